"""``recsys``: the single entry point for every step.

Each command group lives beside the code it drives (``pipelines/cli_data.py`` ...) and imports
heavy libraries (torch, mlflow, feast) inside the command, so ``recsys --help`` stays fast.
DAGs and this CLI call the same plain functions in ``pipelines/``.
"""
from __future__ import annotations

import importlib

import typer

app = typer.Typer(
    name="recsys",
    help="Real-time recommendation platform: data, validation, features, training, registry, serving.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

#: (group name, module with an ``app: typer.Typer``). Order is the order shown in --help.
COMMAND_GROUPS: list[tuple[str, str]] = [
    ("config", "core.cli_config"),
    ("data", "pipelines.cli_data"),
    ("validate", "pipelines.cli_validate"),
    ("features", "pipelines.cli_features"),
    ("models", "pipelines.cli_models"),
    ("evaluate", "pipelines.cli_evaluate"),
    ("serving", "serving.cli"),
]
#: Groups assembled from several modules' commands (each module owns its commands).
MERGED_GROUPS: dict[str, tuple[str, list[str]]] = {
    "train": ("Train models: two-tower retrieval, DLRM ranker (MLflow-tracked).",
              ["pipelines.cli_train", "pipelines.cli_train_ranker"]),
}
#: Top-level commands: (module, function name).
TOP_LEVEL_COMMANDS: list[tuple[str, str]] = [
    ("pipelines.demo", "demo_command"),
    ("serving.cli", "serve_command"),
    ("pipelines.cli_models", "promote_command"),
    ("pipelines.cli_models", "rollback_command"),
    ("pipelines.cli_up", "up_command"),
    ("pipelines.cli_up", "down_command"),
    ("pipelines.cli_up", "stack_status_command"),
]

for _name, _module in COMMAND_GROUPS:
    app.add_typer(importlib.import_module(_module).app, name=_name)
for _name, (_help, _modules) in MERGED_GROUPS.items():
    _group = typer.Typer(help=_help, no_args_is_help=True)
    for _module in _modules:
        _group.registered_commands.extend(importlib.import_module(_module).app.registered_commands)
    app.add_typer(_group, name=_name)
for _module, _func in TOP_LEVEL_COMMANDS:
    _fn = getattr(importlib.import_module(_module), _func)
    app.command(name=_fn.__name__.removesuffix("_command").replace("_", "-"))(_fn)


def main() -> None:  # pragma: no cover - console entry
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
