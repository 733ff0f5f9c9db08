"""`hippoctl service`, `hippoctl logs` and log rotation: the files a service manager reads, the
commands given to it, and hippod started exactly as the service file says."""

from __future__ import annotations

import os
import plistlib
import queue
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from hippod.daemon import rotate_if_large
from tests.daemon import REPO_ROOT, Daemon, free_port

TEMPLATES = REPO_ROOT / "launchd"


def hippoctl(*args: str, home: Path, env: dict | None = None, timeout: float = 60) -> subprocess.CompletedProcess:
    """hippoctl with HOME (where service files go) in a temporary directory."""
    e = {k: v for k, v in os.environ.items() if not k.startswith(("HIPPO_", "XDG_"))}
    e.update(HOME=str(home), PYTHONPATH=str(REPO_ROOT), **(env or {}))
    return subprocess.run([sys.executable, "-m", "hippoctl", *args], capture_output=True, text=True, env=e,
                          cwd=REPO_ROOT, timeout=timeout)


def ok(*args: str, home: Path, env: dict | None = None) -> str:
    proc = hippoctl(*args, home=home, env=env)
    assert proc.returncode == 0, (args, proc.stdout, proc.stderr)
    return proc.stdout


def lint_plist(path: Path) -> dict:
    """plutil -lint where there is one (macOS); plistlib's strict parser everywhere."""
    if shutil.which("plutil"):
        proc = subprocess.run(["plutil", "-lint", str(path)], capture_output=True, text=True)
        assert proc.returncode == 0, proc.stdout + proc.stderr
    with open(path, "rb") as f:
        return plistlib.load(f, fmt=plistlib.FMT_XML)


def verify_unit(path: Path, runtime: Path) -> None:
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is not installed")
    runtime.mkdir(mode=0o700, exist_ok=True)
    proc = subprocess.run(["systemd-analyze", "--user", "verify", str(path)], capture_output=True, text=True,
                          env={**os.environ, "XDG_RUNTIME_DIR": str(runtime)})
    assert proc.returncode == 0 and not proc.stderr.strip(), proc.stderr


def test_the_plist_template_is_a_valid_plist():
    plist = lint_plist(TEMPLATES / "io.hippo.hippod.plist")
    assert plist["Label"] == "io.hippo.hippod" and plist["ProgramArguments"] == ["@HIPPOD@"]
    assert plist["KeepAlive"] == {"SuccessfulExit": False} and plist["RunAtLoad"] is True


def test_install_writes_a_launch_agent_that_lints(tmp_path):
    home = tmp_path / "user"
    out = ok("service", "install", "--kind", "launchd", "--file-only", "--grace", "20", home=home)
    path = home / "Library" / "LaunchAgents" / "io.hippo.hippod.plist"
    assert f"wrote {path}" in out
    plist = lint_plist(path)
    hippo_home = home / ".hippo"
    assert plist["ProgramArguments"][1:] == ["--shutdown-grace", "20"]
    assert Path(plist["ProgramArguments"][0]).is_file() or plist["ProgramArguments"][0] == sys.executable
    assert plist["EnvironmentVariables"]["HIPPO_HOME"] == str(hippo_home)
    assert plist["EnvironmentVariables"]["HIPPO_LOG_CONSOLE"] == "false"
    assert plist["StandardErrorPath"] == str(hippo_home / "logs" / "hippod.stderr.log")
    assert plist["ExitTimeOut"] == 35 and (hippo_home / "logs").is_dir()
    assert "@" not in path.read_text()
    # a home with XML's special characters stays valid
    odd = tmp_path / "a & <b>"
    ok("service", "install", "--kind", "launchd", "--file-only", "--home", str(odd), home=home)
    assert lint_plist(path)["WorkingDirectory"] == str(odd)
    ok("service", "uninstall", "--kind", "launchd", "--file-only", home=home)
    assert not path.exists()


def test_install_writes_a_systemd_unit_that_verifies_and_runs(tmp_path):
    home = tmp_path / "user"
    ok("service", "install", "--kind", "systemd", "--file-only", home=home)
    unit = home / ".config" / "systemd" / "user" / "hippod.service"
    verify_unit(unit, tmp_path / "run")
    fields = dict(line.split("=", 1) for line in unit.read_text().splitlines() if "=" in line and not line.startswith("#"))
    assert fields["TimeoutStopSec"] == "45" and fields["KillMode"] == "mixed"
    argv = shlex.split(fields["ExecStart"])
    assert argv[-2:] == ["--shutdown-grace", "30"]
    # Run hippod exactly as the unit says (plus a free port) and stop it as systemd would.
    env = {k: v for k, v in os.environ.items() if not k.startswith("HIPPO_")}
    for line in unit.read_text().splitlines():
        if line.startswith("Environment="):
            key, _, val = line.removeprefix("Environment=").strip('"').partition("=")
            env[key] = val
    env.update(HIPPO_PORT=str(free_port()), HIPPO_DISCOVERY="false")
    workdir = fields["WorkingDirectory"]
    assert workdir == str(home / ".hippo") and env["HIPPO_HOME"] == workdir
    proc = subprocess.Popen(argv, env=env, cwd=workdir, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        log = Path(workdir) / "logs" / "hippod.log"
        deadline = time.monotonic() + 30
        while "listening on" not in (log.read_text() if log.exists() else "") and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.1)
        assert "listening on" in log.read_text()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        out, err = proc.communicate()
        assert out == b"" and err == b"", err  # console logging is off: the rotating log has it all
        assert "stopped" in log.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
    out = ok("service", "uninstall", "--kind", "systemd", "--file-only", home=home)
    assert "removed" in out and not unit.exists()
    assert "no service installed" in ok("service", "uninstall", "--kind", "systemd", "--file-only", home=home)


def test_unit_quotes_odd_paths(tmp_path):
    home = tmp_path / "user"
    odd = tmp_path / "my hippo %n $HOME"
    ok("service", "install", "--kind", "systemd", "--file-only", "--home", str(odd), home=home)
    unit = home / ".config" / "systemd" / "user" / "hippod.service"
    text = unit.read_text()
    assert f'Environment="HIPPO_HOME={str(odd).replace("%", "%%")}"' in text
    verify_unit(unit, tmp_path / "run")


def fake_manager(bin_dir: Path, name: str, calls: Path, print_rc: int = 1) -> None:
    """launchctl/systemctl cannot run here; a stand-in records what hippoctl asks of them."""
    bin_dir.mkdir(exist_ok=True)
    script = bin_dir / name
    script.write_text(f'#!/bin/sh\necho "{name} $*" >> "{calls}"\n'
                      f'[ "$1" = print ] && exit {print_rc}\n'
                      f'[ "$2" = show ] && echo ActiveState=active && echo SubState=running && echo MainPID=4242\n'
                      "exit 0\n")
    script.chmod(0o755)


def test_install_and_uninstall_drive_launchctl_and_systemctl(tmp_path):
    home, bin_dir, calls = tmp_path / "user", tmp_path / "bin", tmp_path / "calls"
    fake_manager(bin_dir, "launchctl", calls)
    fake_manager(bin_dir, "systemctl", calls)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}"}
    uid = os.getuid()
    plist = home / "Library" / "LaunchAgents" / "io.hippo.hippod.plist"
    ok("service", "install", "--kind", "launchd", home=home, env=env)
    ok("service", "uninstall", "--kind", "launchd", home=home, env=env)
    assert calls.read_text().splitlines() == [
        f"launchctl print gui/{uid}/io.hippo.hippod", f"launchctl enable gui/{uid}/io.hippo.hippod",
        f"launchctl bootstrap gui/{uid} {plist}", f"launchctl bootout gui/{uid}/io.hippo.hippod"]
    calls.unlink()
    ok("service", "install", "--kind", "systemd", home=home, env=env)
    ok("service", "uninstall", "--kind", "systemd", home=home, env=env)
    assert calls.read_text().splitlines() == [
        "systemctl --user daemon-reload", "systemctl --user enable hippod.service",
        "systemctl --user restart hippod.service", "systemctl --user disable --now hippod.service",
        "systemctl --user daemon-reload"]


def test_status_reports_the_file_the_manager_and_the_daemon(tmp_path, daemon_factory):
    home, bin_dir, calls = tmp_path / "user", tmp_path / "bin", tmp_path / "calls"
    fake_manager(bin_dir, "systemctl", calls)
    env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "HIPPO_HOST": f"127.0.0.1:{free_port()}"}
    proc = hippoctl("service", "status", "--kind", "systemd", home=home, env=env)
    assert proc.returncode == 3 and "not installed" in proc.stdout and "not answering" in proc.stdout
    ok("service", "install", "--kind", "systemd", "--file-only", home=home)
    d = daemon_factory("s")
    env["HIPPO_HOST"] = f"127.0.0.1:{d.port}"
    out = ok("service", "status", "--kind", "systemd", home=home, env=env)
    assert "(installed)" in out and "active (running), pid 4242" in out
    assert f"answering at http://127.0.0.1:{d.port} (hippod 0.1.0)" in out


def test_logs_tail_and_follow_across_rotation(tmp_path, daemon_factory):
    d = daemon_factory("l")
    out = ok("logs", "-n", "5", home=tmp_path, env={"HIPPO_HOME": str(d.home)})
    assert "listening on" in out and len(out.splitlines()) <= 5

    logs = tmp_path / "h" / "logs"
    logs.mkdir(parents=True)
    log = logs / "hippod.log"
    log.write_text("".join(f"line {i}\n" for i in range(1000)))
    assert ok("logs", "-n", "3", "--home", str(tmp_path / "h"), home=tmp_path) == "line 997\nline 998\nline 999\n"
    e = {k: v for k, v in os.environ.items() if not k.startswith("HIPPO_")}
    follower = subprocess.Popen([sys.executable, "-m", "hippoctl", "logs", "-f", "-n", "1", "--home",
                                 str(tmp_path / "h")], stdout=subprocess.PIPE, env={**e, "PYTHONPATH": str(REPO_ROOT)},
                                cwd=REPO_ROOT, text=True,
                                # a suite started in the background inherits SIGINT ignored: undo it
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(line) for line in follower.stdout], daemon=True).start()

    def next_line() -> str:
        return lines.get(timeout=15)

    try:
        assert next_line() == "line 999\n"
        with open(log, "a") as f:
            f.write("appended\n")
        assert next_line() == "appended\n"
        with open(log, "a") as f:
            f.write("last words\n")
        log.rename(logs / "hippod.log.1")  # what RotatingFileHandler does
        log.write_text("after rotation\n")
        assert next_line() == "last words\n"
        assert next_line() == "after rotation\n"
    finally:
        follower.send_signal(signal.SIGINT)  # Ctrl-C; on a loaded machine it may still be starting
        try:
            follower.wait(30)
        except subprocess.TimeoutExpired:
            follower.kill()
            raise AssertionError("`hippoctl logs -f` did not stop within 30 s of Ctrl-C") from None
    proc = hippoctl("logs", "--home", str(tmp_path / "nothing"), home=tmp_path)
    assert proc.returncode == 1 and proc.stderr.startswith("Error: no log at")


def test_runner_log_rotation(tmp_path):
    log = tmp_path / "runners.log"
    assert not rotate_if_large(log, max_bytes=10)
    for i in range(4):
        log.write_text(f"generation {i}\n" * 10)
        assert rotate_if_large(log, max_bytes=10, backups=2)
    assert not log.exists()
    assert (tmp_path / "runners.log.1").read_text().startswith("generation 3")
    assert (tmp_path / "runners.log.2").read_text().startswith("generation 2")
    assert not (tmp_path / "runners.log.3").exists()
    log.write_text("small\n")
    assert not rotate_if_large(log, max_bytes=1000)
