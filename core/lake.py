"""The data lake: Parquet files partitioned by event date, queried with DuckDB.

Layout (under ``settings.paths.lake_dir``)::

    events/date=YYYY-MM-DD/part-0.parquet   one file per day, rewritten atomically on ingest
    items/items.parquet                     the catalog (upserted by item_id)
    users/users.parquet                     user profiles (upserted by user_id)
    quarantine/<table>/date=YYYY-MM-DD/     batches refused by validation (with their report)

Writes go to a temporary file in the same folder and are renamed into place, so a reader
never sees half a partition and a crash leaves the previous version intact. Merging on the
deterministic ``event_id`` makes ingest idempotent: the same day twice holds each event once.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Iterator

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from core.schemas import EVENT_SCHEMA, ITEM_SCHEMA, USER_SCHEMA, DataError

TABLES = ("events", "items", "users")


@dataclass(frozen=True)
class PartitionWrite:
    """What one partition write did (for reports and idempotency checks)."""

    date: date
    incoming: int
    added: int
    total: int


def _atomic_write(table: pa.Table, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".parquet", dir=path.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp, compression="zstd")
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class Lake:
    """Access to the lake's tables. Cheap to construct; opens nothing until used."""

    def __init__(self, root: Path | str):
        self.root = Path(root)

    # ---- layout -------------------------------------------------------------------------
    def events_dir(self) -> Path:
        return self.root / "events"

    def partition_dir(self, day: date) -> Path:
        return self.events_dir() / f"date={day.isoformat()}"

    def table_path(self, table: str) -> Path:
        if table not in ("items", "users"):
            raise ValueError(f"unknown table {table!r}")
        return self.root / table / f"{table}.parquet"

    def quarantine_dir(self, table: str, day: date | str) -> Path:
        return self.root / "quarantine" / table / f"date={day if isinstance(day, str) else day.isoformat()}"

    def partitions(self) -> list[date]:
        """Dates that have an events partition, oldest first."""
        if not self.events_dir().is_dir():
            return []
        days = []
        for p in self.events_dir().glob("date=*/part-0.parquet"):
            days.append(date.fromisoformat(p.parent.name.split("=", 1)[1]))
        return sorted(days)

    # ---- writes -------------------------------------------------------------------------
    def write_events(self, events: pd.DataFrame) -> list[PartitionWrite]:
        """Merge events into their day partitions; duplicates (same ``event_id``) are kept once."""
        if events["timestamp"].isna().any():
            raise DataError(
                "events without timestamps cannot be stored in the date-partitioned lake "
                "(use the dataset directly, e.g. for the RecBole protocol)",
                column="timestamp",
            )
        days = events["timestamp"].dt.date
        results = []
        for day, batch in events.groupby(days, sort=True):
            results.append(self._merge_partition(day, batch))
        return results

    def replace_partition(self, day: date, events: pd.DataFrame) -> None:
        """Replace one day's partition wholesale (used when restoring from quarantine)."""
        _atomic_write(self._to_table(events), self.partition_dir(day) / "part-0.parquet")

    def _to_table(self, events: pd.DataFrame) -> pa.Table:
        return pa.Table.from_pandas(events[EVENT_SCHEMA.names], schema=EVENT_SCHEMA, preserve_index=False)

    def _merge_partition(self, day: date, batch: pd.DataFrame) -> PartitionWrite:
        path = self.partition_dir(day) / "part-0.parquet"
        incoming = batch.drop_duplicates("event_id")
        if path.exists():
            existing = pq.read_table(path).to_pandas()
            new = incoming[~incoming["event_id"].isin(existing["event_id"])]
            if new.empty:
                return PartitionWrite(day, len(batch), 0, len(existing))
            merged = pd.concat([existing, new], ignore_index=True)
        else:
            new, merged = incoming, incoming
        merged = merged.sort_values(["timestamp", "event_id"], kind="stable")
        _atomic_write(self._to_table(merged), path)
        return PartitionWrite(day, len(batch), len(new), len(merged))

    def upsert(self, table: str, frame: pd.DataFrame) -> int:
        """Upsert items or users by id (the newest row wins). Returns the table's new size."""
        key = "item_id" if table == "items" else "user_id"
        schema = ITEM_SCHEMA if table == "items" else USER_SCHEMA
        path = self.table_path(table)
        if path.exists():
            existing = pq.read_table(path).to_pandas()
            frame = pd.concat([existing[~existing[key].isin(frame[key])], frame], ignore_index=True)
        frame = frame.sort_values(key, kind="stable")
        _atomic_write(pa.Table.from_pandas(frame[schema.names], schema=schema, preserve_index=False), path)
        return len(frame)

    def quarantine_partition(self, table: str, day: date, files: list[Path]) -> Path:
        """Move files into the quarantine folder for ``table``/``day``; nothing is deleted."""
        dest = self.quarantine_dir(table, day)
        dest.mkdir(parents=True, exist_ok=True)
        for f in files:
            target = dest / f.name
            if target.exists():
                target = dest / f"{f.stem}-{len(list(dest.iterdir()))}{f.suffix}"
            shutil.move(str(f), target)
        return dest

    # ---- reads --------------------------------------------------------------------------
    def read_events(self, start: date | None = None, end: date | None = None) -> pd.DataFrame:
        """Events with ``start <= date <= end`` (inclusive; either may be None)."""
        days = [d for d in self.partitions() if (start is None or d >= start) and (end is None or d <= end)]
        if not days:
            return EVENT_SCHEMA.empty_table().to_pandas()
        tables = [pq.read_table(self.partition_dir(d) / "part-0.parquet") for d in days]
        return pa.concat_tables(tables).to_pandas()

    def read_table(self, table: str) -> pd.DataFrame:
        path = self.table_path(table)
        schema = ITEM_SCHEMA if table == "items" else USER_SCHEMA
        if not path.exists():
            return schema.empty_table().to_pandas()
        return pq.read_table(path).to_pandas()

    @contextmanager
    def duckdb(self) -> Iterator["object"]:
        """A DuckDB connection with views ``events``, ``items`` and ``users`` over the lake."""
        import duckdb

        con = duckdb.connect()
        try:
            if self.partitions():
                glob = (self.events_dir() / "date=*" / "part-0.parquet").as_posix()
                con.execute(f"CREATE VIEW events AS SELECT * EXCLUDE (date) FROM read_parquet('{glob}', hive_partitioning = true)")
            else:
                con.register("events_empty", EVENT_SCHEMA.empty_table())
                con.execute("CREATE VIEW events AS SELECT * FROM events_empty")
            for table, schema in (("items", ITEM_SCHEMA), ("users", USER_SCHEMA)):
                path = self.table_path(table)
                if path.exists():
                    con.execute(f"CREATE VIEW {table} AS SELECT * FROM read_parquet('{path.as_posix()}')")
                else:
                    con.register(f"{table}_empty", schema.empty_table())
                    con.execute(f"CREATE VIEW {table} AS SELECT * FROM {table}_empty")
            yield con
        finally:
            con.close()

    def query(self, sql: str, params: list | None = None) -> pd.DataFrame:
        """Run SQL over the lake's views and return a DataFrame."""
        with self.duckdb() as con:
            return con.execute(sql, params or []).df()
