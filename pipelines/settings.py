"""Configuration of the model registry and the promotion gate (owned by ``pipelines/promote``)."""
from __future__ import annotations

from pydantic import Field

from core.settings_base import Section


class RegistrySettings(Section):
    """Registered model names and the promotion gate's margins."""

    retrieval_model: str = "two_tower"
    ranking_model: str = "ranker"
    primary_metric: str = "ndcg@10"
    min_improvement: float = Field(0.0, ge=0, description="Relative margin the candidate must beat the champion by.")
