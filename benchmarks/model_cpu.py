"""Parameter counts and forward + backward times of the U-Nets on this machine's CPU.

    python benchmarks/model_cpu.py --out benchmarks/results/model_cpu.json

UNet3D (nnU-Net topology, 1 input channel, 8 classes, deep supervision) at 64^3 x batch 2 and the
DeepLesionBrain compact U-Net at 96^3 x batch 1 (its paper's batch), per strided-convolution formulation
(--strided; the compact U-Net has none). Also times single 3x3x3 conv layers: stride 1, and stride 2 in
each formulation (jaxseg.models.layers.STRIDED_CONV).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp

sys.path.insert(0, os.path.dirname(__file__))
from common import environment, set_strided, timeit, write_json  # noqa: E402

from jaxseg.losses import dice_ce  # noqa: E402
from jaxseg.losses.deep_supervision import deep_supervision_loss  # noqa: E402
from jaxseg.dlb.model import CompactUNet
from jaxseg.models import UNet3D, plan_topology  # noqa: E402
from jaxseg.models.layers import conv3d  # noqa: E402


def n_params(tree) -> int:
    return sum(int(a.size) for a in jax.tree.leaves(tree))


def unet_case(impl: str, size: int, batch: int, repeats: int) -> dict:
    topo = plan_topology((size,) * 3)
    set_strided(impl)
    model = UNet3D(num_classes=8, topology=topo)
    x = jax.random.normal(jax.random.key(0), (batch, size, size, size, 1))
    y = jax.random.randint(jax.random.key(1), (batch, size, size, size), 0, 8)
    params = jax.jit(model.init)(jax.random.key(2), x)["params"]

    @jax.jit
    def fwd_bwd(p):
        def loss(p):
            out = model.apply({"params": p}, x)
            return deep_supervision_loss(dice_ce, out.seg, y).mean()
        return jax.value_and_grad(loss)(p)

    return {"model": "UNet3D", "patch": [size] * 3, "batch": batch, "strided": impl,
            "n_stages": topo.n_stages, "features": list(topo.features), "params": n_params(params),
            **timeit(fwd_bwd, params, repeats=repeats)}


def compact_case(repeats: int) -> dict:
    model = CompactUNet(num_classes=2)
    x = jax.random.normal(jax.random.key(0), (1, 96, 96, 96, 2))
    y = jax.random.randint(jax.random.key(1), (1, 96, 96, 96), 0, 2)
    params = jax.jit(model.init)(jax.random.key(2), x)["params"]

    @jax.jit
    def fwd_bwd(p):
        def loss(p):
            logits = model.apply({"params": p}, x, train=True, rngs={"dropout": jax.random.key(3)})
            return dice_ce(logits, y).mean()
        return jax.value_and_grad(loss)(p)

    return {"model": "CompactUNet", "patch": [96] * 3, "batch": 1,
            "params": n_params(params), **timeit(fwd_bwd, params, repeats=repeats)}


def conv_case(impl: str, shape, cout: int, stride: int, repeats: int) -> dict:
    x = jax.random.normal(jax.random.key(0), shape)
    w = jax.random.normal(jax.random.key(1), (3, 3, 3, shape[-1], cout))
    st = (stride,) * 3
    fwd = jax.jit(lambda x, w: conv3d(x, w, st, strided=impl))
    f = jax.jit(jax.grad(lambda x, w: jnp.sum(conv3d(x, w, st, strided=impl) ** 2), argnums=(0, 1)))
    return {"model": "conv3x3x3", "input": list(shape), "cout": cout, "stride": stride,
            "strided": impl if stride > 1 else None, "forward": timeit(fwd, x, w, repeats=repeats),
            **timeit(f, x, w, repeats=repeats)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/model_cpu.json")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--strided", default="default", help="UNet3D strided-conv formulations, comma-separated")
    args = ap.parse_args()
    impls = args.strided.split(",")
    results = []

    def flush():  # after every case: a crash (e.g. out of memory) keeps what was measured
        write_json(args.out, {"benchmark": "model_cpu", "environment": environment(), "results": results})

    for shape, cout in (((2, 48, 48, 48, 8), 8), ((2, 32, 32, 32, 16), 16), ((2, 32, 32, 32, 32), 32),
                        ((2, 16, 16, 16, 128), 128)):
        for stride, impl in ((1, None), (2, "native"), (2, "space_to_depth"), (2, "space_to_depth_grad")):
            results.append(conv_case(impl, shape, 2 * cout if stride > 1 else cout, stride, args.repeats))
            flush()
            r = results[-1]
            print(r["model"], shape, "stride", stride, impl or "", f"fwd {r['forward']['min_s']:.3f} s",
                  f"fwd+bwd {r['min_s']:.3f} s", flush=True)
    cases = [(impl, lambda impl=impl: unet_case(impl, 64, 2, args.repeats)) for impl in impls]
    for impl, case in cases + [(None, lambda: compact_case(args.repeats))]:
        try:
            results.append(case())
        except Exception as e:  # noqa: BLE001 -- record the failure (out of memory) and go on
            results.append({"strided": impl, "error": f"{type(e).__name__}: {str(e)[:300]}"})
            print("failed:", results[-1]["error"], flush=True)
            flush()
            continue
        flush()
        r = results[-1]
        print(r["model"], r["patch"], impl or "", f"{r['params']:,} params", f"fwd+bwd {r['min_s']:.2f} s",
              f"(first call {r['first_call_s']:.1f} s)", flush=True)


if __name__ == "__main__":
    main()
