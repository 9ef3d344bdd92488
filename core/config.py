"""One typed configuration for the whole platform.

Layers, lowest to highest: the defaults declared here -> one YAML file (``config/<profile>.yaml``,
or the file named by ``RECSYS_CONFIG``) -> ``RECSYS_*`` environment variables
(``RECSYS_SERVING__PORT=9000``; ``__`` separates sections) -> explicit overrides in code.
Unknown keys are rejected with the file (or variable) and key named, because a typo in a
production config that silently falls back to a default is worse than a crash at start-up.
Nothing happens at import: call :func:`load_settings`.

Each section is declared by the package that owns it (``serving/settings.py`` ...), so the
package that reads a setting also documents it.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from core.settings_base import Section
from expectations.settings import ValidationSettings
from feature_defs.settings import FeatureSettings
from models.settings import TrainingSettings
from monitoring.settings import MonitoringSettings
from pipelines.settings import OrchestrationSettings, RegistrySettings
from serving.settings import EventLogSettings, ServingSettings

ENV_PREFIX = "RECSYS_"
ENV_NESTED = "__"
#: Variables that choose *which* config to load; they are not settings themselves.
META_ENV = {"RECSYS_CONFIG", "RECSYS_PROFILE"}
DEFAULT_PROFILE = "local"


class ConfigError(ValueError):
    """A configuration value or key is wrong; the message names the source and key."""


class PathSettings(Section):
    """Where embedded state lives. Relative paths are resolved against ``root``."""

    root: Path = Field(default=Path("."), description="Project root; relative paths below resolve against it.")
    var_dir: Path = Path("var")
    lake_dir: Path = Path("var/lake")
    data_dir: Path = Path("var/data")
    run_dir: Path = Path("var/run")
    shared_data_dir: Path = Field(
        default=Path("../shared/data"),
        description="Read-only real datasets (MovieLens); never copied into the repo.",
    )

    def resolved(self) -> "PathSettings":
        root = self.root.expanduser().resolve()

        def fix(p: Path) -> Path:
            p = p.expanduser()
            return p if p.is_absolute() else (root / p)

        return self.model_copy(
            update={
                "root": root,
                "var_dir": fix(self.var_dir),
                "lake_dir": fix(self.lake_dir),
                "data_dir": fix(self.data_dir),
                "run_dir": fix(self.run_dir),
                "shared_data_dir": fix(self.shared_data_dir),
            }
        )


class MlflowSettings(Section):
    """MLflow tracking and registry. Embedded default: SQLite + local artifact folder."""

    tracking_uri: str = "sqlite:///var/mlflow.db"
    registry_uri: str | None = None
    artifact_root: Path = Path("var/mlartifacts")
    experiment: str = "recsys"

    def resolved(self, root: Path) -> "MlflowSettings":
        uri = self.tracking_uri
        prefix = "sqlite:///"
        if uri.startswith(prefix) and not uri.startswith(prefix + "/"):
            uri = prefix + str((root / uri[len(prefix):]).resolve())
        art = self.artifact_root if self.artifact_root.is_absolute() else (root / self.artifact_root)
        return self.model_copy(update={"tracking_uri": uri, "artifact_root": art.resolve()})


class DataSettings(Section):
    """Data layer defaults: which dataset the demo uses, synthetic generator sizes."""

    default_source: str = "ml-100k"
    synthetic_users: int = Field(2_000, ge=1)
    synthetic_items: int = Field(1_000, ge=1)
    synthetic_days: int = Field(30, ge=1)
    synthetic_events: int = Field(200_000, ge=1)
    seed: int = 42


class Settings(BaseModel):
    """The whole platform's configuration (see module docstring for the layering)."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    profile: str = DEFAULT_PROFILE
    environment: Literal["local", "test", "production"] = "local"
    paths: PathSettings = PathSettings()
    mlflow: MlflowSettings = MlflowSettings()
    data: DataSettings = DataSettings()
    validation: ValidationSettings = ValidationSettings()
    features: FeatureSettings = FeatureSettings()
    training: TrainingSettings = TrainingSettings()
    registry: RegistrySettings = RegistrySettings()
    orchestration: OrchestrationSettings = OrchestrationSettings()
    serving: ServingSettings = ServingSettings()
    eventlog: EventLogSettings = EventLogSettings()
    monitoring: MonitoringSettings = MonitoringSettings()

    @model_validator(mode="after")
    def _resolve_paths(self) -> "Settings":
        paths = self.paths.resolved()
        object.__setattr__(self, "paths", paths)
        object.__setattr__(self, "mlflow", self.mlflow.resolved(paths.root))
        return self

    # Convenience accessors used everywhere; keeping them here means one definition of layout.
    @property
    def lake(self) -> Path:
        return self.paths.lake_dir


def _known_keys(model: type[BaseModel]) -> dict[str, Any]:
    return dict(model.model_fields)


def _check_unknown(data: Mapping[str, Any], model: type[BaseModel], source: str, prefix: str = "") -> None:
    """Reject keys the model does not declare, naming the source and the dotted key."""
    fields = _known_keys(model)
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            choices = ", ".join(sorted(fields))
            raise ConfigError(f"{source}: unknown key '{dotted}' (known here: {choices})")
        annotation = fields[key].annotation
        if isinstance(value, Mapping) and isinstance(annotation, type) and issubclass(annotation, BaseModel):
            _check_unknown(value, annotation, source, prefix=f"{dotted}.")


def _deep_merge(base: dict[str, Any], top: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in top.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = _deep_merge(dict(out[key]), value)
        else:
            out[key] = value
    return out


def _yaml_layer(path: Path) -> dict[str, Any]:
    try:
        loaded = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of sections, got {type(loaded).__name__}")
    _check_unknown(loaded, Settings, str(path))
    return loaded


def _env_layer(environ: Mapping[str, str]) -> dict[str, Any]:
    """``RECSYS_SERVING__PORT=9000`` -> ``{"serving": {"port": "9000"}}`` (pydantic coerces types)."""
    out: dict[str, Any] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name in META_ENV:
            continue
        parts = [p.lower() for p in name[len(ENV_PREFIX):].split(ENV_NESTED)]
        model: type[BaseModel] = Settings
        node = out
        for i, part in enumerate(parts):
            fields = _known_keys(model)
            if part not in fields:
                raise ConfigError(
                    f"environment variable {name}: unknown key '{'.'.join(parts[: i + 1])}' "
                    f"(known here: {', '.join(sorted(fields))})"
                )
            last = i == len(parts) - 1
            annotation = fields[part].annotation
            if last:
                node[part] = _parse_env_value(raw)
            else:
                if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
                    raise ConfigError(f"environment variable {name}: '{part}' is not a section")
                node = node.setdefault(part, {})
                model = annotation
    return out


def _parse_env_value(raw: str) -> Any:
    """Lists and mappings may be given as YAML/JSON (``[a, b]``); scalars stay strings."""
    text = raw.strip()
    if text[:1] in "[{":
        try:
            return yaml.safe_load(text)
        except yaml.YAMLError:
            return raw
    return raw


def config_file_for(environ: Mapping[str, str], root: Path) -> Path | None:
    explicit = environ.get("RECSYS_CONFIG")
    if explicit:
        path = Path(explicit)
        if not path.is_file():
            raise ConfigError(f"RECSYS_CONFIG={explicit}: no such file")
        return path
    profile = environ.get("RECSYS_PROFILE", DEFAULT_PROFILE)
    path = root / "config" / f"{profile}.yaml"
    if path.is_file():
        return path
    if "RECSYS_PROFILE" in environ:
        raise ConfigError(f"RECSYS_PROFILE={profile}: no file {path}")
    return None


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    config_file: Path | str | None = None,
    root: Path | str | None = None,
) -> Settings:
    """Build the settings: defaults -> YAML -> environment -> ``overrides``; then validate.

    ``root`` is where ``config/`` and relative paths live (default: the current directory).
    """
    env = dict(os.environ if environ is None else environ)
    base_root = Path(root) if root is not None else Path(env.get("RECSYS_PATHS__ROOT", "."))
    layers: list[tuple[str, dict[str, Any]]] = []
    path = Path(config_file) if config_file is not None else config_file_for(env, base_root)
    data: dict[str, Any] = {}
    if path is not None:
        data = _deep_merge(data, _yaml_layer(path))
        layers.append((str(path), data))
        data.setdefault("profile", path.stem)
    data = _deep_merge(data, _env_layer(env))
    if overrides:
        _check_unknown(overrides, Settings, "overrides")
        data = _deep_merge(data, overrides)
    if root is not None:
        data = _deep_merge(data, {"paths": {"root": str(root)}})
    try:
        return Settings.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        source = f"{path} + environment" if path else "environment/overrides"
        raise ConfigError(f"invalid configuration ({source}): {problems}") from exc
