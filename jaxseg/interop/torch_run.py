"""A PyTorch checkpoint (MONAI DynUNet or nnU-Net v2 PlainConvUNet) -> a jaxseg run directory that
`python -m jaxseg.launch predict --run RUN_DIR` (and `train.init_from=RUN_DIR`) accepts.

`import_torch_run(checkpoint, kind, out, arch=... | plans=...)` writes, into a temporary folder next to
`out` that is renamed to `out` only once everything is written and checked:

  config.yaml    a full jaxseg config whose `model` section rebuilds the imported topology with
                 `jaxseg.models.build_model`, and whose `data` section holds the channels, classes,
                 patch size and target spacing
  preprocessing.json  what predict does to an input before the network (jaxseg.rundir): prepare's
                 steps, the target spacing, channel and class names
  best/0/        the parameters, in train's Orbax layout (items `state` = {"step", "params"} and
                 `meta` = train's meta record plus "imported"); `predict --checkpoint best` (the
                 default) loads them. There is no `ckpt/` (no training history; `--checkpoint last`
                 says so)
  run.json       train's run record (versions, git revision) plus "imported_from"
  import.json    source file, its sha256, kind, architecture arguments, what was adapted to fit
                 the config, and the max abs logit difference to the torch model on a random input

The config's `model` section says everything the importers build: DynUNet's bias-free convolutions
(`conv_bias: false`), its plain decoder blocks under a residual encoder (`decoder_block: plain`) and
its decoder kernels (`decoder_kernels`: decoder level i uses kernel_size[i + 1]). Per-stage features
that are not `min(features_base * 2**i, features_max)` cannot be expressed and are refused. The
config-built model has the imported model's parameter tree, leaf for leaf, and is checked against
the imported one (and against torch) before anything is written.
"""

from __future__ import annotations

import datetime
import hashlib
import json
import os
import pickle
import shutil
import tempfile
import warnings
import zipfile
from pathlib import Path
from typing import Any, Sequence

import numpy as np

KINDS = ("dynunet", "nnunet")
REL_TOL = 1e-3  # max |jaxseg - torch| allowed, relative to max(1, max |torch logit|)


class ImportRunError(ValueError):
    """A bad input to `import_torch_run`: one line naming the file (or option) and the problem."""


def _one_line(e: BaseException, limit: int = 4) -> str:
    """An exception's message on one line; multi-line lists (StateDictError) keep the first `limit` items."""
    msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    lines = [ln.strip() for ln in str(msg).splitlines() if ln.strip()]
    if not lines:
        return type(e).__name__
    head, items = lines[0], lines[1:]
    if items:
        more = f"; ... and {len(items) - limit} more" if len(items) > limit else ""
        head = f"{head.rstrip(':')}: " + "; ".join(items[:limit]) + more
    return head


def sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def parse_triple(text: str | Sequence | None, option: str, kind=int):
    """"X,Y,Z" (or one value for all three axes) -> a tuple of 3 positive numbers; None stays None."""
    if text is None:
        return None
    parts = text.split(",") if isinstance(text, str) else list(text)
    try:
        values = tuple(kind(p) for p in parts)
    except (TypeError, ValueError):
        raise ImportRunError(f"{option} {text!r}: expected X,Y,Z ({kind.__name__} values)") from None
    if len(values) == 1:
        values = values * 3
    if len(values) != 3 or not all(np.isfinite(v) and v > 0 for v in values):
        raise ImportRunError(f"{option} {text!r}: expected 3 positive values X,Y,Z")
    return values


def _read_json(path: str | os.PathLike, option: str) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ImportRunError(f"{path}: no such file ({option})")
    try:
        data = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ImportRunError(f"{path}: not valid JSON ({option}): {_one_line(e)}") from None
    if not isinstance(data, dict):
        raise ImportRunError(f"{path}: expected a JSON object ({option}), got {type(data).__name__}")
    return data


def _kind_hint(kind: str, keys) -> str:
    keys = list(keys)
    if kind == "dynunet" and any(k.startswith(("encoder.stages.", "decoder.seg_layers.")) for k in keys):
        return " (the weights look like an nnU-Net PlainConvUNet: try --kind nnunet --plans plans.json)"
    if kind == "nnunet" and any(k.startswith(("input_block.", "downsamples.", "output_block.")) for k in keys):
        return " (the weights look like a MONAI DynUNet: try --kind dynunet --arch arch.json)"
    return ""


# ------------------------------------------------------------------------------ model -> config


def _stage_features_params(features: Sequence[int]) -> tuple[int, int] | None:
    """(features_base, features_max) with features == min(base * 2**i, max), or None."""
    from jaxseg.models.topology import stage_features

    base, top = int(features[0]), int(max(features))
    if tuple(stage_features(len(features), base, top)) == tuple(int(f) for f in features):
        return base, top
    return None


def config_for(model, *, num_channels: int, spacing, experiment: str):
    """(Config, adaptations): the jaxseg config whose build_model gives the imported UNet3D `model` (the
    same parameter tree), and the list of parameter adaptations `fit_params` makes (none: the config
    expresses conv_bias, decoder_block and decoder_kernels; kept in import.json for the record)."""
    from jaxseg.config import Config, from_dict

    topo = model.topology
    n = topo.n_stages
    fb = _stage_features_params(topo.features)
    if fb is None:
        raise ImportRunError(
            f"features per stage {list(topo.features)} are not min(base * 2**i, max): jaxseg's config cannot "
            "express them (it would need a model.features field)")
    if model.age_head:
        raise ImportRunError("an age head cannot be imported")
    decoder_block = model.decoder_block if model.decoder_block not in (None, model.block) else "same"
    decoder_kernels = (None if model.decoder_kernels is None
                       or tuple(map(tuple, model.decoder_kernels)) == tuple(map(tuple, topo.kernels[:n - 1]))
                       else [list(k) for k in model.decoder_kernels])
    model_section = dict(
        arch="unet", features_base=fb[0], features_max=fb[1], n_stages=n,
        strides=[list(s) for s in topo.strides], kernels=[list(k) for k in topo.kernels],
        block=model.block, norm=model.norm, norm_groups=int(model.norm_groups), activation=model.act,
        upsample=model.upsample, deep_supervision=bool(model.deep_supervision),
        num_ds_heads=model.num_ds_heads if model.deep_supervision else None,
        compute_dtype="float32", age_head=False,
        decoder_block=decoder_block, decoder_kernels=decoder_kernels, conv_bias=bool(model.conv_bias))
    data_section = dict(num_channels=int(num_channels), num_classes=int(model.num_classes),
                        patch_size=list(topo.patch_size), spacing=None if spacing is None else list(spacing))
    cfg = from_dict(Config, {"experiment": experiment, "data": data_section, "model": model_section},
                    source="import-torch")
    return cfg, []


def fit_params(src_model, src_params, dst_model, in_channels: int) -> dict:
    """The imported parameters as `dst_model`'s tree (the config-built UNet3D): the same tree, checked
    leaf for leaf (every destination leaf present with the same shape, every source leaf used)."""
    import jax
    import jax.numpy as jnp
    from flax import traverse_util

    total = np.prod(np.array(dst_model.topology.strides), axis=0)
    x = jax.ShapeDtypeStruct((1, *(int(t) for t in total), int(in_channels)), jnp.float32)
    abstract = jax.eval_shape(lambda x: dst_model.init(jax.random.key(0), x)["params"], x)
    dst = traverse_util.flatten_dict(abstract)
    src = {k: np.asarray(v, np.float32) for k, v in traverse_util.flatten_dict(src_params).items()}
    out = {}
    for path, leaf in dst.items():
        if path not in src:
            raise RuntimeError(f"torch import: no source for the config model's parameter {'/'.join(path)}")
        if src[path].shape != tuple(leaf.shape):
            raise RuntimeError(f"torch import: {'/'.join(path)} has shape {src[path].shape}, the config model "
                               f"{tuple(leaf.shape)}")
        out[path] = src[path]
    unused = sorted("/".join(p) for p in src if p not in dst)
    if unused:
        raise RuntimeError(f"torch import: imported parameters the config model has no place for: {unused}")
    return traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in out.items()})


# ------------------------------------------------------------------------------ torch reference


def _tupled(v):
    return tuple(_tupled(x) for x in v) if isinstance(v, list) else v


def _torch_model(kind: str, arch_kwargs: dict, in_channels: int, num_classes: int):
    """The torch model the checkpoint was trained as (eval mode), or raise ImportError."""
    if kind == "dynunet":
        import inspect

        from monai.networks.nets import DynUNet

        accepted = inspect.signature(DynUNet).parameters
        kw = {k: v for k, v in arch_kwargs.items() if k in accepted}
        for key in ("norm_name", "act_name", "dropout"):
            if isinstance(kw.get(key), list):
                kw[key] = _tupled(kw[key])
        kw.setdefault("spatial_dims", 3)
        return DynUNet(**kw).eval()
    import pydoc

    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    kw = {k: v for k, v in arch_kwargs.items() if k != "patch_size"}
    for key in ("conv_op", "norm_op", "dropout_op", "nonlin"):
        if isinstance(kw.get(key), str):
            located = pydoc.locate(kw[key])
            if located is None:
                raise ValueError(f"cannot locate {key} {kw[key]!r}")
            kw[key] = located
    return PlainConvUNet(input_channels=in_channels, num_classes=num_classes, deep_supervision=False, **kw).eval()


def _compare_with_torch(kind, arch_kwargs, state_dict, model, params, in_channels, x: np.ndarray) -> dict:
    """Max abs difference between jaxseg's seg[0] and the torch model's output on `x` (N, X, Y, Z, C)."""
    try:
        import torch

        tmodel = _torch_model(kind, arch_kwargs, in_channels, model.num_classes)
    except ImportError as e:
        return {"max_abs_logit_diff": None, "note": f"skipped: {e} (install torch and "
                f"{'monai' if kind == 'dynunet' else 'dynamic-network-architectures'} to measure it)"}
    try:
        tmodel.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()},
                               strict=True)
    except RuntimeError as e:
        raise ImportRunError(f"the torch model built from the architecture arguments does not load the "
                             f"weights: {_one_line(e)}") from None
    with torch.no_grad():
        t_out = tmodel(torch.from_numpy(np.ascontiguousarray(x.transpose(0, 4, 1, 2, 3))))
    t_out = t_out[0] if isinstance(t_out, (list, tuple)) else t_out
    t_out = t_out.numpy().transpose(0, 2, 3, 4, 1)
    j_out = _apply(model, params, x)
    diff = float(np.abs(j_out - t_out).max())
    return {"max_abs_logit_diff": diff, "max_abs_logit": float(np.abs(t_out).max()),
            "torch_version": torch.__version__}


def _apply(model, params, x: np.ndarray) -> np.ndarray:
    import jax

    return np.asarray(jax.jit(model.apply)({"params": params}, x).seg[0])


# ------------------------------------------------------------------------------ the import


def _import_model(kind, state_dict, arch_kwargs, *, plans, configuration, patch_size):
    from jaxseg.interop.torch_import import import_dynunet, import_nnunet_plans

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # dropout: identity at inference
        if kind == "dynunet":
            kw = dict(arch_kwargs)
            if patch_size is not None:
                kw["patch_size"] = patch_size
            return import_dynunet(state_dict, **kw)
        extra = {} if patch_size is None else {"patch_size": patch_size}
        return import_nnunet_plans(state_dict, plans, configuration, deep_supervision=True, **extra)


def import_torch_run(checkpoint: str | os.PathLike, kind: str, out: str | os.PathLike, *,
                     arch: str | os.PathLike | None = None, plans: str | os.PathLike | None = None,
                     configuration: str = "3d_fullres", patch_size: Sequence[int] | None = None,
                     spacing: Sequence[float] | None = None, verify: bool = True, seed: int = 0) -> dict:
    """Convert a PyTorch checkpoint into the jaxseg run directory `out` (see the module docstring).
    Returns the import record (import.json). Bad inputs raise ImportRunError (one line, naming the file);
    `out` is written completely or not at all. Long: every flag combination is checked up front, each with
    its own one-line error, before anything is read or written."""
    checkpoint, out = Path(checkpoint), Path(out)
    if kind not in KINDS:
        raise ImportRunError(f"--kind {kind!r}: expected one of {', '.join(KINDS)}")
    if kind == "dynunet" and arch is None:
        raise ImportRunError(f"{checkpoint}: --kind dynunet needs --arch ARCH.json (DynUNet's constructor "
                             "arguments)")
    if kind == "nnunet" and plans is None:
        raise ImportRunError(f"{checkpoint}: --kind nnunet needs --plans plans.json")
    if kind == "dynunet" and plans is not None:
        raise ImportRunError(f"{plans}: --plans is for --kind nnunet; a DynUNet takes --arch")
    if kind == "nnunet" and arch is not None:
        raise ImportRunError(f"{arch}: --arch is for --kind dynunet; nnU-Net's architecture comes from --plans")
    if not checkpoint.is_file():
        raise ImportRunError(f"{checkpoint}: no such file")
    if out.exists():
        raise ImportRunError(f"{out}: already exists; the import writes a new run directory (choose another "
                             "--out or remove it)")
    patch_size = parse_triple(patch_size, "--patch-size", int)
    spacing = parse_triple(spacing, "--spacing", float)

    # architecture arguments
    if kind == "dynunet":
        arch_kwargs = _read_json(arch, "--arch")
        arch_file, arch_what = Path(arch), "--arch"
    else:
        from jaxseg.interop.torch_import import nnunet_arch_kwargs

        plans_dict = _read_json(plans, "--plans")
        arch_file, arch_what = Path(plans), f"--plans configuration {configuration!r}"
        try:
            arch_kwargs = nnunet_arch_kwargs(plans_dict, configuration)
        except (KeyError, ValueError, TypeError) as e:
            raise ImportRunError(f"{plans}: {_one_line(e)}") from None

    # weights
    try:
        from jaxseg.interop.torch_import import load_torch_checkpoint

        state_dict = load_torch_checkpoint(checkpoint)
    except ImportError:
        raise ImportRunError(f"{checkpoint}: reading a PyTorch checkpoint needs torch (pip install torch)") from None
    except (ValueError, KeyError, RuntimeError, EOFError, OSError, pickle.UnpicklingError, zipfile.BadZipFile,
            AttributeError) as e:
        raise ImportRunError(f"{checkpoint}: not a readable PyTorch checkpoint: {_one_line(e)}") from None

    # jaxseg model, as the importer builds it
    from jaxseg.interop.torch_import import StateDictError

    try:
        imported = _import_model(kind, state_dict, arch_kwargs, plans=plans_dict if kind == "nnunet" else None,
                                 configuration=configuration, patch_size=patch_size)
    except StateDictError as e:
        raise ImportRunError(f"{checkpoint}: the weights do not match {arch_file} ({arch_what})"
                             f"{_kind_hint(kind, state_dict)}: {_one_line(e)}") from None
    except (ValueError, TypeError, KeyError) as e:
        if patch_size is not None and "patch_size" in str(e):
            raise ImportRunError(f"--patch-size {','.join(map(str, patch_size))}: {_one_line(e)}") from None
        raise ImportRunError(f"{arch_file}: {arch_what}: {_one_line(e)}{_kind_hint(kind, state_dict)}") from None
    model, params = imported
    patch_source = ("--patch-size" if patch_size is not None else
                    "--arch" if kind == "dynunet" and "patch_size" in arch_kwargs else
                    "--plans" if kind == "nnunet" and "patch_size" in arch_kwargs else
                    "default: the total stride (pass --patch-size for larger windows)")
    in_channels = int(arch_kwargs["in_channels"]) if kind == "dynunet" else int(
        state_dict["encoder.stages.0.0.convs.0.conv.weight"].shape[1])

    # the config that rebuilds it, and the parameters in that model's tree
    try:
        cfg, adaptations = config_for(model, num_channels=in_channels, spacing=spacing,
                                      experiment=f"import-{kind}-{checkpoint.stem}")
    except ImportRunError as e:
        raise ImportRunError(f"{arch_file}: {e}") from None
    from jaxseg.models import build_model

    dst_model = build_model(cfg)
    dst_params = fit_params(model, params, dst_model, in_channels)

    # checks on a random input of twice the total stride (the bottleneck has 2 voxels per axis)
    total = np.prod(np.array(model.topology.strides), axis=0)
    x = np.random.default_rng(seed).standard_normal((1, *(2 * int(t) for t in total), in_channels)).astype(np.float32)
    ref = _apply(model, params, x)
    rebuilt = _apply(dst_model, dst_params, x)
    rebuild_diff = float(np.abs(ref - rebuilt).max())
    scale = max(1.0, float(np.abs(ref).max()))
    if not np.isfinite(rebuild_diff) or rebuild_diff > REL_TOL * scale:
        raise RuntimeError(f"torch import: the config-built model differs from the imported one by {rebuild_diff}")
    if verify:
        check = _compare_with_torch(kind, arch_kwargs, state_dict, dst_model, dst_params, in_channels, x)
        d = check["max_abs_logit_diff"]
        if d is not None and (not np.isfinite(d) or d > REL_TOL * max(1.0, check["max_abs_logit"])):
            raise ImportRunError(f"{checkpoint}: the imported model's logits differ from torch's by {d:.3g} "
                                 f"(max |logit| {check['max_abs_logit']:.3g}) on a random input; not written")
    else:
        check = {"max_abs_logit_diff": None, "note": "skipped (--no-verify)"}
    check.update(input_shape_channels_first=[1, in_channels, *x.shape[1:4]], seed=seed,
                 jaxseg_rebuild_max_abs_diff=rebuild_diff)

    record = {
        "source": str(checkpoint.absolute()),
        "sha256": sha256(checkpoint),
        "size_bytes": checkpoint.stat().st_size,
        "kind": kind,
        "arch_file": str(arch_file.absolute()),
        "configuration": configuration if kind == "nnunet" else None,
        "arch_kwargs": arch_kwargs,
        "patch_size": list(model.topology.patch_size),
        "patch_size_from": patch_source,
        "target_spacing": None if spacing is None else list(spacing),
        "in_channels": in_channels,
        "num_classes": int(model.num_classes),
        "adaptations": adaptations,
        "verification": check,
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "notes": ["inputs are preprocessed as jaxseg's prepare does (RAS reorientation, crop to the nonzero box, "
                  "z-score over nonzero voxels, resampling to target_spacing when set) and fed as arrays in RAS "
                  "(X, Y, Z) order; the network was trained on its own framework's preprocessing and axis order"],
    }
    _write_run(out, cfg, dst_params, record, in_channels)
    return record


def _write_run(out: Path, cfg, params, record: dict, in_channels: int) -> None:
    """Everything into a temporary sibling folder, then one rename; nothing is left on failure."""
    import jax
    import orbax.checkpoint as ocp

    from jaxseg import rundir
    from jaxseg.data.prepare import PREPROCESSING_VERSION
    from jaxseg.train import checkpoint as ckpt

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.import-", dir=out.parent))
    try:
        spacing = record["target_spacing"]
        rundir.write_run(tmp, cfg, {
            "version": PREPROCESSING_VERSION, "orientation": "RAS", "crop": "nonzero_bbox",
            "normalization": "zscore_nonzero", "target_spacing": spacing,
            "channel_names": [f"channel_{i}" for i in range(in_channels)],
            "labels": {"background": 0, **{f"class_{k}": k for k in range(1, record["num_classes"])}},
            "median_spacing": spacing, "imported_from": record["source"]}, imported_from=record["source"])
        state = {"step": np.zeros((), np.int32), "params": jax.device_get(params)}
        mgr = ckpt.manager(tmp / "best", 1)
        mgr.save(0, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            meta=ocp.args.JsonSave(ckpt.meta_record(cfg, 0, best={"val_dice": None, "step": 0},
                                                    imported={k: record[k] for k in ("source", "sha256", "kind")})),
        ))
        mgr.wait_until_finished()
        mgr.close()
        (tmp / "import.json").write_text(json.dumps(record, indent=2, default=_json_default) + "\n")
        if out.exists():  # appeared meanwhile (os.rename would replace an empty folder)
            raise ImportRunError(f"{out}: appeared while importing; nothing written")
        os.rename(tmp, out)  # and fails if a non-empty `out` appeared since: never merges into another run
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _json_default(o: Any):
    if isinstance(o, (np.integer, np.floating)):
        return o.item()
    if isinstance(o, (tuple, set)):
        return list(o)
    return str(o)
