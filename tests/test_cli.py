"""The recsys CLI: fast start (no heavy imports), and the data commands end to end."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "torchrec", "mlflow", "feast", "great_expectations", "evidently", "airflow", "faiss", "fastapi", "sklearn")


def test_cli_import_pulls_no_heavy_library() -> None:
    code = "import sys, core.cli; print(','.join(m for m in %r if m in sys.modules))" % (HEAVY,)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert out.stdout.strip() == "", f"imported at CLI start-up: {out.stdout.strip()}"


def test_help_lists_groups() -> None:
    from core.cli import app

    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0 and "data" in result.stdout and "demo" in result.stdout


def test_data_ingest_stats_and_bad_input(tmp_path: Path, monkeypatch) -> None:
    from core.cli import app

    monkeypatch.chdir(tmp_path)
    f = tmp_path / "ev.csv"
    f.write_text("uid,sku,ts\na,x,2024-01-01T10:00:00Z\nb,y,2024-01-02T11:00:00Z\n")
    runner = CliRunner()
    r = runner.invoke(app, ["data", "ingest", "--source", f"csv:{f}", "--map", "user_id=uid", "--map", "item_id=sku",
                            "--map", "timestamp=ts", "--date", "2024-01-01"])
    assert r.exit_code == 0, r.output
    assert "ingested 1 events" in r.output
    assert (tmp_path / "var/lake/events/date=2024-01-01/part-0.parquet").is_file()
    r = runner.invoke(app, ["data", "stats"])
    assert r.exit_code == 0 and "partitions" in r.output
    r = runner.invoke(app, ["data", "ingest", "--source", f"csv:{f}", "--date", "2024-13-01"])
    assert r.exit_code == 2 and "--date must be YYYY-MM-DD" in r.output
    r = runner.invoke(app, ["data", "ingest", "--source", f"csv:{f}"])
    assert r.exit_code == 2 and "missing required column(s) ['user_id', 'item_id']" in r.output
    assert "Traceback" not in r.output


def test_fetch_from_local_path(tmp_path: Path, monkeypatch, shared_data: Path) -> None:
    from core.cli import app

    monkeypatch.chdir(tmp_path)
    r = CliRunner().invoke(app, ["data", "fetch", "ml-100k", "--path", str(shared_data / "ml-100k")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "var/data/ml-100k/u.data").is_file()


def test_extract_ml100k_from_a_wheel(tmp_path: Path) -> None:
    """The fetch path reads RecBole's files out of the wheel zip (tests never download: the zip is built here)."""
    import zipfile

    import pytest

    from core.datasets import load_ml100k
    from pipelines.fetch import FetchError, extract_ml100k_from_wheel

    wheel = tmp_path / "recbole-1.2.1-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.writestr("recbole/dataset_example/ml-100k/ml-100k.inter",
                   "user_id:token\titem_id:token\trating:float\ttimestamp:float\n196\t242\t3\t881250949\n")
        z.writestr("recbole/dataset_example/ml-100k/ml-100k.item", "item_id:token\tmovie_title:token_seq\n242\tKolya\n")
        z.writestr("recbole/dataset_example/ml-100k/ml-100k.user", "user_id:token\tage:token\n196\t49\n")
    dest = extract_ml100k_from_wheel(wheel, tmp_path / "data" / "ml-100k")
    ds = load_ml100k(dest)
    assert len(ds.events) == 1 and ds.items.loc[0, "title"] == "Kolya" and int(ds.users.loc[0, "age"]) == 49
    broken = tmp_path / "broken.whl"
    with zipfile.ZipFile(broken, "w") as z:
        z.writestr("recbole/__init__.py", "")
    with pytest.raises(FetchError, match="has no recbole/dataset_example/ml-100k/ml-100k.inter"):
        extract_ml100k_from_wheel(broken, tmp_path / "d2")


def test_protocol_check_names_the_choices():
    import pytest

    from core.cli_common import check_protocol

    check_protocol("recbole")
    check_protocol("temporal")
    with pytest.raises(ValueError, match="--protocol must be recbole or temporal, not 'random'"):
        check_protocol("random")
