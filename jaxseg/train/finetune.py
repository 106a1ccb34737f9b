"""Transfer-learning strategies of the neonatal paper (Richter & Fetit, dHCP) as parameter masks over U-Net stages.

The strategies say which U-Net stages are trained, counted from the bottleneck outwards (the paper's
"from the inside to the outside"). With `n` stages the UNet3D parameter tree is ``encoder_0 ..
encoder_{n-2}``, ``bottleneck``, ``decoder_{n-2} .. decoder_0``, ``head_*`` and optionally ``age_head``
(see jaxseg.models.unet); encoder level ``i`` and decoder level ``i`` are at the same resolution and
``decoder_i`` merges the skip of ``encoder_i``, so level ``n-2`` is next to the bottleneck and level 0 is
the full-resolution level. With ``L = n - 1`` encoder/decoder levels:

=========  =======================================================================================
none       nothing trains: the pre-trained model is evaluated as it is.
shallow    bottleneck + the adjacent encoder and decoder blocks (level ``n-2``).
medium     shallow + one more encoder and decoder block (levels ``n-3 .. n-2``).
deep       every level except the outermost, full-resolution one (levels ``1 .. n-2``).
full       everything.
=========  =======================================================================================

The names follow the paper; the authors' reference code names them the other way round (its
"deep" is the paper's shallow, its "shallow" the paper's deep).

``deep``: the paper says "two more downsampling and upsampling blocks" than medium, for its 6-stage
network (128^3 patch, bottleneck at 4^3): bottleneck + levels 1..4, i.e. all but the full-resolution
level. The authors' code selects exactly that for both of its networks (6 stages: 4 levels; the 5-stage
96^3 network: 3 levels), so `deep` is "all levels but the outermost" here, which is "medium + 2" on the
paper's network. A strategy that would coincide with its neighbour on a network with too few stages
(``shallow`` needs n >= 3, ``medium`` n >= 4, ``deep`` n >= 5) is refused instead of silently
training the same thing under another name.

Heads (a choice the paper does not spell out):

* ``head_i`` (the 1x1x1 segmentation / deep-supervision head that reads ``decoder_i``) trains exactly
  when ``decoder_i`` trains. So the final output head ``head_0`` (level 0) trains only under ``full``,
  and a deep-supervision head is never trained on top of frozen features. (The reference code trains
  every deep-supervision head in every partial strategy and freezes the final output block; the final
  output block is the same here, the deep-supervision heads follow their level.)
* ``age_head`` (AgeU-Net, reads the bottleneck) trains exactly when the bottleneck trains: in every
  strategy but ``none``.

Norm scales and biases belong to their stage and are frozen with it (instance/group norm keep no
running statistics, so a frozen stage is bit-for-bit fixed).

API::

    trainable_mask(params, strategy, n_stages=None) -> pytree of bools shaped like params
    freeze(tx, mask) -> optax.GradientTransformation   # frozen leaves: zero updates, no moments
    describe(mask, params=None) -> str                  # which stages train, for logs
    trainable_stages(mask) -> list[str]

`make_optimizer(cfg.optim, ..., trainable=mask)` (jaxseg.train.optim) does the same masking as
`freeze(make_optimizer(cfg.optim, ...), mask)`: gradient clipping and weight decay see the trainable
leaves only.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

import jax
import numpy as np
import optax

__all__ = ["STRATEGIES", "Strategy", "trainable_mask", "trainable_levels", "freeze", "describe",
           "trainable_stages"]

Strategy = Literal["none", "shallow", "medium", "deep", "full"]
STRATEGIES: tuple[str, ...] = ("none", "shallow", "medium", "deep", "full")

# Smallest number of U-Net stages for which the strategy differs from its neighbours.
_MIN_STAGES = {"none": 1, "shallow": 3, "medium": 4, "deep": 5, "full": 1}
_NAME = re.compile(r"^(encoder|decoder|head)_(\d+)$")


def _stage_tree(params: Any) -> Mapping:
    """The mapping whose keys are the stage names: `params` itself, or `params["params"]` for a
    variables dict as `model.init` returns it."""
    if not isinstance(params, Mapping):
        raise TypeError(f"params must be a mapping of U-Net stage names to parameters, got {type(params).__name__}")
    if set(params.keys()) == {"params"} and isinstance(params["params"], Mapping):
        return params["params"]
    return params


def _parse(names: list[str], n_stages: int | None) -> tuple[int, dict[str, int | None]]:
    """Map each top-level name to its level (None for the bottleneck and the age head); return n."""
    levels: dict[str, int | None] = {}
    enc, dec, unknown = set(), set(), []
    for name in names:
        m = _NAME.match(name)
        if m:
            levels[name] = int(m.group(2))
            if m.group(1) == "encoder":
                enc.add(levels[name])
            elif m.group(1) == "decoder":
                dec.add(levels[name])
        elif name in ("bottleneck", "age_head"):
            levels[name] = None
        else:
            unknown.append(name)
    if "bottleneck" not in levels:
        raise ValueError(
            f"the parameter tree has no U-Net stage names (expected encoder_0.., bottleneck, decoder_.., "
            f"head_.., age_head as built by jaxseg.models.UNet3D); its top-level keys are {sorted(names)}")
    if unknown:
        raise ValueError(f"parameter tree has top-level keys that are not U-Net stages: {sorted(unknown)}; "
                         f"cannot tell whether they are trainable (stages are {sorted(levels)})")
    n = len(enc) + 1
    if enc != set(range(n - 1)) or dec != set(range(n - 1)):
        raise ValueError(f"inconsistent U-Net stages: encoders {sorted(enc)}, decoders {sorted(dec)} "
                         f"(expected encoder_0..encoder_{n - 2} and decoder_0..decoder_{n - 2})")
    bad_heads = sorted(k for k, v in levels.items() if k.startswith("head_") and v is not None and v > n - 2)
    if bad_heads:
        raise ValueError(f"heads {bad_heads} read decoder levels this {n}-stage U-Net does not have")
    if n_stages is not None and n_stages != n:
        raise ValueError(f"n_stages={n_stages} but the parameter tree has {n} stages "
                         f"(encoder_0..encoder_{n - 2} + bottleneck)")
    return n, levels


def trainable_levels(strategy: str, n_stages: int) -> tuple[bool, list[int]]:
    """(bottleneck trains, trainable encoder/decoder levels) of `strategy` on an n-stage U-Net."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown fine-tuning strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    if n_stages < _MIN_STAGES[strategy]:
        raise ValueError(
            f"fine-tuning strategy {strategy!r} needs a U-Net with at least {_MIN_STAGES[strategy]} stages to "
            f"differ from its neighbouring strategy; this one has {n_stages}")
    n_levels = n_stages - 1
    depth = {"none": 0, "shallow": 1, "medium": 2, "deep": n_levels - 1, "full": n_levels}[strategy]
    return strategy != "none", list(range(n_levels - depth, n_levels))


def trainable_mask(params: Any, strategy: str, n_stages: int | None = None) -> Any:
    """A pytree of Python bools with the structure of `params` (a UNet3D parameter tree, or the
    variables dict ``{"params": ...}``): True where the leaf trains under `strategy`.

    `n_stages` (optional) is checked against the stages found in the tree.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown fine-tuning strategy {strategy!r}; valid: {', '.join(STRATEGIES)}")
    tree = _stage_tree(params)
    n, levels = _parse(list(tree.keys()), n_stages)
    bottleneck, trainable = trainable_levels(strategy, n)
    trainable = set(trainable)

    def flag(name: str) -> bool:
        level = levels[name]
        return bottleneck if level is None else level in trainable

    inner = {k: jax.tree.map(lambda _, f=flag(k): f, v) for k, v in tree.items()}
    inner = _like(tree, inner)
    if tree is not params:
        return _like(params, {"params": inner})
    return inner


def _like(template: Mapping, d: dict) -> Any:
    """`d` in the container type of `template` (dict or flax FrozenDict), so tree structures match."""
    if type(template) is dict:
        return d
    try:
        return type(template)(d)
    except TypeError:
        return d


def _check_mask(mask: Any) -> list:
    leaves = jax.tree.leaves(mask)
    bad = [x for x in leaves if not isinstance(x, (bool, np.bool_))]
    if bad:
        raise TypeError(f"a trainable mask needs Python bools as leaves, got {type(bad[0]).__name__}")
    return leaves


def freeze(tx: optax.GradientTransformation, mask: Any) -> optax.GradientTransformation:
    """Wrap `tx` so that leaves whose mask is False get exactly zero updates and no optimiser state.

    The mask (from :func:`trainable_mask`) must have the structure of the parameters. `tx` sees only
    the trainable leaves (gradient clipping, weight decay and moments are computed on them alone), as
    if the frozen ones had ``requires_grad=False`` in torch. An all-True mask returns `tx` itself; an
    all-False one :func:`optax.set_to_zero`.
    """
    leaves = _check_mask(mask)
    if all(leaves):
        return tx
    if not any(leaves):
        return optax.set_to_zero()
    labels = jax.tree.map(lambda t: "train" if t else "freeze", mask)
    return optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)


def _stage_states(mask: Any) -> dict[str, str]:
    """Top-level stage name -> "trainable" / "frozen" / "partial", in network order (encoders from the
    full-resolution one, bottleneck, age head, decoders from the bottleneck outwards, heads)."""
    tree = _stage_tree(mask)
    n = sum(1 for k in tree if str(k).startswith("encoder_")) + 1

    def order(name):
        m = _NAME.match(str(name))
        if m:
            i = int(m.group(2))
            return {"encoder": (0, i), "decoder": (2, n - i), "head": (3, i)}[m.group(1)]
        return {"bottleneck": (1, 0), "age_head": (1, 1)}.get(name, (4, 0, str(name)))

    out = {}
    for name in sorted(tree, key=order):
        flags = _check_mask(tree[name])
        out[name] = "trainable" if flags and all(flags) else "frozen" if not any(flags) else "partial"
    return out


def trainable_stages(mask: Any) -> list[str]:
    """Names of the top-level stages whose leaves all train, in network order."""
    return [k for k, state in _stage_states(mask).items() if state == "trainable"]


def describe(mask: Any, params: Any = None) -> str:
    """One line for logs: the trainable and frozen top-level stages (network order), and with
    `params` the number of trainable parameters."""
    states = _stage_states(mask)
    parts = []
    for state in ("trainable", "partial", "frozen"):
        sel = [k for k, v in states.items() if v == state]
        if sel or state != "partial":
            parts.append(f"{state}: {', '.join(sel) if sel else '(none)'}")
    text = "; ".join(parts)
    if params is not None:
        flags = jax.tree.leaves(mask)
        sizes = [int(np.size(x)) for x in jax.tree.leaves(params)]
        if len(flags) != len(sizes):
            raise ValueError(f"mask has {len(flags)} leaves but params has {len(sizes)}")
        total, train = sum(sizes), sum(s for s, f in zip(sizes, flags) if f)
        text += f" ({train:,} of {total:,} parameters trainable, {100.0 * train / max(total, 1):.1f}%)"
    return text
