"""One training step of the same U-Net in jaxseg and in PyTorch (eager and torch.compile), fp32 and bf16.

    python benchmarks/train_step_vs_torch.py --out benchmarks/results/train_step_vs_torch_cpu.json
    python benchmarks/train_step_vs_torch.py --device gpu --shape 128 --batch 2 --peak-tflops 989 \\
        --out benchmarks/results/train_step_vs_torch_gpu.json

The model is built once in PyTorch (nnU-Net v2's PlainConvUNet from dynamic_network_architectures:
the nnU-Net topology jaxseg plans for the patch, as benchmarks/model_cpu.py uses: 64^3 -> 5 stages,
features 32-64-128-256-320, 3x3x3 kernels, conv bias, InstanceNorm affine, LeakyReLU(0.01), 8 classes,
1 input channel) and its weights are imported into jaxseg's UNet3D with jaxseg.interop.torch_import,
so both frameworks train the same network from the same weights; the JSON records the max abs
difference of their logits on the benchmark batch (fp32, per strided-conv formulation) and the losses of the first
steps in both frameworks.

Training step, identical in both: forward, loss = cross-entropy - soft Dice (nnU-Net's DC_and_CE,
per sample, background excluded from the Dice, smooth 1e-5) on the full-resolution output only (no
deep supervision in either), backward, SGD (lr 1e-2, momentum 0.99, Nesterov, no weight decay).
bfloat16: jaxseg computes in bf16 with fp32 parameters (model.compute_dtype); torch runs the forward
under torch.autocast(bfloat16) with fp32 parameters (no grad scaler: bf16 does not need one); both
compute the loss in fp32.

Each configuration (framework x dtype x strided-conv formulation) runs in its own subprocess, so peak memory is its
own. CPU: peak RSS of the timed steps (VmHWM, reset after the first call and warm-up) minus the RSS
after imports, model and data set-up; the whole-process peak (compilation included) is recorded too.
GPU: jax `memory_stats()["peak_bytes_in_use"]`, torch `max_memory_allocated()` (both include
parameters, optimiser state and the batch). Reported per configuration: the first call (jax:
lowering + XLA compile + first step, the compile time also alone; torch.compile: its compilation,
cold, in a fresh inductor cache unless --warm-compile-cache, + first step) apart from the steady
state (median of --steps after --warmup steps), volumes/s and voxels/s, XLA's FLOP count of the
jitted step (`compiled.cost_analysis()`), an analytic convolution FLOP count, MFU against
--peak-tflops when given (H100/H200 bf16 dense: 989), and the jaxseg / torch time ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
NUM_CLASSES = 8
IN_CHANNELS = 1
LR, MOMENTUM = 1e-2, 0.99
SMOOTH = 1e-5
FRAMEWORKS = ("jaxseg", "torch", "torch_compile")


# ------------------------------------------------------------------------------ shared with the other scripts


def unet_arch(size: int, features_base: int = 32, features_max: int = 320) -> dict:
    """PlainConvUNet keyword arguments (JSON-able, nnU-Net plans style) of the topology jaxseg plans
    for a size^3 patch at 1 mm (benchmarks/model_cpu.py's UNet3D)."""
    from jaxseg.models.topology import plan_topology

    topo = plan_topology((size,) * 3, features_base=features_base, features_max=features_max)
    n = topo.n_stages
    return dict(n_stages=n, features_per_stage=list(topo.features), conv_op="torch.nn.Conv3d",
                kernel_sizes=[list(k) for k in topo.kernels], strides=[list(s) for s in topo.strides],
                n_conv_per_stage=[2] * n, n_conv_per_stage_decoder=[2] * (n - 1), conv_bias=True,
                norm_op="torch.nn.InstanceNorm3d", norm_op_kwargs={"eps": 1e-5, "affine": True},
                dropout_op=None, dropout_op_kwargs=None, nonlin="torch.nn.LeakyReLU",
                nonlin_kwargs={"inplace": True})


def torch_unet(arch: dict, in_channels: int = IN_CHANNELS, num_classes: int = NUM_CLASSES):
    import pydoc

    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    kw = dict(arch)
    for key in ("conv_op", "norm_op", "nonlin"):
        kw[key] = pydoc.locate(kw[key])
    return PlainConvUNet(input_channels=in_channels, num_classes=num_classes, deep_supervision=False, **kw)


def make_weights(arch: dict, workdir: Path, seed: int = 0, perturb: bool = True) -> Path:
    """A freshly initialised torch model's state_dict as .npz (what every worker loads); norm weights
    and biases moved away from 1/0 so that each matters for the parity check."""
    import torch

    torch.manual_seed(seed)
    model = torch_unet(arch)
    if perturb:
        g = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 1:
                    p.add_(0.1 * torch.randn(p.shape, generator=g))
    path = workdir / "weights.npz"
    np.savez(path, **{k: v.detach().numpy() for k, v in model.state_dict().items()})
    return path


def load_npz(path) -> dict:
    with np.load(path) as f:
        return {k: f[k] for k in f.files}


def jax_unet(weights: dict, arch: dict, size, *, strided: str | None, dtype: str, deep_supervision: bool = False):
    """(UNet3D, params) imported from the torch weights; `strided` forces the strided-conv formulation."""
    import jax.numpy as jnp

    from jaxseg.interop.torch_import import import_plain_conv_unet

    sys.path.insert(0, str(HERE))
    from common import set_strided

    set_strided(strided)
    return import_plain_conv_unet(weights, input_channels=IN_CHANNELS, num_classes=NUM_CLASSES,
                                  deep_supervision=deep_supervision, patch_size=size,
                                  dtype=jnp.bfloat16 if dtype == "bfloat16" else jnp.float32, **arch)


def batch(size, batch_size: int, seed: int = 0):
    """(x channels-last float32 (B, X, Y, Z, 1), labels int32 (B, X, Y, Z)): a smooth random image and
    labels from its quantiles (every class present)."""
    rng = np.random.default_rng(seed)
    size = tuple(int(s) for s in size)
    coarse = rng.standard_normal((batch_size, *(max(2, s // 8) for s in size), IN_CHANNELS)).astype(np.float32)
    x = coarse
    for a, s in zip((1, 2, 3), size):
        x = np.repeat(x, -(-s // x.shape[a]), axis=a)
    x = x[:, :size[0], :size[1], :size[2]] + 0.3 * rng.standard_normal((batch_size, *size, IN_CHANNELS))
    x = x.astype(np.float32)
    q = np.quantile(x, np.linspace(0, 1, NUM_CLASSES + 1)[1:-1])
    y = np.digitize(x[..., 0], q).astype(np.int32)
    return x, y


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    """The process's peak RSS since it started (getrusage; includes compilation)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def reset_peak_rss() -> bool:
    """Reset the kernel's RSS high-water mark (VmHWM) to the current RSS (Linux >= 4.0), so that
    `hwm_bytes` then measures the steady state apart from the first call's compilation."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return peak_rss_bytes()


def cpu_memory(base_rss: int, steady_reset: bool, warm_rss: int | None = None) -> dict:
    """Peak memory of a CPU worker. `peak_mem_bytes`: peak RSS during the timed runs (the high-water
    mark reset after the first call and warm-up) minus the RSS after set-up (imports, model, data),
    so it includes what the first call left resident (jax: the compiled executable and compiler heap;
    torch.compile: its kernels). `peak_mem_over_warm_bytes`: the same peak minus the RSS just before
    the timed runs (the working memory of a step alone). Also the whole-process peak, compilation
    included."""
    steady = hwm_bytes() if steady_reset else None
    out = {"base_rss_bytes": base_rss, "peak_rss_bytes": peak_rss_bytes(),
           "peak_mem_incl_first_call_bytes": peak_rss_bytes() - base_rss,
           "peak_mem_bytes": (steady - base_rss) if steady is not None else peak_rss_bytes() - base_rss,
           "peak_mem_kind": ("peak RSS of the timed runs - RSS after set-up" if steady is not None else
                             "peak RSS (first call included) - RSS after set-up")}
    if steady is not None and warm_rss is not None:
        out["warm_rss_bytes"] = warm_rss
        out["peak_mem_over_warm_bytes"] = steady - warm_rss
    return out


def run_worker(script: Path, spec: dict, timeout: float, env_extra: dict | None = None) -> dict:
    """Run `script --worker SPEC` in a fresh process; its JSON result, or {"error": ...}."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        env = dict(os.environ, **(env_extra or {}))
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
        cmd = [sys.executable, str(script), "--worker", json.dumps(spec), "--worker-out", str(out)]
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timeout after {timeout:.0f} s"}
        wall = time.perf_counter() - t0
        if out.exists():
            res = json.loads(out.read_text())
            res["process_wall_s"] = wall
            return res
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-6:]
        return {"error": f"exit {proc.returncode}: " + " | ".join(tail)[-800:], "process_wall_s": wall}


def cost_flops(compiled) -> float | None:
    try:
        ca = compiled.cost_analysis()
    except Exception:  # noqa: BLE001 -- not every backend implements it
        return None
    if isinstance(ca, (list, tuple)):
        ca = ca[0] if ca else None
    if not ca or "flops" not in ca:
        return None
    return float(ca["flops"])


def conv_flops(arch: dict, size, batch_size: int, train: bool = True) -> float:
    """Multiply-adds x 2 of every convolution (and transposed conv, and the head) of the PlainConvUNet
    forward at `size`; x3 for forward + backward (input and weight gradients; the first layer's input
    gradient is not needed but counted)."""
    feats, strides, kernels = arch["features_per_stage"], arch["strides"], arch["kernel_sizes"]
    res = np.array(size, dtype=np.int64)
    cin, total, enc_res = IN_CHANNELS, 0, []
    for f, s, k in zip(feats, strides, kernels):
        res = res // np.array(s)
        vox = int(np.prod(res))
        kk = int(np.prod(k))
        total += vox * kk * (cin * f + f * f)
        enc_res.append(vox)
        cin = f
    for i in range(len(feats) - 2, -1, -1):
        vox, f, kk = enc_res[i], feats[i], int(np.prod(kernels[i]))
        up = int(np.prod(strides[i + 1]))
        total += enc_res[i + 1] * feats[i + 1] * f * up  # transposed conv, kernel = stride
        total += vox * kk * (2 * f * f + f * f)
    total += enc_res[0] * feats[0] * NUM_CLASSES
    return 2.0 * total * batch_size * (3 if train else 1)


# ------------------------------------------------------------------------------ workers


def jax_loss_fn():
    from jaxseg.losses import dice_ce

    def loss(logits, labels):
        return dice_ce(logits, labels, smooth=SMOOTH).mean()

    return loss


def torch_loss(logits, labels, num_classes: int = NUM_CLASSES):
    """cross-entropy - soft Dice per sample (jaxseg.losses.dice_ce), mean over the batch. logits
    (B, C, X, Y, Z) float32, labels (B, X, Y, Z) int64."""
    import torch
    import torch.nn.functional as F

    ce = F.cross_entropy(logits, labels, reduction="none").mean(dim=(1, 2, 3))
    probs = torch.softmax(logits, 1)
    onehot = F.one_hot(labels, num_classes).permute(0, 4, 1, 2, 3).to(probs.dtype)
    axes = (2, 3, 4)
    tp = (probs * onehot).sum(axes)
    fp = (probs * (1 - onehot)).sum(axes)
    fn = ((1 - probs) * onehot).sum(axes)
    dc = (2 * tp + SMOOTH) / torch.clamp(2 * tp + fp + fn + SMOOTH, min=1e-8)
    return (ce - dc[:, 1:].mean(1)).mean()


def _steady(times: list[float]) -> dict:
    return {"times_s": times, "median_s": statistics.median(times), "min_s": min(times)}


def worker_jax(spec: dict) -> dict:
    if spec["device"] == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import optax

    arch, size, bsz = spec["arch"], tuple(spec["size"]), spec["batch"]
    x, y = batch(size, bsz, spec["seed"])
    weights = load_npz(spec["weights"])
    model, params = jax_unet(weights, arch, size, strided=spec["strided"], dtype=spec["dtype"])
    from common import set_strided

    from jaxseg import runtime

    loss_fn = jax_loss_fn()
    opt = optax.sgd(LR, momentum=MOMENTUM, nesterov=True)
    dev = jax.devices()[0]
    params = jax.device_put(params, dev)
    opt_state = jax.device_put(opt.init(params), dev)
    xd, yd = jax.device_put(x, dev), jax.device_put(y, dev)
    jax.block_until_ready((params, opt_state, xd, yd))
    base_rss = rss_bytes()

    def step(params, opt_state, x, y):
        def objective(p):
            return loss_fn(model.apply({"params": p}, x).seg[0], y)

        loss, grads = jax.value_and_grad(objective)(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    t0 = time.perf_counter()
    lowered = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, xd, yd)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    params, opt_state, loss = compiled(params, opt_state, xd, yd)
    losses = [float(loss)]  # blocks
    t3 = time.perf_counter()
    for _ in range(spec["warmup"]):
        params, opt_state, loss = compiled(params, opt_state, xd, yd)
        losses.append(float(loss))
    warm = rss_bytes()
    reset = spec["device"] == "cpu" and reset_peak_rss()
    times = []
    for _ in range(spec["steps"]):
        t = time.perf_counter()
        params, opt_state, loss = compiled(params, opt_state, xd, yd)
        jax.block_until_ready(loss)
        times.append(time.perf_counter() - t)
        losses.append(float(loss))
    out = {"lower_s": t1 - t0, "compile_s": t2 - t1, "first_call_s": t3 - t0, **_steady(times),
           "losses": losses, "xla_flops_per_step": cost_flops(compiled), "backend": jax.default_backend(),
           "device_kind": dev.device_kind, "persistent_cache": jax.config.jax_compilation_cache_dir,
           "default_matmul_precision": str(jax.config.jax_default_matmul_precision),  # None: XLA's (TF32 on GPU)
           "strided_in_effect": set_strided(None), "jaxseg_runtime": runtime.record(),
           "hlo_onednn_convolutions": "__onednn$convolution" in (compiled.as_text() or "")}
    if spec["device"] == "cpu":
        out.update(cpu_memory(base_rss, reset, warm))
    else:
        stats = dev.memory_stats() or {}
        out.update(peak_mem_bytes=stats.get("peak_bytes_in_use"), peak_mem_kind="jax peak_bytes_in_use")
    return out


def worker_torch(spec: dict) -> dict:
    cache = None
    if not spec.get("warm_compile_cache"):  # a cold torch.compile, as jax's first call is (no persistent cache)
        cache = tempfile.mkdtemp(prefix="inductor-")
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache
        os.environ.setdefault("TRITON_CACHE_DIR", os.path.join(cache, "triton"))
    import torch

    if spec.get("threads"):
        torch.set_num_threads(int(spec["threads"]))
    gpu = spec["device"] == "gpu"
    dev = torch.device("cuda" if gpu else "cpu")
    arch, size, bsz = spec["arch"], tuple(spec["size"]), spec["batch"]
    x, y = batch(size, bsz, spec["seed"])
    model = torch_unet(arch)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in load_npz(spec["weights"]).items()})
    model = model.to(dev).train()
    xt = torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3))).to(dev)
    yt = torch.from_numpy(y.astype(np.int64)).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM, nesterov=True)
    net = torch.compile(model) if spec["framework"] == "torch_compile" else model
    amp = spec["dtype"] == "bfloat16"
    sync = torch.cuda.synchronize if gpu else (lambda: None)
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    base_rss = rss_bytes()

    def step():
        opt.zero_grad(set_to_none=True)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=amp):
            out = net(xt)
        loss = torch_loss(out.float(), yt)
        loss.backward()
        opt.step()
        return loss.detach()

    t0 = time.perf_counter()
    losses = [float(step())]
    sync()
    first = time.perf_counter() - t0
    for _ in range(spec["warmup"]):
        losses.append(float(step()))
    warm = rss_bytes()
    reset = not gpu and reset_peak_rss()
    times = []
    for _ in range(spec["steps"]):
        sync()
        t = time.perf_counter()
        loss = step()
        sync()
        times.append(time.perf_counter() - t)
        losses.append(float(loss))
    out = {"first_call_s": first, **_steady(times), "losses": losses, "torch_threads": torch.get_num_threads(),
           "device_kind": torch.cuda.get_device_name() if gpu else "cpu",
           "tf32": {"cudnn": torch.backends.cudnn.allow_tf32, "matmul": torch.backends.cuda.matmul.allow_tf32},
           "inductor_cache": "cold (fresh directory)" if cache else "warm (the user's)"}
    if cache:
        import shutil

        shutil.rmtree(cache, ignore_errors=True)
    if gpu:
        out.update(peak_mem_bytes=int(torch.cuda.max_memory_allocated()), peak_mem_kind="torch max_memory_allocated")
    else:
        out.update(cpu_memory(base_rss, reset, warm))
    return out


def worker_parity(spec: dict) -> dict:
    """fp32 logits of the torch model and of the imported jaxseg model (each strided formulation) on the batch."""
    if spec["device"] == "cpu":
        os.environ.setdefault("JAX_PLATFORMS", "cpu")
    import jax
    import torch

    jax.config.update("jax_default_matmul_precision", "highest")  # no TF32 on GPU: the same model

    arch, size = spec["arch"], tuple(spec["size"])
    x, y = batch(size, spec["batch"], spec["seed"])
    weights = load_npz(spec["weights"])
    model = torch_unet(arch)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in weights.items()})
    with torch.no_grad():
        t_logits = model.eval()(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3))))
        t_loss = float(torch_loss(t_logits, torch.from_numpy(y.astype(np.int64))))
    t_logits = t_logits.numpy().transpose(0, 2, 3, 4, 1)
    out = {"max_abs_logit": float(np.abs(t_logits).max()), "torch_loss": t_loss, "per_strided": {}}
    loss_fn = jax_loss_fn()
    for impl in spec["impls"]:
        jm, params = jax_unet(weights, arch, size, strided=impl, dtype="float32")
        j_logits = np.asarray(jax.jit(lambda p, x: jm.apply({"params": p}, x).seg[0])(params, x))
        out["per_strided"][impl] = {"max_abs_logit_diff": float(np.abs(j_logits - t_logits).max()),
                                      "jax_loss": float(loss_fn(j_logits, y))}
    # torch counts every seg layer (nnU-Net keeps the deep-supervision heads even when unused)
    out["n_params_torch"] = int(sum(p.numel() for p in model.parameters()))
    out["n_params"] = int(sum(v.size for v in jax.tree.leaves(params)))  # the jaxseg model (used heads only)
    return out


# ------------------------------------------------------------------------------ driver


def _ratios(results: list[dict]) -> list[dict]:
    out = []
    for r in results:
        if r.get("framework") != "jaxseg" or "median_s" not in r:
            continue
        for ref in ("torch", "torch_compile"):
            t = next((q for q in results if q.get("framework") == ref and q.get("dtype") == r["dtype"]
                      and "median_s" in q), None)
            if t is not None:
                out.append({"dtype": r["dtype"], "strided": r["strided"], "vs": ref,
                            "jaxseg_over_torch_time": r["median_s"] / t["median_s"],
                            "jaxseg_over_torch_peak_mem": (r["peak_mem_bytes"] / t["peak_mem_bytes"]
                                                           if r.get("peak_mem_bytes") and t.get("peak_mem_bytes")
                                                           else None)})
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/train_step_vs_torch_cpu.json")
    ap.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
    ap.add_argument("--shape", type=int, default=64, help="cubic patch edge (GPU: 128)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--features-base", type=int, default=32)
    ap.add_argument("--frameworks", default=",".join(FRAMEWORKS))
    ap.add_argument("--strided", default="default",
                    help="jaxseg strided-conv formulations, comma-separated: default (the library's choice for "
                         "the device), space_to_depth, native")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps after the first call")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds per configuration")
    ap.add_argument("--torch-threads", type=int, default=0, help="torch.set_num_threads (0: torch's default)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="for MFU (H100/H200 bf16 dense: 989)")
    ap.add_argument("--skip-parity", action="store_true")
    ap.add_argument("--warm-compile-cache", action="store_true",
                    help="let torch.compile use its on-disk cache (default: a fresh one, a cold compile)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--worker-out", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        spec = json.loads(args.worker)
        fn = {"parity": worker_parity, "jaxseg": worker_jax}.get(spec["framework"], worker_torch)
        Path(args.worker_out).write_text(json.dumps(fn(spec)))
        return

    sys.path.insert(0, str(HERE))
    from common import environment, write_json

    size = (args.shape,) * 3
    arch = unet_arch(args.shape, args.features_base)
    frameworks = [f for f in args.frameworks.split(",") if f]
    bad = [f for f in frameworks if f not in FRAMEWORKS]
    if bad:
        ap.error(f"--frameworks: unknown {bad}; choose from {FRAMEWORKS}")
    impls, dtypes = args.strided.split(","), args.dtypes.split(",")
    vox = args.batch * int(np.prod(size))
    flops_conv = conv_flops(arch, size, args.batch)
    payload = {"benchmark": "train_step_vs_torch", "environment": environment(),
               "settings": {"device": args.device, "shape": list(size), "batch": args.batch,
                            "in_channels": IN_CHANNELS, "num_classes": NUM_CLASSES, "arch": arch,
                            "model": "nnU-Net PlainConvUNet (dynamic_network_architectures) -> jaxseg UNet3D",
                            "loss": "CE - soft Dice (per sample, no background, smooth 1e-5), full-res output only",
                            "optimizer": f"SGD lr {LR} momentum {MOMENTUM} nesterov, no weight decay",
                            "steps": args.steps, "warmup": args.warmup, "dtypes": dtypes, "strided": impls,
                            "frameworks": frameworks, "peak_tflops": args.peak_tflops,
                            "analytic_conv_flops_per_step": flops_conv},
               "parity": None, "results": [], "ratios": []}

    with tempfile.TemporaryDirectory() as tmp:
        base = dict(arch=arch, size=list(size), batch=args.batch, seed=args.seed, device=args.device,
                    warmup=args.warmup, steps=args.steps, threads=args.torch_threads,
                    warm_compile_cache=args.warm_compile_cache,
                    weights=str(make_weights(arch, Path(tmp), args.seed)))

        def flush():
            payload["ratios"] = _ratios(payload["results"])
            write_json(args.out, payload)

        if not args.skip_parity:
            payload["parity"] = run_worker(Path(__file__), dict(base, framework="parity", impls=impls), args.timeout)
            p = payload["parity"]
            if "error" in p:
                print("parity failed:", p["error"], flush=True)
            else:
                print("parity: max |logit| %.3g, max abs diff %s, params %s" % (
                    p["max_abs_logit"], {k: "%.2e" % v["max_abs_logit_diff"] for k, v in p["per_strided"].items()},
                    f"{p['n_params']:,}"), flush=True)
            flush()
        for dtype in dtypes:
            configs = [("jaxseg", impl) for impl in impls if "jaxseg" in frameworks]
            configs += [(f, None) for f in frameworks if f != "jaxseg"]
            for fw, impl in configs:
                spec = dict(base, framework=fw, dtype=dtype, strided=impl)
                r = run_worker(Path(__file__), spec, args.timeout)
                r = {"framework": fw, "dtype": dtype, "strided": impl, **r}
                if "median_s" in r:
                    r["volumes_per_s"] = args.batch / r["median_s"]
                    r["voxels_per_s"] = vox / r["median_s"]
                    flops = r.get("xla_flops_per_step")
                    if args.peak_tflops:
                        f = flops or flops_conv
                        r["mfu"] = f / r["median_s"] / (args.peak_tflops * 1e12)
                        r["mfu_flops_source"] = "xla cost_analysis" if flops else "analytic conv flops"
                    print(f"{fw:13s} {dtype:8s} {impl or '':14s} step {r['median_s']:.3f} s (first call "
                          f"{r['first_call_s']:.1f} s), {r['volumes_per_s']:.2f} vol/s, peak mem "
                          f"{(r.get('peak_mem_bytes') or 0) / 2**30:.2f} GiB, loss {r['losses'][0]:.5f}", flush=True)
                else:
                    print(f"{fw:13s} {dtype:8s} {impl or '':14s} failed: {r['error']}", flush=True)
                payload["results"].append(r)
                flush()
    xla_flops = next((r.get("xla_flops_per_step") for r in payload["results"]
                      if r.get("framework") == "jaxseg" and r.get("xla_flops_per_step")), None)
    payload["settings"]["xla_flops_per_step"] = xla_flops
    ref = {r["framework"]: r for r in payload["results"] if r.get("dtype") == "float32" and "losses" in r
           and r.get("strided") in (None, impls[0])}
    if "jaxseg" in ref and "torch" in ref:
        n = min(len(ref["jaxseg"]["losses"]), len(ref["torch"]["losses"]), 3)
        payload["loss_parity_fp32_first_steps"] = {"jaxseg": ref["jaxseg"]["losses"][:n],
                                                   "torch": ref["torch"]["losses"][:n]}
    flush()
    for q in payload["ratios"]:
        print(f"ratio jaxseg({q['strided']}) / {q['vs']} [{q['dtype']}]: time {q['jaxseg_over_torch_time']:.2f}x")


if __name__ == "__main__":
    main()
