"""Ollama TEMPLATEs (Go text/template) translated to Jinja and rendered the way the engine does.

Expected strings follow Go's text/template rules: text is kept verbatim except where `{{-` or
`-}}` trims whitespace, `$variables` assigned in a range survive the iteration, and Ollama
passes .System (system messages joined), .Messages (all of them) and .Tools.
"""

from __future__ import annotations

import json

import pytest
from transformers.utils.chat_template_utils import _compile_jinja_template

from hippod.registry.gotemplate import TemplateError, to_jinja

CHAT = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"}, {"role": "user", "content": "bye"}]


def render(go: str, messages=CHAT, **kw) -> str:
    return _compile_jinja_template(to_jinja(go)).render(messages=messages,
                                                        add_generation_prompt=True, **kw)


def test_legacy_prompt_response_template_renders_once_per_turn():
    go = ("{{ if .System }}[S]{{ .System }}\n{{ end }}"
          "{{ if .Prompt }}[U]{{ .Prompt }}\n{{ end }}[A]{{ .Response }}[/A]\n")
    # The system goes with the first turn only; the turn being generated stops at .Response.
    assert render(go) == "[S]Be brief.\n[U]hi\n[A]hello[/A]\n[U]bye\n[A]"
    assert render(go, [{"role": "user", "content": "x"}]) == "[U]x\n[A]"


def test_messages_template_with_trim_markers_and_last_message_logic():
    go = ('{{- range $i, $_ := .Messages }}\n'
          '{{- $last := eq (len (slice $.Messages $i)) 1 -}}\n'
          '{{- if eq .Role "user" }}<u>{{ .Content }}</u>\n'
          '{{ else if eq .Role "assistant" }}<a>{{ .Content }}{{ if not $last }}</a>{{ end }}\n'
          '{{ end }}\n'
          '{{- if and (ne .Role "assistant") $last }}<a>{{ end }}\n'
          '{{- end }}')
    assert render(go) == "<u>hi</u>\n<a>hello</a>\n<u>bye</u>\n<a>"


def test_variables_assigned_in_a_range_outlive_the_iteration():
    go = ('{{- $sys := "" }}{{ range .Messages }}{{ if eq .Role "system" }}'
          '{{ $sys = printf "%s|%s" $sys .Content }}{{ end }}{{ end }}sys={{ $sys }};'
          '{{ with .System }}S={{ . }}{{ else }}none{{ end }}')
    assert render(go) == "sys=|Be brief.;S=Be brief."
    assert render(go, [{"role": "user", "content": "x"}]) == "sys=;none"


def test_tools_and_tool_calls_render_as_json():
    go = ('{{ if .Tools }}TOOLS{{ range .Tools }} {{ .Function.Name }}={{ json .Function }}'
          '{{ end }}\n{{ end }}{{ range .Messages }}{{ .Role }}:'
          '{{ range .ToolCalls }}call {{ .Function.Name }}({{ .Function.Arguments }}){{ end }}'
          '{{ .Content }}\n{{ end }}')
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}]
    messages = [{"role": "user", "content": "1+2?"},
                {"role": "assistant", "content": "",
                 "tool_calls": [{"function": {"name": "add", "arguments": {"a": 1, "b": 2}}}]},
                {"role": "tool", "content": "3"}]
    out = render(go, messages, tools=tools)
    head, rest = out.split("\n", 1)
    name, _, fn = head.removeprefix("TOOLS ").partition("=")
    assert name == "add" and json.loads(fn) == tools[0]["function"]
    role, _, call = rest.split("\n")[1].partition(":")
    assert role == "assistant" and json.loads(call.removeprefix("call add(").removesuffix(")")) \
        == {"a": 1, "b": 2}
    assert rest.split("\n")[2] == "tool:3"
    assert render(go, messages).startswith("user:1+2?\n")  # no tools: the if is false


def test_literal_jinja_looking_text_is_copied_not_run():
    go = "{% raw %}{{ range .Messages }}{{ .Content }}{%if%}{{ end }}{# x #}"
    assert render(go) == "{% raw %}Be brief.{%if%}hi{%if%}hello{%if%}bye{%if%}{# x #}"


def test_a_final_newline_is_kept():
    assert render("{{ .Prompt }}\n", [{"role": "user", "content": "q"}]) == "q\n"


@pytest.mark.parametrize("go,named", [
    ('{{ template "x" . }}', "{{ template }}"),
    ('{{ define "x" }}y{{ end }}', "{{ define }}"),
    ("{{ .System | printf }}", "pipelines"),
    ('{{ printf "%q" .System }}', "'%q'"),
    ("{{ html .System }}", "'html'"),
    ("{{ .Suffix }}", ".Suffix"),
    ("{{ if .System }}x", "unclosed {{ if }}"),
    ("{{ end }}", "{{ end }} without"),
    ("{{ else }}", "{{ else }} without"),
    ("{{ range .Messages }}{{ .Colour }}{{ end }}", ".Colour"),
    ("{{ continue }}", "outside {{ range }}"),
])
def test_untranslatable_constructs_are_named(go, named):
    with pytest.raises(TemplateError) as e:
        to_jinja(go)
    assert named in str(e.value)


def test_a_jinja_template_is_kept_as_it_is_and_checked():
    jinja = ("{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
             "{% if add_generation_prompt %}<assistant>{% endif %}")
    assert to_jinja(jinja) == jinja
    assert render(jinja, CHAT[1:2]) == "<user>hi\n<assistant>"
    with pytest.raises(TemplateError) as e:
        to_jinja("{% for m in messages %}{{ m.content }}")
    assert "Jinja syntax error" in str(e.value)
    # Go templates that mention messages are still Go.
    assert to_jinja("{{ range .Messages }}{{ .Content }}{{ end }}") != \
        "{{ range .Messages }}{{ .Content }}{{ end }}"
