"""Every GPU measurement in one call that fits in 8 minutes on one H100/H200; writes one JSON.

    python benchmarks/gpu.py --out benchmarks/results/gpu_h200.json      # on the GPU machine
    python benchmarks/gpu.py --smoke --out /tmp/gpu_smoke.json           # the same plumbing, tiny, on a CPU

Parts, each a subprocess running the project's own benchmark script (results merged as they were written,
so a part cut short by its time budget keeps what it measured):
1. train_step: one training step of the same imported U-Net, jaxseg vs torch eager vs torch.compile, at
   128^3 x 2, fp32 and bf16, with MFU against 989 TFLOP/s (H100/H200 bf16 dense)
   (benchmarks/train_step_vs_torch.py); jaxseg with the library's strided-conv formulation for the GPU;
2. strided: the jaxseg step again with strided convolutions as space_to_depth and space_to_depth_grad,
   bf16 and fp32, so that jaxseg.models.layers.STRIDED_CONV["gpu"] is chosen on a measurement;
3. sliding_window: a 256^3 volume, 64^3 windows, jaxseg vs MONAI (benchmarks/sliding_window_vs_monai.py);
4. dlb: the DeepLesionBrain ensemble at the paper's setting, 181x217x181, 125 tiles of 96^3, 75 compact
   U-Nets: inference per group size and the vmapped training step (benchmarks/dlb_ensemble.py --paper).

On the GPU image (Python 3.12, jax with CUDA, torch, flax, optax, orbax, tensorstore) the project runs
from the checkout (PYTHONPATH, no install: pyproject's jax pin would replace the CUDA jax); grain,
nibabel, monai and dynamic-network-architectures come as wheels carried in `.whl/`:
    pip download --no-deps -d .whl grain nibabel monai dynamic-network-architectures array-record einops
    # on the device:
    pip install -q --no-deps --no-index .whl/*.whl && PYTHONPATH=. python benchmarks/gpu.py --out $OUT/gpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))


def parts(smoke: bool, tmp: Path) -> list[tuple[str, list[str], float]]:
    """(name, command, seconds budget); budgets sum to 450 s, 30 s under the 8-minute target."""
    py = sys.executable
    if smoke:
        dev = ["--device", "cpu"]
        step = [*dev, "--shape", "32", "--batch", "1", "--features-base", "4", "--steps", "1", "--warmup", "0"]
        sw = [*dev, "--size", "48", "--roi", "32", "--features-base", "4"]
        dlb = ["--groups", "5", "--repeats", "1", "--skip-loop"]
    else:
        dev = ["--device", "gpu"]
        step = [*dev, "--shape", "128", "--batch", "2", "--peak-tflops", "989", "--steps", "5", "--warmup", "2"]
        sw = [*dev, "--size", "256", "--roi", "64"]
        dlb = ["--paper", "--groups", "5,25,75", "--repeats", "2", "--skip-loop"]
    return [
        ("train_step", [py, str(HERE / "train_step_vs_torch.py"), *step, "--strided", "default",
                        "--out", str(tmp / "train_step.json")], 210),
        ("strided", [py, str(HERE / "train_step_vs_torch.py"), *step, "--frameworks", "jaxseg", "--skip-parity",
                     "--strided", "space_to_depth,space_to_depth_grad", "--out", str(tmp / "strided.json")], 90),
        ("sliding_window", [py, str(HERE / "sliding_window_vs_monai.py"), *sw,
                            "--out", str(tmp / "sliding_window.json")], 60),
        ("dlb", [py, str(HERE / "dlb_ensemble.py"), *dlb, "--out", str(tmp / "dlb.json")], 90),
    ]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU: checks the plumbing only")
    ap.add_argument("--budget", type=float, default=470, help="seconds for all parts together")
    ap.add_argument("--only", default="", help="comma-separated part names")
    args = ap.parse_args()

    from common import environment, write_json

    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    if args.smoke:
        env.setdefault("JAX_PLATFORMS", "cpu")
    payload = {"benchmark": "gpu", "smoke": args.smoke, "environment": environment(), "parts": {}}
    deadline = time.monotonic() + args.budget
    only = {p for p in args.only.split(",") if p}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        for name, cmd, budget in parts(args.smoke, tmp):
            if only and name not in only:
                continue
            left = deadline - time.monotonic()
            entry = {"command": " ".join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))}
            if left < 20:
                entry["skipped"] = f"time budget spent ({args.budget:.0f} s)"
            else:
                t0 = time.monotonic()
                try:
                    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=min(budget, left),
                                       cwd=REPO)
                    entry["returncode"] = p.returncode
                    entry["log_tail"] = (p.stdout + p.stderr)[-3000:]
                except subprocess.TimeoutExpired as e:
                    entry["timed_out_after_s"] = round(min(budget, left))
                    out = (e.stdout or b"") + (e.stderr or b"")
                    entry["log_tail"] = (out.decode(errors="replace") if isinstance(out, bytes) else out)[-3000:]
                entry["wall_s"] = round(time.monotonic() - t0, 1)
                result = tmp / f"{name}.json"
                entry["result"] = json.loads(result.read_text()) if result.exists() else None
            payload["parts"][name] = entry
            print(f"{name}: {entry.get('wall_s', 0)} s, rc {entry.get('returncode')}, "
                  f"{'result' if entry.get('result') else 'no result'}"
                  f"{' (' + entry['skipped'] + ')' if 'skipped' in entry else ''}", flush=True)
            write_json(args.out, payload)
    write_json(args.out, payload)


if __name__ == "__main__":
    main()
