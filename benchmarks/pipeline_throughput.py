"""Host data pipeline throughput: patches/s read from the tensorstore case store, plus the
on-device augmentation throughput when ``jaxseg.data.augment`` is available.

    python benchmarks/pipeline_throughput.py --out benchmarks/results/pipeline_throughput.json

Data: a synthetic cohort at 1 mm (``synth.write_cohort`` -> ``prepare.prepare``, T1 + T2 like the
neonatal setting; cropped cases of about 110-165 voxels per axis), in a temporary folder; with
``--data random`` (or when the synthetic cohort cannot be built) random smooth volumes of
``--shape`` written with ``store.write_case``.

Measured per configuration (global batch 2, one process): a fresh ``PatchBatchIterator``,
``--warmup`` batches, then ``--batches`` batches timed back to back (the consumer never waits
on anything else, so this is the read throughput, i.e. an upper bound on what the host can feed).
Configurations: patch 64^3 and 128^3 x threads 1 and 2 with the uniform (grain) path; the
hardness-weighted (live draw) path; and a 128^3 patch with a 16-voxel margin (160^3 region, what
rotation/scaling on the device needs). Every read hits tensorstore (no chunk cache), i.e. the OS
page cache + blosc/zstd decompression.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
from common import environment, write_json  # noqa: E402

from jaxseg.data import store  # noqa: E402
from jaxseg.data.pipeline import CaseSampler, CaseSource, PatchBatchIterator  # noqa: E402


def _load() -> list[float]:
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except OSError:
        return []


def build_synth(root: Path, n: int, spacing: float) -> dict:
    from jaxseg.data.prepare import prepare
    from jaxseg.config import SynthConfig
    from jaxseg.data.synth import write_cohort

    t0 = time.perf_counter()
    write_cohort(root / "raw", SynthConfig(n_subjects=n, spacing=spacing, n_test=0), channels=("T1", "T2"), workers=2,
                 progress=False, preview=False, overwrite=True)
    prepare(root / "raw", root / "store", num_workers=2, progress=False)
    return {"kind": "synth", "spacing_mm": spacing, "build_s": round(time.perf_counter() - t0, 2)}


def build_random(root: Path, n: int, shape) -> dict:
    t0 = time.perf_counter()
    rng = np.random.default_rng(0)
    for i in range(n):
        coarse = rng.standard_normal((8, 8, 8, 2)).astype(np.float32)
        reps = [int(np.ceil(s / 8)) for s in shape]
        smooth = np.kron(coarse, np.ones((*reps, 1), np.float32))[: shape[0], : shape[1], : shape[2]]
        image = smooth + 0.1 * rng.standard_normal((*shape, 2)).astype(np.float32)
        label = np.digitize(smooth[..., 0], [-0.5, 0.3, 1.0]).astype(np.uint8)
        store.write_case(root / "store", f"rand_{i:03d}", image, label, {"split": "train"})
    return {"kind": "random", "shape": list(shape), "build_s": round(time.perf_counter() - t0, 2)}


def measure(src: CaseSource, *, patch: int, margin: int, threads: int, mode: str, warmup: int,
            batches: int, prefetch: int = 2, batch_size: int = 2) -> dict:
    sampler = CaseSampler(len(src), mode=mode, seed=0)
    it = PatchBatchIterator(src, sampler, batch_size=batch_size, patch_size=patch, margin=margin,
                            threads=threads, prefetch=prefetch, seed=0, process_index=0,
                            process_count=1)
    try:
        for _ in range(warmup):
            b = next(it)
            if mode == "hardness":
                sampler.update(b["case_index"], np.abs(b["image"]).mean(axis=(1, 2, 3, 4)))
        t0 = time.perf_counter()
        nbytes = 0
        for _ in range(batches):
            b = next(it)
            nbytes += b["image"].nbytes + b["label"].nbytes
            if mode == "hardness":  # the loop a DRO run does: update, then the next draw sees it
                sampler.update(b["case_index"], np.abs(b["image"]).mean(axis=(1, 2, 3, 4)))
        dt = time.perf_counter() - t0
    finally:
        it.close()
    region = patch + 2 * margin
    return {
        "patch": patch, "margin": margin, "region": region, "threads": threads, "sampler": mode,
        "path": "live draw + thread pool" if it.live else "grain MapDataset prefetch",
        "prefetch_batches": prefetch if not it.live else 0, "batch_size": batch_size,
        "batches": batches, "seconds": round(dt, 3),
        "patches_per_s": round(batches * batch_size / dt, 2),
        "batches_per_s": round(batches / dt, 3),
        "ms_per_batch": round(1e3 * dt / batches, 1),
        "MB_per_s": round(nbytes / dt / 1e6, 1),
    }


def augment_throughput(channels: int, sizes, budget_s: float) -> dict:
    try:
        import jax
        import jax.numpy as jnp
        from jaxseg.data.augment import PRESETS, augment
    except Exception as e:  # being written elsewhere: skip with a note
        return {"skipped": f"jaxseg.data.augment unavailable: {type(e).__name__}: {e}"}
    out = {"preset": "nnunet", "backend": jax.default_backend(), "results": []}
    t_start = time.perf_counter()
    for patch, margin, repeats in sizes:
        if time.perf_counter() - t_start > budget_s:
            out["results"].append({"patch": patch, "skipped": f"time budget {budget_s}s spent"})
            continue
        region = patch + 2 * margin
        try:
            fn = jax.jit(lambda k, x, y, m, ps=patch: augment(k, x, y, m, PRESETS["nnunet"],
                                                              out_shape=(ps,) * 3))
            key = jax.random.key(0)
            x = jax.random.normal(key, (2, region, region, region, channels), jnp.float32)
            y = jax.random.randint(jax.random.fold_in(key, 1), x.shape[:4], 0, 8)
            m = jnp.ones(x.shape[:4], jnp.float32)
            t0 = time.perf_counter()
            jax.block_until_ready(fn(jax.random.fold_in(key, 2), x, y, m))
            compile_s = time.perf_counter() - t0
            times = []
            for i in range(repeats):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(jax.random.fold_in(key, 3 + i), x, y, m))
                times.append(time.perf_counter() - t0)
            med = float(np.median(times))
            out["results"].append({
                "patch": patch, "region": region, "batch_size": 2, "channels": channels,
                "compile_s": round(compile_s, 2), "times_s": [round(t, 3) for t in times],
                "median_s": round(med, 3), "patches_per_s": round(2 / med, 2)})
        except Exception as e:
            out["results"].append({"patch": patch, "error": f"{type(e).__name__}: {e}",
                                   "traceback": traceback.format_exc(limit=3)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/pipeline_throughput.json")
    ap.add_argument("--data", choices=("synth", "random"), default="synth")
    ap.add_argument("--cases", type=int, default=4)
    ap.add_argument("--spacing", type=float, default=1.0)
    ap.add_argument("--shape", type=int, nargs=3, default=(160, 160, 160))
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--batches", type=int, default=100)
    ap.add_argument("--batches-128", type=int, default=40)
    ap.add_argument("--augment-budget-s", type=float, default=90.0)
    ap.add_argument("--no-augment", action="store_true")
    args = ap.parse_args()

    env = environment()
    load_before = _load()
    tmp = Path(tempfile.mkdtemp(prefix="jaxseg-pipeline-bench-"))
    try:
        try:
            data = build_synth(tmp, args.cases, args.spacing) if args.data == "synth" else None
        except Exception as e:
            print(f"synthetic cohort failed ({type(e).__name__}: {e}); using random volumes")
            data = None
        if data is None:
            data = build_random(tmp, args.cases, tuple(args.shape))
        src = CaseSource(tmp / "store")
        data["cases"] = len(src)
        data["shapes"] = [list(s) for s in src.shapes]
        data["channels"] = src.n_channels
        data["store_mb"] = round(sum(f.stat().st_size for f in (tmp / "store").rglob("*")
                                     if f.is_file()) / 1e6, 1)
        print("data:", data, flush=True)

        configs = []
        for patch in (64, 128):
            for threads in (1, 2):
                configs.append(dict(patch=patch, margin=0, threads=threads, mode="uniform"))
            configs.append(dict(patch=patch, margin=0, threads=2, mode="hardness"))
        configs.append(dict(patch=128, margin=16, threads=2, mode="uniform"))
        results = []
        for c in configs:
            n = args.batches if c["patch"] <= 64 else args.batches_128
            r = measure(src, warmup=args.warmup, batches=n, **c)
            r["load_avg"] = _load()
            print(r, flush=True)
            results.append(r)

        aug = ({"skipped": "--no-augment"} if args.no_augment else
               augment_throughput(src.n_channels, [(64, 8, 3), (128, 16, 2)], args.augment_budget_s))
        print("augment:", aug, flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    payload = {
        "benchmark": "pipeline_throughput",
        "what": "patches/s of jaxseg.data.pipeline.PatchBatchIterator from a tensorstore case store "
                "(host, numpy), and jitted jaxseg.data.augment throughput on the default JAX backend",
        **env,
        "machine": {"cpu_count": os.cpu_count(),
                    "sched_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
                    "platform": env["platform"], "load_avg_before": load_before, "load_avg_after": _load()},
        "data": data,
        "pipeline": results,
        "augment": aug,
        "notes": [
            "batch 2 = global batch of one process; patches/s = batches * 2 / wall time of the timed loop",
            "uniform sampler: grain MapDataset.map(read).to_iter_dataset(ReadOptions(num_threads, "
            "prefetch_buffer_size=2 batches)).batch; hardness sampler: drawn at next() (live table), "
            "reads threaded, no read-ahead",
            "tensorstore decompresses with its own thread pool too, so threads=1 still uses both cores",
            "the shared 2-core machine was loaded by other jobs (see load_avg): numbers are lower bounds",
        ],
    }
    write_json(args.out, payload)
    print("wrote", args.out)


if __name__ == "__main__":
    main()
