"""Derived columns that turn cross-table and batch-level checks into per-row GX expectations.

Great Expectations validates one batch (one DataFrame) at a time. Referential integrity needs the
item catalog, and distribution checks need per-item / per-user aggregates, so they are computed
here with pandas and added as columns; the suites then state them as ordinary expectations
(``item_id__in_catalog`` must be True, ...). That way every check is a GX expectation that shows
up in the validation result and in Data Docs, with examples pointing at the offending rows.

A derived column is only added when its inputs exist and have the right shape: if ``item_id``
is missing (a renamed column), ``item_id__in_catalog`` is left out, the schema expectation names
the missing column, and the expectations on the derived column report that they could not run.
"""
from __future__ import annotations

from typing import Iterable

import pandas as pd

#: Added to event batches (see module docstring). Order is the order they appear in the frame.
IN_CATALOG = "item_id__in_catalog"
ITEM_SHARE = "item_id__batch_share"
USER_EVENTS = "user_id__batch_events"
EVENT_DERIVED_COLUMNS = (IN_CATALOG, ITEM_SHARE, USER_EVENTS)


def add_event_columns(events: pd.DataFrame, *, catalog_item_ids: Iterable[str] | None) -> pd.DataFrame:
    """Return a copy of ``events`` with the derived columns whose inputs are present.

    - ``item_id__in_catalog``: the event's item is in the lake's item catalog (omitted when
      there is no catalog: ``catalog_item_ids=None``).
    - ``item_id__batch_share``: the share of this batch's events that went to the row's item,
      so the column's max is the top item's share.
    - ``user_id__batch_events``: the number of events of the row's user in this batch, set on
      the user's *first* row only and null elsewhere. GX ignores nulls in column-value
      expectations, so ``mostly`` over this column is a share of *users* (not of events): that
      is what "share of bots" means.
    """
    out = events.copy()
    if "item_id" in out.columns:
        items = out["item_id"]
        if catalog_item_ids is not None:
            catalog = pd.Index(pd.unique(pd.Series(list(catalog_item_ids), dtype=object).astype(str)))
            # Null ids stay null here: the not-null expectation reports them, not this one.
            out[IN_CATALOG] = items.astype(str).isin(catalog).astype(object).where(items.notna(), None)
        if len(out):
            counts = items.map(items.value_counts(dropna=False))
            out[ITEM_SHARE] = counts.astype("float64") / float(len(out))
        else:
            out[ITEM_SHARE] = pd.Series(dtype="float64")
    if "user_id" in out.columns:
        users = out["user_id"]
        per_user = users.map(users.value_counts(dropna=False)).astype("float64")
        first = ~users.duplicated(keep="first")
        out[USER_EVENTS] = per_user.where(first)
    return out


def derived_columns_present(frame: pd.DataFrame) -> list[str]:
    """The derived columns ``frame`` holds (the schema expectation allows exactly these extra)."""
    return [c for c in EVENT_DERIVED_COLUMNS if c in frame.columns]
