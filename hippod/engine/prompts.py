"""Turn a GenerateRequest into prompt tokens with the model's own chat template."""

from __future__ import annotations

from hippod.protocol import GenerateRequest


class PromptError(ValueError):
    """The request cannot be rendered (e.g. the template rejects the messages)."""


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def render_prompt(tokenizer, req: GenerateRequest, template_kwargs: dict | None = None) -> list[int]:
    """`template_kwargs` are extra chat-template variables (enable_thinking, reasoning_effort)."""
    extra = template_kwargs or {}
    if req.messages is not None:
        messages = list(req.messages)
        if req.system and not any(m.get("role") == "system" for m in messages):
            messages.insert(0, {"role": "system", "content": req.system})
        return _apply_template(tokenizer, messages, req.tools, extra)
    prompt = req.prompt or ""
    if req.raw:
        return tokenizer.encode(prompt, add_special_tokens=False)
    if has_chat_template(tokenizer):
        messages = [{"role": "system", "content": req.system}] if req.system else []
        messages.append({"role": "user", "content": prompt})
        return _apply_template(tokenizer, messages, req.tools, extra)
    text = f"{req.system}\n\n{prompt}" if req.system else prompt
    return tokenizer.encode(text)


def _apply_template(tokenizer, messages: list[dict], tools: list[dict] | None, extra: dict
                    ) -> list[int]:
    if not has_chat_template(tokenizer):
        # Base models: plain concatenation is what users of Ollama get for template-less models.
        text = "".join(f"{m.get('content') or ''}\n" for m in messages)
        return tokenizer.encode(text)
    try:
        text = tokenizer.apply_chat_template(
            messages, tools=tools or None, add_generation_prompt=True, tokenize=False, **extra
        )
    except Exception as e:  # jinja raises TemplateError/TypeError on messages it cannot render
        raise PromptError(f"the model's chat template rejected the messages: {e}") from None
    return tokenizer.encode(text, add_special_tokens=False)
