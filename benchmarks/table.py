"""Markdown tables of the jaxseg vs PyTorch benchmarks, for the README.

    python benchmarks/table.py                       # every benchmarks/results/*.json it knows
    python benchmarks/table.py /tmp/bench a.json     # other folders or files

Reads the JSON of train_step_vs_torch.py, sliding_window_vs_monai.py and conv_cpu.py (recognised by
their "benchmark" field; other files are skipped) and prints one table per file: framework, dtype,
time, and the ratio to PyTorch.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
GiB = 2**30


def _gib(v) -> str:
    return f"{v / GiB:.2f}" if isinstance(v, (int, float)) else "-"


def _f(v, fmt: str = ".2f") -> str:
    return format(v, fmt) if isinstance(v, (int, float)) else "-"


def _where(d: dict, path: Path) -> str:
    env = d.get("environment", {})
    dev = ", ".join(sorted(set(env.get("devices", [])))) or env.get("backend", "?")
    load = env.get("load_average_1_5_15")
    return (f"`{path.name}`: {dev}, {env.get('cpu_count', '?')} CPUs"
            + (f", load {load[0]:.1f}" if load else "") + f", {env.get('date', '')}")


def _strided(r: dict) -> str:
    if r.get("framework") != "jaxseg":
        return ""
    return r.get("strided") or ""


def train_table(d: dict, path: Path) -> str:
    s = d["settings"]
    lines = [f"**Training step** ({s['device']}, {'x'.join(map(str, s['shape']))} x batch {s['batch']}, "
             f"features {s['arch']['features_per_stage']}; {s['loss']}; {s['optimizer']}) -- {_where(d, path)}"]
    p = d.get("parity") or {}
    if "per_strided" in p:
        diffs = ", ".join(f"{k} {v['max_abs_logit_diff']:.1e}" for k, v in p["per_strided"].items())
        lines.append(f"Same model: {p['n_params']:,} parameters; max abs logit difference jaxseg vs torch (fp32, "
                     f"max |logit| {p['max_abs_logit']:.2f}): {diffs}.")
    lp = d.get("loss_parity_fp32_first_steps")
    if lp:
        lines.append("Losses of the first steps (fp32): jaxseg " + ", ".join(f"{v:.5f}" for v in lp["jaxseg"])
                     + "; torch " + ", ".join(f"{v:.5f}" for v in lp["torch"]) + ".")
    lines.append("")
    mfu = any("mfu" in r for r in d["results"])
    head = ["framework", "dtype", "strided convs", "step (s, median)", "first call (s)", "volumes/s", "Mvoxels/s",
            "peak mem (GiB)", "time / torch eager", "time / torch.compile"] + (["MFU"] if mfu else [])
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    ref = {(r["framework"], r["dtype"]): r.get("median_s") for r in d["results"] if r["framework"] != "jaxseg"}
    for r in d["results"]:
        name = {"torch_compile": "torch.compile", "torch": "torch eager"}.get(r["framework"], r["framework"])
        if "median_s" not in r:
            cells = [name, r["dtype"], _strided(r), f"failed: {str(r.get('error'))[:60]}"]
            cells += [""] * (len(head) - len(cells))
        else:
            ratios = []
            for fw in ("torch", "torch_compile"):
                t = ref.get((fw, r["dtype"]))
                ratios.append(_f(r["median_s"] / t) if t else "-")
            cells = [name, r["dtype"], _strided(r), _f(r["median_s"], ".3f"), _f(r["first_call_s"], ".1f"),
                     _f(r.get("volumes_per_s")), _f((r.get("voxels_per_s") or 0) / 1e6), _gib(r.get("peak_mem_bytes")),
                     *ratios] + ([_f(r.get("mfu"), ".1%")] if mfu else [])
        lines.append("| " + " | ".join(cells) + " |")
    fl = s.get("xla_flops_per_step") or next((r.get("xla_flops_per_step") for r in d["results"]
                                              if r.get("xla_flops_per_step")), None)
    lines.append("")
    lines.append(f"FLOPs per step: XLA cost analysis {_f((fl or 0) / 1e9, '.1f')} GFLOP, analytic (convolutions) "
                 f"{_f(s['analytic_conv_flops_per_step'] / 1e9, '.1f')} GFLOP. Peak memory: "
                 + (d["results"][0].get("peak_mem_kind", "") if d["results"] else "") + ".")
    return "\n".join(lines)


def sliding_table(d: dict, path: Path) -> str:
    s = d["settings"]
    lines = [f"**Sliding-window inference** ({s['device']}, volume {'x'.join(map(str, s['volume']))}, window "
             f"{'x'.join(map(str, s['roi']))}, overlap {s['overlap']}, {s['sw_batch']} windows per call, "
             f"{s['mode']} blending{' (same map)' if s.get('same_importance_map') else ''}, features "
             f"{s['arch']['features_per_stage']}, fp32) -- {_where(d, path)}", ""]
    head = ["framework", "volume (s, median)", "first call (s)", "Mvoxels/s", "peak mem (GiB)", "time / MONAI"]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    monai = next((r.get("median_s") for r in d["results"] if r["framework"] == "monai"), None)
    for r in d["results"]:
        name = "jaxseg" if r["framework"] == "jaxseg" else "MONAI sliding_window_inference (torch eager)"
        if "median_s" not in r:
            lines.append(f"| {name} | failed: {str(r.get('error'))[:60]} | | | | |")
            continue
        lines.append("| " + " | ".join([name, _f(r["median_s"]), _f(r["first_call_s"]),
                                        _f(r["voxels_per_s"] / 1e6), _gib(r.get("peak_mem_bytes")),
                                        _f(r["median_s"] / monai) if monai else "-"]) + " |")
    a = d.get("agreement") or {}
    if "argmax_agreement" in a:
        lines += ["", f"Outputs: max abs difference of the fused logits {a['max_abs_logit_diff']:.1e} (max |logit| "
                      f"{a['max_abs_logit']:.2f}), of the probabilities {a['max_abs_prob_diff']:.1e}; same argmax "
                      f"at {a['argmax_agreement']:.4%} of the voxels."]
    return "\n".join(lines)


def conv_table(d: dict, path: Path) -> str:
    s = d["settings"]
    ref = s["reference_layer"]
    lines = [f"**3D convolution, forward + backward** (input {'x'.join(map(str, ref['input']))} NDHWC, "
             f"{ref['cout']} out channels, 3x3x3, fp32) -- {_where(d, path)}", ""]
    rows = d["reference"]
    torch_ref = next((r.get("median_s") for r in rows if r.get("framework") == "torch"
                      and r.get("layout") == "NCDHW" and "median_s" in r), None)
    head = ["framework", "layout", "XLA_FLAGS", "ms (median)", "first call (ms)", "time / torch NCDHW",
            "library fusions in HLO"]
    lines += ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
    for r in rows:
        flags = f"`{r['xla_flags']}`" if r.get("xla_flags") else ("" if r.get("framework") == "torch" else "(none)")
        what = r.get("layout") or ("NDHWC" if r.get("framework") == "jax" else "")
        if "median_s" in r:
            cells = [r["framework"], what, flags, _f(r["median_s"] * 1e3, ".1f"), _f(r["first_call_s"] * 1e3, ".0f"),
                     _f(r["median_s"] / torch_ref) if torch_ref else "-",
                     ", ".join(r.get("hlo_library_fusions") or []) if r["framework"] == "jax" else ""]
        else:
            why = r.get("rejected")
            cells = [r.get("framework", "?"), what, flags, "rejected by XLA" if why else "failed", "", "",
                     str(why or r.get("error"))[:80]]
        lines.append("| " + " | ".join(cells) + " |")
    if d.get("layers"):
        sys.path.insert(0, str(HERE))
        from conv_cpu import layer_table

        lines += ["", f"Per layer (the U-Net at {s['unet_size']}^3 x batch {s['batch']}, every distinct conv; "
                      "count = occurrences in one forward pass):", "", layer_table(d["layers"])]
    return "\n".join(lines)


TABLES = {"train_step_vs_torch": train_table, "sliding_window_vs_monai": sliding_table, "conv_cpu": conv_table}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="*", default=[str(HERE / "results")], help="JSON files or folders of them")
    args = ap.parse_args()
    files: list[Path] = []
    for p in map(Path, args.paths):
        files += sorted(p.glob("*.json")) if p.is_dir() else [p]
    order = list(TABLES)
    found = []
    for f in files:
        try:
            d = json.loads(f.read_text())
        except (OSError, json.JSONDecodeError) as e:
            print(f"<!-- skipped {f}: {e} -->", file=sys.stderr)
            continue
        if isinstance(d, dict) and d.get("benchmark") in TABLES:
            found.append((order.index(d["benchmark"]), f, d))
    if not found:
        print("no train_step_vs_torch / sliding_window_vs_monai / conv_cpu results in " + ", ".join(args.paths),
              file=sys.stderr)
        sys.exit(1)
    for _, f, d in sorted(found, key=lambda t: (t[0], str(t[1]))):
        print(TABLES[d["benchmark"]](d, f))
        print()


if __name__ == "__main__":
    main()
