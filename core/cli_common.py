"""Helpers shared by the CLI command groups: settings loading and error reporting."""
from __future__ import annotations

import functools
import json
from typing import Any, Callable, TypeVar

import typer
from rich.console import Console

console = Console(stderr=False)
err_console = Console(stderr=True)

F = TypeVar("F", bound=Callable[..., Any])


def settings():
    """Load the layered settings (lazily, so --help never reads config)."""
    from core.config import load_settings

    return load_settings()


def clean_errors(fn: F) -> F:
    """Turn the platform's expected errors into one red line and exit code 2 (no traceback)."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from core.config import ConfigError
        from core.schemas import DataError

        try:
            return fn(*args, **kwargs)
        except (ConfigError, DataError, FileNotFoundError, ValueError) as exc:
            err_console.print(f"[bold red]error:[/] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None

    return wrapper  # type: ignore[return-value]


def check_protocol(protocol: str) -> None:
    """The evaluation protocols every training/evaluation command accepts (``core.splits``)."""
    if protocol not in ("recbole", "temporal"):
        raise ValueError(f"--protocol must be recbole or temporal, not {protocol!r}")


def print_run(result: Any) -> None:
    """The closing line of a training command: its MLflow run, registration and model URI."""
    reg = f"registered {result.registered_name} v{result.registered_version}" if result.registered_version else "not registered"
    console.print(f"MLflow run {result.run_id}; {reg}; model {result.model_uri}", highlight=False)


def print_json(obj: Any) -> None:
    console.print_json(json.dumps(obj, default=str))
