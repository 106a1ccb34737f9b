"""Time writing the synthetic default cohort (jaxseg.data.synth.write_cohort).

    .venv/bin/python benchmarks/synth_time.py                      # 100 subjects, 2 mm, 2 workers
    .venv/bin/python benchmarks/synth_time.py --n 20 --spacing 4 --out /tmp/x.json

Writes to a temporary folder (deleted afterwards unless --keep DIR) and records wall time,
time per subject, the machine, package versions and the command in a JSON file
(default benchmarks/results/synth_time.json) and copies the cohort's preview.png next to it
(``<json stem>_preview.png``). The template label map is loaded (and, on a cold
cache, computed) before the clock starts; its time is reported separately.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _versions() -> dict[str, str]:
    out = {"python": platform.python_version()}
    for mod in ("numpy", "scipy", "nibabel", "nilearn", "matplotlib", "tqdm", "jaxseg"):
        try:
            out[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - a missing package is reported, not fatal
            out[mod] = "missing"
    return out


def _du(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=100, help="subjects (default 100)")
    ap.add_argument("--spacing", type=float, default=2.0, help="output spacing, mm (default 2)")
    ap.add_argument("--flavour", choices=("tissue", "lesion"), default="tissue")
    ap.add_argument("--workers", type=int, default=2, help="worker processes (default 2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--keep", type=Path, default=None, help="write the cohort here and keep it")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "synth_time.json")
    args = ap.parse_args(argv)

    from jaxseg.config import SynthConfig
    from jaxseg.data import synth

    t0 = time.perf_counter()
    template = synth.load_template(1 if args.spacing < 3 else 2)
    t_template = time.perf_counter() - t0

    with tempfile.TemporaryDirectory(prefix="synth_time_") as tmp:
        out_dir = args.keep if args.keep is not None else Path(tmp) / "cohort"
        t1 = time.perf_counter()
        # the lesion flavour on control anatomy only
        no_abnormal = {"p_ventriculomegaly": 0.0, "p_cerebellar_hypoplasia": 0.0} if args.flavour == "lesion" else {}
        cfg = SynthConfig(n_subjects=args.n, seed=args.seed, spacing=args.spacing, flavour=args.flavour,
                          **no_abnormal)
        info = synth.write_cohort(out_dir, cfg, workers=args.workers, template=template,
                                  overwrite=args.keep is not None)
        wall = time.perf_counter() - t1
        size = _du(out_dir)
        preview = args.out.with_name(args.out.stem + "_preview.png")
        if info.get("preview"):  # keep the picture of what was timed next to the numbers
            preview.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(info["preview"], preview)
        shape, _ = synth.output_grid(args.spacing)

    result = {
        "benchmark": "synth_time",
        "what": f"write_cohort: {args.n} {args.flavour} subjects at {args.spacing:g} mm "
                f"(nnU-Net raw dataset + metadata.csv + preview.png)",
        "wall_s": round(wall, 2),
        "per_subject_s": round(wall / args.n, 3),
        "subjects_per_s": round(args.n / wall, 3),
        "goal_s": 120.0 if (args.n == 100 and args.spacing == 2.0) else None,
        "template_load_s": round(t_template, 2),
        "n_subjects": args.n,
        "spacing_mm": args.spacing,
        "flavour": args.flavour,
        "workers": args.workers,
        "seed": args.seed,
        "grid_shape": list(shape),
        "dataset_mb": round(size / 2**20, 1),
        "preview_png": ((str(preview.relative_to(ROOT)) if preview.is_relative_to(ROOT)
                         else str(preview)) if info.get("preview") else None),
        "machine": {
            "cpu_count": os.cpu_count(),
            "sched_affinity": (len(os.sched_getaffinity(0))
                               if hasattr(os, "sched_getaffinity") else None),
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        },
        "versions": _versions(),
        "command": " ".join(shlex.quote(a) for a in [sys.executable, *sys.argv]),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    tmp_json = args.out.with_name(f".{args.out.name}.{os.getpid()}.tmp")
    tmp_json.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp_json, args.out)
    print(json.dumps({k: result[k] for k in ("wall_s", "per_subject_s", "template_load_s",
                                              "dataset_mb")}), file=sys.stderr)
    print(f"wrote {args.out}", file=sys.stderr)
    return result


if __name__ == "__main__":
    main()
