"""MLflow wiring shared by training, evaluation, registry and serving.

MLflow metric names may not contain ``@``, so ``recall@10`` is logged as ``recall_at_10``
(:func:`metric_key`); benchmark JSON files keep the ``@`` form.
"""
from __future__ import annotations

import subprocess
from pathlib import Path

from core.config import Settings


def metric_key(name: str) -> str:
    """``recall@10`` -> ``recall_at_10`` (MLflow rejects ``@``)."""
    return name.replace("@", "_at_")


def configure_mlflow(settings: Settings) -> str:
    """Point MLflow at the configured tracking/registry store and return the experiment id.

    Creates the experiment (with its artifact location under ``mlflow.artifact_root``) once.
    """
    import mlflow

    cfg = settings.mlflow
    if cfg.tracking_uri.startswith("sqlite:///"):
        Path(cfg.tracking_uri[len("sqlite:///"):]).parent.mkdir(parents=True, exist_ok=True)
    mlflow.set_tracking_uri(cfg.tracking_uri)
    mlflow.set_registry_uri(cfg.registry_uri or cfg.tracking_uri)
    client = mlflow.MlflowClient()
    exp = client.get_experiment_by_name(cfg.experiment)
    if exp is None:
        cfg.artifact_root.mkdir(parents=True, exist_ok=True)
        exp_id = client.create_experiment(cfg.experiment, artifact_location=cfg.artifact_root.as_uri())
    else:
        exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def git_commit(root: Path | None = None) -> str | None:
    """The checkout's HEAD commit (with ``-dirty`` if the tree has changes), or None outside git."""
    try:
        cwd = str(root) if root else None
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=cwd, timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, cwd=cwd, timeout=5)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None
