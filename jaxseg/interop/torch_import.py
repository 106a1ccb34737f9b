"""Import trained PyTorch U-Nets into jaxseg's `UNet3D`, with identical outputs.

Supported:
  MONAI `monai.networks.nets.DynUNet` (3D; res_block True/False; deep_supervision with any
    deep_supr_num; trans_bias; instance or group norm, affine or not; LeakyReLU(0.01) or ReLU)
    -> `import_dynunet(state_dict, **dynunet_kwargs)`
  nnU-Net v2 `dynamic_network_architectures.architectures.unet.PlainConvUNet` (3D; two convs per
    stage; conv_bias True/False; InstanceNorm3d affine or not; LeakyReLU(0.01) or ReLU; any deep
    supervision setting: nnU-Net always stores every seg layer)
    -> `import_plain_conv_unet(state_dict, **plain_conv_unet_kwargs)`, or from nnU-Net's plans.json
    -> `import_nnunet_plans(state_dict, plans, configuration)`.
  `load_torch_checkpoint(path)` reads a .pt/.pth file (a bare state_dict, nnU-Net's
    checkpoint_final.pth with its "network_weights", or a dict holding a state_dict) as numpy arrays.

Each import function takes the torch model's constructor arguments under their torch names, so the
dict used to build the torch model can be passed as is, and returns `ImportedUNet(model, params)`:
`model.apply({"params": params}, x)` with x channels-last (N, X, Y, Z, C) = torch's (N, C, D, H, W)
transposed by (0, 2, 3, 4, 1) gives `UNetOutput.seg`, highest resolution first: seg[0] is the torch
model's final output, seg[k] the k-th deep-supervision output (before MONAI's interpolation to full
size), each transposed to channels-last.

Layout conversions: Conv3d weight (O, I, D, H, W) -> kernel (D, H, W, I, O); ConvTranspose3d weight
(I, O, D, H, W) -> kernel (D, H, W, I, O), no spatial flip (kernel == stride, so each output voxel
o*s + d takes x[o] @ W[:, :, d]); norm weight/bias -> scale/bias. Parameters torch does not have
(an absent transposed-conv bias, a non-affine norm) are filled with the identity (0, or scale 1).

Not expressible in UNet3D (rejected with an error naming the option): 2D models, even kernels,
strides other than what k//2 padding matches, n_conv_per_stage != 2, norm eps != 1e-5, batch norm or
running statistics, nonlin_first, other activations or slopes, nnU-Net's ResidualEncoderUNet.
Dropout has no parameters and is the identity at inference: accepted with a warning (UNet3D has none).
"""

from __future__ import annotations

import json
import os
import pickle
import warnings
from typing import Any, Mapping, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from jaxseg.models.topology import Topology
from jaxseg.models.unet import UNet3D

Triple = tuple[int, int, int]
EPS = 1e-5  # jaxseg's Norm eps, which is torch's default


class ImportedUNet(NamedTuple):
    model: UNet3D
    params: dict  # the Flax "params" collection: model.apply({"params": params}, x)


class StateDictError(ValueError):
    """The state_dict does not match the architecture the hyperparameters describe."""


class _Src(NamedTuple):
    key: str | None  # torch state_dict key; None: use `fill`
    kind: str  # "conv" | "convT" | "vec"
    fill: float = 0.0


# ------------------------------------------------------------------------------ checkpoints


def _numpy_safe_globals() -> list:
    """numpy scalar and dtype reconstructors (nnU-Net's checkpoints log numpy floats), for weights_only."""
    try:
        from numpy._core.multiarray import _reconstruct, scalar  # numpy >= 2
    except ImportError:  # pragma: no cover
        from numpy.core.multiarray import _reconstruct, scalar  # type: ignore[no-redef]
    dtypes = {type(np.dtype(t)) for t in (np.float16, np.float32, np.float64, np.int32, np.int64, np.bool_)}
    return [scalar, _reconstruct, np.ndarray, np.dtype, *dtypes]


def _tensor_to_numpy(v) -> np.ndarray:
    if hasattr(v, "detach"):  # a torch tensor; torch itself need not be imported here
        v = v.detach().cpu()
        try:
            return v.numpy()
        except TypeError:  # bfloat16 and other dtypes numpy lacks
            return v.float().numpy()
    return np.asarray(v)


def _is_state_dict(obj) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and (hasattr(v, "detach") or isinstance(v, np.ndarray)) for k, v in obj.items())


def _numpy_state_dict(state_dict: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Tensors or arrays -> numpy; drops the `module.` (DataParallel) and `_orig_mod.` (torch.compile)
    prefixes when every key has them."""
    if not isinstance(state_dict, Mapping):
        raise TypeError(f"expected a state_dict (a mapping of names to tensors/arrays), got {type(state_dict)}")
    out = {str(k): _tensor_to_numpy(v) for k, v in state_dict.items()}
    changed = True
    while changed and out:
        changed = False
        for prefix in ("module.", "_orig_mod."):
            if all(k.startswith(prefix) for k in out):
                out = {k[len(prefix):]: v for k, v in out.items()}
                changed = True
    return out


_WRAPPER_KEYS = ("network_weights", "state_dict", "model_state_dict", "model", "net", "network")


def load_torch_checkpoint(path: str | os.PathLike, *, key: str | None = None,
                          weights_only: bool = True) -> dict[str, np.ndarray]:
    """A .pt/.pth file's state_dict as {name: float32/int numpy array}.

    Accepts a bare state_dict (what MONAI users save with torch.save(model.state_dict())), nnU-Net v2's
    checkpoint_final.pth/checkpoint_best.pth (weights under "network_weights"), or a dict holding the
    state_dict under `key` or one of "state_dict", "model_state_dict", "model", "net", "network".
    Loads with torch.load(weights_only=True), allowing numpy scalars (nnU-Net logs them); pass
    weights_only=False only for a file you trust (it can then run arbitrary code)."""
    import torch

    path = os.fspath(path)
    try:
        with torch.serialization.safe_globals(_numpy_safe_globals()):
            obj = torch.load(path, map_location="cpu", weights_only=weights_only)
    except pickle.UnpicklingError as e:
        why = next((line.strip() for line in str(e).splitlines() if "Unsupported global" in line), str(e))
        raise ValueError(f"{path}: torch.load(weights_only=True) refused an object in the file ({why}). If you "
                         "trust the file, call load_torch_checkpoint(path, weights_only=False)") from e
    if hasattr(obj, "state_dict") and callable(obj.state_dict) and not isinstance(obj, Mapping):
        obj = obj.state_dict()  # a whole pickled nn.Module (weights_only=False only)
    if key is not None:
        if not isinstance(obj, Mapping) or key not in obj:
            found = list(obj) if isinstance(obj, Mapping) else type(obj).__name__
            raise KeyError(f"{path}: no {key!r} in the checkpoint; top-level keys: {found}")
        obj = obj[key]
    elif not _is_state_dict(obj):
        if not isinstance(obj, Mapping):
            raise ValueError(f"{path}: expected a state_dict or a dict holding one, got {type(obj).__name__}")
        for k in _WRAPPER_KEYS:
            if k in obj and _is_state_dict(obj[k]):
                obj = obj[k]
                break
        else:
            raise ValueError(f"{path}: found no state_dict; top-level keys: {list(obj)}. Name the one "
                             "holding the weights with key=")
    return _numpy_state_dict(obj)


# ------------------------------------------------------------------------------ shared helpers


def _triple(v, what: str) -> Triple:
    if isinstance(v, (int, np.integer)):
        return (int(v),) * 3  # type: ignore[return-value]
    t = tuple(int(i) for i in v)
    if len(t) != 3:
        raise ValueError(f"{what}: expected an int or 3 values (a 3D model), got {v!r}")
    return t  # type: ignore[return-value]


def _per_stage(v, n: int, what: str) -> list:
    if isinstance(v, (int, np.integer)):
        return [int(v)] * n
    v = list(v)
    if len(v) != n:
        raise ValueError(f"{what} has {len(v)} entries, expected {n} (one per stage)")
    return v


def _check_padding(kernels: Sequence[Triple], strides: Sequence[Triple], torch_pad, source: str) -> None:
    """jaxseg pads k//2 on each side; the torch model must do the same or the outputs shift."""
    for i, (k, s) in enumerate(zip(kernels, strides)):
        for a in range(3):
            if k[a] % 2 == 0:
                raise ValueError(f"stage {i}: even kernel {k} is not supported (jaxseg pads k//2 symmetrically)")
            if torch_pad(k[a], s[a]) != k[a] // 2:
                raise ValueError(f"stage {i}: {source} pads kernel {k} stride {s} by {torch_pad(k[a], s[a])} on "
                                 f"axis {a}, jaxseg by {k[a] // 2}; this kernel/stride pair is not supported")


def _name(op) -> str:
    """Class or dotted-string name -> last component, lower case ("torch.nn.LeakyReLU" -> "leakyrelu")."""
    if op is None:
        return "none"
    return str(getattr(op, "__name__", op)).rsplit(".", 1)[-1].lower()


def _activation(name: str, slope: float | None, what: str) -> str:
    if name == "leakyrelu":
        slope = 0.01 if slope is None else float(slope)
        if slope != 0.01:
            raise ValueError(f"{what}: LeakyReLU negative_slope {slope} is not supported (jaxseg uses 0.01)")
        return "leaky_relu"
    if name == "relu":
        return "relu"
    raise ValueError(f"{what}: activation {name!r} is not supported; jaxseg has LeakyReLU(0.01) and ReLU")


def _check_eps(eps, what: str) -> None:
    if eps is not None and float(eps) != EPS:
        raise ValueError(f"{what}: norm eps {eps} is not supported (jaxseg's Norm uses {EPS})")


def _conv(spec: dict, path: tuple, tkey: str, bias: bool) -> None:
    spec[path + ("kernel",)] = _Src(tkey + ".weight", "conv")
    if bias:
        spec[path + ("bias",)] = _Src(tkey + ".bias", "vec")


def _norm(spec: dict, path: tuple, tkey: str, affine: bool) -> None:
    spec[path + ("scale",)] = _Src(tkey + ".weight", "vec") if affine else _Src(None, "vec", 1.0)
    spec[path + ("bias",)] = _Src(tkey + ".bias", "vec") if affine else _Src(None, "vec", 0.0)


def _torch_shape(kind: str, jax_shape: tuple) -> tuple:
    if kind == "conv":
        return (jax_shape[4], jax_shape[3], *jax_shape[:3])
    if kind == "convT":
        return (jax_shape[3], jax_shape[4], *jax_shape[:3])
    return tuple(jax_shape)


def _to_jax_layout(kind: str, a: np.ndarray) -> np.ndarray:
    if kind == "conv":
        return a.transpose(2, 3, 4, 1, 0)
    if kind == "convT":
        return a.transpose(2, 3, 4, 0, 1)
    return a


def _running_stat(key: str) -> bool:
    return key.rsplit(".", 1)[-1] in ("running_mean", "running_var", "num_batches_tracked")


def _assemble(model: UNet3D, in_channels: int, spec: dict, state_dict: Mapping, strict: bool,
              known_unused=lambda key: False) -> dict:
    """Fill the model's parameter tree from the state_dict following `spec`, with full checking."""
    sd = _numpy_state_dict(state_dict)
    total = np.prod(np.array(model.topology.strides), axis=0)
    x = jax.ShapeDtypeStruct((1, *(int(t) for t in total), int(in_channels)), jnp.float32)
    abstract = jax.eval_shape(lambda x: model.init(jax.random.key(0), x)["params"], x)
    flat = traverse_util.flatten_dict(abstract)
    missing_spec = sorted("/".join(p) for p in flat if p not in spec)
    extra_spec = sorted("/".join(p) for p in spec if p not in flat)
    if missing_spec or extra_spec:  # a bug in this module, not in the user's input
        raise RuntimeError(f"torch import mapping out of sync with UNet3D: unmapped {missing_spec}, "
                           f"mapped but absent {extra_spec}")
    problems, out, used = [], {}, set()
    for path, leaf in flat.items():
        src = spec[path]
        jname = "/".join(path)
        want_torch = _torch_shape(src.kind, tuple(leaf.shape))
        if src.key is None:
            out[path] = jnp.full(leaf.shape, src.fill, jnp.float32)
            continue
        used.add(src.key)
        if src.key not in sd:
            problems.append(f"missing torch key {src.key!r}: expected shape {want_torch} (for jaxseg {jname} "
                            f"{tuple(leaf.shape)})")
            continue
        a = sd[src.key]
        if tuple(a.shape) != want_torch:
            problems.append(f"torch key {src.key!r} has shape {tuple(a.shape)}, expected {want_torch} (for jaxseg "
                            f"{jname} {tuple(leaf.shape)})")
            continue
        out[path] = jnp.asarray(_to_jax_layout(src.kind, a.astype(np.float32)))
    unexpected = sorted(k for k in sd if k not in used and not known_unused(k))
    if strict and unexpected:
        stats = [k for k in unexpected if _running_stat(k)]
        hint = (" (norm running statistics: jaxseg normalises with instance statistics only; a torch norm with "
                "track_running_stats=True, or batch norm, is not supported)" if stats else
                " (the hyperparameters describe a different architecture, e.g. bias/affine/res_block/"
                "deep_supervision flags; strict=False ignores them)")
        problems.append(f"unexpected torch keys{hint}: " + ", ".join(repr(k) for k in unexpected[:20])
                        + (f" ... and {len(unexpected) - 20} more" if len(unexpected) > 20 else ""))
    if problems:
        raise StateDictError(f"{len(problems)} state_dict mismatch(es):\n  " + "\n  ".join(problems))
    return traverse_util.unflatten_dict(out)


def _default_patch(strides: Sequence[Triple], patch_size) -> Triple:
    total = np.prod(np.array(strides), axis=0)
    if patch_size is None:
        return tuple(int(t) for t in total)  # type: ignore[return-value]
    p = _triple(patch_size, "patch_size")
    if any(v % int(t) for v, t in zip(p, total)):
        raise ValueError(f"patch_size {p} is not divisible by the total stride {tuple(int(t) for t in total)}")
    return p


# ------------------------------------------------------------------------------ MONAI DynUNet


def _split_monai(name_args, what: str) -> tuple[str, dict]:
    if isinstance(name_args, str):
        return name_args.lower(), {}
    if isinstance(name_args, (tuple, list)) and len(name_args) in (1, 2) and isinstance(name_args[0], str):
        return name_args[0].lower(), dict(name_args[1]) if len(name_args) == 2 else {}
    raise ValueError(f"{what}: expected a name or (name, kwargs), got {name_args!r}")


def _monai_norm(norm_name) -> tuple[str, int, bool]:
    """-> (jaxseg norm kind, groups, affine)."""
    name, args = _split_monai(norm_name, "norm_name")
    _check_eps(args.get("eps"), "norm_name")
    if args.get("track_running_stats", False):
        raise ValueError("norm_name: track_running_stats=True is not supported (jaxseg uses instance statistics)")
    if name in ("instance", "instance_nvfuser"):
        return "instance", 8, bool(args.get("affine", False))  # torch.nn.InstanceNorm3d's default: not affine
    if name == "group":
        if "num_groups" not in args:
            raise ValueError("norm_name: group norm needs num_groups")
        return "group", int(args["num_groups"]), bool(args.get("affine", True))
    raise ValueError(f"norm_name {name!r} is not supported; jaxseg has instance and group norm")


def import_dynunet(
    state_dict: Mapping[str, Any],
    *,
    in_channels: int,
    out_channels: int,
    kernel_size: Sequence,
    strides: Sequence,
    upsample_kernel_size: Sequence | None = None,
    filters: Sequence[int] | None = None,
    dropout=None,
    norm_name=("INSTANCE", {"affine": True}),
    act_name=("leakyrelu", {"inplace": True, "negative_slope": 0.01}),
    deep_supervision: bool = False,
    deep_supr_num: int = 1,
    res_block: bool = False,
    trans_bias: bool = False,
    spatial_dims: int = 3,
    patch_size: Sequence[int] | None = None,
    dtype: Any = jnp.float32,
    strict: bool = True,
) -> ImportedUNet:
    """MONAI DynUNet -> UNet3D. Arguments up to `spatial_dims` are DynUNet's, with its defaults;
    `patch_size` becomes Topology.patch_size (default: the total stride, the smallest valid input);
    strict=False ignores torch keys the architecture does not use.

    seg[0] is DynUNet's output_block; with deep supervision seg[k] (k = 1..deep_supr_num) is
    deep_supervision_heads[k-1] at its own resolution (DynUNet's training-mode forward interpolates
    these to full size and stacks them behind the output).
    Long on purpose: the signature is DynUNet's constructor argument for argument, and the body one
    checked map from its state_dict names to UNet3D's tree, read in one place."""
    if spatial_dims != 3:
        raise ValueError(f"spatial_dims={spatial_dims}: only 3D DynUNets are supported")
    n = len(strides)
    if len(kernel_size) != n or n < 3:
        raise ValueError(f"kernel_size ({len(kernel_size)}) and strides ({n}) need the same length, at least 3")
    st = [_triple(s, f"strides[{i}]") for i, s in enumerate(strides)]
    ks = [_triple(k, f"kernel_size[{i}]") for i, k in enumerate(kernel_size)]
    _check_padding(ks, st, lambda k, s: int((k - s + 1) / 2), "DynUNet")
    up = st[1:] if upsample_kernel_size is None else [_triple(u, "upsample_kernel_size") for u in upsample_kernel_size]
    if list(up) != st[1:]:
        raise ValueError(f"upsample_kernel_size {up} must equal strides[1:] {st[1:]} (jaxseg's transposed conv has "
                         "kernel = stride)")
    feats = [min(2 ** (5 + i), 320) for i in range(n)] if filters is None else [int(f) for f in filters]
    if len(feats) < n:
        raise ValueError(f"filters has {len(feats)} entries, need {n}")
    feats = feats[:n]
    norm, groups, affine = _monai_norm(norm_name)
    act_n, act_args = _split_monai(act_name, "act_name")
    act = _activation(act_n, act_args.get("negative_slope"), "act_name")
    if dropout not in (None, 0, 0.0):
        warnings.warn("DynUNet dropout is ignored: UNet3D has no dropout (inference is unaffected)", stacklevel=2)
    if deep_supervision and not 1 <= deep_supr_num < n - 1:
        raise ValueError(f"deep_supr_num={deep_supr_num} must be in [1, {n - 2}] for {n} stages")

    topo = Topology(tuple(st), tuple(ks), tuple(feats), _default_patch(st, patch_size))
    model = UNet3D(num_classes=int(out_channels), topology=topo, block="residual" if res_block else "plain",
                   norm=norm, norm_groups=groups, act=act, upsample="transpose", deep_supervision=deep_supervision,
                   num_ds_heads=deep_supr_num + 1 if deep_supervision else None, conv_bias=False,
                   dtype=dtype, decoder_block="plain", decoder_kernels=tuple(ks[1:]))

    spec: dict = {}

    def block(jpath: tuple, tpre: str, residual: bool, cin: int, cout: int, stride: Triple) -> None:
        if residual:
            r = jpath + ("res",)
            for j in (1, 2):
                _conv(spec, r + (f"conv{j}",), f"{tpre}.conv{j}.conv", False)
                _norm(spec, r + (f"norm{j}",), f"{tpre}.norm{j}", affine)
            if cin != cout or stride != (1, 1, 1):
                _conv(spec, r + ("conv3",), f"{tpre}.conv3.conv", False)
                _norm(spec, r + ("norm3",), f"{tpre}.norm3", affine)
        else:
            for j in (0, 1):
                _conv(spec, jpath + (f"block_{j}", "conv"), f"{tpre}.conv{j + 1}.conv", False)
                _norm(spec, jpath + (f"block_{j}", "norm"), f"{tpre}.norm{j + 1}", affine)

    for i in range(n):
        jname = "bottleneck" if i == n - 1 else f"encoder_{i}"
        tpre = "input_block" if i == 0 else "bottleneck" if i == n - 1 else f"downsamples.{i - 1}"
        block((jname,), tpre, res_block, int(in_channels) if i == 0 else feats[i - 1], feats[i], st[i])
    for i in range(n - 1):
        tpre = f"upsamples.{n - 2 - i}"
        spec[(f"decoder_{i}", "up", "kernel")] = _Src(f"{tpre}.transp_conv.conv.weight", "convT")
        spec[(f"decoder_{i}", "up", "bias")] = (_Src(f"{tpre}.transp_conv.conv.bias", "vec") if trans_bias
                                               else _Src(None, "vec", 0.0))
        block((f"decoder_{i}", "stage"), f"{tpre}.conv_block", False, 2 * feats[i], feats[i], (1, 1, 1))
    n_heads = deep_supr_num + 1 if deep_supervision else 1
    for k in range(n_heads):
        _conv(spec, (f"head_{k}",), "output_block.conv.conv" if k == 0 else f"deep_supervision_heads.{k - 1}.conv.conv",
              True)
    # skip_layers.* repeat the same modules under DynUNet's recursive forward structure
    params = _assemble(model, int(in_channels), spec, state_dict, strict,
                       known_unused=lambda key: key.startswith("skip_layers."))
    return ImportedUNet(model, params)


# ------------------------------------------------------------------------------ nnU-Net PlainConvUNet


def import_plain_conv_unet(
    state_dict: Mapping[str, Any],
    *,
    input_channels: int,
    n_stages: int,
    features_per_stage,
    kernel_sizes,
    strides,
    num_classes: int,
    conv_op="torch.nn.Conv3d",
    n_conv_per_stage=2,
    n_conv_per_stage_decoder=2,
    conv_bias: bool = False,
    norm_op=None,
    norm_op_kwargs: dict | None = None,
    dropout_op=None,
    dropout_op_kwargs: dict | None = None,
    nonlin=None,
    nonlin_kwargs: dict | None = None,
    deep_supervision: bool = False,
    nonlin_first: bool = False,
    patch_size: Sequence[int] | None = None,
    dtype: Any = jnp.float32,
    strict: bool = True,
) -> ImportedUNet:
    """nnU-Net v2 PlainConvUNet (dynamic_network_architectures) -> UNet3D. Arguments up to
    `nonlin_first` are PlainConvUNet's (ops as classes or nnU-Net plans' dotted strings); nnU-Net's
    plans give norm_op InstanceNorm3d with {"eps": 1e-5, "affine": True} and nonlin LeakyReLU.

    deep_supervision picks the jaxseg model's heads (every decoder level, seg[0] = seg_layers[-1]) or
    only seg_layers[-1]; nnU-Net stores all seg layers either way, so both load from any checkpoint.
    Long on purpose, like import_dynunet: PlainConvUNet's constructor and one checked name map."""
    if _name(conv_op) != "conv3d":
        raise ValueError(f"conv_op {conv_op!r}: only 3D (Conv3d) networks are supported")
    n = int(n_stages)
    if n < 2:
        raise ValueError(f"n_stages={n}: need at least 2")
    feats = [int(f) for f in _per_stage(features_per_stage, n, "features_per_stage")]
    ks = [_triple(k, f"kernel_sizes[{i}]") for i, k in enumerate(_per_stage(kernel_sizes, n, "kernel_sizes"))]
    st = [_triple(s, f"strides[{i}]") for i, s in enumerate(_per_stage(strides, n, "strides"))]
    _check_padding(ks, st, lambda k, s: (k - 1) // 2, "PlainConvUNet")
    for what, v, m in (("n_conv_per_stage", n_conv_per_stage, n), ("n_conv_per_stage_decoder",
                                                                    n_conv_per_stage_decoder, n - 1)):
        if any(int(c) != 2 for c in _per_stage(v, m, what)):
            raise ValueError(f"{what}={v!r}: jaxseg's UNet3D has exactly 2 convs per stage")
    if _name(norm_op) != "instancenorm3d":
        raise ValueError(f"norm_op {norm_op!r} is not supported: jaxseg's UNet3D normalises every conv with "
                         "InstanceNorm (nnU-Net: torch.nn.InstanceNorm3d)")
    nk = dict(norm_op_kwargs or {})
    _check_eps(nk.get("eps"), "norm_op_kwargs")
    if nk.get("track_running_stats", False):
        raise ValueError("norm_op_kwargs: track_running_stats=True is not supported")
    affine = bool(nk.get("affine", False))  # InstanceNorm3d's default
    act = _activation(_name(nonlin), (nonlin_kwargs or {}).get("negative_slope"), "nonlin")
    if nonlin_first:
        raise ValueError("nonlin_first=True (conv -> nonlin -> norm) is not supported: jaxseg is "
                         "conv -> norm -> nonlin")
    if dropout_op is not None and (dropout_op_kwargs or {}).get("p", 0.5) != 0:
        warnings.warn("PlainConvUNet dropout is ignored: UNet3D has no dropout (inference is unaffected)",
                      stacklevel=2)

    topo = Topology(tuple(st), tuple(ks), tuple(feats), _default_patch(st, patch_size))
    model = UNet3D(num_classes=int(num_classes), topology=topo, block="plain", norm="instance", act=act,
                   upsample="transpose", deep_supervision=deep_supervision, num_ds_heads=None,
                   conv_bias=bool(conv_bias), dtype=dtype)
    spec: dict = {}

    def stacked(jpath: tuple, tpre: str) -> None:
        for j in (0, 1):
            _conv(spec, jpath + (f"block_{j}", "conv"), f"{tpre}.convs.{j}.conv", bool(conv_bias))
            _norm(spec, jpath + (f"block_{j}", "norm"), f"{tpre}.convs.{j}.norm", affine)

    for i in range(n):
        stacked(("bottleneck" if i == n - 1 else f"encoder_{i}",), f"encoder.stages.{i}.0")
    for i in range(n - 1):
        s = n - 2 - i  # nnU-Net's decoder stages run from the bottleneck up
        spec[(f"decoder_{i}", "up", "kernel")] = _Src(f"decoder.transpconvs.{s}.weight", "convT")
        spec[(f"decoder_{i}", "up", "bias")] = (_Src(f"decoder.transpconvs.{s}.bias", "vec") if conv_bias
                                               else _Src(None, "vec", 0.0))
        stacked((f"decoder_{i}", "stage"), f"decoder.stages.{s}")
    for i in range(n - 1 if deep_supervision else 1):
        _conv(spec, (f"head_{i}",), f"decoder.seg_layers.{n - 2 - i}", True)

    def known_unused(key: str) -> bool:
        # .all_modules.N repeats .conv/.norm; decoder.encoder.* repeats encoder.*; unused seg layers are fine
        return (".all_modules." in key or key.startswith("decoder.encoder.")
                or (key.startswith("decoder.seg_layers.") and not _running_stat(key)))

    params = _assemble(model, int(input_channels), spec, state_dict, strict, known_unused)
    return ImportedUNet(model, params)


def nnunet_arch_kwargs(plans: str | os.PathLike | Mapping, configuration: str = "3d_fullres") -> dict:
    """PlainConvUNet keyword arguments (plus patch_size) from an nnU-Net v2 plans.json (path or dict),
    without input_channels / num_classes / deep_supervision. Reads both the current format
    ("architecture": {"network_class_name", "arch_kwargs"}) and the older one ("UNet_class_name",
    "conv_kernel_sizes", "pool_op_kernel_sizes", ...); follows "inherits_from"."""
    if not isinstance(plans, Mapping):
        with open(plans) as f:
            plans = json.load(f)
    configs = plans["configurations"]
    if configuration not in configs:
        raise KeyError(f"configuration {configuration!r} not in the plans; have {sorted(configs)}")

    def resolve(name: str, seen=()) -> dict:
        c = dict(configs[name])
        parent = c.pop("inherits_from", None)
        if parent is None:
            return c
        if parent in seen:
            raise ValueError(f"plans: circular inherits_from at {parent!r}")
        return {**resolve(parent, seen + (name,)), **c}

    c = resolve(configuration)
    if "architecture" in c:
        arch = c["architecture"]
        cls = arch["network_class_name"]
        if _name(cls) != "plainconvunet":
            raise ValueError(f"network class {cls!r} is not supported; only PlainConvUNet")
        kw = dict(arch["arch_kwargs"])
    else:
        cls = c.get("UNet_class_name", "PlainConvUNet")
        if _name(cls) != "plainconvunet":
            raise ValueError(f"network class {cls!r} is not supported; only PlainConvUNet")
        n = len(c["conv_kernel_sizes"])
        kw = dict(n_stages=n, features_per_stage=[min(c["UNet_base_num_features"] * 2**i, c["unet_max_num_features"])
                                                  for i in range(n)],
                  conv_op="torch.nn.modules.conv.Conv3d", kernel_sizes=c["conv_kernel_sizes"],
                  strides=c["pool_op_kernel_sizes"], n_conv_per_stage=c["n_conv_per_stage_encoder"],
                  n_conv_per_stage_decoder=c["n_conv_per_stage_decoder"], conv_bias=True,
                  norm_op="torch.nn.modules.instancenorm.InstanceNorm3d",
                  norm_op_kwargs={"eps": 1e-5, "affine": True}, dropout_op=None, dropout_op_kwargs=None,
                  nonlin="torch.nn.LeakyReLU", nonlin_kwargs={"inplace": True})
    if "patch_size" in c:
        kw["patch_size"] = tuple(c["patch_size"])
    return kw


def import_nnunet_plans(
    state_dict: Mapping[str, Any],
    plans: str | os.PathLike | Mapping,
    configuration: str = "3d_fullres",
    *,
    input_channels: int | None = None,
    num_classes: int | None = None,
    deep_supervision: bool = False,
    **kwargs,
) -> ImportedUNet:
    """An nnU-Net v2 model from its plans.json and weights (e.g. `load_torch_checkpoint(
    ".../fold_0/checkpoint_final.pth")`). input_channels and num_classes default to what the weights'
    first conv and last seg layer hold. Further kwargs (dtype, strict, patch_size) go to
    `import_plain_conv_unet`."""
    kw = nnunet_arch_kwargs(plans, configuration)
    sd = _numpy_state_dict(state_dict)
    n = int(kw["n_stages"])
    first, last = "encoder.stages.0.0.convs.0.conv.weight", f"decoder.seg_layers.{n - 2}.weight"
    for key, given in ((first, input_channels), (last, num_classes)):
        if given is None and key not in sd:
            raise StateDictError(f"missing torch key {key!r}: cannot infer the channel counts; pass "
                                 "input_channels= and num_classes=")
    input_channels = int(sd[first].shape[1]) if input_channels is None else input_channels
    num_classes = int(sd[last].shape[0]) if num_classes is None else num_classes
    kw.update(kwargs)
    return import_plain_conv_unet(sd, input_channels=input_channels, num_classes=num_classes,
                                  deep_supervision=deep_supervision, **kw)
