"""Loaders for real public formats (MovieLens 100K / 1M / latest-small, RecBole atomic files)
and a generic CSV/Parquet interactions loader with a column mapping, so a new dataset needs
configuration, not code. Every loader returns a :class:`core.schemas.Dataset` in the platform's
schemas and raises :class:`core.schemas.DataError` naming file, row and column on bad input.
"""
from __future__ import annotations

import csv
import io
from pathlib import Path
from typing import Callable, Mapping

import pandas as pd

from core.schemas import DataError, Dataset, coerce_events, coerce_items, coerce_users, empty_items, empty_users

ML100K_GENRES = [
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
]


def _read_delimited(path: Path, *, sep: str, names: list[str] | None, header: int | None = None,
                    encoding: str = "utf-8", dtype: object = str) -> pd.DataFrame:
    """Read a delimited file as strings; turn pandas' failures into DataError naming the file."""
    if not path.is_file():
        raise DataError("no such file", source=str(path))
    try:
        if sep == "::":
            # '::' is multi-character: split by hand (the python engine is slow and the C engine refuses it).
            with _open_text(path, encoding) as fh:
                rows = [line.rstrip("\r\n").split("::") for line in fh if line.strip()]
            if not rows:
                raise DataError("file is empty", source=str(path))
            width = len(names or rows[0])
            for i, r in enumerate(rows):
                if len(r) != width:
                    raise DataError(f"expected {width} '::'-separated fields, found {len(r)}", source=str(path), row=i + 1)
            return pd.DataFrame(rows, columns=names)
        return pd.read_csv(path, sep=sep, names=names, header=header, encoding=encoding, dtype=dtype,
                           quoting=csv.QUOTE_NONE if sep != "," else csv.QUOTE_MINIMAL, keep_default_na=True,
                           compression="infer", engine="c")
    except pd.errors.EmptyDataError as exc:
        raise DataError("file is empty", source=str(path)) from exc
    except pd.errors.ParserError as exc:
        raise DataError(f"cannot parse: {exc}", source=str(path)) from exc
    except UnicodeDecodeError as exc:
        raise DataError(f"not {encoding} text: {exc}", source=str(path)) from exc


def _open_text(path: Path, encoding: str) -> io.TextIOBase:
    if path.suffix == ".gz":
        import gzip

        return gzip.open(path, "rt", encoding=encoding)
    return open(path, encoding=encoding)


def _first_existing(folder: Path, names: list[str]) -> Path | None:
    for n in names:
        if (folder / n).is_file():
            return folder / n
    return None


# ---- MovieLens 100K -------------------------------------------------------------------------
def load_ml100k(folder: Path | str) -> Dataset:
    """MovieLens 100K, either GroupLens' own files (``u.data``, ``u.item``, ``u.user``) or the
    RecBole atomic copy (``ml-100k.inter`` ...) that ``recsys data fetch ml-100k`` extracts."""
    folder = Path(folder)
    if (folder / "u.data").is_file():
        raw = _read_delimited(folder / "u.data", sep="\t", names=["user_id", "item_id", "value", "timestamp"])
        events = coerce_events(raw, source=str(folder / "u.data"))
        items = _ml100k_items(folder / "u.item") if (folder / "u.item").is_file() else empty_items()
        users = empty_users()
        if (folder / "u.user").is_file():
            u = _read_delimited(folder / "u.user", sep="|", names=["user_id", "age", "gender", "occupation", "zip_code"])
            users = coerce_users(u, source=str(folder / "u.user"))
        return Dataset("ml-100k", events, items, users)
    if (folder / "ml-100k.inter").is_file():
        return load_recbole_atomic(folder, "ml-100k")
    raise DataError("neither u.data (GroupLens) nor ml-100k.inter (RecBole) found", source=str(folder))


def _ml100k_items(path: Path) -> pd.DataFrame:
    names = ["item_id", "title", "release_date", "video_release", "url", *ML100K_GENRES]
    raw = _read_delimited(path, sep="|", names=names, encoding="latin-1")
    flags = raw[ML100K_GENRES].fillna("0").astype(int).to_numpy().astype(bool)
    raw["categories"] = [[g for g, on in zip(ML100K_GENRES, row) if on and g != "unknown"] for row in flags]
    raw["created_at"] = pd.to_datetime(raw["release_date"], format="%d-%b-%Y", errors="coerce", utc=True)
    return coerce_items(raw[["item_id", "title", "categories", "created_at"]], source=str(path))


def load_recbole_atomic(folder: Path | str, name: str) -> Dataset:
    """RecBole atomic files: ``<name>.inter`` (``user_id:token item_id:token rating:float timestamp:float``),
    optional ``.item`` and ``.user``. Headers carry ``field:type``; the type suffix is dropped."""
    folder = Path(folder)
    inter = folder / f"{name}.inter"
    raw = _read_delimited(inter, sep="\t", names=None, header=0)
    raw.columns = [c.split(":", 1)[0] for c in raw.columns]
    raw = raw.rename(columns={"rating": "value"})
    events = coerce_events(raw, source=str(inter), row_offset=2)
    items, users = empty_items(), empty_users()
    if (folder / f"{name}.item").is_file():
        it = _read_delimited(folder / f"{name}.item", sep="\t", names=None, header=0)
        it.columns = [c.split(":", 1)[0] for c in it.columns]
        it = it.rename(columns={"movie_title": "title", "class": "categories"})
        if "categories" in it.columns:
            it["categories"] = it["categories"].fillna("").str.split(" ")
        if "release_year" in it.columns:
            it["created_at"] = pd.to_datetime(it["release_year"], format="%Y", errors="coerce", utc=True)
        items = coerce_items(it, source=str(folder / f"{name}.item"), row_offset=2)
    if (folder / f"{name}.user").is_file():
        us = _read_delimited(folder / f"{name}.user", sep="\t", names=None, header=0)
        us.columns = [c.split(":", 1)[0] for c in us.columns]
        users = coerce_users(us, source=str(folder / f"{name}.user"), row_offset=2)
    return Dataset(name, events, items, users)


# ---- MovieLens 1M ---------------------------------------------------------------------------
def load_ml1m(folder: Path | str, *, ratings: str = "auto") -> Dataset:
    """MovieLens 1M. ``ratings``: ``dat`` (``ratings.dat[.gz]``, with timestamps), ``no_timestamps``
    (``ratings_no_timestamps.csv.gz``: all 1,000,209 ratings, no time; items are ``movie_rank``),
    or ``auto`` (the complete ``ratings.dat`` if present, else the timestamp-less file)."""
    folder = Path(folder)
    dat = _first_existing(folder, ["ratings.dat", "ratings.dat.gz"])
    nots = folder / "ratings_no_timestamps.csv.gz"
    if ratings == "auto":
        ratings = "dat" if (folder / "ratings.dat").is_file() or not nots.is_file() else "no_timestamps"
    movies = _ml1m_movies(folder / "movies.dat") if (folder / "movies.dat").is_file() else empty_items()
    users = empty_users()
    if (folder / "users.dat").is_file():
        u = _read_delimited(folder / "users.dat", sep="::", names=["user_id", "gender", "age", "occupation", "zip_code"])
        users = coerce_users(u, source=str(folder / "users.dat"))
    if ratings == "dat":
        if dat is None:
            raise DataError("no ratings.dat or ratings.dat.gz", source=str(folder))
        raw = _read_delimited(dat, sep="::", names=["user_id", "item_id", "value", "timestamp"])
        events = coerce_events(raw, source=str(dat))
        return Dataset("ml-1m", events, movies, users)
    if ratings != "no_timestamps":
        raise ValueError(f"ratings must be auto, dat or no_timestamps, not {ratings!r}")
    raw = _read_delimited(nots, sep=",", names=None, header=0)
    for col in ("user_id", "movie_rank", "movie_id", "rating"):
        if col not in raw.columns:
            raise DataError(f"missing required column(s) ['{col}']; found {list(raw.columns)}", source=str(nots), column=col)
    frame = pd.DataFrame({"user_id": raw["user_id"], "item_id": raw["movie_rank"], "value": raw["rating"]})
    events = coerce_events(frame, source=str(nots), row_offset=2, allow_missing_timestamps=True)
    # Catalog keyed by movie_rank, described by movies.dat where the MovieID is known.
    ranks = raw[["movie_rank", "movie_id"]].drop_duplicates("movie_rank")
    if len(movies):
        info = movies.set_index("item_id")
        rows = []
        for rank, mid in zip(ranks["movie_rank"], ranks["movie_id"]):
            known = mid in info.index
            rows.append({
                "item_id": rank,
                "title": info.at[mid, "title"] if known else f"movie rank {rank}",
                "categories": list(info.at[mid, "categories"]) if known else [],
                "created_at": info.at[mid, "created_at"] if known else pd.NaT,
            })
        items = coerce_items(pd.DataFrame(rows), source=str(folder / "movies.dat"))
    else:
        items = empty_items()
    return Dataset("ml-1m", events, items, users, has_timestamps=False)


def _ml1m_movies(path: Path) -> pd.DataFrame:
    raw = _read_delimited(path, sep="::", names=["item_id", "title", "categories"], encoding="latin-1")
    years = raw["title"].str.extract(r"\((\d{4})\)\s*$")[0]
    raw["created_at"] = pd.to_datetime(years, format="%Y", errors="coerce", utc=True)
    return coerce_items(raw, source=str(path))


# ---- MovieLens latest-small -----------------------------------------------------------------
def load_ml_latest_small(folder: Path | str) -> Dataset:
    """MovieLens latest-small (``ratings.csv``, ``movies.csv``; header rows)."""
    folder = Path(folder)
    path = folder / "ratings.csv"
    raw = _read_delimited(path, sep=",", names=None, header=0)
    raw = raw.rename(columns={"userId": "user_id", "movieId": "item_id", "rating": "value"})
    events = coerce_events(raw, source=str(path), row_offset=2)
    items = empty_items()
    if (folder / "movies.csv").is_file():
        m = _read_delimited(folder / "movies.csv", sep=",", names=None, header=0)
        m = m.rename(columns={"movieId": "item_id", "genres": "categories"})
        years = m["title"].str.extract(r"\((\d{4})\)\s*$")[0]
        m["created_at"] = pd.to_datetime(years, format="%Y", errors="coerce", utc=True)
        items = coerce_items(m, source=str(folder / "movies.csv"), row_offset=2)
    return Dataset("ml-latest-small", events, items, empty_users())


# ---- generic --------------------------------------------------------------------------------
def load_interactions(
    path: Path | str,
    *,
    columns: Mapping[str, str] | None = None,
    sep: str = ",",
    timestamp_unit: str | None = None,
    event_type: str | None = None,
    name: str | None = None,
) -> Dataset:
    """Any CSV/TSV/Parquet of interactions. ``columns`` maps the platform's names to the file's
    (``{"user_id": "uid", "item_id": "sku", "timestamp": "ts", "value": "rating"}``); unmapped
    platform columns are taken by their own name when present. ``event_type`` fills a missing
    event-type column."""
    path = Path(path)
    if not path.is_file():
        raise DataError("no such file", source=str(path))
    if path.suffix == ".parquet":
        try:
            raw = pd.read_parquet(path)
        except Exception as exc:  # pyarrow raises several types for a bad file
            raise DataError(f"cannot read Parquet: {exc}", source=str(path)) from exc
        row_offset = 0
    else:
        raw = _read_delimited(path, sep=sep, names=None, header=0)
        row_offset = 2
    mapping = dict(columns or {})
    missing = [src for src in mapping.values() if src not in raw.columns]
    if missing:
        raise DataError(f"column mapping names {missing}, which the file does not have; found {list(raw.columns)}",
                        source=str(path), column=missing[0])
    raw = raw.rename(columns={src: dst for dst, src in mapping.items()})
    if event_type and "event_type" not in raw.columns:
        raw["event_type"] = event_type
    events = coerce_events(raw, source=str(path), row_offset=row_offset, timestamp_unit=timestamp_unit)
    return Dataset(name or path.stem, events)


LOADERS: dict[str, Callable[[Path], Dataset]] = {
    "ml-100k": load_ml100k,
    "ml-1m": load_ml1m,
    "ml-latest-small": load_ml_latest_small,
}
