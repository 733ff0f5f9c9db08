"""Reasoning models: `think` reaches the chat template, and thinking is split from the answer.

mlx_lm's TokenizerWrapper finds a model's thinking markers (`<think>`/`</think>` for Qwen3 and
the DeepSeek-R1 distills, and the other families it knows) and passes `enable_thinking` to the
template under the name the template uses. gpt-oss (the harmony format, which this mlx_lm does
not know) thinks in an `analysis` channel and answers in a `final` one; its template takes a
`reasoning_effort`.

Whether the answer starts inside thinking is read off the rendered prompt: R1-style templates
open `<think>` in the generation prompt, Qwen3 with thinking off closes an empty block there.
"""

from __future__ import annotations

from dataclasses import dataclass

from hippod.engine.prompts import PromptError

HARMONY_THINK = "<|channel|>analysis<|message|>"
HARMONY_END = "<|end|>"
HARMONY_FINAL = ("<|start|>assistant<|channel|>final<|message|>", "<|channel|>final<|message|>")


@dataclass(frozen=True)
class Markers:
    start: str
    end: str
    drop: tuple[str, ...] = ()  # answer-side headers that are markup, not text


def markers(tokenizer) -> Markers | None:
    if getattr(tokenizer, "has_thinking", False) and tokenizer.think_start and tokenizer.think_end:
        return Markers(tokenizer.think_start, tokenizer.think_end)
    vocab = _vocab(tokenizer)
    if "<|channel|>" in vocab and "<|message|>" in vocab:  # gpt-oss
        return Markers(HARMONY_THINK, HARMONY_END, HARMONY_FINAL)
    return None


def _vocab(tokenizer) -> dict:
    try:
        return tokenizer.get_vocab()
    except Exception:
        return {}


def _template(tokenizer) -> str:
    t = getattr(tokenizer, "chat_template", None)
    return t if isinstance(t, str) else ""


def can_think(tokenizer) -> bool:
    return markers(tokenizer) is not None or "enable_thinking" in _template(tokenizer)


def template_kwargs(tokenizer, think: bool | str | None) -> dict:
    """The chat-template variables for `think`; None leaves the template's own default."""
    if think is None:
        return {}
    if not can_think(tokenizer):
        if think is False:
            return {}  # nothing to turn off
        raise PromptError("think: this model does not support thinking")
    kwargs: dict = {"enable_thinking": think is not False}
    if isinstance(think, str):
        kwargs["reasoning_effort"] = think
    elif think is False and "reasoning_effort" in _template(tokenizer):
        kwargs["reasoning_effort"] = "low"  # gpt-oss cannot stop thinking; think as little as it can
    return kwargs


def starts_inside(tokenizer, tokens: list[int], m: Markers) -> bool:
    """True when the prompt leaves a thinking block open (the model continues inside it)."""
    tail = tokenizer.decode(tokens[-64:])
    return tail.rfind(m.start) > tail.rfind(m.end)


def _partial_suffix(text: str, marks: list[str]) -> int:
    """Length of the longest end of `text` that is a proper prefix of one of `marks`."""
    best = 0
    for mark in marks:
        for n in range(min(len(mark) - 1, len(text)), best, -1):
            if text.endswith(mark[:n]):
                best = n
                break
    return best


class ThinkingSplitter:
    """Streams (answer, thinking) text out of decoded text, holding back partial markers."""

    def __init__(self, m: Markers, inside: bool):
        self.m = m
        self.inside = inside
        self.buf = ""
        self.trim = True  # whitespace right after a marker (or at the start) is layout, not text

    def feed(self, text: str) -> tuple[str, str]:
        self.buf += text
        answer, thinking = [], []
        while True:
            mark = self.m.end if self.inside else self.m.start
            i = self.buf.find(mark)
            if i < 0:
                break
            self._take(self.buf[:i], answer, thinking)
            self.buf = self.buf[i + len(mark):]
            self.inside = not self.inside
            self.trim = True
        marks = [self.m.end] if self.inside else [self.m.start, *self.m.drop]
        keep = _partial_suffix(self.buf, marks)
        self._take(self.buf[:len(self.buf) - keep], answer, thinking)
        self.buf = self.buf[len(self.buf) - keep:]
        return "".join(answer), "".join(thinking)

    def flush(self) -> tuple[str, str]:
        answer, thinking = [], []
        self._take(self.buf, answer, thinking)
        self.buf = ""
        return "".join(answer), "".join(thinking)

    def _take(self, text: str, answer: list, thinking: list) -> None:
        if not self.inside:
            for header in self.m.drop:
                text = text.replace(header, "")
        if self.trim:
            text = text.lstrip()
            if not text:
                return
            self.trim = False
        (thinking if self.inside else answer).append(text)
