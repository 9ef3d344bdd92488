"""Configuration of the real-time API and the durable event log (owned by ``serving/``).

Budgets are per request: each stage has its own deadline and the whole request has a total
budget; a stage that would overrun hands over to the next fallback instead of making the
client wait (see ``serving/recommend.py``).
"""
from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from core.settings_base import Section


class ServingSettings(Section):
    """HTTP server, request-path budgets, limits, model lifecycle and fallbacks."""

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    workers: int = Field(1, ge=1)
    reuse_port: bool = Field(
        True, description="With several workers on Linux: one listening socket per worker (SO_REUSEPORT), so the "
        "kernel spreads new connections over the workers by address hash. With uvicorn's one shared socket, the "
        "worker that wakes first accepts a whole burst of connections (measured: all 64 of a client's connections "
        "on one worker in three of four starts), and the other worker idles while this one queues. The price: each "
        "worker batches half the traffic, so at low load a request costs more CPU (docs/serving.md, Workers and "
        "connections).")
    # --- security and limits -------------------------------------------------------------
    api_key: str | None = Field(None, description="Key expected in the `api_key_header` header for writes/admin (None: writes need no key; only sensible locally).")
    api_key_header: str = "X-API-Key"
    require_key_for_reads: bool = False
    max_body_bytes: int = Field(1_000_000, ge=1_024, description="Larger request bodies get 413 before they are parsed.")
    max_batch_events: int = Field(1_000, ge=1, description="Most events one POST /v1/events may carry.")
    max_id_length: int = Field(256, ge=1)
    # --- request path ----------------------------------------------------------------------
    default_k: int = Field(20, ge=1)
    max_k: int = Field(200, ge=1)
    candidates: int = Field(500, ge=1, description="Retrieval candidates handed to the ranker.")
    total_budget_ms: float = Field(50.0, gt=0, description="Whole-request deadline; past it the popularity fallback answers.")
    features_budget_ms: float = Field(10.0, gt=0)
    model_budget_ms: float = Field(40.0, gt=0, description="Retrieval + filter + ranking + diversity, in one batched call.")
    microbatch_max: int = Field(64, ge=1, description="Most concurrent requests scored in one batched model call.")
    microbatch_wait_ms: float = Field(0.0, ge=0, description="Linger: a micro-batch smaller than microbatch_max starts once "
                                      "its oldest request has waited this long (0: take whatever is queued).")
    model_threads: int = Field(1, ge=1, description="Torch intra-op threads per worker (1 per worker on small machines).")
    model_thread_nice: int = Field(
        10, ge=0, le=19, description="The model thread of each worker runs as background CPU work (Linux "
        "SCHED_BATCH at this niceness; 0: normal scheduling like the other threads). It is busy whenever "
        "requests are queued, so under load it is always runnable; at normal priority it competes on equal "
        "terms with the event loops, which then wait for a CPU before they can parse, respond or hand it the "
        "next batch. Lowered, it takes the CPU time the loops leave (measured in docs/serving.md). On a host "
        "shared with other CPU-bound processes it also yields to them (nice 10 weighs ~1/10 of a normal thread): "
        "set 0 there, or give the server its own CPUs.")
    gil_switch_interval_ms: float = Field(
        0.5, gt=0, description="CPython's GIL switch interval in a worker (default 5 ms). The event loop, the "
        "feature-read thread and the model thread share one GIL; a thread that wants it waits up to this long, "
        "which adds directly to request latency.")
    gc_freeze: bool = Field(
        True, description="Move everything alive after start-up (and after each model swap) out of the cyclic "
        "garbage collector's reach (gc.freeze): a full collection over a loaded worker's ~700K objects "
        "stalls every request for ~250 ms; frozen objects are still freed by reference counting.")
    ranker_precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto", description="Compute precision of the ranker's MLPs: fp32 (bit-for-bit the offline scores), bf16 "
        "(~3x faster where the CPU has AMX / AVX512-BF16; scores within ~1e-2, see docs/serving.md) or auto "
        "(bf16 on such CPUs, else fp32).")
    # --- model lifecycle ---------------------------------------------------------------------
    retrieval_alias: str = "champion"
    ranking_alias: str = "champion"
    registry_poll_s: float = Field(30.0, ge=0, description="How often to check whether an alias moved (0: never).")
    # --- fallbacks -------------------------------------------------------------------------
    popularity_days: int = Field(7, ge=1, description="Trending window: events of the last N days in the lake (and the event log).")
    popularity_half_life_days: float = Field(2.0, gt=0)
    popular_items: int = Field(500, ge=1, description="Popular items kept per context for the fallback.")
    blocked_items: list[str] = Field(default_factory=list, description="Never recommended (policy, takedowns).")
    # --- feedback ------------------------------------------------------------------------------
    log_impressions: bool = True
    impression_flush_ms: float = Field(
        50.0, gt=0, description="Served impressions wait in the worker's memory up to this long and go to the event "
        "log together (unacknowledged by design: a crash loses at most this much of them). Each hand-over wakes "
        "the log's writer thread for a write and an fsync: at 5 ms that was ~6 thread switches per request at "
        "low load, at 50 ms ~1.4 (docs/serving.md).")
    update_features_on_event: bool = True
    metrics_dir: Path = Field(Path("var/run/prometheus"), description="prometheus_client multiprocess folder (relative to paths.root).")
    model_cache_dir: Path = Field(Path("var/serving/models"), description="Where serving notes the last loaded artifacts (relative to paths.root).")

    @model_validator(mode="after")
    def _check(self) -> "ServingSettings":
        if self.default_k > self.max_k:
            raise ValueError(f"default_k ({self.default_k}) must be <= max_k ({self.max_k})")
        return self


class EventLogSettings(Section):
    """Durable feedback log: local append-only file by default, a broker in production.

    ``local``: per-process segment files with group-commit fsync (an append is acknowledged
    only after fdatasync). ``nats``: JetStream, acknowledged on the server's PubAck (file
    storage; the server's ``sync_interval`` decides when it fsyncs). ``redis``: Streams
    (XADD); on disk only if the server runs with ``appendonly yes`` + ``appendfsync always``,
    which the backend checks and reports.
    """

    backend: Literal["local", "nats", "redis"] = "local"
    path: Path = Path("var/eventlog")
    nats_url: str = "nats://127.0.0.1:4222"
    redis_url: str = "redis://127.0.0.1:6379/0"
    stream_prefix: str = Field("recsys", pattern=r"^[A-Za-z0-9_-]+$", description="Streams are <prefix>-events and <prefix>-impressions.")
    segment_max_bytes: int = Field(64 * 1024 * 1024, ge=4_096)
    timeout_s: float = Field(5.0, gt=0, description="Longest wait for a broker acknowledgement.")
    redis_maxlen: int | None = Field(None, ge=1, description="Approximate cap on a Redis stream's length (None: unbounded).")
    checkpoint_dir: Path = Field(Path("var/eventlog/checkpoints"), description="Ingest cursors (relative to paths.root).")
