"""The prepared cases of a store as a grain random-access data source."""

from __future__ import annotations

import json
import operator
import threading
from pathlib import Path
from typing import Any, Sequence


from jaxseg.data import store

class CaseSource:
    """Random access over the prepared cases of a store (grain ``RandomAccessDataSource``).

    ``split``: keep cases whose ``meta["split"]`` is this string (or in this collection);
    ``None`` keeps all. ``require_label``: keep only cases with a label (training).
    ``case_ids``: an explicit subset (e.g. a fold), in this order; default: all complete cases,
    sorted. ``context``: an optional ``tensorstore.Context`` shared by all cases (e.g. with a
    ``cache_pool``). ``src[i]`` opens case i on first use and caches it (its arrays are read
    lazily; its ``fg`` coordinates, at most 10000 x 3 int32 per class, stay in memory).
    """

    def __init__(self, root, *, split: str | Sequence[str] | None = None,
                 require_label: bool = True, case_ids: Sequence[str] | None = None,
                 context: Any = None):
        self.root = Path(root)
        ids = list(store.list_cases(self.root)) if case_ids is None else [str(c) for c in case_ids]
        splits = None if split is None else ({split} if isinstance(split, str) else set(split))
        keep, metas = [], []
        for cid in ids:
            path = self.root / cid / "meta.json"
            if not path.is_file():
                raise FileNotFoundError(f"{path}: case {cid!r} is not a complete case of the store {self.root}")
            with open(path) as f:
                meta = json.load(f)
            if splits is not None and meta.get("split") not in splits:
                continue
            if require_label and not meta.get("has_label", False):
                continue
            keep.append(cid)
            metas.append(meta)
        if not keep:
            raise ValueError(f"{self.root}: no case left (of {len(ids)}) with split={split!r}, "
                             f"require_label={require_label}")
        channels = {int(m["n_channels"]) for m in metas}
        if len(channels) != 1:
            raise ValueError(f"{self.root}: cases have different channel counts {sorted(channels)}")
        self._ids = keep
        self._metas = metas
        self._index = {c: i for i, c in enumerate(keep)}
        self.n_channels = channels.pop()
        self._context = context
        self._cases: dict[int, store.StoredCase] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._ids)

    def __getitem__(self, record_key) -> store.StoredCase:
        i = operator.index(record_key)
        if i < 0:
            i += len(self._ids)
        if not 0 <= i < len(self._ids):
            raise IndexError(f"case index {record_key} out of range for {len(self._ids)} cases")
        case = self._cases.get(i)
        if case is None:
            with self._lock:
                case = self._cases.get(i)
                if case is None:
                    case = store.open_case(self.root, self._ids[i], context=self._context)
                    self._cases[i] = case
        return case

    @property
    def case_ids(self) -> list[str]:
        return list(self._ids)

    @property
    def metas(self) -> list[dict]:
        return list(self._metas)

    @property
    def shapes(self) -> list[tuple[int, int, int]]:
        return [tuple(int(s) for s in m["shape"]) for m in self._metas]

    def index_of(self, case_id: str) -> int:
        return self._index[case_id]

    def __repr__(self) -> str:
        return f"CaseSource({str(self.root)!r}, n={len(self)}, channels={self.n_channels})"
