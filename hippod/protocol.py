"""Messages between hippod and its runner processes, defined once for both sides.

The wire is a Unix socket carrying one JSON object per line. A connection carries one job: the
daemon writes a request line, the runner answers with event lines, and closing the connection
cancels the job (that is how a client that goes away frees its batch slot at once).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

# Sampling options a runner honours, with Ollama's names. Anything else is rejected upstream.
SAMPLING_OPTIONS = (
    "temperature", "top_p", "top_k", "min_p", "seed", "num_predict", "stop", "num_ctx",
    "repeat_penalty", "repeat_last_n", "presence_penalty", "frequency_penalty",
)


@dataclass
class GenerateRequest:
    """Generate from a raw prompt or from chat messages (the runner owns the chat template)."""

    prompt: str | None = None
    messages: list[dict] | None = None
    system: str | None = None  # applied by the runner for prompt-style requests
    raw: bool = False  # prompt is already templated
    tools: list[dict] | None = None  # OpenAI/Ollama shape: [{"type": "function", "function": {...}}]
    # None or "auto" (the model decides), "none" (tools hidden), "required" (some call),
    # {"type": "function", "function": {"name": N}} (a call to N). required/named are enforced.
    tool_choice: str | dict | None = None
    options: dict[str, Any] = field(default_factory=dict)
    grammar: dict | None = None  # {"json_schema": {...}} or {"json_object": true}
    logprobs: int | None = None
    kind: str = "generate"


@dataclass
class EmbedRequest:
    inputs: list[str]
    truncate: bool = True
    num_ctx: int | None = None
    kind: str = "embed"


@dataclass
class InfoRequest:
    kind: str = "info"


@dataclass
class TokenEvent:
    text: str
    token: int
    type: str = "token"


@dataclass
class DoneEvent:
    done_reason: str  # stop | length | cancel
    prompt_tokens: int
    completion_tokens: int
    prompt_seconds: float
    eval_seconds: float
    cached_tokens: int = 0
    drafted: int = 0  # speculative decoding: draft tokens proposed and accepted
    accepted: int = 0
    # Calls parsed from the answer (their text was not streamed): [{"name", "arguments": {...}}],
    # "id" too when the model wrote one. None when the request had no tools or made no call.
    tool_calls: list[dict] | None = None
    # A required call (tool_choice "required" or named) that the token limit cut short, with
    # done_reason "length": [{"name": what was written of it, "arguments": the raw JSON so far}].
    partial_tool_calls: list[dict] | None = None
    type: str = "done"


@dataclass
class ErrorEvent:
    message: str
    status: int = 500  # the HTTP status the daemon should answer with
    type: str = "error"


@dataclass
class EmbedResult:
    embeddings: list[list[float]]
    prompt_tokens: int
    seconds: float
    type: str = "embeddings"


@dataclass
class InfoResult:
    pid: int
    rss_bytes: int
    mlx_active_bytes: int
    mlx_peak_bytes: int
    context_length: int
    num_parallel: int
    active_requests: int
    admission: dict | None = None  # the generation loop's AdmissionStats
    type: str = "info"


@dataclass
class ReadyEvent:
    """Printed on the runner's stdout once the model is loaded and the socket listens."""

    pid: int
    load_seconds: float
    rss_bytes: int
    mlx_active_bytes: int
    context_length: int
    device: str = "gpu"  # "gpu" (Metal or CUDA) or "cpu": what /api/ps calls size_vram
    type: str = "ready"


@dataclass
class SpareReadyEvent:
    """Printed by a spare runner (started with --spare) once MLX is imported and the device warm;
    it then waits for one stdin line, {"argv": [...]}, naming the model to load."""

    pid: int
    rss_bytes: int
    warm_seconds: float
    type: str = "spare"


_REQUESTS = {"generate": GenerateRequest, "embed": EmbedRequest, "info": InfoRequest}
_EVENTS = {"token": TokenEvent, "done": DoneEvent, "error": ErrorEvent, "embeddings": EmbedResult,
           "info": InfoResult, "ready": ReadyEvent, "spare": SpareReadyEvent}


def encode(message: Any) -> bytes:
    # vars() instead of asdict(): no deep copy, and these records hold only JSON values.
    return (json.dumps(vars(message), separators=(",", ":")) + "\n").encode()


def decode_request(line: bytes):
    data = json.loads(line)
    cls = _REQUESTS[data.pop("kind")]
    return cls(**data)


def decode_event(line: bytes):
    data = json.loads(line)
    cls = _EVENTS[data.pop("type")]
    return cls(**data)
