"""Case splits: nnU-Net's k-fold split, explicit case lists, nested subsets. Training, the studies and
DeepLesionBrain all take their cases from here."""

from __future__ import annotations

import numpy as np

from jaxseg.data.io import DataError

__all__ = ["kfold_split", "limit_cases", "select_cases"]


def kfold_split(case_ids, fold: int | str, num_folds: int = 5, seed: int = 12345) -> tuple[list, list]:
    """nnU-Net's split: sklearn KFold(num_folds, shuffle=True, random_state=seed) over sorted case ids.
    `fold: all` trains on every case and validates on none."""
    keys = sorted(case_ids)
    if fold == "all":
        return keys, []
    if len(keys) < num_folds:
        raise ValueError(f"{len(keys)} training cases cannot make {num_folds} folds; use data.fold=all")
    idx = np.arange(len(keys))
    np.random.RandomState(seed).shuffle(idx)  # what sklearn's KFold(shuffle=True) does
    sizes = np.full(num_folds, len(keys) // num_folds)
    sizes[: len(keys) % num_folds] += 1
    start = int(sizes[:fold].sum())
    val = set(idx[start: start + sizes[fold]].tolist())
    return [keys[i] for i in range(len(keys)) if i not in val], [keys[i] for i in sorted(val)]


def select_cases(case_ids, cfg, store_root) -> tuple[list, list]:
    """(train, validation) case ids: `data.train_cases` / `data.val_cases` when given (each must be a
    training case of the store), else the `data.fold` split."""
    d = cfg.data
    if d.train_cases is None:
        return kfold_split(case_ids, d.fold, d.num_folds, d.split_seed)
    known = set(case_ids)
    for key, ids in (("train_cases", d.train_cases), ("val_cases", d.val_cases or ())):
        missing = [c for c in ids if c not in known]
        if missing:
            raise DataError(f"{store_root}: data.{key} names {len(missing)} case(s) that are not training "
                                f"cases of the store, e.g. {missing[0]!r}")
    return sorted(d.train_cases), sorted(d.val_cases or ())


def limit_cases(case_ids, max_cases: int | None, seed: int = 12345) -> list:
    """The first `max_cases` of `case_ids` in a random order fixed by `seed` (returned in sorted order);
    all of them when `max_cases` is None or not smaller. Deterministic: the sorted ids are permuted by
    numpy's PCG64 seeded with `seed` (data.split_seed), so a smaller N is a prefix of a larger one's
    draw (nested subsets)."""
    keys = sorted(case_ids)
    if max_cases is None or max_cases >= len(keys):
        return keys
    order = np.random.default_rng(seed).permutation(len(keys))
    return sorted(keys[i] for i in order[:max_cases])
