"""Obtain public datasets without redistributing them.

ML-100K: the ``recbole==1.2.1`` wheel on PyPI carries RecBole's atomic copy of it, so any machine
that reaches PyPI can have it: download the wheel (``pip download --no-deps``), read the three
files out of the zip, never install recbole. ``path=`` copies from a local folder instead.
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from core.schemas import DataError

RECBOLE_WHEEL = "recbole==1.2.1"
ML100K_MEMBERS = ("ml-100k.inter", "ml-100k.item", "ml-100k.user")
ML100K_NATIVE = ("u.data", "u.item", "u.user", "u.genre", "u.info", "README")
FETCHABLE = ("ml-100k",)


class FetchError(RuntimeError):
    """The dataset could not be obtained (no registry access, bad wheel, missing folder)."""


def fetch_dataset(name: str, *, dest_root: Path, path: Path | None = None, force: bool = False,
                  timeout_s: float = 300.0) -> Path:
    """Put dataset ``name`` under ``dest_root/name`` and return that folder (idempotent)."""
    if name not in FETCHABLE and path is None:
        raise FetchError(f"no download source for {name!r}; pass --path to a local copy (fetchable: {', '.join(FETCHABLE)})")
    dest = dest_root / name
    if path is not None:
        return _copy_local(Path(path), dest, force=force)
    if not force and all((dest / m).is_file() for m in ML100K_MEMBERS):
        return dest
    with tempfile.TemporaryDirectory(prefix="recsys-fetch-") as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "--disable-pip-version-check",
               RECBOLE_WHEEL, "-d", tmp]
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s)
        except subprocess.TimeoutExpired as exc:
            raise FetchError(f"pip download {RECBOLE_WHEEL} timed out after {timeout_s:.0f}s") from exc
        wheels = list(Path(tmp).glob("recbole-*.whl"))
        if proc.returncode != 0 or not wheels:
            raise FetchError(f"pip download {RECBOLE_WHEEL} failed: {proc.stderr.strip()[-500:]}")
        extract_ml100k_from_wheel(wheels[0], dest)
    return dest


def extract_ml100k_from_wheel(wheel_path: Path, dest: Path) -> Path:
    """Read RecBole's ML-100K atomic files out of its wheel into ``dest`` (replaced atomically)."""
    with tempfile.TemporaryDirectory(prefix="recsys-wheel-") as tmp:
        staging = Path(tmp) / "staging"
        staging.mkdir()
        try:
            wheel = zipfile.ZipFile(wheel_path)
        except zipfile.BadZipFile as exc:
            raise FetchError(f"{wheel_path} is not a wheel (zip): {exc}") from exc
        with wheel:
            for member in ML100K_MEMBERS:
                try:
                    data = wheel.read(f"recbole/dataset_example/ml-100k/{member}")
                except KeyError as exc:
                    raise FetchError(f"{wheel_path.name} has no recbole/dataset_example/ml-100k/{member}") from exc
                (staging / member).write_bytes(data)
        _replace_dir(staging, dest)
    return dest


def _copy_local(src: Path, dest: Path, *, force: bool) -> Path:
    if not src.is_dir():
        raise DataError("no such folder", source=str(src))
    if src.resolve() == dest.resolve():
        return dest
    files = [f for f in src.iterdir() if f.is_file()]
    if not files:
        raise DataError("folder is empty", source=str(src))
    if dest.is_dir() and not force and all((dest / f.name).is_file() for f in files):
        return dest
    with tempfile.TemporaryDirectory(prefix="recsys-fetch-", dir=dest.parent if dest.parent.exists() else None) as tmp:
        staging = Path(tmp) / "staging"
        staging.mkdir()
        for f in files:
            shutil.copy2(f, staging / f.name)
        _replace_dir(staging, dest)
    return dest


def _replace_dir(staging: Path, dest: Path) -> None:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        shutil.rmtree(dest)
    shutil.move(str(staging), dest)
