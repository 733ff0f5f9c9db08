"""Plain records the store hands to callers.

Callers never see ORM objects or sessions, so nothing outside `hippod.store` can issue SQL by
accident or trip over a detached instance. Records are frozen; use `dataclasses.replace` to
derive a changed copy (e.g. to copy a model under a new name). All datetimes are aware UTC.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any


@dataclass(frozen=True, kw_only=True)
class ModelRecord:
    name: str  # "name:tag"
    source: str  # "hf:repo@rev", "gguf:/path", "dir:/path", "peer:node", "copy:name"
    digest: str  # sha256 hex of the manifest
    files: list[dict[str, Any]]  # [{"name", "sha256", "size"}, ...]
    format: str  # "mlx" | "gguf" | "safetensors"
    family: str | None = None
    parameters: int | None = None
    parameter_size: str | None = None  # "135M"
    quantization: str | None = None
    size: int = 0  # bytes, all files
    context_length: int | None = None
    details: dict[str, Any] = field(default_factory=dict)
    missing: bool = False  # set by reconcile when files are gone from disk
    created_at: datetime | None = None  # None on put: keep the stored value, or now
    modified_at: datetime | None = None  # always set to now by put_model


@dataclass(frozen=True, kw_only=True)
class BlobRecord:
    sha256: str
    size: int
    path: str
    created_at: datetime


@dataclass(frozen=True, kw_only=True)
class LoadRecord:
    id: int
    model: str
    node: str
    started_at: datetime
    ended_at: datetime | None
    reason: str  # why it was loaded: "request", ...
    end_reason: str | None  # "evicted" | "expired" | "stopped" | "crashed" | "shutdown"
    load_seconds: float
    bytes: int
    pid: int | None = None
    layers: str | None = None  # "0-14" for a share of a split model


@dataclass(frozen=True, kw_only=True)
class PeerRecord:
    node_id: str
    name: str
    addresses: list[str]
    port: int
    memory_total: int
    memory_free: int
    version: str
    chip: str | None = None
    trusted: bool = False
    models: list[str] = field(default_factory=list)
    last_seen: datetime | None = None  # None on put: now


@dataclass(frozen=True, kw_only=True)
class RequestRecord:
    client: str
    endpoint: str
    status: int
    model: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_seconds: float = 0.0
    ttft_seconds: float | None = None
    error: str | None = None
    prompt: str | None = None
    model_source: str | None = None  # how this node got the model: "local", "copied from peer NAME"
    time: datetime | None = None  # None on add: now
    id: int | None = None  # assigned by add_request
