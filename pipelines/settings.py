"""Configuration of the model registry, the promotion gate and the local orchestration stack.

Owned by ``pipelines/promote`` (registry, gate) and ``pipelines/cli_up`` (``recsys up``).
The gate's tolerances live here, not in code, because they are a product decision that a
deployment tunes (a latency-critical deployment tightens the latency guardrail, a catalogue
team tightens coverage) and every refusal names the setting that caused it.
"""
from __future__ import annotations

from pathlib import Path

from pydantic import Field

from core.settings_base import Section


class GuardrailSettings(Section):
    """How much a candidate may regress on metrics that are not the primary one.

    Each guardrail is checked against the champion measured on the same frozen evaluation
    set in the same process, so the comparison is fair even for the latency benchmark.
    """

    coverage_max_drop: float = Field(
        0.10, ge=0, le=1,
        description="Largest allowed relative drop of catalog coverage@k (0.10 = may lose 10% of the champion's coverage).",
    )
    calibration_max_increase: float = Field(
        0.05, ge=0,
        description="Largest allowed absolute increase of miscalibration (KL of recommended vs. consumed category mix, or ECE for scores).",
    )
    latency_max_ratio: float = Field(
        1.5, ge=1,
        description="The candidate's p50 scoring latency may be at most this many times the champion's ...",
    )
    latency_slack_ms: float = Field(
        2.0, ge=0,
        description="... plus this many milliseconds (timer noise on a shared laptop would otherwise refuse equal models).",
    )


class SanitySettings(Section):
    """Absolute checks every candidate must pass, champion or not (the only gate for the first model)."""

    min_primary: float = Field(0.0, ge=0, description="The primary metric must be strictly above this.")
    must_beat_popularity: bool = Field(
        True, description="The candidate must beat a most-popular baseline on the frozen evaluation set's primary metric.",
    )
    min_coverage: float = Field(0.0, ge=0, le=1, description="Minimum catalog coverage@k.")
    max_latency_ms: float = Field(
        1000.0, gt=0,
        description="Maximum median time to score one batch of registry.latency_users users over the whole catalog "
                    "(64 users -> ~16 ms per user; a two-stage ranker scores retrieval + ranking here).",
    )


class RegistrySettings(Section):
    """Registered model names, aliases, and the promotion gate."""

    retrieval_model: str = "two_tower"
    ranking_model: str = "ranker"
    champion_alias: str = "champion"
    previous_alias: str = "previous_champion"
    challenger_alias: str = "challenger"
    primary_metric: str = "ndcg@10"
    min_improvement: float = Field(
        0.0, ge=0,
        description="Relative margin the candidate must beat the champion by on the primary metric (0.02 = 2% better).",
    )
    k: int = Field(10, ge=1, description="Cut-off for the gate's coverage and calibration metrics.")
    guardrails: GuardrailSettings = GuardrailSettings()
    sanity: SanitySettings = SanitySettings()
    eval_set_dir: Path = Field(Path("var/eval_sets"), description="Frozen, versioned evaluation sets (relative to paths.root).")
    eval_test_days: int = Field(7, ge=1, description="Days at the end of the lake held out as the frozen evaluation window.")
    eval_max_users: int = Field(2_000, ge=1, description="Evaluation users are a seeded sample of at most this many.")
    latency_users: int = Field(64, ge=1, description="Users per batch in the scoring micro-benchmark.")
    latency_repeats: int = Field(7, ge=1, description="Timed repetitions of the micro-benchmark (the median is used).")


class OrchestrationSettings(Section):
    """The local Airflow + MLflow stack started by ``recsys up`` (all bound to loopback)."""

    host: str = "127.0.0.1"
    airflow_port: int = Field(8080, ge=1, le=65535)
    mlflow_port: int = Field(5000, ge=1, le=65535)
    log_server_port: int = Field(8793, ge=1, le=65535)
    airflow_home: Path = Path("var/airflow")
    airflow_db_uri: str | None = Field(
        None, description="Airflow metadata DB (SQLAlchemy URI). None = SQLite under airflow_home; production: PostgreSQL.",
    )
    parallelism: int = Field(4, ge=1)
    airflow_user: str = "admin"
    start_timeout_s: float = Field(120.0, gt=0)
    training_source: str = Field("synthetic", description="Source the training DAG ingests (a dataset name or csv:/parquet: path).")
    training_window_days: int = Field(30, ge=1, description="Days of history each daily training run learns from.")
