"""What a request leaves unset takes the model's own defaults, on both APIs.

Precedence, per option: the client's value, then the model's Modelfile parameters (stored by
`create` in the record's details["parameters"] under Ollama's names), then its Hugging Face
generation_config.json, then Ollama's defaults. A Modelfile is written for this model by its
user, so it wins over the generation_config the weights came with; Ollama's defaults come last
because a client that sends nothing (the OpenAI SDK does not send temperature) should get what
an Ollama user gets, not OpenAI's temperature 1.0, which makes small models babble.

The Modelfile's SYSTEM is the system prompt when the request has none, and its MESSAGEs come
before the request's own.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path
from typing import Any

from hippod.api import request as common
from hippod.api.errors import BadRequest
from hippod.protocol import GenerateRequest
from hippod.store.records import ModelRecord

log = logging.getLogger("hippo.api")

# Ollama's defaults (api/types.go DefaultOptions) for what the runner samples with, but for its
# repeat_penalty 1.1: like llama.cpp and mlx_lm, hippo leaves the penalty off unless the model or
# the client sets it, since a penalty on quotes and braces derails small models' JSON tool calls.
OLLAMA_DEFAULTS: dict[str, Any] = {"temperature": 0.8, "top_k": 40, "top_p": 0.9, "min_p": 0.0,
                                   "repeat_penalty": 1.0, "repeat_last_n": 64}
# generation_config.json name -> option name
_GENERATION_CONFIG = {"temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
                      "min_p": "min_p", "repetition_penalty": "repeat_penalty"}
_cache: dict[tuple[str, str], dict[str, Any]] = {}


def generation_config_options(model_dir: Path) -> dict[str, Any]:
    """The sampling values a model ships in generation_config.json; what does not check is skipped."""
    try:
        cfg = json.loads((model_dir / "generation_config.json").read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(cfg, dict):
        return {}
    out = {}
    for src, name in _GENERATION_CONFIG.items():
        if cfg.get(src) is None:
            continue
        try:
            out[name] = common.check_option(name, cfg[src], f"generation_config.{src}")
        except BadRequest as e:
            log.warning("%s: ignoring %s", model_dir, e)
    return out


def modelfile_options(rec: ModelRecord) -> dict[str, Any]:
    """The record's stored Modelfile parameters, checked as a request's options are."""
    params = (rec.details or {}).get("parameters")
    if not params:
        return {}
    try:
        return common.parse_options(params, "parameters")
    except BadRequest as e:  # stored by an older or foreign writer: serve without it
        log.warning("model %s: ignoring its stored parameters: %s", rec.name, e)
        return {}


def model_options(rec: ModelRecord, model_dir: Path) -> dict[str, Any]:
    """Every default this model's requests start from (cached per model and digest)."""
    key = (rec.name, rec.digest)
    if key not in _cache:
        if len(_cache) > 256:
            _cache.clear()
        _cache[key] = {**OLLAMA_DEFAULTS, **generation_config_options(model_dir),
                       **modelfile_options(rec)}
    return _cache[key]


def _model_messages(rec: ModelRecord) -> list[dict]:
    raw = (rec.details or {}).get("messages") or []
    return [{"role": m["role"], "content": m.get("content") or ""} for m in raw
            if isinstance(m, dict) and isinstance(m.get("role"), str)]


def apply(req: GenerateRequest, rec: ModelRecord, model_dir: Path) -> GenerateRequest:
    """`req` with the model's defaults filled in wherever the client left a field unset."""
    options = {**model_options(rec, model_dir), **req.options}
    details = rec.details or {}
    system = details.get("system") if isinstance(details.get("system"), str) else None
    history = _model_messages(rec)
    if req.messages is not None:
        own = list(req.messages)
        lead = 0  # the request's leading system messages stay first, before the Modelfile's turns
        while lead < len(own) and own[lead].get("role") == "system":
            lead += 1
        if system and not any(m.get("role") == "system" for m in own):
            own.insert(0, {"role": "system", "content": system})
            lead = 1
        return replace(req, options=options, messages=own[:lead] + history + own[lead:])
    if req.raw:
        return replace(req, options=options)
    if history and req.prompt:  # a prompt after the Modelfile's messages: one chat
        messages = ([{"role": "system", "content": req.system or system}] if req.system or system
                    else []) + history + [{"role": "user", "content": req.prompt}]
        return replace(req, options=options, messages=messages, prompt=None, system=None)
    return replace(req, options=options, system=req.system if req.system is not None else system)
