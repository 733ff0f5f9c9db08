"""`hippoctl create NAME -f Modelfile`: the parser, and the whole path through a real hippod."""

from __future__ import annotations

from pathlib import Path

import pytest

from hippoctl import modelfile
from tests.test_hippoctl import fails, ok

MODELFILE = '''# a pirate
FROM smollm2
PARAMETER temperature 0.4
PARAMETER num_ctx 1024
PARAMETER stop "<|im_end|>"
PARAMETER stop User:
parameter top_k 30
SYSTEM """You are a pirate.
Answer in one line."""
TEMPLATE """{{ if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}{{ range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""
MESSAGE user Who are you?
MESSAGE assistant """A pirate, arr."""
LICENSE """MIT"""
'''


def test_parser_reads_every_instruction(tmp_path):
    body = modelfile.parse(MODELFILE, tmp_path)
    assert body["from"] == "smollm2"
    assert body["parameters"] == {"temperature": 0.4, "num_ctx": 1024, "top_k": 30,
                                  "stop": ["<|im_end|>", "User:"]}
    assert body["system"] == "You are a pirate.\nAnswer in one line."
    assert body["template"].startswith("{{ if .System }}<|im_start|>system\n")
    assert body["template"].endswith("<|im_start|>assistant\n")
    assert body["messages"] == [{"role": "user", "content": "Who are you?"},
                                {"role": "assistant", "content": "A pirate, arr."}]
    assert body["license"] == "MIT"


def test_relative_from_is_resolved_against_the_modelfile(tmp_path):
    (tmp_path / "weights").mkdir()
    assert modelfile.parse("FROM ./weights", tmp_path)["from"] == str(tmp_path / "weights")
    assert modelfile.parse("FROM weights", tmp_path)["from"] == str(tmp_path / "weights")
    assert modelfile.parse("FROM llama3.2:1b", tmp_path)["from"] == "llama3.2:1b"


@pytest.mark.parametrize("text,named", [
    ("FROM x\nADAPTER ./lora.gguf", "ADAPTER is not supported"),
    ("FROM x\nQUANTIZE q4", "unknown instruction 'QUANTIZE'"),
    ('FROM x\nSYSTEM """never closed', "unterminated"),
    ("FROM x\nMESSAGE wizard hi", "MESSAGE role"),
    ("FROM x\nPARAMETER temperature", "PARAMETER needs a name and a value"),
    ("PARAMETER temperature 1", "no FROM line"),
])
def test_parser_names_what_it_refuses(tmp_path, text, named):
    with pytest.raises(modelfile.ModelfileError) as e:
        modelfile.parse(text, tmp_path)
    assert named in str(e.value)


def test_hippoctl_create_from_a_modelfile_then_show(hippod, tmp_path):
    host = hippod.url.removeprefix("http://")
    (tmp_path / "Modelfile").write_text(MODELFILE)
    out = ok(host, "create", "ctl-pirate", "-f", str(tmp_path / "Modelfile"))
    assert out.splitlines()[-1] == "success"
    status, shown = hippod.request("POST", "/api/show", {"model": "ctl-pirate"})
    assert status == 200
    assert shown["system"] == "You are a pirate.\nAnswer in one line."
    assert shown["template"] == modelfile.parse(MODELFILE, tmp_path)["template"]
    assert ["temperature", "0.4"] in [l.split(None, 1) for l in shown["parameters"].splitlines()]
    assert shown["license"] == "MIT" and len(shown["messages"]) == 2
    # Without -f, ./Modelfile is used, as with ollama.
    ok(host, "create", "ctl-pirate2", cwd=tmp_path)
    assert hippod.request("POST", "/api/show", {"model": "ctl-pirate2"})[0] == 200


def test_hippoctl_create_reports_modelfile_and_daemon_errors(hippod, tmp_path):
    host = hippod.url.removeprefix("http://")
    bad = Path(tmp_path / "Modelfile")
    bad.write_text("FROM smollm2\nADAPTER ./x.gguf\n")
    assert "ADAPTER is not supported" in fails(host, "create", "x", "-f", str(bad))
    bad.write_text('FROM smollm2\nTEMPLATE """{{ template "a" }}"""\n')
    assert "{{ template }}" in fails(host, "create", "x", "-f", str(bad))
    bad.write_text("FROM smollm2\nPARAMETER bogus_knob 3\n")
    assert "bogus_knob" in fails(host, "create", "x", "-f", str(bad))
    assert "q3_x" in fails(host, "create", "x", "--from", "smollm2", "-q", "q3_x")
