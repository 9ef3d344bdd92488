"""The data-validation gate: run the Great Expectations suites on a lake batch, quarantine failures.

A batch that fails a (non-warn-only) expectation must not reach features or training, so its
files are *moved* out of the lake to ``quarantine/<table>/date=D/`` together with the GX
validation result (JSON), our one-screen report and the GX Data Docs HTML, and the step raises
:class:`ValidationFailed`. Nothing is deleted: restoring a batch is moving its Parquet file back.

Checks needing more than the batch (the item catalog, the previous partitions' volumes, per-user
rates) are computed here with pandas and handed to the suites as bounds or derived columns (see
:mod:`expectations.derived`), so every check is a GX expectation in the result and in Data Docs.

One GX context per process (:func:`gx_runtime`): creating it and importing GX takes seconds,
validating a partition against it takes a fraction of one.
"""
from __future__ import annotations

import json
import math
import shutil
import tempfile
import threading
from dataclasses import asdict, dataclass, field
from datetime import date, datetime, time, timedelta, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Sequence

import pandas as pd

from core.config import Settings
from core.lake import Lake
from core.schemas import DataError
from expectations.derived import IN_CATALOG, ITEM_SHARE, USER_EVENTS, add_event_columns, derived_columns_present
from expectations.suites import BatchFacts, build_suite, check_specs, resolve_warn_only

if TYPE_CHECKING:  # pragma: no cover
    from pipelines.demo import DemoState

RESULT_FILE = "validation_result.json"
REPORT_FILE = "report.json"
SUMMARY_FILE = "summary.txt"
DOCS_DIR = "data_docs"
#: Columns GX reports for each unexpected row, so examples point at concrete events.
INDEX_COLUMNS = {"events": ("event_id", "user_id", "item_id"), "items": ("item_id",), "users": ("user_id",)}
#: For derived columns, the example worth showing is the entity, not the derived value.
_DERIVED_ENTITY = {IN_CATALOG: "item_id", ITEM_SHARE: "item_id", USER_EVENTS: "user_id"}


# ---- results ----------------------------------------------------------------------------------
@dataclass
class CheckOutcome:
    """One expectation's outcome, reduced to what a person needs to act on it."""

    name: str
    expectation: str
    success: bool
    warn_only: bool
    column: str | None
    expected: str
    observed: str | None = None
    unexpected_count: int | None = None
    element_count: int | None = None
    examples: list[str] = field(default_factory=list)
    error: str | None = None

    @property
    def fatal(self) -> bool:
        return not self.success and not self.warn_only

    def line(self) -> str:
        tag = "FAIL" if self.fatal else "warn" if not self.success else "ok"
        if self.error:
            what = f"could not run: {self.error}"
        elif self.unexpected_count is not None and self.element_count is not None:
            pct = 100.0 * self.unexpected_count / self.element_count if self.element_count else 0.0
            share = f"{pct:.1f}%" if pct >= 0.1 or pct == 0 else "<0.1%"
            what = f"{self.unexpected_count:,} of {self.element_count:,} values unexpected ({share})"
        else:
            what = f"observed {self.observed}"
        text = f"  {tag} {self.name}: {what}; expected {self.expected}"
        if self.examples:
            text += f"\n       e.g. {', '.join(self.examples)}"
        return text


@dataclass
class ValidationReport:
    """What validating one batch found, and where its evidence went."""

    table: str
    date: str
    rows: int
    success: bool
    checks: list[CheckOutcome]
    skipped: dict[str, str] = field(default_factory=dict)
    notes: dict[str, str] = field(default_factory=dict)
    quarantine_dir: str | None = None
    result_path: str | None = None
    docs_path: str | None = None
    report_path: str | None = None

    @property
    def failed(self) -> list[CheckOutcome]:
        return [c for c in self.checks if c.fatal]

    @property
    def warnings(self) -> list[CheckOutcome]:
        return [c for c in self.checks if not c.success and c.warn_only]

    @property
    def label(self) -> str:
        return f"{self.table} date={self.date}"

    def summary(self, *, max_lines: int = 12) -> str:
        """The one-screen summary: verdict, each failed/warned check with counts and examples, evidence."""
        verdict = "PASSED" if self.success else "FAILED"
        head = (f"validation {verdict}: {self.label}, {self.rows:,} rows; {len(self.failed)} of {len(self.checks)} "
                f"expectations failed, {len(self.warnings)} warn-only")
        lines = [head]
        shown = self.failed + self.warnings
        lines += [c.line() for c in shown[:max_lines]]
        if len(shown) > max_lines:
            lines.append(f"  ... and {len(shown) - max_lines} more (see the report)")
        if self.quarantine_dir:
            lines.append(f"quarantined to {self.quarantine_dir} ({self.rows:,} rows moved, nothing deleted)")
        for label, path in (("validation result", self.result_path), ("data docs", self.docs_path)):
            if path:
                lines.append(f"  {label}: {path}")
        return "\n".join(lines)

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["summary"] = self.summary()
        return out


class ValidationFailed(DataError):
    """A batch failed the gate: it was quarantined (unless dry-run) and must not be used downstream.

    ``reports`` holds every failed batch's report (the message is their one-screen summary);
    ``passed`` the reports of batches validated in the same call that passed.
    """

    def __init__(self, reports: Sequence[ValidationReport], *, passed: Sequence[ValidationReport] = ()):
        self.reports = list(reports)
        self.passed = list(passed)
        lines = 12 if len(self.reports) == 1 else 4  # several batches: keep it to one screen
        parts = [r.summary(max_lines=lines) for r in self.reports[:3]]
        if len(self.reports) > 3:
            parts.append("also failed: " + ", ".join(r.label for r in self.reports[3:]))
        super().__init__("\n".join(parts))

    @property
    def report(self) -> ValidationReport:
        return self.reports[0]


# ---- the GX runtime ---------------------------------------------------------------------------
class GxRuntime:
    """One ephemeral GX context with a pandas datasource holding one dataframe asset per table."""

    def __init__(self) -> None:
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        self._gx = gx
        self.context = gx.get_context(mode="ephemeral")
        self.context.variables.progress_bars = ProgressBarsConfig(globally=False)
        source = self.context.data_sources.add_pandas("recsys_lake")
        self.batches = {t: source.add_dataframe_asset(t).add_batch_definition_whole_dataframe(f"{t}_batch")
                        for t in INDEX_COLUMNS}
        self.lock = threading.Lock()
        self._suites: dict[str, Any] = {}
        self._checkpoints: dict[tuple[str, tuple[str, ...]], Any] = {}

    def _checkpoint(self, table: str, result_format: dict[str, Any]) -> Any:
        """The table's Checkpoint for this result format, added to the context once.

        Re-adding the suite per batch (``add_or_update``) costs ~1 s because GX compares
        expectations pairwise; instead :meth:`validate` swaps the stored suite's expectations.
        """
        gx = self._gx
        key = (table, tuple(result_format.get("unexpected_index_column_names", ())))
        if key not in self._checkpoints:
            if table not in self._suites:
                self._suites[table] = self.context.suites.add(gx.ExpectationSuite(name=table))
            suite = self.context.suites.get(table)  # the stored version: other checkpoints may have saved it
            name = f"{table}_gate_{len(self._checkpoints)}"
            definition = self.context.validation_definitions.add(
                gx.ValidationDefinition(name=name, data=self.batches[table], suite=suite))
            self._checkpoints[key] = self.context.checkpoints.add(
                gx.Checkpoint(name=name, validation_definitions=[definition], result_format=result_format))
        return self._checkpoints[key]

    def validate(self, table: str, frame: pd.DataFrame, suite: Any, *, examples: int) -> tuple[Any, Any]:
        """Run ``suite``'s expectations on ``frame`` through the table's Checkpoint.

        Returns (validation result identifier, suite validation result). The stored suite takes
        this batch's expectations (their bounds depend on the batch) and is saved, so the
        result and Data Docs show exactly what this batch was held to.
        """
        index = [c for c in INDEX_COLUMNS[table] if c in frame.columns]
        result_format: dict[str, Any] = {"result_format": "SUMMARY", "partial_unexpected_count": max(20, examples)}
        if index:
            result_format["unexpected_index_column_names"] = index
        with self.lock:
            checkpoint = self._checkpoint(table, result_format)
            stored = checkpoint.validation_definitions[0].suite
            stored.expectations = list(suite.expectations)
            stored.save()
            run = checkpoint.run(batch_parameters={"dataframe": frame})
        ((identifier, result),) = run.run_results.items()
        return identifier, result

    def build_docs(self, identifier: Any, dest: Path) -> Path:
        """Render GX Data Docs for one validation result into ``dest``; return its page's path."""
        site = f"quarantine-{dest.name}-{id(dest)}"
        with self.lock:
            self.context.add_data_docs_site(site_name=site, site_config={
                "class_name": "SiteBuilder",
                "store_backend": {"class_name": "TupleFilesystemStoreBackend", "base_directory": str(dest)},
                "site_index_builder": {"class_name": "DefaultSiteIndexBuilder"},
            })
            try:
                self.context.build_data_docs(site_names=[site], resource_identifiers=[identifier])
            finally:
                self.context.delete_data_docs_site(site)
        pages = sorted((dest / "validations").rglob("*.html"))
        return pages[0] if pages else dest / "index.html"


_RUNTIME: GxRuntime | None = None
_RUNTIME_LOCK = threading.Lock()


def gx_runtime() -> GxRuntime:
    """The process's GX runtime (created on first use; GX's import alone takes ~3 s)."""
    global _RUNTIME
    with _RUNTIME_LOCK:
        if _RUNTIME is None:
            _RUNTIME = GxRuntime()
        return _RUNTIME


# ---- reading GX results -----------------------------------------------------------------------
def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:,.4g}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def _bound(value: Any) -> str:
    if isinstance(value, datetime):
        return f"{value:%Y-%m-%d %H:%M:%S} UTC"
    return _fmt(value)


def _expected(expectation: str, kwargs: dict[str, Any]) -> str:
    if "column_set" in kwargs:
        return f"columns {sorted(kwargs['column_set'])}"
    if "value_set" in kwargs:
        return f"values in {kwargs['value_set']}"
    if "type_" in kwargs:
        return f"type {kwargs['type_']}"
    if "column_list" in kwargs:
        return f"({', '.join(kwargs['column_list'])}) unique"
    if expectation.endswith("_to_be_unique"):
        return "unique values"
    if expectation.endswith("_to_not_be_null"):
        return "no nulls"
    lo, hi = kwargs.get("min_value"), kwargs.get("max_value")
    if lo is None and hi is None:
        return "see the suite"
    what = "max " if expectation.startswith("expect_column_max") else "rows " if "row_count" in expectation else ""
    if lo is not None and hi is not None:
        text = f"{what}{_bound(lo)} .. {_bound(hi)}"
    else:
        text = f"{what}>= {_bound(lo)}" if lo is not None else f"{what}<= {_bound(hi)}"
    cond = kwargs.get("row_condition")
    if cond:
        where = cond.get("pass_through_filter", cond) if isinstance(cond, dict) else getattr(cond, "pass_through_filter", cond)
        text += f" where {where}"
    if kwargs.get("mostly") is not None and kwargs["mostly"] < 1:
        text += f" for at least {kwargs['mostly']:.2%} of values"
    return text


def _error(exception_info: Any) -> str | None:
    """GX reports errors either flat or keyed by metric; return the first message, shortened."""
    if not exception_info:
        return None
    infos = [exception_info] if "raised_exception" in exception_info else list(exception_info.values())
    for info in infos:
        if isinstance(info, dict) and info.get("raised_exception"):
            msg = str(info.get("exception_message") or "error").strip().splitlines()[0]
            return msg[:200]
    return None


def _examples(column: str | None, result: dict[str, Any], frame: pd.DataFrame, name: str, n: int) -> list[str]:
    if name.endswith(".top_item_share") and ITEM_SHARE in frame.columns and len(frame):
        top = frame.loc[frame[ITEM_SHARE].idxmax()]
        return [f"item_id={top['item_id']} ({top[ITEM_SHARE]:.1%} of rows)"]
    details = result.get("details") or {}
    if "mismatched" in details:
        mm = details["mismatched"]
        return [f"{k}: {sorted(v)}" for k, v in mm.items() if v]
    entity = _DERIVED_ENTITY.get(column or "")
    if entity:
        counts: dict[str, int] = {}
        values: dict[str, Any] = {}
        for row in result.get("partial_unexpected_index_list") or []:
            key = str(row.get(entity))
            counts[key] = counts.get(key, 0) + 1
            values[key] = row.get(column)
        if column == USER_EVENTS:
            return [f"{entity}={k} ({_fmt(values[k])} events)" for k in list(counts)[:n]]
        return [f"{entity}={k} (x{c})" for k, c in sorted(counts.items(), key=lambda kv: -kv[1])[:n]]
    out = []
    for item in (result.get("partial_unexpected_counts") or [])[:n]:
        out.append(f"{_example(item.get('value'))} (x{item.get('count')})")
    if not out:
        out = [_example(v) for v in (result.get("partial_unexpected_list") or [])[:n]]
    return out


def _example(value: Any) -> str:
    """Strings quoted (so '' and ' x' are visible), everything else as printed."""
    if isinstance(value, (list, tuple)):
        return "(" + ", ".join(str(v) for v in value) + ")"
    return repr(value) if isinstance(value, str) or value is None else str(value)


def _outcomes(result: Any, frame: pd.DataFrame, warn: set[str], n_examples: int) -> list[CheckOutcome]:
    outcomes = []
    for r in result.results:
        cfg = r.expectation_config
        name = (cfg.meta or {}).get("name", cfg.type)
        kwargs = dict(cfg.kwargs)
        res = dict(r.result or {})
        column = kwargs.get("column")
        error = _error(r.exception_info)
        observed = res.get("observed_value")
        outcomes.append(CheckOutcome(
            name=name,
            expectation=cfg.type,
            success=bool(r.success),
            warn_only=name in warn,
            column=column,
            expected=_expected(cfg.type, kwargs),
            observed=None if observed is None else _fmt(observed),
            unexpected_count=res.get("unexpected_count"),
            element_count=res.get("element_count"),
            examples=[] if r.success else _examples(column, res, frame, name, n_examples),
            error=error,
        ))
    return outcomes


# ---- batch facts ------------------------------------------------------------------------------
def _utc(day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=timezone.utc)


def _now(now: datetime | None) -> datetime:
    if now is None:
        return datetime.now(timezone.utc)
    return now if now.tzinfo else now.replace(tzinfo=timezone.utc)


def _partition_files(lake: Lake, day: date) -> list[Path]:
    folder = lake.partition_dir(day)
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.glob("*.parquet") if not p.name.startswith("."))


def _row_count(files: Iterable[Path]) -> int:
    import pyarrow.parquet as pq

    return sum(pq.ParquetFile(f).metadata.num_rows for f in files)


def _read_files(files: Sequence[Path]) -> pd.DataFrame:
    """Read a batch as written, without coercing it to the schema: the gate must see what is there."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    tables = [pq.read_table(f) for f in files]
    try:
        table = pa.concat_tables(tables, promote_options="permissive") if len(tables) > 1 else tables[0]
    except (pa.ArrowInvalid, pa.ArrowTypeError):  # files disagree on schema: validate them side by side
        return pd.concat([t.to_pandas() for t in tables], ignore_index=True)
    return table.to_pandas()


def event_facts(lake: Lake, day: date, frame: pd.DataFrame, *, settings: Settings, now: datetime,
                has_catalog: bool) -> tuple[BatchFacts, dict[str, str]]:
    """The bounds for ``day``'s events suite from the rest of the lake, plus notes explaining them."""
    cfg = settings.validation
    notes: dict[str, str] = {}
    others = [d for d in lake.partitions() if d != day]
    previous = [d for d in others if d < day][-cfg.volume_window:]
    volume = None
    if len(previous) >= cfg.volume_min_history:
        counts = [_row_count(_partition_files(lake, d)) for d in previous]
        mean = sum(counts) / len(counts)
        lo, hi = max(1, math.floor(mean / cfg.volume_band)), math.ceil(mean * cfg.volume_band)
        basis = f"mean {mean:,.0f} rows of the {len(previous)} partitions {previous[0]}..{previous[-1]}, band x{cfg.volume_band:g}"
        volume = (lo, hi, basis)
        notes["events.volume"] = basis
    if cfg.dataset_start is not None:
        start: datetime | None = _utc(cfg.dataset_start)
        notes["events.timestamp_after_start"] = f"validation.dataset_start = {cfg.dataset_start}"
    elif others:
        first = others[0] - timedelta(days=cfg.backfill_tolerance_days)
        start = _utc(first)
        notes["events.timestamp_after_start"] = (f"the lake's earliest other partition {others[0]} minus "
                                                 f"{cfg.backfill_tolerance_days} days; set validation.dataset_start to fix it")
    else:
        start = None
    fresh_after = None
    if day >= now.date() - timedelta(days=cfg.freshness_live_days):
        reference = min(now, _utc(day) + timedelta(days=1))
        fresh_after = reference - timedelta(hours=cfg.freshness_max_lag_hours)
        notes["events.freshness"] = f"live partition: newest event must be after {fresh_after:%Y-%m-%d %H:%M} UTC"
    facts = BatchFacts(table="events", now=now, rows=len(frame), day=day,
                       derived_columns=tuple(derived_columns_present(frame)), dataset_start=start,
                       volume=volume, fresh_after=fresh_after, has_catalog=has_catalog)
    return facts, notes


def _catalog_ids(lake: Lake) -> list[str] | None:
    import pyarrow.parquet as pq

    path = lake.table_path("items")
    if not path.exists():
        # A quarantined catalog is not "no catalog": with it out of the lake no item can be confirmed.
        return [] if (lake.root / "quarantine" / "items").is_dir() else None
    try:
        return [str(v) for v in pq.read_table(path, columns=["item_id"]).column("item_id").to_pylist() if v is not None]
    except (KeyError, ValueError) as exc:  # a broken catalog fails its own suite; events cannot be checked against it
        raise DataError(f"cannot read item ids from the catalog: {exc}", source=str(path)) from exc


def effective_warn_only(settings: Settings, extra: Iterable[str] | None) -> set[str]:
    """``validation.warn_only`` plus the call's (or CLI's) extra names, expanded and checked."""
    return resolve_warn_only([*settings.validation.warn_only, *(extra or [])])


# ---- the gate ---------------------------------------------------------------------------------
def _run_gate(*, table: str, label_day: date, frame: pd.DataFrame, facts: BatchFacts, notes: dict[str, str],
              files: list[Path], settings: Settings, warn: set[str], quarantine: bool) -> ValidationReport:
    """Validate ``frame``; on failure move ``files`` plus the evidence to quarantine. Never raises on failure."""
    cfg = settings.validation
    built = build_suite(facts, cfg, warn_only=sorted(warn))
    runtime = gx_runtime()
    identifier, result = runtime.validate(table, frame, built.suite, examples=cfg.examples)
    checks = _outcomes(result, frame, warn, cfg.examples)
    for c in checks:
        if c.name in notes:
            c.expected += f" ({notes[c.name]})"
    report = ValidationReport(table=table, date=label_day.isoformat(), rows=len(frame),
                              success=not any(c.fatal for c in checks), checks=checks,
                              skipped=built.skipped, notes=notes)
    lake = Lake(settings.paths.lake_dir)
    if report.success or not quarantine:
        _write_evidence(settings.paths.var_dir / "validation" / table / f"date={label_day.isoformat()}", report, result)
        return report
    _quarantine(lake, table, label_day, files, report, result, runtime, identifier)
    return report


def _write_evidence(folder: Path, report: ValidationReport, result: Any) -> None:
    """Keep a batch's GX result and our report under ``var/validation`` (an audit trail of passes)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / RESULT_FILE).write_text(json.dumps(result.to_json_dict(), indent=1, default=str))
    report.result_path = str(folder / RESULT_FILE)
    report.report_path = str(folder / REPORT_FILE)
    (folder / REPORT_FILE).write_text(json.dumps(report.as_dict(), indent=1, default=str))


def _move(lake: Lake, table: str, day: date, path: Path) -> Path:
    """Move one file/folder into quarantine and return where it landed (Lake renames on collision)."""
    dest = lake.quarantine_dir(table, day)
    before = set(dest.iterdir()) if dest.is_dir() else set()
    lake.quarantine_partition(table, day, [path])
    (landed,) = set(dest.iterdir()) - before
    return landed


def _quarantine(lake: Lake, table: str, day: date, files: list[Path], report: ValidationReport, result: Any,
                runtime: GxRuntime, identifier: Any) -> None:
    """Move the batch's files out of the lake, then the evidence beside them. Nothing is deleted."""
    qroot = lake.root / "quarantine"
    qroot.mkdir(parents=True, exist_ok=True)
    report.quarantine_dir = str(lake.quarantine_dir(table, day))
    for f in files:
        _move(lake, table, day, f)
    source_dir = files[0].parent if files else None
    if source_dir is not None and source_dir != lake.root / table and source_dir.is_dir() and not any(source_dir.iterdir()):
        source_dir.rmdir()  # the now-empty date=D folder; the data itself was moved
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=qroot))
    try:
        (staging / RESULT_FILE).write_text(json.dumps(result.to_json_dict(), indent=1, default=str))
        report.result_path = str(_move(lake, table, day, staging / RESULT_FILE))
        page = runtime.build_docs(identifier, staging / DOCS_DIR)
        docs = _move(lake, table, day, staging / DOCS_DIR)
        report.docs_path = str(docs / page.relative_to(staging / DOCS_DIR))
        (staging / SUMMARY_FILE).write_text(report.summary() + "\n")
        _move(lake, table, day, staging / SUMMARY_FILE)
        (staging / REPORT_FILE).write_text(json.dumps(report.as_dict(), indent=1, default=str))
        report.report_path = str(_move(lake, table, day, staging / REPORT_FILE))
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # only our own empty staging folder


def _disabled(table: str, day: date, rows: int) -> ValidationReport:
    return ValidationReport(table=table, date=day.isoformat(), rows=rows, success=True, checks=[],
                            skipped={"*": "validation.enabled is false: the gate lets every batch through"})


def validate_partition(
    day: date,
    *,
    settings: Settings,
    table: str = "events",
    warn_only: Sequence[str] | None = None,
    now: datetime | None = None,
    quarantine: bool = True,
) -> ValidationReport:
    """Validate one day's events partition; return its report, or quarantine it and raise.

    ``warn_only`` adds check names/patterns to ``settings.validation.warn_only``. ``now`` is the
    clock for the future/freshness checks (default: the wall clock). ``quarantine=False`` is a dry
    run: a failure raises but the partition stays in the lake.
    Raises :class:`ValidationFailed` when a non-warn-only expectation fails.
    """
    if table != "events":
        raise ValueError(f"only the events table is partitioned by date; validate {table!r} with validate_catalog()")
    warn = effective_warn_only(settings, warn_only)
    lake = Lake(settings.paths.lake_dir)
    files = _partition_files(lake, day)
    if not files:
        raise DataError(f"no events partition for {day} in {lake.events_dir()}")
    if not settings.validation.enabled:
        return _disabled(table, day, _row_count(files))
    clock = _now(now)
    raw = _read_files(files)
    catalog = _catalog_ids(lake)
    frame = add_event_columns(raw, catalog_item_ids=catalog)
    facts, notes = event_facts(lake, day, frame, settings=settings, now=clock, has_catalog=catalog is not None)
    if catalog == [] and not lake.table_path("items").exists():
        notes["events.item_in_catalog"] = "the item catalog is in quarantine: release or re-ingest it first"
    report = _run_gate(table="events", label_day=day, frame=frame, facts=facts, notes=notes, files=files,
                       settings=settings, warn=warn, quarantine=quarantine)
    if not report.success:
        raise ValidationFailed([report])
    return report


def validate_catalog(
    *,
    settings: Settings,
    tables: Sequence[str] = ("items", "users"),
    warn_only: Sequence[str] | None = None,
    now: datetime | None = None,
    quarantine: bool = True,
) -> list[ValidationReport]:
    """Validate the item catalog and user profiles (those present in the lake).

    A failing table is moved to ``quarantine/<table>/date=<today>/``; after every table has been
    checked, :class:`ValidationFailed` is raised with the failed tables' reports.
    """
    warn = effective_warn_only(settings, warn_only)
    lake = Lake(settings.paths.lake_dir)
    clock = _now(now)
    reports: list[ValidationReport] = []
    failed: list[ValidationReport] = []
    for table in tables:
        check_specs(table)  # rejects unknown table names with the known ones listed
        path = lake.table_path(table)
        if not path.exists():
            continue
        if not settings.validation.enabled:
            reports.append(_disabled(table, clock.date(), _row_count([path])))
            continue
        frame = _read_files([path])
        facts = BatchFacts(table=table, now=clock, rows=len(frame))
        report = _run_gate(table=table, label_day=clock.date(), frame=frame, facts=facts, notes={}, files=[path],
                           settings=settings, warn=warn, quarantine=quarantine)
        (reports if report.success else failed).append(report)
    if failed:
        raise ValidationFailed(failed, passed=reports)
    return reports


def validate_partitions(
    days: Sequence[date],
    *,
    settings: Settings,
    warn_only: Sequence[str] | None = None,
    now: datetime | None = None,
    quarantine: bool = True,
) -> list[ValidationReport]:
    """Validate several partitions (oldest first, so each sees the volumes the gate accepted);
    one bad day does not stop the others. Raises :class:`ValidationFailed` listing all failures."""
    passed: list[ValidationReport] = []
    failed: list[ValidationReport] = []
    for day in sorted(days):
        try:
            passed.append(validate_partition(day, settings=settings, warn_only=warn_only, now=now, quarantine=quarantine))
        except ValidationFailed as exc:
            failed.extend(exc.reports)
    if failed:
        raise ValidationFailed(failed, passed=passed)
    return passed


# ---- demo -------------------------------------------------------------------------------------
def poisoned_batch_demo(settings: Settings, *, days: int | None = None, now: datetime | None = None) -> ValidationReport:
    """Show the gate refusing a bad batch, on a scratch *copy* of the lake (never the real data).

    Copies the newest partitions and the catalog into ``var/demo/poisoned-lake``, writes a
    synthetic next day built from the newest day's events with injected faults (unknown item
    ids, out-of-range ratings, null user ids, duplicated events) the way a broken upstream writer
    would, validates it, and returns the report of the quarantined batch.
    """
    from core.schemas import make_event_ids

    lake = Lake(settings.paths.lake_dir)
    history = lake.partitions()
    if not history:
        raise DataError(f"the lake at {lake.root} is empty: ingest something before the validation demo")
    scratch = settings.paths.var_dir / "demo" / "poisoned-lake"
    if scratch.exists():
        shutil.rmtree(scratch)  # the previous run's scratch copy, not lake data
    demo_settings = settings.model_copy(update={"paths": settings.paths.model_copy(
        update={"lake_dir": scratch / "lake", "var_dir": scratch / "var"})})
    copy = Lake(demo_settings.paths.lake_dir)
    keep = history[-(days or settings.validation.volume_window):]
    for d in keep:
        for f in _partition_files(lake, d):
            target = copy.partition_dir(d) / f.name
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(f, target)
    for table in ("items", "users"):
        if lake.table_path(table).exists():
            copy.table_path(table).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(lake.table_path(table), copy.table_path(table))
    batch = _read_files(_partition_files(lake, keep[-1]))
    batch["timestamp"] = batch["timestamp"] + pd.Timedelta(days=1)
    n = len(batch)
    k = max(1, n // 30)
    batch.loc[batch.index[:k], "item_id"] = [f"ghost-{i}" for i in range(k)]            # unknown items
    rated = batch.index[batch["event_type"] == "rate"]
    batch.loc[rated[-max(1, min(k, len(rated) // 3)):], "value"] = 50.0                  # rating out of range
    batch["event_id"] = make_event_ids(batch.fillna({"user_id": ""}))
    batch.loc[batch.index[2 * k:2 * k + 3], "user_id"] = None                          # null keys
    batch = pd.concat([batch, batch.iloc[-k:].assign(event_id=lambda f: f["event_id"] + "-dup")], ignore_index=True)
    day = keep[-1] + timedelta(days=1)
    copy.replace_partition(day, batch)  # straight to Parquet, as a broken upstream writer would
    try:
        validate_partition(day, settings=demo_settings, now=now)
    except ValidationFailed as exc:
        return exc.report
    raise AssertionError("the poisoned batch passed the gate: the suites are broken")


def step_validate(settings: Settings, state: "DemoState") -> str:
    """Demo step: validate the newest ingested partitions and the catalog, then quarantine a
    poisoned copy. Validating every ML-100K partition takes ~0.4 s CPU each, so the demo checks
    the ``validation.demo_recent_partitions`` newest ones (the gate runs per new batch anyway)."""
    import time as _time

    t0 = _time.perf_counter()
    lake = Lake(settings.paths.lake_dir)
    ingested = sorted(date.fromisoformat(d) for d in state.values.get("partitions", [])) or lake.partitions()
    present = set(lake.partitions())
    days = [d for d in ingested if d in present][-settings.validation.demo_recent_partitions:]
    reports: list[ValidationReport] = []
    for run in (lambda: validate_partitions(days, settings=settings), lambda: validate_catalog(settings=settings)):
        try:
            reports += run()
        except ValidationFailed as exc:
            reports += exc.passed + exc.reports
    bad = [r for r in reports if not r.success]
    elapsed = _time.perf_counter() - t0
    poisoned = poisoned_batch_demo(settings)
    state.values["validation"] = {"reports": [r.as_dict() for r in reports], "poisoned": poisoned.as_dict()}
    verdict = "all passed" if not bad else f"{len(bad)} FAILED and quarantined ({', '.join(r.label for r in bad)})"
    rows = sum(r.rows for r in reports if r.table == "events")
    return (f"validated the {len(days)} newest partitions ({rows:,} events) + catalog in {elapsed:.1f}s: {verdict}; "
            f"a poisoned copy of {poisoned.date} was quarantined by {', '.join(c.name for c in poisoned.failed)} "
            f"-> {poisoned.quarantine_dir} (Data Docs: {poisoned.docs_path})")
