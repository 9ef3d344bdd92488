"""``recsys config``: show the effective configuration."""
from __future__ import annotations

import typer

from core.cli_common import clean_errors, print_json, settings

app = typer.Typer(help="Show the effective configuration (defaults -> YAML -> RECSYS_* env).", no_args_is_help=True)


@app.command("show")
@clean_errors
def show() -> None:
    """Print the merged, validated settings as JSON."""
    print_json(settings().model_dump(mode="json"))
