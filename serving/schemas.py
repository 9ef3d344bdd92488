"""Request and response bodies of the API (pydantic: they are also the OpenAPI schema at /docs)."""
from __future__ import annotations

from datetime import datetime
from typing import Any, Literal, Union

from pydantic import BaseModel, ConfigDict, Field

from core.schemas import EVENT_TYPES

EventType = Literal[EVENT_TYPES]  # type: ignore[valid-type]


class EventIn(BaseModel):
    """One feedback event (the core event schema; ``timestamp`` defaults to the time received)."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    user_id: str = Field(min_length=1, max_length=256)
    item_id: str = Field(min_length=1, max_length=256)
    event_type: EventType = "click"  # type: ignore[valid-type]
    value: float = Field(1.0, allow_inf_nan=False)
    timestamp: datetime | None = None
    context: dict[str, Union[str, int, float, bool, None]] | str | None = None
    event_id: str | None = Field(None, min_length=1, max_length=128, description="Idempotency key; a retry with the same id is stored once.")
    request_id: str | None = Field(None, max_length=64, description="The recommendation request that showed the item (joins clicks to impressions).")


class EventBatch(BaseModel):
    model_config = ConfigDict(extra="forbid")

    events: list[EventIn]


EventsBody = Union[EventIn, list[EventIn], EventBatch]


class EventsAccepted(BaseModel):
    accepted: int
    event_ids: list[str]
    durable: bool = Field(description="True when the log guarantees the events are on disk.")
    features_updated: bool


class RecommendedItem(BaseModel):
    item_id: str
    score: float
    position: int


class Recommendations(BaseModel):
    request_id: str
    user_id: str
    items: list[RecommendedItem]
    model_versions: dict[str, str]
    variant: str | None = Field(None, description="Experiment variant (null until experiments are configured).")
    fallback_reason: str | None = Field(None, description="Why a fallback served this (cold_start, model_unavailable, features_unavailable, timeout, model_error ...); null when the models did.")
    context: str | None = None
    timings_ms: dict[str, float] = Field(default_factory=dict)


class SimilarItems(BaseModel):
    item_id: str
    items: list[RecommendedItem]
    model_versions: dict[str, str]
    fallback_reason: str | None = None


class Problem(BaseModel):
    """Every 4xx/5xx body: a message that says what is wrong, never a stack trace."""

    error: str
    detail: Any = None
    request_id: str | None = None


class Health(BaseModel):
    status: str
    detail: dict[str, Any] = Field(default_factory=dict)
