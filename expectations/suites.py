"""The expectation suites for events, items and users, declared as code.

Each check is a :class:`CheckSpec`: a stable name (what ``validation.warn_only`` and
``--warn-only`` refer to), why it exists, and a function of the batch's :class:`BatchFacts`
that returns the GX expectation with concrete bounds, or a reason the check does not apply
to this batch (e.g. no volume baseline yet). Bounds are concrete numbers rather than suite
parameters so that Data Docs show the actual limits a batch was held to.

Great Expectations is imported inside :func:`build_suite` only: this module is imported by the
CLI, and ``recsys --help`` must not pay GX's multi-second import.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from typing import TYPE_CHECKING, Any, Callable, Iterable, Sequence

from core.schemas import EVENT_COLUMNS, EVENT_TYPES, ITEM_COLUMNS, USER_COLUMNS
from expectations.derived import IN_CATALOG, ITEM_SHARE, USER_EVENTS
from expectations.settings import ValidationSettings

if TYPE_CHECKING:  # pragma: no cover
    import great_expectations as gx

SUITE_TABLES = ("events", "items", "users")

#: GX ``type_`` names for the pandas dtypes the lake's Parquet files read back as
#: (strings are object columns checked element-wise; tz-aware timestamps have type ``Timestamp``,
#: so a tz-naive column fails).
_TYPES: dict[str, dict[str, str]] = {
    "events": {"event_id": "str", "user_id": "str", "item_id": "str", "event_type": "str",
               "value": "float64", "timestamp": "Timestamp", "context": "str"},
    "items": {"item_id": "str", "title": "str", "created_at": "Timestamp"},
    "users": {"user_id": "str", "created_at": "Timestamp"},
}
_COLUMNS = {"events": EVENT_COLUMNS, "items": ITEM_COLUMNS, "users": USER_COLUMNS}
_KEY = {"events": "event_id", "items": "item_id", "users": "user_id"}


@dataclass(frozen=True)
class BatchFacts:
    """What a suite needs to know about a batch besides its rows (computed by the pipeline)."""

    table: str
    now: datetime
    rows: int = 0
    day: date | None = None
    derived_columns: tuple[str, ...] = ()
    dataset_start: datetime | None = None
    #: (min rows, max rows, how the band was derived) or None when there is no baseline.
    volume: tuple[int, int, str] | None = None
    #: The newest event must be at least this recent; None for backfills.
    fresh_after: datetime | None = None
    has_catalog: bool = False

    @property
    def day_start(self) -> datetime:
        assert self.day is not None
        return datetime.combine(self.day, time(0), tzinfo=timezone.utc)


@dataclass(frozen=True)
class CheckSpec:
    name: str
    why: str
    #: (GX expectation class name, kwargs) for this batch, or a string: why it does not apply.
    build: Callable[[BatchFacts, ValidationSettings], "tuple[str, dict[str, Any]] | str"] = field(repr=False)


Builder = Callable[[BatchFacts, ValidationSettings], "tuple[str, dict[str, Any]] | str"]


def _fixed(expectation: str, **kwargs: Any) -> Builder:
    """A builder for a check whose bounds do not depend on the batch."""
    def build(facts: BatchFacts, cfg: ValidationSettings) -> tuple[str, dict[str, Any]]:
        return expectation, dict(kwargs)
    return build


def _specs_events() -> list[CheckSpec]:
    t = "events"
    specs = [
        CheckSpec(f"{t}.schema", "exactly the event schema's columns (a renamed or extra column fails)",
                  lambda f, c: ("ExpectTableColumnsToMatchSet",
                                {"column_set": list(EVENT_COLUMNS) + list(f.derived_columns), "exact_match": True})),
        CheckSpec(f"{t}.not_empty", "an empty partition means a broken upstream writer",
                  lambda f, c: ("ExpectTableRowCountToBeBetween", {"min_value": 1})),
        CheckSpec(f"{t}.volume", "row count within the volume band of the previous partitions' mean",
                  lambda f, c: ("ExpectTableRowCountToBeBetween", {"min_value": f.volume[0], "max_value": f.volume[1]})
                  if f.volume else f"fewer than {c.volume_min_history} previous partitions: no volume baseline yet"),
    ]
    specs += _type_specs(t)
    specs += [
        CheckSpec(f"{t}.not_null.{col}", f"every event has a {col}",
                  _fixed("ExpectColumnValuesToNotBeNull", column=col))
        for col in ("event_id", "user_id", "item_id", "event_type", "value", "timestamp")
    ]
    specs += [
        CheckSpec(f"{t}.event_type_known", f"event_type is one of {', '.join(EVENT_TYPES)}",
                  lambda f, c: ("ExpectColumnValuesToBeInSet", {"column": "event_type", "value_set": list(EVENT_TYPES)})),
        CheckSpec(f"{t}.rating_range", "ratings ('rate' events) lie in the rating scale",
                  lambda f, c: ("ExpectColumnValuesToBeBetween",
                                {"column": "value", "min_value": c.rating_min, "max_value": c.rating_max,
                                 "row_condition": 'event_type == "rate"', "condition_parser": "pandas"})),
        CheckSpec(f"{t}.value_range", "every event's value is in the plausible range (catches unit mix-ups)",
                  lambda f, c: ("ExpectColumnValuesToBeBetween",
                                {"column": "value", "min_value": c.value_min, "max_value": c.value_max})),
        CheckSpec(f"{t}.timestamp_not_future", "no event is in the future (beyond the tolerated clock skew)",
                  lambda f, c: ("ExpectColumnValuesToBeBetween",
                                {"column": "timestamp", "max_value": f.now + timedelta(seconds=c.clock_skew_seconds)})),
        CheckSpec(f"{t}.timestamp_after_start", "no event is older than the dataset's start",
                  lambda f, c: ("ExpectColumnValuesToBeBetween", {"column": "timestamp", "min_value": f.dataset_start})
                  if f.dataset_start else "no dataset start: the lake has no other partition and validation.dataset_start is unset"),
        CheckSpec(f"{t}.timestamp_in_partition", "every event belongs to its partition's day (UTC)",
                  lambda f, c: ("ExpectColumnValuesToBeBetween",
                                {"column": "timestamp", "min_value": f.day_start,
                                 "max_value": f.day_start + timedelta(days=1), "strict_max": True})),
        CheckSpec(f"{t}.freshness", "a live partition's newest event is recent (the producer is not stalled)",
                  lambda f, c: ("ExpectColumnMaxToBeBetween", {"column": "timestamp", "min_value": f.fresh_after})
                  if f.fresh_after else f"backfill: {f.day} is older than the {c.freshness_live_days}-day live window"),
        CheckSpec(f"{t}.unique_event", "(user_id, item_id, timestamp, event_type) identifies an event",
                  lambda f, c: ("ExpectCompoundColumnsToBeUnique",
                                {"column_list": ["user_id", "item_id", "timestamp", "event_type"]})),
        CheckSpec(f"{t}.event_id_unique", "event_id is unique (ingest merges on it)",
                  lambda f, c: ("ExpectColumnValuesToBeUnique", {"column": "event_id"})),
        CheckSpec(f"{t}.item_in_catalog", "every event's item is in the lake's item catalog (referential integrity)",
                  lambda f, c: ("ExpectColumnValuesToBeInSet", {"column": IN_CATALOG, "value_set": [True]})
                  if f.has_catalog else "the lake has no item catalog (items/items.parquet)"),
        CheckSpec(f"{t}.top_item_share", "no single item takes an absurd share of the batch (stuck widget, replay loop)",
                  lambda f, c: ("ExpectColumnMaxToBeBetween", {"column": ITEM_SHARE, "max_value": c.max_top_item_share})
                  if f.rows >= c.min_rows_for_shares else f"only {f.rows} rows (< {c.min_rows_for_shares}): a share is not meaningful"),
        CheckSpec(f"{t}.bot_share", "few users have absurd event rates (bots); the value is per user, 'mostly' is the allowed non-bot share",
                  lambda f, c: ("ExpectColumnValuesToBeBetween",
                                {"column": USER_EVENTS, "min_value": 1, "max_value": c.max_events_per_user_per_day,
                                 "mostly": round(1.0 - c.max_bot_share, 6)})),
    ]
    return specs


def _type_specs(table: str) -> list[CheckSpec]:
    return [
        CheckSpec(f"{table}.type.{col}", f"{col} has the schema's type ({type_})",
                  _fixed("ExpectColumnValuesToBeOfType", column=col, type_=type_))
        for col, type_ in _TYPES[table].items()
    ]


def _specs_catalog(table: str) -> list[CheckSpec]:
    key = _KEY[table]
    specs = [
        CheckSpec(f"{table}.schema", f"exactly the {table} schema's columns",
                  lambda f, c: ("ExpectTableColumnsToMatchSet", {"column_set": list(_COLUMNS[table]), "exact_match": True})),
        CheckSpec(f"{table}.not_empty", f"an empty {table} table would orphan every event",
                  lambda f, c: ("ExpectTableRowCountToBeBetween", {"min_value": 1})),
    ]
    specs += _type_specs(table)
    specs += [
        CheckSpec(f"{table}.not_null.{key}", f"every row has a {key}",
                  lambda f, c: ("ExpectColumnValuesToNotBeNull", {"column": key})),
        CheckSpec(f"{table}.{key}_unique", f"{key} is unique (upserts key on it)",
                  lambda f, c: ("ExpectColumnValuesToBeUnique", {"column": key})),
        CheckSpec(f"{table}.created_at_not_future", "created_at is not in the future",
                  lambda f, c: ("ExpectColumnValuesToBeBetween",
                                {"column": "created_at", "max_value": f.now + timedelta(seconds=c.clock_skew_seconds)})),
    ]
    if table == "users":
        specs.append(CheckSpec("users.age_range", "ages are plausible (nulls allowed: age is optional)",
                               lambda f, c: ("ExpectColumnValuesToBeBetween",
                                             {"column": "age", "min_value": 0, "max_value": c.max_user_age})))
    return specs


def check_specs(table: str) -> list[CheckSpec]:
    """The checks of ``table``'s suite, in the order they run."""
    if table == "events":
        return _specs_events()
    if table in ("items", "users"):
        return _specs_catalog(table)
    raise ValueError(f"no expectation suite for table {table!r} (known: {', '.join(SUITE_TABLES)})")


def all_check_names() -> list[str]:
    return [s.name for t in SUITE_TABLES for s in check_specs(t)]


def resolve_warn_only(patterns: Iterable[str]) -> set[str]:
    """Expand names/fnmatch patterns to check names; an entry matching nothing is an error,
    because a typo would silently keep a check fatal that someone meant to downgrade."""
    names = all_check_names()
    out: set[str] = set()
    for pattern in patterns:
        hits = fnmatch.filter(names, pattern)
        if not hits:
            raise ValueError(
                f"warn-only entry {pattern!r} matches no expectation; known names: {', '.join(names)}")
        out.update(hits)
    return out


@dataclass
class SuiteBuild:
    """A concrete suite for one batch plus the checks that did not apply (name -> reason)."""

    suite: "gx.ExpectationSuite"
    skipped: dict[str, str]


def build_suite(facts: BatchFacts, cfg: ValidationSettings, *, warn_only: Sequence[str] = ()) -> SuiteBuild:
    """Instantiate ``facts.table``'s suite with this batch's bounds.

    Each expectation carries ``meta.name`` (the check's name), ``notes`` (why it exists; Data
    Docs show it) and ``severity`` ("warning" for warn-only checks, else "critical").
    """
    import great_expectations as gx
    import great_expectations.expectations as gxe

    warn = set(warn_only)
    expectations = []
    skipped: dict[str, str] = {}
    for spec in check_specs(facts.table):
        built = spec.build(facts, cfg)
        if isinstance(built, str):
            skipped[spec.name] = built
            continue
        cls_name, kwargs = built
        cls = getattr(gxe, cls_name)
        expectations.append(cls(**kwargs, meta={"name": spec.name}, notes=f"{spec.name}: {spec.why}",
                                severity="warning" if spec.name in warn else "critical"))
    return SuiteBuild(gx.ExpectationSuite(name=facts.table, expectations=expectations), skipped)
