"""`hippoctl run MODEL` interactively, typed into a real terminal (tmux) against a real hippod:
/set parameter, /set system, /show info, \"\"\" multi-line input, Ctrl-C, history, /bye."""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import time

import pytest

from bench.daemon import REPO_ROOT

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None,
                                reason="no tmux on this machine (Debian: apt-get install -y tmux)")


class Terminal:
    """One tmux window running a command, on a private tmux server."""

    def __init__(self, tmp_path, command: list[str], env: dict[str, str]):
        n = len(list(tmp_path.glob("run-*")))
        self.socket = str(tmp_path / f"tmux-{n}.sock")  # a fresh server per terminal
        script = tmp_path / f"run-{n}.sh"
        exports = "".join(f"export {k}={shlex.quote(v)}\n" for k, v in env.items())
        self.status_path = tmp_path / f"run-{n}.status"  # tmux's pane_dead_status can stay empty
        script.write_text(f"{exports}cd {shlex.quote(str(REPO_ROOT))}\n{shlex.join(command)}\n"
                          f"echo $? > {shlex.quote(str(self.status_path))}\n")
        self.tmux("new-session", "-d", "-s", "t", "-x", "140", "-y", "50", f"bash {script}",
                  ";", "set-option", "-t", "t", "remain-on-exit", "on")

    def tmux(self, *args: str) -> str:
        return subprocess.run(["tmux", "-S", self.socket, *args], check=True, capture_output=True,
                              text=True).stdout

    def screen(self) -> str:
        return self.tmux("capture-pane", "-p", "-J", "-S", "-2000", "-t", "t")

    def type(self, text: str) -> None:
        self.tmux("send-keys", "-t", "t", "-l", text)
        self.tmux("send-keys", "-t", "t", "Enter")

    def key(self, name: str) -> None:
        self.tmux("send-keys", "-t", "t", name)

    def wait(self, pattern: str, timeout: float = 120, count: int = 1) -> str:
        deadline = time.monotonic() + timeout
        while True:
            screen = self.screen()
            if len(re.findall(pattern, screen, re.M)) >= count:
                return screen
            if time.monotonic() > deadline:
                raise AssertionError(f"no {pattern!r} (x{count}) on the terminal:\n{screen}")
            time.sleep(0.2)

    def exit_status(self, timeout: float = 20) -> int:
        deadline = time.monotonic() + timeout
        while True:
            text = self.status_path.read_text().strip() if self.status_path.exists() else ""
            if text:
                return int(text)
            if time.monotonic() > deadline:
                raise AssertionError(f"hippoctl did not exit:\n{self.screen()}")
            time.sleep(0.2)

    def close(self) -> None:
        subprocess.run(["tmux", "-S", self.socket, "kill-server"], capture_output=True)


def prompts(screen: str) -> int:
    return len(re.findall(r"^>>> ", screen, re.M))


@pytest.mark.slow
def test_interactive_run_like_ollama(hippod, tmp_path):
    home = tmp_path / "client-home"
    env = {"HIPPO_HOST": hippod.url, "HIPPO_HOME": str(home), "PYTHONPATH": str(REPO_ROOT),
           "TERM": "xterm"}
    term = Terminal(tmp_path, [sys.executable, "-m", "hippoctl", "run", "smollm2"], env)
    try:
        term.wait(r"^>>> ", 120)
        for line, answer in (("/set parameter num_predict 12", "Set parameter 'num_predict' to '12'"),
                             ("/set parameter temperature 0", "Set parameter 'temperature' to '0'"),
                             ("/set parameter bogus 1", "unknown parameter 'bogus'"),
                             ("/set parameter top_k many", "top_k must be an integer"),
                             ("/set verbose", "Set 'verbose' mode.")):
            term.type(line)
            term.wait(re.escape(answer), 10)

        # a multi-line message between triple quotes, answered by the real model
        term.type('"""')
        term.wait(r"^\.\.\. ", 10)
        term.type("What is the capital")
        term.type('of France?"""')
        screen = term.wait(r"^prompt eval count:", 120)
        assert "Paris" in screen, screen
        first_prompt = int(re.findall(r"^prompt eval count:\s+(\d+)", screen, re.M)[-1])

        term.type("/show info")
        screen = term.wait(r"^\s+architecture\s+llama", 30)
        term.type("/show parameters")
        term.wait(r"^num_predict\s+12$", 10)

        # /set system changes what the model is given: the daemon counts the same prompt tokens
        # for [system, user] as the session sent
        term.type("/set system You answer in one word.")
        term.wait(re.escape("Set system message."), 10)
        term.type("/show system")
        term.wait(r"^You answer in one word\.$", 10)
        term.type("/clear")
        term.wait("Cleared session context", 10)
        term.type("What is the capital of France?")
        screen = term.wait(r"^prompt eval count:", 120, count=2)
        with_system = int(re.findall(r"^prompt eval count:\s+(\d+)", screen, re.M)[-1])
        status, direct = hippod.request("POST", "/api/chat", {
            "model": "smollm2", "stream": False, "options": {"num_predict": 1},
            "messages": [{"role": "system", "content": "You answer in one word."},
                         {"role": "user", "content": "What is the capital of France?"}]})
        assert status == 200 and direct["prompt_eval_count"] == with_system != first_prompt

        # Ctrl-C stops the answer and keeps the session
        term.type("/set quiet")
        term.wait(re.escape("Set 'quiet' mode."), 10)
        term.type("/set parameter num_predict 3000")
        term.type("/set parameter temperature 1")
        term.wait(re.escape("Set parameter 'temperature' to '1'"), 10)
        before = prompts(term.screen())
        term.type("Write a very long story about a dragon and a lighthouse.")
        deadline = time.monotonic() + 120
        while not term.screen().rstrip().splitlines()[-1].strip() or \
                term.screen().rstrip().endswith("lighthouse."):
            assert time.monotonic() < deadline, term.screen()
            time.sleep(0.2)
        term.key("C-c")
        term.wait(r"^>>> ", 15, count=before + 1)
        deadline = time.monotonic() + 15  # the daemon stopped generating for it
        while hippod.request("GET", "/api/ps")[1]["models"][0]["hippo"]["busy"]:
            assert time.monotonic() < deadline, "the generation went on after Ctrl-C"
            time.sleep(0.3)
        term.type("/set parameter num_predict 4")
        term.wait(re.escape("Set parameter 'num_predict' to '4'"), 10)
        term.type("/bye")
        assert term.exit_status() == 0
        assert "Traceback" not in term.screen()
    finally:
        term.close()

    # history is kept across runs: Up brings back the last session's lines
    history = (home / "history").read_text()
    assert "/set parameter num_predict 12" in history and "/bye" in history
    term = Terminal(tmp_path, [sys.executable, "-m", "hippoctl", "run", "smollm2"], env)
    try:
        term.wait(r"^>>> ", 120)
        term.key("Up")
        term.wait(r"^>>> /bye$", 10)
        term.key("Up")
        term.wait(r"^>>> /set parameter num_predict 4$", 10)
        term.key("C-u")
        term.key("C-d")
        assert term.exit_status() == 0
    finally:
        term.close()
