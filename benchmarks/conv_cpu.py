"""The CPU convolution gap: 3D convolution forward + backward in PyTorch and in JAX (each strided-conv
formulation of jaxseg.models.layers),
for one reference layer under XLA flag variants, and for every distinct conv layer of the U-Net.

    python benchmarks/conv_cpu.py --out benchmarks/results/conv_cpu.json

1. Reference layer: 3x3x3 conv, 32 -> 32 channels, on 2x32x64^3, stride 1, no bias. Forward and
   backward = y = conv(x, w) and the input and weight gradients for a fixed output cotangent (jax:
   `jax.vjp`, y returned too so the forward is not dead code; torch: `y.backward(ct)`).
   - torch: NCDHW (contiguous) and NDHWC (channels_last_3d memory format);
   - jax: jaxseg's conv3d (lax.conv_general_dilated, NDHWC/DHWIO), once per XLA_FLAGS variant
     (--xla-variants; default: none, and the oneDNN pair jaxseg sets: --xla_cpu_use_onednn=true
     --xla_cpu_experimental_onednn_custom_call=true). JAXSEG_ONEDNN=0 in every jax worker, so that a
     variant's flags are exactly what XLA sees.
     Each variant runs in its own process: XLA aborts the process on a flag it does not know (or a
     value it does not accept), which is recorded as "rejected" (probed first); for an accepted
     variant the JSON says which library fusions the compiled HLO holds (onednn, ynn_fusion: jaxlib
     0.10 sends dots to YNNPACK by default; no flag of it sends a convolution to a library).
2. Per layer: every distinct convolution shape of benchmarks/train_step_vs_torch.py's U-Net (nnU-Net's
   PlainConvUNet planned for --unet-size^3, features 32..320, batch --batch): encoder convs (the
   strided first conv of each stage), decoder convs (on the concatenated skip: 2C -> C), with how often
   each occurs in one forward pass; jax per strided formulation (--strided: native, space_to_depth,
   space_to_depth_grad; stride-1 layers once) vs torch (NCDHW; and NDHWC with
   --layer-torch-layouts). The first layer (1 input channel) computes the weight gradient only, as in
   training. Transposed convs and the 1x1x1 head are not convolutions in jaxseg (matmuls) and are left
   out. --layer-xla-variants repeats the jax part under other flag variants.

Times: first call apart (jit compile / oneDNN primitive creation), then the median of --repeats.
Every framework x variant runs in a separate process (one at a time).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import train_step_vs_torch as ts  # noqa: E402

from jaxseg.runtime import ONEDNN_FLAGS  # noqa: E402

DEFAULT_VARIANTS = ";" + " ".join(ONEDNN_FLAGS)


def _timed(fn, repeats: int, sync) -> dict:
    t0 = time.perf_counter()
    sync(fn())
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        sync(fn())
        times.append(time.perf_counter() - t)
    return {"first_call_s": first, "times_s": times, "median_s": statistics.median(times), "min_s": min(times)}


def unet_layers(size: int, batch: int, features_base: int = 32) -> list[dict]:
    """Distinct conv shapes of the U-Net's forward pass with their counts (NDHWC input shapes)."""
    arch = ts.unet_arch(size, features_base)
    feats, strides, kernels = arch["features_per_stage"], arch["strides"], arch["kernel_sizes"]
    res = np.array([size] * 3)
    layers: dict[tuple, dict] = {}

    def add(where, res_in, cin, cout, k, s, input_grad=True):
        key = (tuple(int(r) for r in res_in), cin, cout, tuple(k), tuple(s), input_grad)
        if key in layers:
            layers[key]["count"] += 1
            layers[key]["where"].append(where)
        else:
            layers[key] = {"input": [batch, *key[0], cin], "cout": cout, "kernel": list(k), "stride": list(s),
                           "input_grad": input_grad, "count": 1, "where": [where]}

    cin, res_stage = ts.IN_CHANNELS, []
    for i, (f, s, k) in enumerate(zip(feats, strides, kernels)):
        add(f"encoder_{i}.conv0", res, cin, f, k, s, input_grad=i > 0)
        res = res // np.array(s)
        add(f"encoder_{i}.conv1", res, f, f, k, (1, 1, 1))
        res_stage.append(res)
        cin = f
    for i in range(len(feats) - 2, -1, -1):
        add(f"decoder_{i}.conv0", res_stage[i], 2 * feats[i], feats[i], kernels[i], (1, 1, 1))
        add(f"decoder_{i}.conv1", res_stage[i], feats[i], feats[i], kernels[i], (1, 1, 1))
    return list(layers.values())


def reference_layer(args) -> dict:
    c = args.channels
    return {"input": [args.batch, args.size, args.size, args.size, c], "cout": c, "kernel": [3, 3, 3],
            "stride": [1, 1, 1], "input_grad": True, "count": 1, "where": ["reference"]}


# ------------------------------------------------------------------------------ workers


def worker_jax(spec: dict) -> dict:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import jax.numpy as jnp

    from jaxseg.models.layers import conv3d

    out = {"xla_flags": os.environ.get("XLA_FLAGS", ""), "cases": []}
    for layer in spec["layers"]:
        n, X, Y, Z, cin = layer["input"]
        k, s, cout = tuple(layer["kernel"]), tuple(layer["stride"]), layer["cout"]
        rng = np.random.default_rng(0)
        x = jnp.asarray(rng.standard_normal((n, X, Y, Z, cin), np.float32))
        w = jnp.asarray((rng.standard_normal((*k, cin, cout)) / np.sqrt(cin * np.prod(k))).astype(np.float32))
        oshape = [n, *(-(-d // st) for d, st in zip((X, Y, Z), s)), cout]
        ct = jnp.asarray(rng.standard_normal(oshape, np.float32))
        for impl in spec["impls"] if s != (1, 1, 1) else spec["impls"][:1]:
            if layer["input_grad"]:
                def fb(x, w, ct, impl=impl):
                    y, vjp = jax.vjp(lambda x, w: conv3d(x, w, s, strided=impl), x, w)
                    return (y, *vjp(ct))
            else:
                def fb(x, w, ct, impl=impl):
                    y, vjp = jax.vjp(lambda w: conv3d(x, w, s, strided=impl), w)
                    return (y, *vjp(ct))
            f = jax.jit(fb)
            case = {**layer, "framework": "jax", "strided": impl if s != (1, 1, 1) else None}
            try:
                hlo = f.lower(x, w, ct).compile().as_text() or ""
                case["hlo_calls_onednn"] = "onednn" in hlo.lower()
                case["hlo_library_fusions"] = sorted({m for m in ("onednn", "ynn_fusion", "xnn_fusion")
                                                      if m in hlo.lower()})
                case.update(_timed(lambda: f(x, w, ct), spec["repeats"], jax.block_until_ready))
            except Exception as e:  # noqa: BLE001 -- e.g. out of memory: record and go on
                case["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            out["cases"].append(case)
            print(json.dumps({k: case.get(k) for k in ("where", "strided", "median_s")}), flush=True)
    return out


def worker_torch(spec: dict) -> dict:
    import torch
    import torch.nn.functional as F

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    out = {"torch_threads": torch.get_num_threads(), "mkldnn": torch.backends.mkldnn.is_available(), "cases": []}
    for layer in spec["layers"]:
        n, X, Y, Z, cin = layer["input"]
        k, s, cout = tuple(layer["kernel"]), tuple(layer["stride"]), layer["cout"]
        rng = np.random.default_rng(0)
        x0 = torch.from_numpy(rng.standard_normal((n, cin, X, Y, Z), np.float32))
        w0 = torch.from_numpy((rng.standard_normal((cout, cin, *k)) / np.sqrt(cin * np.prod(k))).astype(np.float32))
        oshape = [n, cout, *(-(-d // st) for d, st in zip((X, Y, Z), s))]
        ct0 = torch.from_numpy(rng.standard_normal(oshape, np.float32))
        for layout in spec["layouts"]:
            fmt = torch.channels_last_3d if layout == "NDHWC" else torch.contiguous_format
            x = x0.to(memory_format=fmt).requires_grad_(layer["input_grad"])
            w = w0.to(memory_format=fmt).requires_grad_(True)
            ct = ct0.to(memory_format=fmt)
            pad = tuple(kk // 2 for kk in k)

            def fb():
                x.grad = None
                w.grad = None
                y = F.conv3d(x, w, stride=s, padding=pad)
                y.backward(ct)
                return y

            case = {**layer, "framework": "torch", "layout": layout}
            try:
                case.update(_timed(fb, spec["repeats"], lambda _: None))
            except Exception as e:  # noqa: BLE001
                case["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            out["cases"].append(case)
            print(json.dumps({k: case.get(k) for k in ("where", "layout", "median_s")}), flush=True)
    return out


def probe_flags(flags: str) -> dict:
    """Does this process's XLA accept XLA_FLAGS=flags? (an unknown flag aborts the process)"""
    if not flags:
        return {"accepted": True}
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    code = "import jax, jax.numpy as jnp; jax.block_until_ready(jnp.ones(3) * 2)"
    try:
        p = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return {"accepted": False, "why": "probe timed out"}
    if p.returncode == 0:
        return {"accepted": True}
    lines = [ln for ln in p.stderr.splitlines() if "flag" in ln.lower() or "illegal" in ln.lower()]
    return {"accepted": False, "why": (lines[0] if lines else p.stderr.strip()[-300:]).strip()[:300],
            "returncode": p.returncode}


# ------------------------------------------------------------------------------ driver


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/conv_cpu.json")
    ap.add_argument("--size", type=int, default=64, help="reference layer: spatial edge")
    ap.add_argument("--channels", type=int, default=32, help="reference layer: channels in = out")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--strided", default="native,space_to_depth,space_to_depth_grad",
                    help="strided-conv formulations for strided layers")
    ap.add_argument("--xla-variants", default=DEFAULT_VARIANTS,
                    help="';'-separated XLA_FLAGS values for the reference layer (empty = none)")
    ap.add_argument("--torch-layouts", default="NCDHW,NDHWC")
    ap.add_argument("--unet-size", type=int, default=64, help="per-layer part: the U-Net's patch edge (0: skip)")
    ap.add_argument("--features-base", type=int, default=32)
    ap.add_argument("--layer-xla-variants", default=" ".join(ONEDNN_FLAGS),
                    help="';'-separated XLA_FLAGS for the per-layer jax runs (default: jaxseg's oneDNN pair)")
    ap.add_argument("--layer-torch-layouts", default="NCDHW")
    ap.add_argument("--torch-threads", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per worker process")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        spec = json.loads(args.worker)
        fn = worker_jax if spec["framework"] == "jax" else worker_torch
        Path(args.worker_out).write_text(json.dumps(fn(spec)))
        return

    from common import environment, write_json

    script = Path(__file__)
    impls = args.strided.split(",")
    ref = reference_layer(args)
    layers = unet_layers(args.unet_size, args.batch, args.features_base) if args.unet_size else []
    # without the oneDNN flags that `import jaxseg` added to this process: each variant sets its own
    base_flags = " ".join(f for f in os.environ.get("XLA_FLAGS", "").split() if f not in ONEDNN_FLAGS)
    payload = {"benchmark": "conv_cpu", "environment": environment(),
               "settings": {"reference_layer": ref, "repeats": args.repeats, "strided": impls,
                            "unet_size": args.unet_size, "features_base": args.features_base,
                            "batch": args.batch, "dtype": "float32",
                            "what": "forward + input and weight gradients (weight only for the first layer)"},
               "xla_variants": [], "reference": [], "layers": []}

    def flush():
        write_json(args.out, payload)

    def jax_env(flags: str) -> dict:
        return {"XLA_FLAGS": " ".join(f for f in (base_flags, flags) if f), "JAX_PLATFORMS": "cpu",
                "JAXSEG_ONEDNN": "0"}

    # 1. the reference layer: torch layouts, then jax per XLA flag variant
    r = ts.run_worker(script, {"framework": "torch", "layers": [ref], "layouts": args.torch_layouts.split(","),
                               "repeats": args.repeats, "threads": args.torch_threads}, args.timeout)
    payload["torch_info"] = {k: r.get(k) for k in ("torch_threads", "mkldnn")}
    for c in r.get("cases", [{"framework": "torch", "error": r.get("error")}]):
        payload["reference"].append({**c, "xla_flags": None})
        print("reference torch", c.get("layout"), _fmt(c), flush=True)
    flush()
    for flags in args.xla_variants.split(";"):
        probe = probe_flags(flags)
        payload["xla_variants"].append({"xla_flags": flags, **probe})
        if not probe["accepted"]:
            print(f"XLA_FLAGS={flags!r}: rejected ({probe['why']})", flush=True)
            payload["reference"].append({"framework": "jax", "xla_flags": flags, "rejected": probe["why"]})
            flush()
            continue
        for impl in impls[:1]:  # the reference layer has stride 1: one formulation
            r = ts.run_worker(script, {"framework": "jax", "layers": [ref], "impls": [impl],
                                       "repeats": args.repeats}, args.timeout, env_extra=jax_env(flags))
            for c in r.get("cases", [{"framework": "jax", "strided": impl, "error": r.get("error")}]):
                payload["reference"].append({**c, "xla_flags": flags})
                print(f"reference jax {c.get('strided') or ''} XLA_FLAGS={flags!r}", _fmt(c),
                      f"HLO library fusions {c.get('hlo_library_fusions')}", flush=True)
            flush()

    # 2. per layer
    if layers:
        r = ts.run_worker(script, {"framework": "torch", "layers": layers,
                                   "layouts": args.layer_torch_layouts.split(","), "repeats": args.repeats,
                                   "threads": args.torch_threads}, args.timeout)
        payload["layers"] += [{**c, "xla_flags": None} for c in r.get("cases", [])] or [
            {"framework": "torch", "error": r.get("error")}]
        flush()
        for flags in args.layer_xla_variants.split(";"):
            if flags and not probe_flags(flags)["accepted"]:
                payload["layers"].append({"framework": "jax", "xla_flags": flags, "rejected": True})
                continue
            r = ts.run_worker(script, {"framework": "jax", "layers": layers, "impls": impls,
                                       "repeats": args.repeats}, args.timeout, env_extra=jax_env(flags))
            payload["layers"] += [{**c, "xla_flags": flags} for c in r.get("cases", [])] or [
                {"framework": "jax", "xla_flags": flags, "error": r.get("error")}]
            flush()
        print(layer_table(payload["layers"]), flush=True)
    flush()


def _fmt(c: dict) -> str:
    if "median_s" in c:
        return f"{c['median_s'] * 1e3:.1f} ms (first call {c['first_call_s'] * 1e3:.0f} ms)"
    return f"failed: {c.get('error') or c.get('rejected')}"


def layer_table(cases: list[dict]) -> str:
    """Per-layer markdown: layer, input, jax per impl, torch per layout, ratios (also used by table.py)."""
    keyf = lambda c: (tuple(c["input"]), c["cout"], tuple(c["stride"]))  # noqa: E731
    rows: dict = {}
    cols: list[str] = []
    for c in cases:
        if "median_s" not in c:
            continue
        col = (f"jax {c.get('strided') or 'conv'}" + (f" [{c['xla_flags']}]" if c.get("xla_flags") else "")
               if c["framework"] == "jax" else f"torch {c['layout']}")
        if col not in cols:
            cols.append(col)
        rows.setdefault(keyf(c), {"c": c})[col] = c["median_s"]
    if not rows:
        return "(no per-layer results)"
    torch_col = next((c for c in cols if c.startswith("torch")), None)
    jax_cols = [c for c in cols if c.startswith("jax")]
    head = ["layer(s)", "input NDHWC", "cout", "stride", "count"] + [f"{c} ms" for c in cols]
    head += [f"{c} / {torch_col}" for c in jax_cols] if torch_col else []
    lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    totals = {c: 0.0 for c in cols}
    for row in rows.values():
        c = row["c"]
        cells = [", ".join(c["where"]), "x".join(map(str, c["input"])), str(c["cout"]),
                 "".join(map(str, c["stride"])), str(c["count"])]
        cells += [f"{row[k] * 1e3:.1f}" if k in row else "-" for k in cols]
        for k in cols:
            if k in row:
                totals[k] += row[k] * c["count"]
        if torch_col:
            cells += [f"{row[k] / row[torch_col]:.2f}" if k in row and torch_col in row else "-" for k in jax_cols]
        lines.append("| " + " | ".join(cells) + " |")
    cells = ["all convs of one fwd+bwd (x count)", "", "", "", ""] + [f"{totals[k] * 1e3:.0f}" for k in cols]
    if torch_col:
        cells += [f"{totals[k] / totals[torch_col]:.2f}" if totals[torch_col] else "-" for k in jax_cols]
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
