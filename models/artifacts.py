"""Self-describing model artifacts: everything serving needs to rebuild a model, in one folder,
with no training code.

An artifact folder holds

- ``manifest.json``: format version, model ``kind``, creation time, feature-service version,
  free-form metadata (metrics, data window, git commit) and a SHA-256 of every other file, so a
  truncated copy or a half-finished download fails loudly instead of serving garbage;
- ``config.json``: the model's typed config (a pydantic model registered for the kind);
- ``weights.pt``: the ``state_dict`` (loaded with ``weights_only=True``: no pickled code);
- ``users.json`` / ``items.json``: the :class:`models.base.IdMap` s (external id <-> row);
- ``arrays.npz``: extra arrays (item embeddings, popularity ...), loaded without pickle.

Kinds are generic: a model module calls :func:`register_kind` with its config class and a
``builder(artifact) -> servable`` (two-tower, DLRM ...). :meth:`Artifact.build` imports the
kind's module on demand from :data:`KIND_MODULES`, so loading never needs training code.

MLflow: :func:`log_artifact_model` logs the folder as a pyfunc model (``models:/two_tower@champion``
resolves to it); :func:`load_from_registry` downloads a registered version and keeps a local
copy under ``var/models/<name>/<version>/`` plus the last known alias -> version map, so serving
can start when the registry is unreachable.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Mapping

import numpy as np
from pydantic import BaseModel

from models.base import IdMap

if TYPE_CHECKING:  # pragma: no cover
    import pandas as pd

    from core.config import Settings

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
CONFIG = "config.json"
WEIGHTS = "weights.pt"
USERS = "users.json"
ITEMS = "items.json"
ARRAYS = "arrays.npz"
#: Name of the artifact folder inside a logged MLflow pyfunc model (``<model>/artifacts/<this>``).
PYFUNC_ARTIFACT_KEY = "recsys_artifact"

#: Where each known kind's builder lives; imported lazily by :func:`kind_spec`.
KIND_MODULES: dict[str, str] = {
    "two_tower": "models.two_tower",
    "dlrm": "models.dlrm",
}


class ArtifactError(ValueError):
    """An artifact is missing, incomplete, corrupt or of an unknown kind; the message says which."""


@dataclass(frozen=True)
class KindSpec:
    """How to rebuild one kind of model: its config class and ``builder(artifact) -> servable``.

    The servable should offer ``predict(frame: pandas.DataFrame, params: dict | None) -> DataFrame``
    if it is to be served through MLflow's pyfunc flavour."""

    kind: str
    config_cls: type[BaseModel]
    builder: Callable[["Artifact"], Any]
    signature: Callable[[], Any] | None = None


_KINDS: dict[str, KindSpec] = {}


def register_kind(kind: str, *, config_cls: type[BaseModel], builder: Callable[["Artifact"], Any],
                  signature: Callable[[], Any] | None = None) -> None:
    """Declare a model kind (called at import time by the module that defines the model)."""
    _KINDS[kind] = KindSpec(kind, config_cls, builder, signature)


def kind_spec(kind: str) -> KindSpec:
    """The spec of ``kind``, importing its module from :data:`KIND_MODULES` if needed."""
    if kind not in _KINDS and kind in KIND_MODULES:
        importlib.import_module(KIND_MODULES[kind])
    if kind not in _KINDS:
        known = sorted(set(_KINDS) | set(KIND_MODULES))
        raise ArtifactError(f"unknown model kind {kind!r} (known: {', '.join(known)})")
    return _KINDS[kind]


@dataclass
class Artifact:
    """A model as data: what :func:`save_artifact` writes and :func:`load_artifact` returns."""

    kind: str
    config: BaseModel | dict[str, Any]
    state_dict: dict[str, Any] = field(default_factory=dict)
    users: IdMap | None = None
    items: IdMap | None = None
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    feature_service_version: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    #: Where it was loaded from (folder, or registry ``name``/``version``); not saved.
    origin: dict[str, Any] = field(default_factory=dict)

    def config_dict(self) -> dict[str, Any]:
        return self.config.model_dump(mode="json") if isinstance(self.config, BaseModel) else dict(self.config)

    def typed_config(self) -> BaseModel:
        """The config validated into the kind's class (raises naming the bad field)."""
        if isinstance(self.config, BaseModel):
            return self.config
        spec = kind_spec(self.kind)
        try:
            return spec.config_cls.model_validate(self.config)
        except Exception as exc:
            raise ArtifactError(f"{self.kind} artifact: invalid config: {exc}") from exc

    def build(self) -> Any:
        """Rebuild the servable model of this kind (no training code involved)."""
        return kind_spec(self.kind).builder(self)


# ---- folder format --------------------------------------------------------------------------
def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB chunks (artifact manifests and frozen eval sets use it)."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _json_default(obj: Any) -> Any:
    if isinstance(obj, (np.integer,)):
        return int(obj)
    if isinstance(obj, (np.floating,)):
        return float(obj)
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, (datetime, Path)):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def save_artifact(
    folder: Path | str,
    *,
    kind: str | None = None,
    config: BaseModel | Mapping[str, Any] | None = None,
    state_dict: Mapping[str, Any] | None = None,
    users: IdMap | None = None,
    items: IdMap | None = None,
    arrays: Mapping[str, np.ndarray] | None = None,
    feature_service_version: str | None = None,
    metadata: Mapping[str, Any] | None = None,
    artifact: Artifact | None = None,
) -> Path:
    """Write an artifact folder (either pass ``artifact=`` or the parts). Returns the folder.

    Writes into a sibling temp folder and renames it into place, so a crash never leaves a
    half-written artifact under ``folder``. Non-finite weights are refused: a NaN model must
    never be saved."""
    if artifact is None:
        if kind is None or config is None:
            raise ArtifactError("save_artifact needs artifact= or at least kind= and config=")
        artifact = Artifact(kind=kind, config=config if isinstance(config, BaseModel) else dict(config),
                            state_dict=dict(state_dict or {}), users=users, items=items,
                            arrays=dict(arrays or {}), feature_service_version=feature_service_version,
                            metadata=dict(metadata or {}))
    folder = Path(folder)
    _check_finite(artifact)
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        files: dict[str, str] = {}
        (tmp / CONFIG).write_text(json.dumps(artifact.config_dict(), indent=2, default=_json_default))
        if artifact.state_dict:
            import torch

            torch.save({k: v.detach().cpu() if hasattr(v, "detach") else v for k, v in artifact.state_dict.items()},
                       tmp / WEIGHTS)
        if artifact.users is not None:
            (tmp / USERS).write_text(json.dumps(artifact.users.to_list()))
        if artifact.items is not None:
            (tmp / ITEMS).write_text(json.dumps(artifact.items.to_list()))
        if artifact.arrays:
            for name, arr in artifact.arrays.items():
                if np.asarray(arr).dtype == object:
                    raise ArtifactError(f"array {name!r} has dtype object; only numeric/string arrays are saved")
            np.savez(tmp / ARRAYS, **{k: np.asarray(v) for k, v in artifact.arrays.items()})
        for p in sorted(tmp.iterdir()):
            files[p.name] = sha256_file(p)
        manifest = {
            "format_version": FORMAT_VERSION,
            "kind": artifact.kind,
            "created_at": datetime.now(timezone.utc).isoformat(),
            "feature_service_version": artifact.feature_service_version,
            "config_class": (f"{type(artifact.config).__module__}.{type(artifact.config).__qualname__}"
                             if isinstance(artifact.config, BaseModel) else None),
            "n_users": None if artifact.users is None else len(artifact.users),
            "n_items": None if artifact.items is None else len(artifact.items),
            "metadata": artifact.metadata,
            "files": files,
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2, default=_json_default))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return folder


def _check_finite(artifact: Artifact) -> None:
    for name, value in artifact.state_dict.items():
        if hasattr(value, "is_floating_point") and value.is_floating_point():
            import torch

            if not bool(torch.isfinite(value).all()):
                raise ArtifactError(f"refusing to save a broken model: weight {name!r} has NaN/inf values")
    for name, arr in artifact.arrays.items():
        a = np.asarray(arr)
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            raise ArtifactError(f"refusing to save a broken model: array {name!r} has NaN/inf values")


def read_manifest(folder: Path | str) -> dict[str, Any]:
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.is_file():
        raise ArtifactError(f"{folder}: not a model artifact (no {MANIFEST})")
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ArtifactError(f"{path}: corrupt manifest: {exc}") from exc
    if manifest.get("format_version") != FORMAT_VERSION:
        raise ArtifactError(f"{path}: format_version {manifest.get('format_version')!r}, this code reads {FORMAT_VERSION}")
    return manifest


def verify_artifact(folder: Path | str) -> dict[str, Any]:
    """Check every file against the manifest's checksums; return the manifest."""
    folder = Path(folder)
    manifest = read_manifest(folder)
    for name, digest in manifest.get("files", {}).items():
        p = folder / name
        if not p.is_file():
            raise ArtifactError(f"{folder}: incomplete artifact, {name} is missing")
        if sha256_file(p) != digest:
            raise ArtifactError(f"{folder}: {name} does not match its checksum (corrupt or modified)")
    return manifest


def load_artifact(folder_or_uri: Path | str, *, settings: "Settings | None" = None) -> Artifact:
    """Load an artifact from a folder, or from an MLflow URI (``models:/...``, ``runs:/...``)
    via :func:`load_from_registry` (``settings`` required then)."""
    text = str(folder_or_uri)
    if "://" in text or text.startswith("models:/") or text.startswith("runs:/"):
        if text.startswith("file://"):
            from urllib.parse import urlparse

            return load_artifact(Path(urlparse(text).path))
        if settings is None:
            raise ArtifactError(f"loading {text} from MLflow needs settings=")
        return load_from_registry(text, settings)
    folder = Path(folder_or_uri)
    if not folder.is_dir():
        raise ArtifactError(f"{folder}: no such artifact folder")
    pyfunc_inner = folder / "artifacts" / PYFUNC_ARTIFACT_KEY
    if not (folder / MANIFEST).is_file() and pyfunc_inner.is_dir():
        folder = pyfunc_inner  # a downloaded MLflow pyfunc model folder
    manifest = verify_artifact(folder)
    kind = manifest["kind"]
    config: BaseModel | dict[str, Any] = json.loads((folder / CONFIG).read_text())
    try:
        spec = kind_spec(kind)
    except (ArtifactError, ImportError) as exc:  # still loadable as data; build() will fail clearly
        log.debug("kind %s not importable (%s); config stays a dict", kind, exc)
    else:
        try:
            config = spec.config_cls.model_validate(config)
        except Exception as exc:
            raise ArtifactError(f"{folder}: config does not fit {spec.config_cls.__name__}: {exc}") from exc
    state: dict[str, Any] = {}
    if (folder / WEIGHTS).is_file():
        import torch

        state = torch.load(folder / WEIGHTS, map_location="cpu", weights_only=True)
    users = IdMap(tuple(json.loads((folder / USERS).read_text()))) if (folder / USERS).is_file() else None
    items = IdMap(tuple(json.loads((folder / ITEMS).read_text()))) if (folder / ITEMS).is_file() else None
    arrays: dict[str, np.ndarray] = {}
    if (folder / ARRAYS).is_file():
        with np.load(folder / ARRAYS, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    return Artifact(kind=kind, config=config, state_dict=state, users=users, items=items, arrays=arrays,
                    feature_service_version=manifest.get("feature_service_version"),
                    metadata=manifest.get("metadata", {}), origin={"folder": str(folder)})


# ---- MLflow ---------------------------------------------------------------------------------
def _pyfunc_class() -> type:
    """Defined lazily so importing this module never imports mlflow."""
    import mlflow.pyfunc

    global _ArtifactPyfunc
    if _ArtifactPyfunc is None:

        class ArtifactPyfunc(mlflow.pyfunc.PythonModel):
            """MLflow pyfunc wrapper: rebuilds the servable from the artifact folder and delegates
            ``predict`` to it (the servable's ``predict(frame, params)``)."""

            def load_context(self, context: Any) -> None:
                self.artifact = load_artifact(context.artifacts[PYFUNC_ARTIFACT_KEY])
                self.model = self.artifact.build()

            def predict(self, context: Any, model_input: "pd.DataFrame", params: dict[str, Any] | None = None) -> Any:
                if not hasattr(self.model, "predict"):
                    raise ArtifactError(f"{self.artifact.kind} servable has no predict(frame, params)")
                return self.model.predict(model_input, params)

        ArtifactPyfunc.__module__ = __name__
        ArtifactPyfunc.__qualname__ = "ArtifactPyfunc"
        _ArtifactPyfunc = ArtifactPyfunc
        globals()["ArtifactPyfunc"] = ArtifactPyfunc
    return _ArtifactPyfunc


_ArtifactPyfunc: type | None = None


def __getattr__(name: str) -> Any:  # lets cloudpickle/pyfunc resolve models.artifacts.ArtifactPyfunc
    if name == "ArtifactPyfunc":
        return _pyfunc_class()
    raise AttributeError(name)


def log_artifact_model(
    artifact: Artifact,
    *,
    name: str,
    registered_model_name: str | None = None,
    signature: Any = None,
    input_example: Any = None,
    aliases: list[str] | tuple[str, ...] = (),
) -> Any:
    """Log ``artifact`` as an MLflow pyfunc model in the active run (optionally registering it
    and pointing ``aliases`` at the new version). Returns MLflow's ``ModelInfo``.

    ``signature`` defaults to the kind's declared signature when it has one."""
    import mlflow
    import mlflow.pyfunc

    if signature is None:
        try:
            spec = kind_spec(artifact.kind)
            signature = spec.signature() if spec.signature else None
        except ArtifactError:
            signature = None
    with tempfile.TemporaryDirectory(prefix="recsys-artifact-") as tmp:
        folder = save_artifact(Path(tmp) / PYFUNC_ARTIFACT_KEY, artifact=artifact)
        info = mlflow.pyfunc.log_model(
            name=name,
            python_model=_pyfunc_class()(),
            artifacts={PYFUNC_ARTIFACT_KEY: str(folder)},
            signature=signature,
            input_example=input_example,
            registered_model_name=registered_model_name,
            pip_requirements=_pip_requirements(),
            metadata={"recsys_kind": artifact.kind, "feature_service_version": artifact.feature_service_version},
        )
    if registered_model_name and aliases:
        client = mlflow.MlflowClient()
        for alias in aliases:
            client.set_registered_model_alias(registered_model_name, alias, str(info.registered_model_version))
    return info


def _pip_requirements() -> list[str]:
    """Pinned requirements of the pyfunc wrapper (MLflow's inference of them is slow and fails on
    this layout). The platform's own ``models`` package must be importable where it is served."""
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in ("mlflow", "torch", "numpy", "pandas", "pydantic", "cloudpickle", "faiss-cpu"):
        try:
            out.append(f"{dist}=={version(dist).split('+')[0]}")
        except PackageNotFoundError:
            continue
    return out


def _parse_models_uri(uri: str) -> tuple[str, str | None, str | None]:
    """``models:/name/3`` -> (name, "3", None); ``models:/name@champion`` -> (name, None, "champion")."""
    rest = uri[len("models:/"):].strip("/")
    if "@" in rest:
        name, alias = rest.split("@", 1)
        return name, None, alias
    if "/" in rest:
        name, version = rest.rsplit("/", 1)
        if version.isdigit():
            return name, version, None
        if version.lower() == "latest":
            return name, None, None
        raise ArtifactError(f"{uri}: expected models:/<name>/<version>, models:/<name>@<alias> or models:/<name>/latest")
    return rest, None, None


def model_cache_root(settings: "Settings") -> Path:
    return settings.paths.var_dir / "models"


def _cached_version(root: Path, name: str, alias: str | None) -> tuple[str, Path] | None:
    """The locally cached version for an alias (or the newest cached version)."""
    base = root / name
    if alias:
        amap = base / "aliases.json"
        if amap.is_file():
            version = json.loads(amap.read_text()).get(alias)
            if version and (base / str(version) / MANIFEST).is_file():
                return str(version), base / str(version)
        return None
    versions = sorted((int(p.name) for p in base.glob("*") if p.name.isdigit() and (p / MANIFEST).is_file()), reverse=True)
    return (str(versions[0]), base / str(versions[0])) if versions else None


def _remember_alias(root: Path, name: str, alias: str, version: str) -> None:
    """Record which version ``alias`` pointed to (for starting without the registry).

    Every server worker does this at start, at the same moment: the read-modify-write runs under
    an exclusive ``flock``, and each writer stages its own temporary file. With one shared
    temporary name, two workers starting together could move each other's half-written file into
    place or fail on a file already moved, and a worker then started without its ranker."""
    import fcntl

    base = root / name
    amap = base / "aliases.json"
    with open(base / ".aliases.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        data = json.loads(amap.read_text()) if amap.is_file() else {}
        if data.get(alias) == version:
            return
        data[alias] = version
        tmp = base / f".aliases.{os.getpid()}.{threading.get_ident()}.tmp"
        tmp.write_text(json.dumps(data, indent=2))
        os.replace(tmp, amap)


def load_from_registry(uri: str, settings: "Settings", *, offline: bool = False) -> Artifact:
    """Resolve ``models:/<name>@<alias>`` / ``models:/<name>/<version>`` / ``runs:/...`` to an
    :class:`Artifact`, keeping a verified local copy in ``var/models/<name>/<version>/``.

    A cached version is reused without downloading (registered versions are immutable). When
    the registry cannot be reached (or ``offline=True``), an alias resolves to the version it
    pointed to last time it was seen, and a bare name to the newest cached version; only with no
    local copy at all does this raise."""
    root = model_cache_root(settings)
    if uri.startswith("runs:/"):
        return _download_and_load(uri, root / "_runs" / uri[len("runs:/"):].strip("/").replace("/", "_"), settings)
    if not uri.startswith("models:/"):
        return load_artifact(uri)
    name, version, alias = _parse_models_uri(uri)
    if not offline:
        try:
            version = _resolve_version(settings, name, version, alias)
        except ArtifactError:
            raise
        except Exception as exc:  # registry down: fall back to the local copy
            cached = _cached_version(root, name, alias) if version is None else (
                (version, root / name / version) if (root / name / version / MANIFEST).is_file() else None)
            if cached is None:
                raise ArtifactError(f"{uri}: registry unreachable ({type(exc).__name__}: {exc}) and no local copy "
                                    f"under {root / name}") from exc
            log.warning("registry unreachable (%s); using cached %s version %s", exc, name, cached[0])
            art = load_artifact(cached[1])
            art.origin.update({"name": name, "version": cached[0], "alias": alias, "cached": True})
            return art
        folder = root / name / version
        if alias:
            (root / name).mkdir(parents=True, exist_ok=True)
            _remember_alias(root, name, alias, version)
        if (folder / MANIFEST).is_file():
            try:
                art = load_artifact(folder)
                art.origin.update({"name": name, "version": version, "alias": alias, "cached": True})
                return art
            except ArtifactError as exc:  # a damaged cache is replaced, not trusted
                log.warning("cached %s is unusable (%s); downloading again", folder, exc)
        art = _download_and_load(f"models:/{name}/{version}", folder, settings)
        art.origin.update({"name": name, "version": version, "alias": alias, "cached": False})
        return art
    cached = _cached_version(root, name, alias) if version is None else (
        (version, root / name / version) if (root / name / version / MANIFEST).is_file() else None)
    if cached is None:
        raise ArtifactError(f"{uri}: offline and no local copy under {root / name}")
    art = load_artifact(cached[1])
    art.origin.update({"name": name, "version": cached[0], "alias": alias, "cached": True})
    return art


def _resolve_version(settings: "Settings", name: str, version: str | None, alias: str | None) -> str:
    import mlflow
    from mlflow.exceptions import MlflowException

    from core.tracking import configure_mlflow

    configure_mlflow(settings)
    client = mlflow.MlflowClient()
    try:
        if alias:
            return str(client.get_model_version_by_alias(name, alias).version)
        if version:
            return str(client.get_model_version(name, version).version)
        versions = client.search_model_versions(f"name='{name}'")
    except MlflowException as exc:
        if getattr(exc, "error_code", "") in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            what = f"alias {alias!r}" if alias else f"version {version}" if version else "any version"
            raise ArtifactError(f"registered model {name!r} has no {what}") from exc
        raise
    if not versions:
        raise ArtifactError(f"registered model {name!r} has no versions")
    return str(max(int(v.version) for v in versions))


def _download_and_load(uri: str, dest: Path, settings: "Settings") -> Artifact:
    """Download a logged pyfunc model, verify its artifact and move it into ``dest`` atomically."""
    import mlflow

    from core.tracking import configure_mlflow

    configure_mlflow(settings)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".download-", dir=dest.parent) as tmp:
        local = Path(mlflow.artifacts.download_artifacts(artifact_uri=uri, dst_path=tmp))
        inner = local / "artifacts" / PYFUNC_ARTIFACT_KEY
        if not inner.is_dir():
            raise ArtifactError(f"{uri}: not a recsys model (no artifacts/{PYFUNC_ARTIFACT_KEY} in the logged model)")
        verify_artifact(inner)
        staged = Path(tmp) / "staged"
        shutil.move(str(inner), staged)
        # Several server workers start together and may all download the same (immutable) version:
        # a copy another process finished first is kept (it may be loading from it right now), and
        # only a damaged one is moved aside, atomically, never deleted under a reader.
        if dest.exists():
            try:
                return load_artifact(dest)
            except ArtifactError:
                os.replace(dest, Path(tmp) / "damaged")  # removed with the temporary folder
        try:
            os.replace(staged, dest)
        except OSError:  # another process's copy landed in between
            if not (dest / MANIFEST).is_file():
                raise
    return load_artifact(dest)
