"""DeepLesionBrain ensemble timings: whole-volume inference (vmapped vs a Python loop over networks)
and the training step per tile group.

    python benchmarks/dlb_ensemble.py --out benchmarks/results/dlb_ensemble_cpu.json            # CPU, reduced
    python benchmarks/dlb_ensemble.py --paper --out benchmarks/results/dlb_ensemble_gpu.json    # GPU, the paper's

`--paper`: one 181x217x181 volume, 125 tiles of 96^3 (reference grid), 75 compact U-Nets of 24-...-384
filters, 2 channels (the paper needed 38 s per volume on a Titan Xp, networks loaded one by one).
Default (CPU-sized, the setting of configs/dlb_ablation_synth.yaml): the same 5x5x5 grid on a 3 mm volume
(57x70x56), 24^3 tiles, 4-...-64 filters.
The training step is timed for the whole ensemble with each group size (networks vmapped together; group
size 1: one jitted network step at a time, the CPU form).
"""

from __future__ import annotations

import argparse
import os
import sys

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import optax  # noqa: E402

sys.path.insert(0, os.path.dirname(__file__))
from common import environment, timeit, write_json  # noqa: E402

from jaxseg.data.augment import NONE  # noqa: E402
from jaxseg.dlb.model import CompactUNet  # noqa: E402
from jaxseg.dlb import ensemble as ens  # noqa: E402
from jaxseg.dlb.grid import make_grid, reference_grid  # noqa: E402
from jaxseg.dlb.predict import make_loop_predictor, make_predictor  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--paper", action="store_true", help="the paper's sizes (needs a GPU)")
    ap.add_argument("--groups", default="5,25,75", help="group sizes for inference and the train step")
    ap.add_argument("--train-groups", default=None,
                    help="group sizes for the train step (default: --groups); 1 = one jitted network at a time")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--skip-loop", action="store_true")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    if args.paper:
        grid, base = reference_grid(), 24
    else:
        grid, base = make_grid((57, 70, 56), 24, 5), 4
    model = CompactUNet(num_classes=2, features=tuple(base * 2**i for i in range(5)))
    params = ens.init_stacked(model, jax.random.PRNGKey(0), grid.n_networks, grid.tile + (2,))
    vol = jax.random.normal(jax.random.PRNGKey(1), grid.shape + (2,))
    result = {"env": environment(), "setting": "paper" if args.paper else "cpu_reduced",
              "volume": list(grid.shape), "tile": list(grid.tile), "tiles": grid.n_tiles,
              "networks": grid.n_networks, "features": list(model.features),
              "params_per_network": sum(int(x.size) // grid.n_networks for x in jax.tree.leaves(params)),
              "inference": [], "train_step": []}
    out = args.out

    groups = [int(g) for g in args.groups.split(",")]
    for g in groups:
        fn = make_predictor(model, grid, group_size=g)
        try:
            r = timeit(lambda p, v: fn(p, v)[0], params, vol, repeats=args.repeats)
        except Exception as e:  # out of memory at large groups: record and go on
            r = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        result["inference"].append({"mode": "vmapped", "group_size": g, **r})
        print("inference vmapped group", g, r.get("median_s", r.get("error")), flush=True)
        write_json(out, result)
    if not args.skip_loop:
        fn = make_loop_predictor(model, grid)
        r = timeit(lambda p, v: fn(p, v)[0], params, vol, repeats=args.repeats)
        result["inference"].append({"mode": "python_loop", **r})
        print("inference loop", r["median_s"], flush=True)
        write_json(out, result)

    tx = optax.adam(1e-4)
    net_step = ens.make_net_step(model, tx, NONE)
    n = grid.n_networks
    rng = np.random.default_rng(0)
    img = jnp.asarray(rng.normal(size=(n, 1) + grid.tile + (2,)).astype(np.float32))
    lab = jnp.asarray((rng.random((n, 1) + grid.tile) < 0.02).astype(np.int32))
    keys = ens.step_keys(jax.random.PRNGKey(2), 0, n)
    active = jnp.ones(n, bool)
    for g in ([int(v) for v in args.train_groups.split(",")] if args.train_groups else groups):
        step = ens.ensemble_step(net_step, g)
        state = ens.init_state(jax.tree.map(jnp.copy, params), tx)
        holder = {"state": state}

        def run():
            holder["state"], losses = step(holder["state"], img, lab, keys, active)
            return losses

        try:
            r = timeit(run, repeats=args.repeats)
            r["per_group_s"] = r["median_s"] / -(-n // g)
        except Exception as e:
            r = {"error": f"{type(e).__name__}: {str(e)[:200]}"}
        result["train_step"].append({"group_size": g, "batch_per_network": 1, **r})
        print("train step group", g, r.get("median_s", r.get("error")), flush=True)
        write_json(out, result)


if __name__ == "__main__":
    main()
