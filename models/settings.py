"""Configuration of training and offline evaluation (owned by ``models/`` and ``pipelines/train``).

Presets: ``laptop`` trains in about a minute on ML-100K (2 cores), ``full`` is what the quality
benchmark uses. A preset only fills values the configuration does not set itself, so
``RECSYS_TRAINING__EPOCHS=3`` with the ``full`` preset means "full, but 3 epochs";
:meth:`TrainingSettings.effective` returns the resolved values.
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field, ValidationInfo, field_validator

from core.settings_base import Section


class TwoTowerSettings(Section):
    """Two-tower hyper-parameters beyond the shared ones (see ``models.two_tower.TwoTowerConfig``)."""

    feature_dim: int = Field(16, ge=2, description="Side-feature tables (categories, buckets, profile).")
    tower_hidden: list[int] = Field(default_factory=list, description="Hidden layers of each tower's MLP.")
    output_dim: int = Field(64, ge=2)
    use_user_id: bool = True
    history_len: int = Field(50, ge=0, description="History items sampled per training example.")
    max_history: int = Field(200, ge=0, description="History items used at inference.")
    temperature: float = Field(0.15, gt=0, description="Softmax temperature; 0.15 beat 0.07 on ML-100K validation.")
    logq_weight: float = Field(1.0, ge=0, le=1, description="0 = no popularity correction, 1 = full logQ (ML-1M test recall@10: 0.108 without, 0.193 with).")
    random_negatives: int = Field(256, ge=0)
    embedding_lr: float | None = Field(0.2, gt=0, description="Row-wise Adagrad rate of the tables; None = training.learning_rate.")
    dense_lr: float = Field(1e-3, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    patience: int = Field(2, ge=0, description="Epochs without validation gain before stopping.")
    backend: Literal["fused", "ebc"] = "fused"
    index: Literal["auto", "flat", "hnsw"] = "auto"


class RankerSettings(Section):
    """DLRM ranker layer sizes (see ``models.dlrm.DLRMConfig``). The over arch's MLP is most of the
    serving CPU a recommendation costs (it scores every candidate of every request), so its size
    is a latency/quality trade-off measured by ``benchmarks/ranker_arch.py`` (ML-100K, 10 ranker
    seeds, paired): ``(128, 64, 1)`` shows no significant difference from the earlier
    ``(256, 128, 1)`` (each metric within ~1 standard error, means slightly lower) for 1.8-2.8x less
    over-arch time per request; ``(64, 32, 1)`` lost ~0.002 NDCG@10 (~2-3 standard errors)."""

    dense_arch: list[int] = Field(default_factory=lambda: [128, 64],
                                  description="Bottom MLP over the dense features. Its last layer always outputs "
                                              "training.embedding_dim (the interaction needs that width), so the "
                                              "last size given here is replaced by it.")
    over_arch: list[int] = Field(default_factory=lambda: [128, 64, 1],
                                 description="Top MLP over the interactions; must end with 1 (the logit).")

    @field_validator("dense_arch", "over_arch")
    @classmethod
    def _positive_layers(cls, sizes: list[int], info: ValidationInfo) -> list[int]:
        if not sizes or any(int(x) < 1 for x in sizes):
            raise ValueError(f"{info.field_name} must be a non-empty list of positive layer sizes, got {sizes}")
        if info.field_name == "over_arch" and (len(sizes) < 2 or sizes[-1] != 1):
            raise ValueError(f"over_arch must have a hidden layer and end with 1 (the logit), e.g. [128, 64, 1]; got {sizes}")
        return sizes


class TrainingSettings(Section):
    """Training presets: ``laptop`` for quick runs, ``full`` for the benchmark."""

    preset: Literal["laptop", "full"] = "laptop"
    seed: int = 42
    embedding_dim: int = Field(64, ge=4)
    batch_size: int = Field(512, ge=1)
    epochs: int = Field(5, ge=1)
    learning_rate: float = Field(0.05, gt=0, description="Embedding tables (row-wise Adagrad).")
    eval_ks: list[int] = Field(default_factory=lambda: [10, 20, 50])
    two_tower: TwoTowerSettings = TwoTowerSettings()
    ranker: RankerSettings = RankerSettings()

    def effective(self) -> "TrainingSettings":
        """These settings with the preset's values filling every field not set explicitly."""
        return _apply(self, PRESETS[self.preset])


#: Values each preset gives to fields the configuration leaves unset.
PRESETS: dict[str, dict[str, Any]] = {
    "laptop": {
        "epochs": 5,
        "embedding_dim": 32,
        "batch_size": 512,
        "two_tower": {"output_dim": 32, "history_len": 30, "random_negatives": 128, "patience": 2},
    },
    "full": {
        "epochs": 30,
        "embedding_dim": 64,
        "batch_size": 1024,
        "two_tower": {"output_dim": 64, "history_len": 50, "random_negatives": 256, "patience": 3},
    },
}


def _apply(model: BaseModel, values: dict[str, Any]) -> Any:
    update: dict[str, Any] = {}
    for key, value in values.items():
        current = getattr(model, key)
        if isinstance(value, dict) and isinstance(current, BaseModel):
            update[key] = _apply(current, value)
        elif key not in model.model_fields_set:
            update[key] = value
    out = model.model_copy(update=update)
    object.__setattr__(out, "__pydantic_fields_set__", set(model.model_fields_set))
    return out
