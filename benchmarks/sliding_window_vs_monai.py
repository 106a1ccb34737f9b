"""Whole-volume sliding-window inference: jaxseg (jaxseg.inference.sliding_window) vs MONAI
(monai.inferers.sliding_window_inference) with the same network and weights.

    python benchmarks/sliding_window_vs_monai.py --out benchmarks/results/sliding_window_vs_monai_cpu.json
    python benchmarks/sliding_window_vs_monai.py --size 256 --features-base 32 \\
        --out benchmarks/results/sliding_window_vs_monai_cpu256.json              # the full size (slow on CPU)
    python benchmarks/sliding_window_vs_monai.py --device gpu --size 256 --roi 128 \\
        --out benchmarks/results/sliding_window_vs_monai_gpu.json

The network is benchmarks/train_step_vs_torch.py's: nnU-Net's PlainConvUNet planned for the --roi
patch (8 classes, 1 channel), built in PyTorch and imported into jaxseg (the JSON records the max abs
logit difference on one window). MONAI runs the torch model (eager, torch.no_grad), jaxseg its jitted
UNet3D (make_apply_fn). Both: window --roi^3, overlap 0.5 (jaxseg step 0.5: the window positions are the
same when (size - roi) is a multiple of roi / 2), --sw-batch windows per call, Gaussian blending with
sigma = roi / 8 using the same importance map: MONAI's compute_importance_map("gaussian", 0.125),
which clamps the weights at 1e-3, passed to jaxseg as importance_map (jaxseg's own map replaces only
exact zeros; --native-maps gives each its own map, and then the outputs differ where the weights are
tiny). fp32 on both sides.

CPU default: a 128^3 volume with features_base 16 (27 windows of 64^3), which takes minutes on 2 cores;
the full 256^3 with features 32 (343 windows) is reachable with --size 256 --features-base 32.

Each framework runs in its own subprocess. Reported: the first call (one batch of windows: jaxseg's
XLA compilation, torch's first-call set-up) apart from the whole-volume time (median of --repeats
runs after it), voxels/s, peak memory (CPU: peak RSS during the timed runs minus the RSS after
set-up, and minus the RSS after the first call; GPU: jax peak_bytes_in_use / torch
max_memory_allocated), and the agreement of the fused outputs: max abs difference of the logits and
of the softmax probabilities, and the fraction of voxels with the same argmax.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import train_step_vs_torch as ts  # noqa: E402


def _volume(size: int, seed: int) -> np.ndarray:
    x, _ = ts.batch((size,) * 3, 1, seed)
    return x[0]  # (X, Y, Z, 1)


def _monai_map(roi: int, mode: str) -> np.ndarray:
    from monai.data.utils import compute_importance_map

    return compute_importance_map((roi,) * 3, mode=mode, sigma_scale=0.125).numpy().astype(np.float32)


def worker_jaxseg(spec: dict) -> dict:
    if spec["device"] == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax

    from jaxseg import runtime
    from jaxseg.inference.predict import make_apply_fn
    from jaxseg.inference.sliding_window import sliding_window_logits

    roi = (spec["roi"],) * 3
    vol = _volume(spec["size"], spec["seed"])
    model, params = ts.jax_unet(ts.load_npz(spec["weights"]), spec["arch"], roi, strided=spec["strided"],
                                dtype="float32")
    apply_fn = make_apply_fn(model, {"params": jax.device_put(params)})
    imap = None if spec["native_maps"] else _monai_map(spec["roi"], spec["mode"])
    if spec["mode"] == "constant":
        imap = np.ones(roi, np.float32)
    base = ts.rss_bytes()
    t0 = time.perf_counter()
    from jaxseg.inference.sliding_window import window_starts

    bsz = min(spec["sw_batch"], len(window_starts(vol.shape[:3], roi, spec["overlap"])))  # the batch it runs
    window_logits = np.asarray(apply_fn(np.zeros((bsz, *roi, 1), np.float32)))  # compiles
    first = time.perf_counter() - t0
    warm = ts.rss_bytes()
    reset = spec["device"] == "cpu" and ts.reset_peak_rss()
    times, out = [], None
    for _ in range(spec["repeats"]):
        t = time.perf_counter()
        out, extra = sliding_window_logits(apply_fn, vol, roi, ts.NUM_CLASSES, step=spec["overlap"],
                                           window_batch=spec["sw_batch"], importance_map=imap)
        times.append(time.perf_counter() - t)
    np.save(spec["out_logits"], out)
    res = {"first_call_s": first, "times_s": times, "median_s": statistics.median(times),
           "n_windows": extra["n_windows"], "window_starts_per_axis": [sorted({s[a] for s in extra["starts"]})
                                                                      for a in range(3)],
           "blend": "jaxseg native gaussian (sigma 1/8, zeros replaced)" if imap is None else
           f"MONAI compute_importance_map({spec['mode']!r}, sigma_scale=0.125)",
           "backend": jax.default_backend(), "first_window_logit_abs_max": float(np.abs(window_logits).max()),
           "jaxseg_runtime": runtime.record()}
    if spec["device"] == "cpu":
        res.update(ts.cpu_memory(base, reset, warm))
    else:
        stats = jax.devices()[0].memory_stats() or {}
        res.update(peak_mem_bytes=stats.get("peak_bytes_in_use"), peak_mem_kind="jax peak_bytes_in_use")
    return res


def worker_monai(spec: dict) -> dict:
    import torch
    from monai.inferers import sliding_window_inference

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    gpu = spec["device"] == "gpu"
    dev = torch.device("cuda" if gpu else "cpu")
    roi = (spec["roi"],) * 3
    vol = _volume(spec["size"], spec["seed"])
    model = ts.torch_unet(spec["arch"])
    model.load_state_dict({k: torch.from_numpy(v) for k, v in ts.load_npz(spec["weights"]).items()})
    model = model.to(dev).eval()
    x = torch.from_numpy(np.ascontiguousarray(vol.transpose(3, 0, 1, 2))[None]).to(dev)
    kw = dict(roi_size=roi, sw_batch_size=spec["sw_batch"], predictor=model, overlap=spec["overlap"],
              mode=spec["mode"], sigma_scale=0.125, sw_device=dev, device=dev)
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    base = ts.rss_bytes()
    with torch.no_grad():
        t0 = time.perf_counter()
        model(torch.zeros((spec["sw_batch"], 1, *roi), device=dev))
        sync()
        first = time.perf_counter() - t0
        warm = ts.rss_bytes()
        reset = not gpu and ts.reset_peak_rss()
        times = []
        for _ in range(spec["repeats"]):
            sync()
            t = time.perf_counter()
            out = sliding_window_inference(x, **kw)
            sync()
            times.append(time.perf_counter() - t)
    np.save(spec["out_logits"], out[0].float().cpu().numpy().transpose(1, 2, 3, 0))
    res = {"first_call_s": first, "times_s": times, "median_s": statistics.median(times),
           "blend": f"MONAI {spec['mode']} (sigma_scale 0.125)", "torch_threads": torch.get_num_threads()}
    if gpu:
        res.update(peak_mem_bytes=int(torch.cuda.max_memory_allocated()), peak_mem_kind="torch max_memory_allocated")
    else:
        res.update(ts.cpu_memory(base, reset, warm))
    return res


def worker_parity(spec: dict) -> dict:
    """Max abs logit difference of the two models on one window (fp32)."""
    if spec["device"] == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import torch

    jax.config.update("jax_default_matmul_precision", "highest")  # no TF32 on GPU: the same model

    roi = (spec["roi"],) * 3
    w = ts.load_npz(spec["weights"])
    x = _volume(spec["size"], spec["seed"])[None, :spec["roi"], :spec["roi"], :spec["roi"]]
    tm = ts.torch_unet(spec["arch"])
    tm.load_state_dict({k: torch.from_numpy(v) for k, v in w.items()})
    with torch.no_grad():
        t = tm.eval()(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3)))).numpy()
    model, params = ts.jax_unet(w, spec["arch"], roi, strided=spec["strided"], dtype="float32")
    j = np.asarray(jax.jit(lambda p, x: model.apply({"params": p}, x).seg[0])(params, x))
    return {"max_abs_logit_diff": float(np.abs(j - t.transpose(0, 2, 3, 4, 1)).max()),
            "max_abs_logit": float(np.abs(t).max()), "n_params": int(sum(v.size for v in jax.tree.leaves(params))),
            "n_params_torch": int(sum(p.numel() for p in tm.parameters()))}


def compare(a_path: Path, b_path: Path, chunk: int = 16) -> dict:
    """Agreement of two (X, Y, Z, K) logit volumes, read in slabs along X."""
    a, b = np.load(a_path, mmap_mode="r"), np.load(b_path, mmap_mode="r")
    if a.shape != b.shape:
        return {"error": f"shapes differ: {a.shape} vs {b.shape}"}
    dl = dp = 0.0
    same = 0
    for i in range(0, a.shape[0], chunk):
        x, y = np.asarray(a[i:i + chunk], np.float64), np.asarray(b[i:i + chunk], np.float64)
        dl = max(dl, float(np.abs(x - y).max()))
        px = np.exp(x - x.max(-1, keepdims=True))
        px /= px.sum(-1, keepdims=True)
        py = np.exp(y - y.max(-1, keepdims=True))
        py /= py.sum(-1, keepdims=True)
        dp = max(dp, float(np.abs(px - py).max()))
        same += int((x.argmax(-1) == y.argmax(-1)).sum())
    return {"max_abs_logit_diff": dl, "max_abs_prob_diff": dp,
            "argmax_agreement": same / int(np.prod(a.shape[:3])), "max_abs_logit": float(np.abs(b).max())}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/sliding_window_vs_monai_cpu.json")
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--size", type=int, default=None, help="cubic volume edge (default: 128 on CPU, 256 on GPU)")
    ap.add_argument("--roi", type=int, default=64, help="window edge (the network is planned for it)")
    ap.add_argument("--features-base", type=int, default=None, help="default: 16 on CPU, 32 on GPU")
    ap.add_argument("--sw-batch", type=int, default=4, help="windows per network call (both)")
    ap.add_argument("--overlap", type=float, default=0.5)
    ap.add_argument("--mode", choices=("gaussian", "constant"), default="gaussian")
    ap.add_argument("--native-maps", action="store_true", help="each framework its own Gaussian map")
    ap.add_argument("--strided", default="default",
                    help="jaxseg strided-conv formulation: default (the library's), native, space_to_depth, "
                         "space_to_depth_grad")
    ap.add_argument("--repeats", type=int, default=1, help="whole-volume runs after the first call (median)")
    ap.add_argument("--frameworks", default="jaxseg,monai")
    ap.add_argument("--torch-threads", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per framework")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        spec = json.loads(args.worker)
        fn = {"jaxseg": worker_jaxseg, "monai": worker_monai, "parity": worker_parity}[spec["framework"]]
        Path(args.worker_out).write_text(json.dumps(fn(spec)))
        return

    from common import environment, write_json

    size = args.size or (128 if args.device == "cpu" else 256)
    fb = args.features_base or (16 if args.device == "cpu" else 32)
    if size < args.roi:
        ap.error(f"--size {size} is smaller than --roi {args.roi}")
    arch = ts.unet_arch(args.roi, fb)
    frameworks = args.frameworks.split(",")
    payload = {"benchmark": "sliding_window_vs_monai", "environment": environment(),
               "settings": {"device": args.device, "volume": [size] * 3, "roi": [args.roi] * 3, "arch": arch,
                            "features_base": fb, "num_classes": ts.NUM_CLASSES, "in_channels": ts.IN_CHANNELS,
                            "sw_batch": args.sw_batch, "overlap": args.overlap, "mode": args.mode,
                            "sigma_scale": 0.125, "same_importance_map": not args.native_maps,
                            "strided": args.strided, "repeats": args.repeats, "dtype": "float32"},
               "parity": None, "results": [], "agreement": None}
    vox = size ** 3
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        base = dict(arch=arch, size=size, roi=args.roi, seed=args.seed, device=args.device, sw_batch=args.sw_batch,
                    overlap=args.overlap, mode=args.mode, native_maps=args.native_maps, strided=args.strided,
                    repeats=args.repeats, threads=args.torch_threads,
                    weights=str(ts.make_weights(arch, tmp, args.seed)))
        script = Path(__file__)
        payload["parity"] = ts.run_worker(script, dict(base, framework="parity"), args.timeout)
        print("parity (one window):", payload["parity"], flush=True)
        write_json(args.out, payload)
        outputs = {}
        for fw in frameworks:
            outputs[fw] = tmp / f"{fw}.npy"
            r = ts.run_worker(script, dict(base, framework=fw, out_logits=str(outputs[fw])), args.timeout)
            r = {"framework": fw, **r}
            if "median_s" in r:
                r["volumes_per_s"] = 1.0 / r["median_s"]
                r["voxels_per_s"] = vox / r["median_s"]
                print(f"{fw:7s} volume {r['median_s']:.2f} s (first call {r['first_call_s']:.2f} s), peak mem "
                      f"{(r.get('peak_mem_bytes') or 0) / 2**30:.2f} GiB", flush=True)
            else:
                print(f"{fw:7s} failed: {r['error']}", flush=True)
            payload["results"].append(r)
            write_json(args.out, payload)
        ok = [fw for fw in frameworks if outputs[fw].exists()]
        if len(ok) == 2:
            payload["agreement"] = compare(outputs[ok[0]], outputs[ok[1]])
            print("agreement:", payload["agreement"], flush=True)
        times = {r["framework"]: r["median_s"] for r in payload["results"] if "median_s" in r}
        if "jaxseg" in times and "monai" in times:
            payload["jaxseg_over_monai_time"] = times["jaxseg"] / times["monai"]
            print(f"ratio jaxseg / monai: {payload['jaxseg_over_monai_time']:.2f}x")
        write_json(args.out, payload)


if __name__ == "__main__":
    main()
