"""Configuration of training and offline evaluation (owned by ``models/`` and ``pipelines/train``)."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from core.settings_base import Section


class TrainingSettings(Section):
    """Training presets: ``laptop`` for quick runs, ``full`` for the benchmark."""

    preset: Literal["laptop", "full"] = "laptop"
    seed: int = 42
    embedding_dim: int = Field(64, ge=4)
    batch_size: int = Field(512, ge=1)
    epochs: int = Field(5, ge=1)
    learning_rate: float = Field(0.05, gt=0)
    eval_ks: list[int] = Field(default_factory=lambda: [10, 20, 50])
