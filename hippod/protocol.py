"""Messages between hippod and its runner processes, defined once for both sides.

The wire is a Unix socket carrying one JSON object per line. A connection carries one job: the
daemon writes a request line, the runner answers with event lines, and closing the connection
cancels the job (that is how a client that goes away frees its batch slot at once).
"""

from __future__ import annotations

import json
import re
from dataclasses import MISSING as dataclass_MISSING
from dataclasses import dataclass, field, replace
from typing import Any

from hippod import paths

# Options use Ollama's names (temperature, top_p, top_k, min_p, seed, num_predict, stop, num_ctx,
# repeat_penalty, repeat_last_n, presence_penalty, frequency_penalty): hippod/api/request.py checks
# them and fills what the client left out from the model's defaults before a request gets here.


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
    # None: no logprobs; N >= 0: each token's logprob and its N most likely alternatives.
    logprobs: int | None = None
    # None: the chat template's default; False/True: thinking off/on; "low"|"medium"|"high": on,
    # with that effort for templates that take one (gpt-oss).
    think: bool | str | None = None
    # Continue after these generated token ids (a model split across nodes lost one mid-stream,
    # or the peer answering a forwarded request was lost, and the successor replays them): they
    # are prefilled after the prompt, count as generated, and their text (already sent) is not
    # sent again.
    resume: list[int] | None = None
    # The daemon numbers the requests it sends one runner (1, 2, ...; 0: not numbered) and says
    # how many it had numbered when it sent this one: those above this one's number are right
    # behind it, so the runner can start them with it in one batched prefill (BatchLoop).
    arrival: int = 0
    arrived: int = 0
    kind: str = "generate"


def resumed(request: GenerateRequest, sent: list[int]) -> GenerateRequest:
    """The same request, continuing after the tokens already sent (the runner replays them)."""
    if not sent:
        return request
    return replace(request, resume=list(request.resume or []) + sent)


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
    text: str  # answer text (may be "" when this event only carries thinking or logprobs)
    token: int
    thinking: str = ""  # reasoning text, separated from the answer
    # [{"token", "logprob", "bytes", "top_logprobs": [{"token", "logprob", "bytes"}]}] for the
    # tokens generated since the last event, when the request asked for logprobs.
    logprobs: list[dict] | None = None
    ids: list[int] | None = None  # every id this text covers, when that is not just [token]
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


@dataclass
class ForwardStart:
    """First event of a generation a peer runs for another node's client: the model that
    answers, as that peer names it, and how long the request waited for it there."""

    model: str
    digest: str
    load_seconds: float = 0.0
    type: str = "start"


@dataclass
class Heartbeat:
    """A peer answering a forwarded request is alive but has nothing to send yet (loading the
    model, prefilling, waiting for a batch slot): the forwarding node counts silence, not time."""

    type: str = "heartbeat"


@dataclass
class SpareWarmEvent:
    """Printed by a spare runner when its kernel warm-up ran to the end (a handoff that stops
    it earlier prints nothing): from then on a load into it finds its kernels compiled."""

    steps: int
    seconds: float
    type: str = "spare_warm"


_REQUESTS = {"generate": GenerateRequest, "embed": EmbedRequest, "info": InfoRequest}
_EVENTS = {"token": TokenEvent, "done": DoneEvent, "error": ErrorEvent, "embeddings": EmbedResult,
           "info": InfoResult, "ready": ReadyEvent, "spare": SpareReadyEvent, "start": ForwardStart,
           "spare_warm": SpareWarmEvent, "heartbeat": Heartbeat}


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


# -- split records: a model's layers over several nodes ---------------------------------------
# The coordinator and its peers exchange these as JSON bodies on the signed peer API; a peer
# decodes every body with `decode_split`, the one place they are validated.


@dataclass(frozen=True)
class LayerRange:
    """Decoder layers [start, end) that one rank runs: JSON [start, end], CLI "start:end"."""

    start: int
    end: int

    def __post_init__(self):
        if not (isinstance(self.start, int) and isinstance(self.end, int)
                and not isinstance(self.start, bool) and not isinstance(self.end, bool)
                and 0 <= self.start < self.end <= 2**20):
            raise ValueError(f"layers must be [start, end] with 0 <= start < end, not "
                             f"[{self.start!r}, {self.end!r}]")

    @classmethod
    def parse(cls, text: str) -> "LayerRange":
        start, sep, end = str(text).partition(":")
        try:
            if not sep:
                raise ValueError
            return cls(int(start), int(end))
        except ValueError:
            raise ValueError(f"bad layer range {text!r} (expected START:END with START < END)") from None

    @classmethod
    def of(cls, value: Any) -> "LayerRange":
        if isinstance(value, LayerRange):
            return value
        if not (isinstance(value, (list, tuple)) and len(value) == 2):
            raise ValueError("layers must be [start, end] with start < end")
        return cls(value[0], value[1])

    def json(self) -> list[int]:
        return [self.start, self.end]

    def arg(self) -> str:
        return f"{self.start}:{self.end}"

    def __str__(self) -> str:  # how people read it: inclusive, like "layers 0-14"
        return f"{self.start}-{self.end - 1}"

    def __contains__(self, layer: int) -> bool:
        return self.start <= layer < self.end

    def __len__(self) -> int:
        return self.end - self.start


@dataclass
class SplitPrepare:
    """Coordinator -> peer: check room for these layers, get their files, pick a ring port."""

    split: str
    model: str
    digest: str
    layers: LayerRange
    rank: int
    world: int
    bytes: int
    context_length: int | None = None


@dataclass
class SplitStart:
    """Coordinator -> peer: every rank's ring address; start the runner and answer when ready."""

    split: str
    hosts: list[list[str]]


@dataclass
class SplitRef:
    """Coordinator -> peer: ping or stop one split."""

    split: str


class SplitRecordError(ValueError):
    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


_HOST = re.compile(r"[0-9A-Za-z.:\[\]-]{1,100}:\d{1,5}")
_FILE_NAMED = {"split": paths.check_token, "digest": paths.check_sha256}
_SPLIT_INTS = {"rank": (0, 1024), "world": (1, 1024), "bytes": (0, 2**62), "context_length": (1, 2**24)}


def _check_host(entry: Any) -> bool:
    return isinstance(entry, str) and _HOST.fullmatch(entry) is not None


def decode_split(cls, body: Any):
    """A split record from a JSON body, every field checked; SplitRecordError names the bad one."""
    if not isinstance(body, dict):
        raise SplitRecordError("the body must be a JSON object")
    values: dict[str, Any] = {}
    for name, f in cls.__dataclass_fields__.items():
        value = body.get(name)
        required = f.default is dataclass_MISSING and f.default_factory is dataclass_MISSING
        if value is None:
            if required:
                raise SplitRecordError(f"{name} is required", name)
            continue
        if name == "layers":
            try:
                value = LayerRange.of(value)
            except ValueError as e:
                raise SplitRecordError(str(e), name) from None
        elif name == "hosts":
            if not (isinstance(value, list) and value and all(
                    isinstance(e, list) and e and all(_check_host(a) for a in e) for e in value)):
                raise SplitRecordError('hosts must list one ["address:port"] per rank', name)
        elif name in _SPLIT_INTS:
            lo, hi = _SPLIT_INTS[name]
            if not (isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi):
                raise SplitRecordError(f"{name} must be an integer from {lo} to {hi}", name)
        elif not (isinstance(value, str) and 0 < len(value) <= 300):
            raise SplitRecordError(f"{name} must be a non-empty string", name)
        elif name in _FILE_NAMED:  # they become file names on the peer
            try:
                _FILE_NAMED[name](value, name)
            except paths.UnsafePath as e:
                raise SplitRecordError(str(e), name) from None
        values[name] = value
    record = cls(**values)
    if isinstance(record, SplitPrepare) and record.rank >= record.world:
        raise SplitRecordError("rank must be below world", "rank")
    return record


def split_body(record) -> dict:
    """The JSON body of a split record."""
    out = {}
    for name, value in vars(record).items():
        if value is None:
            continue
        out[name] = value.json() if isinstance(value, LayerRange) else value
    return out


# -- forwarded generations: a peer runs a request for another node's client --------------------
# The body of /api/hippo/peer/forward is a ForwardRequest, that of /api/hippo/peer/forward-embed
# a ForwardEmbed; each answer is NDJSON ForwardFrames, each carrying one event above (heartbeat,
# start, token, done, embeddings or error) and an HMAC (cluster/frames.py).


FORWARD_PATH = "/api/hippo/peer/forward"
FORWARD_EMBED_PATH = "/api/hippo/peer/forward-embed"
MAX_RESUME = 1 << 18  # token ids a forwarded request may continue after (far above any context)


@dataclass
class ForwardRequest:
    """Node -> peer: run this generation (the client's request before any model defaults: the
    peer applies its own) and stream its events back."""

    model: str
    request: GenerateRequest
    keep_alive: str | int | float | None = None


@dataclass
class ForwardEmbed:
    """Node -> peer: embed these inputs with a model only the peer can run."""

    model: str
    inputs: list[str]
    truncate: bool = True
    num_ctx: int | None = None
    keep_alive: str | int | float | None = None


@dataclass
class ForwardFrame:
    """One line of a forwarded answer: `data` is one encoded event, `seq` its place in the
    stream (0 first), `mac` the sender's HMAC over (request nonce, seq, data)."""

    seq: int
    data: str
    mac: str


# GenerateRequest field -> the JSON types it may hold (None always allowed unless listed).
_GENERATE_FIELDS: dict[str, tuple] = {
    "prompt": (str,), "messages": (list,), "system": (str,), "raw": (bool,), "tools": (list,),
    "tool_choice": (str, dict), "options": (dict,), "grammar": (dict,), "logprobs": (int,),
    "think": (bool, str), "resume": (list,),
}


def _message(m: Any) -> bool:
    """A chat message as the API layer leaves it: text fields, and the calls of earlier turns."""
    return (isinstance(m, dict) and isinstance(m.get("role"), str)
            and all(isinstance(v, str) or (k == "tool_calls" and isinstance(v, list)
                                           and all(isinstance(c, dict) for c in v)) for k, v in m.items()))


def _generate_request(body: Any) -> GenerateRequest:
    if not isinstance(body, dict):
        raise SplitRecordError("request must be a JSON object", "request")
    unknown = {k for k, v in body.items() if v is not None} - set(_GENERATE_FIELDS) - {"kind"}
    if unknown:
        raise SplitRecordError(f"request has unknown field(s): {', '.join(sorted(unknown))}", "request")
    values = {}
    for name, types in _GENERATE_FIELDS.items():
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, types) or (int in types and isinstance(value, bool)):
            raise SplitRecordError(f"request.{name} has the wrong type", f"request.{name}")
        if name == "messages" and not all(_message(m) for m in value):
            raise SplitRecordError("request.messages must be objects with a role and text fields",
                                   "request.messages")
        if name == "grammar" and not (set(value) <= {"json_schema", "json_object"}
                                      and isinstance(value.get("json_schema", {}), dict)
                                      and isinstance(value.get("json_object", True), bool)):
            raise SplitRecordError("request.grammar must be {json_schema: {...}} or {json_object: true}",
                                   "request.grammar")
        if name == "tool_choice" and not (value in ("auto", "none", "required") or (
                isinstance(value, dict) and isinstance(value.get("function"), dict)
                and isinstance(value["function"].get("name"), str))):
            raise SplitRecordError("request.tool_choice must be auto, none, required or a named function",
                                   "request.tool_choice")
        if name == "resume" and not _token_ids(value):
            raise SplitRecordError(f"request.resume must list at most {MAX_RESUME} token ids (integers "
                                   "from 0 below 2**31)", "request.resume")
        values[name] = value
    return GenerateRequest(**values)


def _token_ids(value: list) -> bool:
    return len(value) <= MAX_RESUME and all(
        type(t) is int and 0 <= t < 2**31 for t in value)  # noqa: E721 (bool is no token id)


def decode_forward(body: Any) -> ForwardRequest:
    """A ForwardRequest from a JSON body, its shape checked (the peer's API layer then checks
    the options and tools as it does a client's)."""
    if not isinstance(body, dict):
        raise SplitRecordError("the body must be a JSON object")
    model, keep_alive = _model(body), _keep_alive(body)
    return ForwardRequest(model, _generate_request(body.get("request")), keep_alive)


def _keep_alive(body: dict):
    keep_alive = body.get("keep_alive")
    if keep_alive is not None and (isinstance(keep_alive, bool) or not isinstance(keep_alive, (str, int, float))):
        raise SplitRecordError("keep_alive must be a duration", "keep_alive")
    return keep_alive


def _model(body: dict) -> str:
    model = body.get("model")
    if not (isinstance(model, str) and 0 < len(model) <= 300):
        raise SplitRecordError("model must be a non-empty string", "model")
    return model


def decode_forward_embed(body: Any) -> ForwardEmbed:
    """A ForwardEmbed from a JSON body, its shape checked."""
    if not isinstance(body, dict):
        raise SplitRecordError("the body must be a JSON object")
    model, keep_alive = _model(body), _keep_alive(body)
    inputs, truncate, num_ctx = body.get("inputs"), body.get("truncate", True), body.get("num_ctx")
    if not (isinstance(inputs, list) and all(isinstance(i, str) for i in inputs)):
        raise SplitRecordError("inputs must list strings", "inputs")  # the API layer checks them further
    if not isinstance(truncate, bool):
        raise SplitRecordError("truncate must be true or false", "truncate")
    if num_ctx is not None and not (type(num_ctx) is int and 0 < num_ctx <= 2**24):  # noqa: E721
        raise SplitRecordError("num_ctx must be a positive integer", "num_ctx")
    return ForwardEmbed(model, inputs, truncate, num_ctx, keep_alive)


def forward_body(record: ForwardRequest) -> dict:
    # Only the fields a peer's API layer takes: the rest (admission numbers) are this daemon's
    # own business with its runners.
    request = {k: v for k, v in vars(record.request).items() if k in _GENERATE_FIELDS and v is not None}
    return {"model": record.model, "request": request, "keep_alive": record.keep_alive}


def decode_frame(line: bytes) -> ForwardFrame:
    """A ForwardFrame from one NDJSON line (its MAC is not checked here); ValueError if malformed."""
    data = json.loads(line)
    if not isinstance(data, dict):
        raise ValueError("a frame must be a JSON object")
    seq, payload, mac = data.get("seq"), data.get("data"), data.get("mac")
    if not (isinstance(seq, int) and not isinstance(seq, bool) and isinstance(payload, str)
            and isinstance(mac, str) and len(mac) <= 128):
        raise ValueError("a frame needs seq, data and mac")
    return ForwardFrame(seq, payload, mac)
