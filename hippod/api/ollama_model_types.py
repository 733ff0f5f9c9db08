"""Ollama wire shapes of /api/create and /api/show (docs/api.md), parsing and building only."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from hippod.api.errors import BadRequest
from hippod.api.fields import get
from hippod.api.ollama_types import details as record_details, iso, parse_messages
from hippod.api.request import IGNORED_OPTIONS, parse_options
from hippod.registry.gotemplate import TemplateError, to_jinja
from hippod.registry.modelfile import (QUANTIZE_LEVELS, parameters_text, quantize_level,
                                       render_modelfile)
from hippod.store.records import ModelRecord

CREATE_FIELDS = {"model", "name", "from", "files", "adapters", "template", "system", "parameters",
                 "messages", "license", "quantize", "stream", "draft", "modelfile", "path",
                 "renderer", "parser"}


@dataclass
class CreateBody:
    name: str
    source: str | None
    files: dict[str, str] | None
    quantize: tuple[int, int] | None
    stream: bool
    draft: str | None
    modelfile: dict[str, Any] = field(default_factory=dict)  # details keys (modelfile.py)
    jinja_template: str | None = None


def parse_create(body: dict) -> CreateBody:
    unknown = sorted(set(body) - CREATE_FIELDS)
    if unknown:
        raise BadRequest(f"create: unknown field {unknown[0]!r}", param=unknown[0])
    for legacy in ("modelfile", "path"):
        if body.get(legacy):
            raise BadRequest(f"create: {legacy!r} is Ollama's removed form; send 'from', "
                             "'parameters', 'template', 'system', 'messages' and 'license' "
                             "(hippoctl create -f Modelfile does)", param=legacy)
    for named in ("renderer", "parser"):  # Ollama's built-in Go renderers and output parsers
        if body.get(named):
            raise BadRequest(f"create: {named!r} is not supported by hippo (it renders with the "
                             "model's chat template and parses with mlx_lm's parsers)",
                             param=named)
    if body.get("adapters"):
        raise BadRequest("create: 'adapters' (LoRA) are not supported by hippo", param="adapters")
    name = get(body, "model", str) or get(body, "name", str, required=True)
    source = get(body, "from", str)
    files = _parse_files(body.get("files"))
    if source is None and not files:
        raise BadRequest("create needs 'from' (a .gguf file, a model directory or a model name) "
                         "or 'files'", param="from")
    out = CreateBody(name=name, source=source, files=files, quantize=None,
                     stream=get(body, "stream", bool, True), draft=get(body, "draft", str))
    if (level := get(body, "quantize", str)) is not None:
        out.quantize = quantize_level(level)
        if out.quantize is None:
            raise BadRequest(f"create: unsupported quantize level {level!r} (supported: "
                             f"{', '.join(QUANTIZE_LEVELS)})", param="quantize")
    if (template := get(body, "template", str)) is not None:
        try:
            out.jinja_template = to_jinja(template)
        except TemplateError as e:
            raise BadRequest(f"create: template: {e}", param="template") from None
        out.modelfile["template"] = template
    if (system := get(body, "system", str)) is not None:
        out.modelfile["system"] = system
    if body.get("parameters") is not None:
        out.modelfile["parameters"] = parse_parameters(body["parameters"])
    if body.get("messages") is not None:
        out.modelfile["messages"] = parse_messages(body["messages"], plain=True)
    if body.get("license") is not None:
        out.modelfile["license"] = _parse_license(body["license"])
    return out


def _parse_files(raw: Any) -> dict[str, str] | None:
    if raw is None or raw == {}:
        return None
    if not isinstance(raw, dict):
        raise BadRequest("files must be an object of file name -> blob digest", param="files")
    for fname, digest in raw.items():
        parts = fname.split("/")
        if not fname or fname.startswith("/") or any(p in ("", ".", "..") for p in parts):
            raise BadRequest(f"files: unsafe file name {fname!r}", param="files")
        if not (isinstance(digest, str) and digest.startswith("sha256:") and len(digest) == 71
                and all(c in "0123456789abcdef" for c in digest[7:])):
            raise BadRequest(f"files: {fname!r} must map to a digest 'sha256:<64 hex>'",
                             param="files")
    return dict(raw)


def parse_parameters(raw: Any) -> dict[str, Any]:
    """Modelfile PARAMETERs: Ollama's option names, checked like request options."""
    if not isinstance(raw, dict):
        raise BadRequest("parameters must be an object", param="parameters")
    try:
        checked = parse_options(raw)
    except BadRequest as e:
        label = (e.param or "").replace("options.", "parameters.", 1)
        raise BadRequest(str(e).replace("options.", "parameters."), param=label) from None
    # Hardware knobs mean nothing on MLX but are kept, so /api/show gives back what was sent.
    checked.update({k: v for k, v in raw.items() if k in IGNORED_OPTIONS and v is not None})
    return checked


def _parse_license(raw: Any) -> str | list[str]:
    if isinstance(raw, str):
        return raw
    if isinstance(raw, list) and all(isinstance(x, str) for x in raw):
        return list(raw)
    raise BadRequest("license must be a string or a list of strings", param="license")


# --------------------------------------------------------------------------- /api/show


def show_response(rec: ModelRecord, jinja_template: str, model_info: dict, capabilities: list,
                  tensors: list[dict] | None) -> dict:
    d = rec.details or {}
    answer = {
        "license": _license_text(d.get("license")),
        "modelfile": render_modelfile(rec.source, d, jinja_template),
        "parameters": parameters_text(d.get("parameters") or {}),
        "template": d.get("template") or jinja_template,
        "system": d.get("system") or "",
        "details": record_details(rec),
        "messages": d.get("messages") or [],
        "model_info": model_info,
        "capabilities": capabilities,
        "modified_at": iso(rec.modified_at),
        "hippo": {"source": rec.source, "digest": rec.digest, "files": rec.files,
                  "size": rec.size, "chat_template": jinja_template},
    }
    if tensors is not None:
        answer["tensors"] = tensors
    return answer


def _license_text(value: Any) -> str:
    if isinstance(value, list):
        return "\n".join(value)
    return value or ""


def parse_show(body: dict) -> tuple[str, bool]:
    unknown = sorted(set(body) - {"model", "name", "verbose", "system", "template", "options"})
    if unknown:
        raise BadRequest(f"show: unknown field {unknown[0]!r}", param=unknown[0])
    for legacy in ("system", "template", "options"):  # Ollama's removed per-request overrides
        if body.get(legacy):
            raise BadRequest(f"show: {legacy!r} is not supported", param=legacy)
    name = get(body, "model", str) or get(body, "name", str, required=True)
    return name, get(body, "verbose", bool, False)


def json_template(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
