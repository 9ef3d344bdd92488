"""Configuration of the real-time API and the durable event log (owned by ``serving/``)."""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field

from core.settings_base import Section


class ServingSettings(Section):
    """HTTP server and request-path budget."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    workers: int = Field(1, ge=1)
    api_key: str | None = None
    require_key_for_reads: bool = False
    default_k: int = Field(20, ge=1)
    max_k: int = Field(200, ge=1)
    candidates: int = Field(500, ge=1)
    total_budget_ms: float = Field(50.0, gt=0)


class EventLogSettings(Section):
    """Durable feedback log: local append-only file by default, a broker in production."""

    backend: Literal["local", "nats", "redis"] = "local"
    path: Path = Path("var/eventlog")
    nats_url: str = "nats://127.0.0.1:4222"
    redis_url: str = "redis://127.0.0.1:6379/0"
