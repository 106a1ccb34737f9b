"""Does the host pipeline keep the training step busy? The real training loop (`train_and_evaluate`) fed by
the grain pipeline from a tensorstore store, against the same loop fed one in-memory batch over and over.

    python benchmarks/pipeline_fed_step.py --out benchmarks/results/pipeline_fed_step_cpu.json

Data: a synthetic cohort (`write_cohort` -> `prepare`) in a temporary folder. For each sampler (uniform,
and DRO's hardness sampling, whose draw needs the previous step's losses and so cannot read ahead) the loop
runs `--steps` steps twice in fresh run directories: once as configured, once with the loop's
`PatchBatchIterator` replaced by one that reads its first batch from the store and then returns that batch
every time (same shapes, same step, same per-step host work: sharding the batch, the DRO table update,
logging). Step times come from metrics.jsonl (`train.log_every=1`); the first `--skip` steps (compilation)
are left out; the median is reported. ratio = fed / in-memory (1.0: the pipeline costs nothing).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, os.path.dirname(__file__))
from common import environment, write_json  # noqa: E402

from jaxseg.config import load_config  # noqa: E402
from jaxseg.train import loop  # noqa: E402


class InMemoryIterator(loop.PatchBatchIterator):
    """The first batch from the store, then that batch again: no reads after the first."""

    _cached = None

    def __next__(self):
        if self._cached is None:
            self._cached = super().__next__()
        return self._cached


def step_times(cfg, workdir: Path, in_memory: bool) -> list[float]:
    real = loop.PatchBatchIterator
    loop.PatchBatchIterator = InMemoryIterator if in_memory else real
    try:
        loop.train_and_evaluate(cfg, workdir, progress=False)
    finally:
        loop.PatchBatchIterator = real
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return [1.0 / r["steps_per_s"] for r in rows if "steps_per_s" in r]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/pipeline_fed_step_cpu.json")
    ap.add_argument("--subjects", type=int, default=16)
    ap.add_argument("--spacing", type=float, default=2.0, help="mm of the synthetic cohort")
    ap.add_argument("--steps", type=int, default=14)
    ap.add_argument("--skip", type=int, default=4, help="first steps left out (compilation)")
    ap.add_argument("--repeats", type=int, default=2, help="fed / in-memory runs alternated, per sampler")
    ap.add_argument("overrides", nargs="*", help="config overrides for the training runs")
    args = ap.parse_args()

    from jaxseg.data.prepare import prepare
    from jaxseg.config import SynthConfig
    from jaxseg.data.synth import write_cohort

    tmp = Path(tempfile.mkdtemp(prefix="jaxseg-fed-step-"))
    base = ["data.patch_size=[64,64,64]", "data.batch_size=2", "data.fold=all", "data.augment=nnunet",
            "data.num_classes=8", "model.features_base=16", "model.features_max=128", "optim.kind=adam",
            "optim.lr=0.001", "train.epochs=1", f"train.steps_per_epoch={args.steps}", "train.log_every=1",
            f"train.checkpoint_every={args.steps}", "dro.log_every=1000"]
    payload = {"benchmark": "pipeline_fed_step", "environment": environment(),
               "settings": {"subjects": args.subjects, "spacing_mm": args.spacing, "steps": args.steps,
                            "skip": args.skip, "repeats": args.repeats, "overrides": base + args.overrides},
               "results": []}
    try:
        write_cohort(tmp / "raw", SynthConfig(n_subjects=args.subjects, spacing=args.spacing, n_test=0), workers=2,
                     progress=False, preview=False)
        prepare(tmp / "raw", tmp / "store", num_workers=2, progress=False)
        for sampler, extra in (("uniform", ["dro.enabled=false"]),
                               ("hardness (DRO)", ["dro.enabled=true", "dro.mode=sampling"])):
            cfg = load_config(None, [f"data.store={tmp / 'store'}", *base, *extra, *args.overrides])
            times = {"fed": [], "in_memory": []}
            for rep in range(args.repeats):
                for kind in ("fed", "in_memory"):
                    wd = tmp / f"run_{len(payload['results'])}_{kind}_{rep}"
                    times[kind] += step_times(cfg, wd, kind == "in_memory")[args.skip:]
                    shutil.rmtree(wd, ignore_errors=True)
            med = {k: statistics.median(v) for k, v in times.items()}
            r = {"sampler": sampler, "step_s_fed": med["fed"], "step_s_in_memory": med["in_memory"],
                 "ratio_fed_over_in_memory": med["fed"] / med["in_memory"], "times_s": times}
            payload["results"].append(r)
            print(f"{sampler}: fed {med['fed']:.3f} s/step, in memory {med['in_memory']:.3f} s/step, "
                  f"ratio {r['ratio_fed_over_in_memory']:.3f}", flush=True)
            write_json(args.out, payload)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    write_json(args.out, payload)


if __name__ == "__main__":
    main()
