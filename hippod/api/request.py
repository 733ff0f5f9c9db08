"""The request parts both APIs share, each read and checked once.

Both the Ollama and the OpenAI types modules translate their wire fields into these: generation
options under Ollama's names (the runner's vocabulary, `protocol.GenerateRequest.options`),
stop rules, tool definitions, tool calls in the chat history, embedding inputs and `think`.
A field is either honoured, accepted as meaning nothing on MLX (named in IGNORED_OPTIONS), or
refused with a 400 naming it.
"""

from __future__ import annotations

import json
from typing import Any

from hippod.api.errors import BadRequest
from hippod.api.fields import get, number_in

MAX_STOPS = 16
MAX_EMBED_INPUTS = 2048
MAX_TOP_LOGPROBS = 20

# option -> (type, min, max): every generation option the runner honours, by Ollama's name.
OPTIONS: dict[str, tuple[Any, float | None, float | None]] = {
    "temperature": (float, 0, 100), "top_p": (float, 0, 1), "top_k": (int, 0, None),
    "min_p": (float, 0, 1), "seed": (int, None, None), "num_predict": (int, -2, None),
    "num_ctx": (int, 1, 2**24), "repeat_penalty": (float, 0, 100), "repeat_last_n": (int, -1, None),
    "presence_penalty": (float, -100, 100), "frequency_penalty": (float, -100, 100),
}
# llama.cpp hardware knobs with no meaning on MLX: accepted and ignored, as they change no output.
IGNORED_OPTIONS = {"num_gpu", "main_gpu", "num_thread", "num_batch", "use_mmap", "use_mlock", "numa",
                   "low_vram", "f16_kv", "vocab_only", "num_keep", "penalize_newline"}
# Sampling methods hippo does not implement: a non-default value is refused, never ignored.
REFUSED_OPTIONS = {"mirostat": 0, "mirostat_tau": 5.0, "mirostat_eta": 0.1, "tfs_z": 1.0,
                   "typical_p": 1.0}
THINK_LEVELS = ("low", "medium", "high")


def parse_stop(raw: Any, param: str = "stop") -> list[str]:
    """A stop string or list of them; empty strings are dropped (they would stop at once)."""
    if raw is None:
        return []
    stops = [raw] if isinstance(raw, str) else raw
    if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
        raise BadRequest(f"{param} must be a string or a list of strings", param=param)
    if len(stops) > MAX_STOPS:
        raise BadRequest(f"{param} allows at most {MAX_STOPS} stop strings", param=param)
    return [s for s in stops if s]


def check_option(name: str, value: Any, label: str) -> Any:
    """One option's value, typed and in range, or a 400 naming `label`."""
    if name == "stop":
        return parse_stop(value, label)
    if name == "draft_on":  # a node's name, or "off"/"": where the model's draft runs
        if not isinstance(value, str) or len(value) > 64 or not value.isprintable():
            raise BadRequest(f"{label} must be a node's name (or 'off')", param=label)
        return value.strip()
    typ, lo, hi = OPTIONS[name]
    prefix, _, key = label.rpartition(".")
    v = get({key: value}, key, typ, prefix=f"{prefix}." if prefix else "")
    return number_in(v, label, lo, hi)


def parse_options(raw: Any, param: str = "options") -> dict[str, Any]:
    """Ollama's `options` object (also Modelfile parameters) -> the runner's options."""
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise BadRequest(f"{param} must be an object", param=param)
    out: dict[str, Any] = {}
    for key, value in raw.items():
        label = f"{param}.{key}"
        if key in IGNORED_OPTIONS or value is None:
            continue
        if key in REFUSED_OPTIONS:
            if value != REFUSED_OPTIONS[key]:
                raise BadRequest(f"option {key} is not supported by hippo", param=label)
            continue
        if key not in ("stop", "draft_on") and key not in OPTIONS:
            raise BadRequest(f"unknown option {key!r}", param=label)
        out[key] = check_option(key, value, label)
    return out


def parse_tools(raw: Any, param: str = "tools") -> list[dict] | None:
    """Function tools in the chat-completions shape {"type": "function", "function": {...}}."""
    if raw is None:
        return None
    if not isinstance(raw, list):
        raise BadRequest(f"{param} must be a list", param=param)
    for i, t in enumerate(raw):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise BadRequest(f"{param}[{i}] must be {{'type': 'function', 'function': {{'name': ...}}}}",
                             param=f"{param}[{i}]")
        params = fn.get("parameters")
        if params is not None and not isinstance(params, dict):
            raise BadRequest(f"{param}[{i}].function.parameters must be a JSON schema object",
                             param=f"{param}[{i}]")
    return raw or None


def call_arguments(args: Any, label: str) -> dict:
    """Tool-call arguments as an object (chat templates expect one); a JSON string is parsed."""
    if args is None or args == "":
        return {}
    if isinstance(args, str):
        try:
            args = json.loads(args)
        except ValueError:
            raise BadRequest(f"{label} is not valid JSON", param=label) from None
    if not isinstance(args, dict):
        raise BadRequest(f"{label} must be a JSON object", param=label)
    return args


def history_tool_call(raw: Any, label: str) -> dict:
    """An assistant's earlier tool call, in either API's shape -> the template's shape."""
    fn = raw.get("function") if isinstance(raw, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise BadRequest(f"{label} must be {{'type': 'function', 'function': {{'name', 'arguments'}}}}",
                         param=label)
    call = {"type": "function", "function": {
        "name": fn["name"], "arguments": call_arguments(fn.get("arguments"), f"{label}.function.arguments")}}
    if isinstance(raw.get("id"), str):
        call["id"] = raw["id"]
    return call


def _is_token_ids(inputs: list) -> bool:
    """One list of ints, or a list of such lists: the OpenAI API's pre-tokenized input."""
    def ids(x: Any) -> bool:
        return isinstance(x, list) and bool(x) and all(
            isinstance(i, int) and not isinstance(i, bool) for i in x)
    return ids(inputs) or all(ids(x) for x in inputs)


def parse_embed_inputs(raw: Any, param: str = "input") -> list[str]:
    """A string or a non-empty list of non-empty strings (token-id inputs are refused)."""
    inputs = [raw] if isinstance(raw, str) else raw
    if not isinstance(inputs, list) or not inputs:
        raise BadRequest(f"{param} must be a string or a non-empty list of strings", param=param)
    if _is_token_ids(inputs):
        raise BadRequest(
            f"{param} holds token ids; hippo embeds text only, because ids from a client-side "
            "tokenizer (tiktoken's cl100k) are not this model's vocabulary: send the text itself "
            "(LangChain's OpenAIEmbeddings does so with check_embedding_ctx_length=False)",
            param=param)
    for i, text in enumerate(inputs):
        if not isinstance(text, str):
            raise BadRequest(f"{param}[{i}] must be a string, got {type(text).__name__}", param=param)
        if not text:
            raise BadRequest(f"{param}[{i}] must not be empty", param=param)
    if len(inputs) > MAX_EMBED_INPUTS:
        raise BadRequest(f"{param} holds more than {MAX_EMBED_INPUTS} inputs", param=param)
    return inputs


def parse_think(raw: Any, param: str = "think") -> bool | str | None:
    """Ollama's `think`: true/false, or an effort level for models that take one (gpt-oss)."""
    if raw is None or isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw in THINK_LEVELS:
        return raw
    raise BadRequest(f"{param} must be true, false or one of {', '.join(THINK_LEVELS)}", param=param)


def parse_top_logprobs(raw: Any, param: str = "top_logprobs") -> int:
    value = number_in(get({param: raw}, param, int, 0), param, 0, MAX_TOP_LOGPROBS)
    return int(value)
