"""Configuration of drift detection and online monitoring (owned by ``monitoring/``)."""
from __future__ import annotations

from pydantic import Field

from core.settings_base import Section


class MonitoringSettings(Section):
    """Drift thresholds (Evidently) that trigger retraining."""

    drift_share_threshold: float = Field(0.5, gt=0, le=1)
