"""What every recommender (baseline or neural) shares, so one evaluator and one serving path
can treat them alike.

- :class:`IdMap` maps external ids (strings) to dense row indices and back; artifacts carry it.
- :class:`InteractionData` is a training/evaluation set in index space.
- :class:`Recommender` is the protocol: ``fit`` on interactions, ``score`` users against the
  whole catalog (dense ``(n_users, n_items)``, higher is better; ``-inf`` = not a candidate,
  which is how a two-stage model reports "not retrieved").
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Literal, Protocol, runtime_checkable

import numpy as np
import pandas as pd
import scipy.sparse as sp

from core.schemas import DataError


@dataclass(frozen=True)
class IdMap:
    """Dense indices ``0..n-1`` for external ids, in a fixed order (saved with every artifact)."""

    ids: tuple[str, ...]

    @classmethod
    def from_values(cls, values: Iterable[object]) -> "IdMap":
        return cls(tuple(sorted({str(v) for v in values})))

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def index(self) -> dict[str, int]:
        cached = self.__dict__.get("_index")
        if cached is None:
            cached = {v: i for i, v in enumerate(self.ids)}
            object.__setattr__(self, "_index", cached)
        return cached

    def encode(self, values: Iterable[object], *, unknown: Literal["error", "minus_one"] = "error", what: str = "id") -> np.ndarray:
        """External ids -> indices. ``unknown="error"`` raises naming the first unknown id."""
        idx = self.index
        out = np.fromiter((idx.get(str(v), -1) for v in values), dtype=np.int64)
        if unknown == "error" and (out < 0).any():
            bad = [v for v, i in zip(values if isinstance(values, (list, tuple, np.ndarray, pd.Series)) else list(values), out) if i < 0]
            raise DataError(f"unknown {what} {bad[0]!r} ({int((out < 0).sum())} unknown in all)")
        return out

    def decode(self, indices: Iterable[int]) -> list[str]:
        return [self.ids[int(i)] for i in indices]

    def to_list(self) -> list[str]:
        return list(self.ids)


@dataclass
class InteractionData:
    """Interactions in index space. ``values`` are ratings or weights; ``timestamps`` epoch seconds or None."""

    users: IdMap
    items: IdMap
    user_idx: np.ndarray
    item_idx: np.ndarray
    values: np.ndarray
    timestamps: np.ndarray | None = None

    @classmethod
    def from_frame(
        cls,
        frame: pd.DataFrame,
        *,
        users: IdMap | None = None,
        items: IdMap | None = None,
        drop_unknown: bool = False,
    ) -> "InteractionData":
        """Encode a frame with ``user_id``, ``item_id`` (and optional ``value``, ``timestamp``).

        With given maps, unknown ids raise (or are dropped with ``drop_unknown=True``, e.g.
        test items never seen in training under a temporal split)."""
        if len(frame) == 0:
            raise DataError("no interactions (empty frame)")
        users = users or IdMap.from_values(frame["user_id"].unique())
        items = items or IdMap.from_values(frame["item_id"].unique())
        mode: Literal["error", "minus_one"] = "minus_one" if drop_unknown else "error"
        u = users.encode(frame["user_id"].to_numpy(), unknown=mode, what="user_id")
        i = items.encode(frame["item_id"].to_numpy(), unknown=mode, what="item_id")
        keep = (u >= 0) & (i >= 0)
        values = frame["value"].to_numpy(dtype=np.float64) if "value" in frame.columns else np.ones(len(frame))
        ts = None
        if "timestamp" in frame.columns and frame["timestamp"].notna().all():
            ts = frame["timestamp"].astype("int64").to_numpy() // 1_000_000
        return cls(users, items, u[keep], i[keep], values[keep], None if ts is None else ts[keep])

    @property
    def n_users(self) -> int:
        return len(self.users)

    @property
    def n_items(self) -> int:
        return len(self.items)

    def __len__(self) -> int:
        return len(self.user_idx)

    def csr(self, *, binary: bool = True) -> sp.csr_matrix:
        """User x item matrix; duplicates collapse (binary) or sum (``binary=False``)."""
        data = np.ones(len(self)) if binary else self.values
        m = sp.csr_matrix((data, (self.user_idx, self.item_idx)), shape=(self.n_users, self.n_items), dtype=np.float32)
        if binary:
            m.data[:] = 1.0
        return m


@runtime_checkable
class Recommender(Protocol):
    """A model the evaluator and serving can use. ``score`` covers the whole catalog."""

    name: str

    def fit(self, train: InteractionData, *, valid: InteractionData | None = None) -> "Recommender": ...

    def score(self, user_idx: np.ndarray) -> np.ndarray:
        """Scores of shape ``(len(user_idx), n_items)``; higher is better; ``-inf`` means not a candidate."""
        ...
