"""hippoctl's operator commands: `service install|uninstall|status`, `logs [-f]`, `audit`.

The service is a LaunchAgent on macOS (launchctl) and a systemd user unit on Linux, both made
from the templates in launchd/. They run hippod with HIPPO_HOME set and console logging off,
so its only log is ~/.hippo/logs/hippod.log, which hippod rotates itself. Settings such as the
host or the API key belong in ~/.hippo/config.yaml, never in the service file.
"""

from __future__ import annotations

import argparse
import os
import platform
import plistlib
import re
import shutil
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

from hippoctl.client import Client, ConnectError, HippoError
from hippoctl.tables import parse_time, table

LABEL = "io.hippo.hippod"
UNIT = "hippod.service"
STOP_MARGIN = 15  # seconds launchd/systemd wait beyond hippod's grace before killing it
DEFAULT_GRACE = 30.0


# -- where things are ----------------------------------------------------------------------------


def hippo_home(args: argparse.Namespace | None = None) -> Path:
    given = getattr(args, "home", None) or os.environ.get("HIPPO_HOME")
    return Path(os.path.expanduser(given)).resolve() if given else Path.home() / ".hippo"


def templates_dir() -> Path:
    """launchd/ next to the package when installed, or at the top of a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "launchd", here.parent / "launchd"):
        if (candidate / f"{LABEL}.plist").is_file():
            return candidate
    raise HippoError(f"service templates not found (looked in {here / 'launchd'} and {here.parent / 'launchd'})")


def service_kind(args: argparse.Namespace) -> str:
    kind = getattr(args, "kind", None)
    if kind:
        return kind
    return "launchd" if platform.system() == "Darwin" else "systemd"


def service_file(kind: str) -> Path:
    if kind == "launchd":
        return Path.home() / "Library" / "LaunchAgents" / f"{LABEL}.plist"
    config = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
    return Path(config) / "systemd" / "user" / UNIT


def hippod_command(override: str | None) -> list[str]:
    """How the service starts hippod: the `hippod` beside this Python, on PATH, or `python -m`."""
    if override:
        path = Path(os.path.expanduser(override)).resolve()
        if not (path.is_file() and os.access(path, os.X_OK)):
            raise HippoError(f"--hippod: {path} is not an executable file")
        return [str(path)]
    beside = Path(sys.executable).parent / "hippod"
    if beside.is_file() and os.access(beside, os.X_OK):
        return [str(beside)]
    found = shutil.which("hippod")
    if found:
        return [str(Path(found).resolve())]
    return [sys.executable, "-m", "hippod.daemon"]


# -- rendering the templates -------------------------------------------------------------------------


def _fill(value, fields: dict[str, str]):
    if isinstance(value, str):
        for key, text in fields.items():
            value = value.replace(f"@{key}@", text)
        return value
    if isinstance(value, list):
        return [_fill(v, fields) for v in value]
    if isinstance(value, dict):
        return {k: _fill(v, fields) for k, v in value.items()}
    return value


def render_plist(program: list[str], home: Path, grace: float) -> bytes:
    """The LaunchAgent: parsed and written with plistlib, so it is valid by construction."""
    template = plistlib.loads((templates_dir() / f"{LABEL}.plist").read_bytes())
    plist = _fill(template, {"HIPPO_HOME": str(home), "LOG_DIR": str(home / "logs")})
    plist["ProgramArguments"] = program
    plist["ExitTimeOut"] = int(grace) + STOP_MARGIN
    return plistlib.dumps(plist, sort_keys=False)


_PLAIN = re.compile(r"[A-Za-z0-9_@+=:,./-]+")


def systemd_quote(arg: str) -> str:
    """One word of ExecStart=: specifiers (%) and variables ($) doubled, quoted when needed."""
    arg = arg.replace("%", "%%").replace("$", "$$")
    if _PLAIN.fullmatch(arg):
        return arg
    return '"' + arg.replace("\\", "\\\\").replace('"', '\\"') + '"'


def render_unit(program: list[str], home: Path, grace: float) -> str:
    text = (templates_dir() / UNIT).read_text()
    fields = {
        "EXEC_START": " ".join(systemd_quote(a) for a in program),
        "ENV_HOME": systemd_quote(f"HIPPO_HOME={home}").replace("$$", "$"),
        "WORKING_DIRECTORY": str(home).replace("%", "%%"),
        "STOP_TIMEOUT": str(int(grace) + STOP_MARGIN),
    }
    for key, value in fields.items():
        text = text.replace(f"@{key}@", value)
    return text


def render(kind: str, program: list[str], home: Path, grace: float) -> bytes:
    if kind == "launchd":
        return render_plist(program, home, grace)
    return render_unit(program, home, grace).encode()


# -- launchctl and systemctl -----------------------------------------------------------------------


def _run(*cmd: str, check: bool = True) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        raise HippoError(f"{cmd[0]} not found; is this the right system for a {cmd[0]} service?") from None
    except subprocess.TimeoutExpired:
        raise HippoError(f"{' '.join(cmd)} did not finish within 60s") from None
    if check and proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()
        raise HippoError(f"{' '.join(cmd)} failed (exit {proc.returncode})"
                         + (f": {detail[-1]}" if detail else ""))
    return proc


def _gui() -> str:
    return f"gui/{os.getuid()}"


def _launchd_load(path: Path) -> None:
    if _run("launchctl", "print", f"{_gui()}/{LABEL}", check=False).returncode == 0:
        _run("launchctl", "bootout", f"{_gui()}/{LABEL}", check=False)  # reload the new file
    _run("launchctl", "enable", f"{_gui()}/{LABEL}", check=False)
    if _run("launchctl", "bootstrap", _gui(), str(path), check=False).returncode != 0:
        _run("launchctl", "load", "-w", str(path))  # macOS before bootstrap, or a stale state


def _launchd_unload(path: Path) -> None:
    if _run("launchctl", "bootout", f"{_gui()}/{LABEL}", check=False).returncode != 0 and path.exists():
        _run("launchctl", "unload", "-w", str(path), check=False)


def _launchd_state() -> dict[str, str]:
    proc = _run("launchctl", "print", f"{_gui()}/{LABEL}", check=False)
    if proc.returncode != 0:
        return {"state": "not loaded"}
    found = dict(re.findall(r"^\s*(state|pid|last exit code) = (.+)$", proc.stdout, re.MULTILINE))
    return {"state": found.get("state", "loaded"), "pid": found.get("pid", ""),
            "last exit": found.get("last exit code", "")}


def _systemd_load() -> None:
    _run("systemctl", "--user", "daemon-reload")
    _run("systemctl", "--user", "enable", UNIT)
    _run("systemctl", "--user", "restart", UNIT)  # start, or pick up a changed unit


def _systemd_unload() -> None:
    _run("systemctl", "--user", "disable", "--now", UNIT, check=False)


def _systemd_state() -> dict[str, str]:
    proc = _run("systemctl", "--user", "show", UNIT, "--property=ActiveState,SubState,MainPID,UnitFileState",
                check=False)
    if proc.returncode != 0:
        reason = (proc.stderr or proc.stdout).strip().splitlines()
        return {"state": "unknown" + (f" ({reason[-1]})" if reason else "")}
    found = dict(line.split("=", 1) for line in proc.stdout.splitlines() if "=" in line)
    state = f"{found.get('ActiveState', '?')} ({found.get('SubState', '?')})"
    pid = found.get("MainPID", "0")
    return {"state": state, "pid": "" if pid == "0" else pid, "enabled": found.get("UnitFileState", "")}


# -- the commands ------------------------------------------------------------------------------------


def service(client: Client, args: argparse.Namespace) -> int | None:
    return {"install": install, "uninstall": uninstall, "status": status}[args.action](client, args)


def install(client: Client, args: argparse.Namespace) -> None:
    kind = service_kind(args)
    home = hippo_home(args)
    grace = args.grace if args.grace is not None else float(os.environ.get("HIPPO_SHUTDOWN_GRACE") or DEFAULT_GRACE)
    program = [*hippod_command(args.hippod), "--shutdown-grace", f"{grace:g}"]
    path = service_file(kind)
    (home / "logs").mkdir(parents=True, exist_ok=True)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(render(kind, program, home, grace))
    print(f"wrote {path}")
    if args.file_only:
        return
    if kind == "launchd":
        _launchd_load(path)
    else:
        _systemd_load()
    print(f"started hippod ({'launchctl' if kind == 'launchd' else 'systemctl --user'}); "
          f"logs: {home / 'logs' / 'hippod.log'}")


def uninstall(client: Client, args: argparse.Namespace) -> int | None:
    kind = service_kind(args)
    path = service_file(kind)
    if not args.file_only and kind == "launchd":
        _launchd_unload(path)
    elif not args.file_only:
        _systemd_unload()
    if not path.exists():
        print(f"no service installed ({path} does not exist)")
        return None
    path.unlink()
    if kind == "systemd" and not args.file_only:
        _run("systemctl", "--user", "daemon-reload", check=False)
    print(f"removed {path}")
    return None


def status(client: Client, args: argparse.Namespace) -> int:
    """What the service manager and the daemon say; exit 0 only when hippod answers."""
    kind = service_kind(args)
    path = service_file(kind)
    manager = "LaunchAgent" if kind == "launchd" else "systemd user unit"
    rows = [("service", f"{manager} {path} ({'installed' if path.exists() else 'not installed'})")]
    if path.exists() and not args.file_only:
        state = _launchd_state() if kind == "launchd" else _systemd_state()
        rows.append(("state", state["state"] + (f", pid {state['pid']}" if state.get("pid") else "")))
    answering = False
    try:
        version = (client.get("/api/version") or {}).get("version", "?")
        rows.append(("daemon", f"answering at {client.url} (hippod {version})"))
        answering = True
    except ConnectError:
        rows.append(("daemon", f"not answering at {client.url}"))
    except HippoError as e:
        rows.append(("daemon", f"at {client.url}: {e}"))
        answering = e.status == 401  # up, but wants the API key
    rows.append(("logs", str(hippo_home(args) / "logs" / "hippod.log")))
    print(table((), [(f"{k}:", v) for k, v in rows]))
    return 0 if answering else 3


# -- logs ----------------------------------------------------------------------------------------------


def _tail(f, lines: int) -> bytes:
    """The last `lines` lines of an open file, read from its end (logs can be large)."""
    f.seek(0, os.SEEK_END)
    end = f.tell()
    block, data = 8192, b""
    while end > 0 and data.count(b"\n") <= lines:
        step = min(block, end)
        end -= step
        f.seek(end)
        data = f.read(step) + data
    f.seek(0, os.SEEK_END)
    return b"\n".join(data.split(b"\n")[-lines - 1:]) if data else b""


def logs(client: Client, args: argparse.Namespace) -> None:
    name = "runners.log" if args.runners else "hippod.log"
    path = hippo_home(args) / "logs" / name
    try:
        f = open(path, "rb")
    except FileNotFoundError:
        raise HippoError(f"no log at {path}; has hippod run with this HIPPO_HOME?") from None
    with f:
        out = sys.stdout.buffer
        out.write(_tail(f, args.lines))
        out.flush()
        if args.follow:
            follow(path, f, out)


def follow(path: Path, f, out, poll: float = 0.25) -> None:
    """`tail -F` from where `f` stands: print what is appended, and go on into the new file after
    a rotation. Closes the files it opens; `f` is the caller's."""
    inode = os.fstat(f.fileno()).st_ino
    opened = None
    try:
        while True:
            chunk = f.read()
            if chunk:
                out.write(chunk)
                out.flush()
                continue
            time.sleep(poll)
            try:
                st = path.stat()
            except FileNotFoundError:
                continue  # between the rename and the new file
            if st.st_ino != inode or st.st_size < f.tell():
                rest = f.read()  # written to the old file after our last read
                if rest:
                    out.write(rest)
                    out.flush()
                if opened is not None:
                    opened.close()
                f = opened = open(path, "rb")
                inode = os.fstat(f.fileno()).st_ino
    finally:
        if opened is not None:
            opened.close()


# -- audit -----------------------------------------------------------------------------------------------


def _seconds(value) -> str:
    return "-" if value is None else f"{value:.2f}s"


def audit(client: Client, args: argparse.Namespace) -> None:
    params = {"limit": args.limit}
    if args.since:
        params["since"] = args.since
    answer = client.get("/api/hippo/audit", params)
    if args.json:
        import json

        print(json.dumps(answer, indent=2))
        return
    rows = []
    for r in answer.get("requests") or []:
        when = parse_time(r.get("time"))
        local = when.astimezone().strftime("%Y-%m-%d %H:%M:%S") if isinstance(when, datetime) else ""
        error = (r.get("error") or "").replace("\n", " ")
        rows.append((local, r.get("client") or "", r.get("route") or "", r.get("model") or "-",
                     r.get("model_source") or "-",
                     r.get("prompt_tokens", 0), r.get("completion_tokens", 0), _seconds(r.get("ttft_seconds")),
                     _seconds(r.get("total_seconds")), r.get("status"),
                     error[:60] + ("…" if len(error) > 60 else "")))
    print(table(("TIME", "CLIENT", "ROUTE", "MODEL", "SOURCE", "IN", "OUT", "TTFT", "TOTAL", "STATUS", "ERROR"), rows))
