"""``recsys serving ingest-log`` (the group ``app``) and the top-level ``recsys serve``
(``serve_command``, registered by core/cli.py; not repeated inside the group).

Heavy imports (uvicorn, models) happen inside the commands, so ``recsys --help`` stays fast.
"""
from __future__ import annotations

from typing import Optional

import typer

app = typer.Typer(help="Real-time serving: the feedback event log (start the API with `recsys serve`).",
                  no_args_is_help=True)


def serve_command(
    host: Optional[str] = typer.Option(None, help="Bind address (default: serving.host)."),
    port: Optional[int] = typer.Option(None, help="Port (default: serving.port)."),
    workers: Optional[int] = typer.Option(None, help="Worker processes (default: serving.workers)."),
    log_level: str = typer.Option("warning", help="uvicorn log level."),
) -> None:
    """Start the recommendation API (FastAPI + uvicorn; OpenAPI at /docs)."""
    from core.cli_common import clean_errors, settings
    from serving.server import run

    @clean_errors
    def _run() -> None:
        run(settings(), host=host, port=port, workers=workers, log_level=log_level)

    _run()



@app.command("ingest-log")
def ingest_log_command(
    all_: bool = typer.Option(False, "--all", help="Re-read the whole log (idempotent) instead of resuming."),
    no_impressions: bool = typer.Option(False, help="Skip the impressions stream."),
) -> None:
    """Load the event log (events and impressions) into the lake, resuming after the last run."""
    from core.cli_common import clean_errors, print_json, settings
    from pipelines.ingest_eventlog import ingest_eventlog

    @clean_errors
    def _run() -> None:
        print_json(ingest_eventlog(settings(), resume=not all_, impressions=not no_impressions).as_dict())

    _run()


if __name__ == "__main__":  # python -m serving.cli --port N ... (what ServerProcess runs: exactly `recsys serve`)
    typer.run(serve_command)
