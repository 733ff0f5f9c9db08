"""A small HTTP client of hippod's API: JSON calls and NDJSON streams over http.client.

Stdlib only, so `hippoctl` starts in a few tens of milliseconds and never pulls in the daemon's
dependencies. Every failure becomes a HippoError whose message is fit to print after "Error: ".
"""

from __future__ import annotations

import http.client
import json
import os
import socket
from collections.abc import Iterator, Mapping
from typing import Any
from urllib.parse import urlencode

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 11434
CONNECT_TIMEOUT = 10.0  # seconds; a daemon that is up accepts at once
CALL_TIMEOUT = 300.0  # seconds without a byte for plain JSON calls (a delete may wait for an unload)


class HippoError(Exception):
    """A failure to show the user as `Error: <message>`; `status` is the HTTP status when there is one."""

    def __init__(self, message: str, status: int | None = None):
        super().__init__(message)
        self.status = status


class ConnectError(HippoError):
    """No daemon answered at the address."""


def base_url(environ: Mapping[str, str] = os.environ) -> str:
    """The daemon's URL from HIPPO_HOST, read the way Ollama reads OLLAMA_HOST.

    "host", "host:port", "http://host:port", "https://host"; no port means HIPPO_PORT (which the
    daemon also reads) or 11434, except that an explicit http:// or https:// scheme means 80 or
    443 (as in Ollama). A path is ignored.
    """
    text = environ.get("HIPPO_HOST", "").strip()
    scheme, sep, hostport = text.partition("://")
    scheme = scheme.lower()
    default_port = environ.get("HIPPO_PORT", "").strip() or DEFAULT_PORT
    if not sep:
        scheme, hostport = "http", text
    elif scheme == "http":
        default_port = 80
    elif scheme == "https":
        default_port = 443
    else:
        raise HippoError(f"HIPPO_HOST: unsupported scheme {scheme!r} (use http or https)")
    hostport = hostport.split("/", 1)[0]
    host, port = _split_host_port(hostport)
    host = host or DEFAULT_HOST
    if host in ("0.0.0.0", "::"):  # a listen-everywhere address is reached on loopback
        host = DEFAULT_HOST
    try:
        port_number = int(port or default_port)
    except ValueError:
        raise HippoError(f"invalid port {port or default_port!r} in HIPPO_HOST/HIPPO_PORT") from None
    if not 0 < port_number < 65536:
        raise HippoError(f"invalid port {port_number} in HIPPO_HOST/HIPPO_PORT")
    if ":" in host:
        host = f"[{host}]"
    return f"{scheme}://{host}:{port_number}"


def _split_host_port(hostport: str) -> tuple[str, str]:
    if hostport.startswith("["):  # [::1]:11434
        host, _, rest = hostport[1:].partition("]")
        return host, rest.lstrip(":")
    if hostport.count(":") == 1:
        host, _, port = hostport.partition(":")
        return host, port
    return hostport, ""  # a name, an IPv4 address, or a bare IPv6 address


class Client:
    """Calls on one daemon. Holds only its address."""

    def __init__(self, url: str):
        self.url = url
        scheme, _, hostport = url.partition("://")
        self._https = scheme == "https"
        host, port = _split_host_port(hostport)
        self._host, self._port = host, int(port)

    # -- plain JSON calls -------------------------------------------------------------------

    def get(self, path: str, params: Mapping[str, Any] | None = None) -> Any:
        if params:
            path = f"{path}?{urlencode(params)}"
        return self._call("GET", path, None)

    def post(self, path: str, body: Mapping[str, Any]) -> Any:
        return self._call("POST", path, body)

    def delete(self, path: str, body: Mapping[str, Any]) -> Any:
        return self._call("DELETE", path, body)

    def _call(self, method: str, path: str, body: Mapping[str, Any] | None) -> Any:
        conn, resp = self._open(method, path, body, CALL_TIMEOUT)
        try:
            raw = self._read(resp.read)
        finally:
            conn.close()
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except ValueError:
            raise HippoError(f"unexpected answer from {self.url}{path}: {_snippet(raw)}") from None

    # -- NDJSON streams ---------------------------------------------------------------------

    def stream(self, path: str, body: Mapping[str, Any]) -> Iterator[dict]:
        """POST and yield each NDJSON object; an `{"error": ...}` line raises HippoError.

        Closing the generator closes the connection, which is how the daemon learns that the
        client went away (and cancels a generation).
        """
        conn, resp = self._open("POST", path, body, None)
        try:
            while True:
                line = self._read(resp.readline)
                if not line:
                    return
                if not line.strip():
                    continue
                try:
                    event = json.loads(line)
                except ValueError:
                    raise HippoError(f"unexpected line from {self.url}{path}: {_snippet(line)}") from None
                if isinstance(event, dict) and event.get("error"):
                    raise HippoError(str(event["error"]))
                yield event
        finally:
            conn.close()

    # -- plumbing ---------------------------------------------------------------------------

    def _open(self, method: str, path: str, body: Mapping[str, Any] | None, read_timeout: float | None):
        cls = http.client.HTTPSConnection if self._https else http.client.HTTPConnection
        conn = cls(self._host, self._port, timeout=CONNECT_TIMEOUT)
        data = None if body is None else json.dumps(body).encode()
        headers = {"Accept": "application/json, application/x-ndjson", "User-Agent": "hippoctl"}
        key = os.environ.get("HIPPO_API_KEY")
        if key:  # the daemon requires it on every route when it has one
            headers["Authorization"] = f"Bearer {key}"
        if data is not None:
            headers["Content-Type"] = "application/json"
        try:
            conn.connect()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise ConnectError(f"could not connect to hippod at {self.url} — is it running? "
                               "(start it with: hippod)") from e
        try:
            conn.sock.settimeout(read_timeout)
            conn.request(method, path, body=data, headers=headers)
            resp = conn.getresponse()
        except (OSError, http.client.HTTPException) as e:
            conn.close()
            raise HippoError(f"lost connection to hippod at {self.url}: {_reason(e)}") from e
        if resp.status >= 400:
            try:
                raw = resp.read()
            except (OSError, http.client.HTTPException):
                raw = b""
            finally:
                conn.close()
            raise HippoError(_error_message(raw, resp.status, resp.reason), resp.status)
        return conn, resp

    def _read(self, read) -> bytes:
        try:
            return read()
        except (OSError, http.client.HTTPException) as e:
            raise HippoError(f"lost connection to hippod at {self.url}: {_reason(e)}") from e


def _error_message(raw: bytes, status: int, reason: str) -> str:
    """The daemon's own `error` text; anything else (a proxy's page, say) as status and snippet."""
    try:
        body = json.loads(raw)
    except ValueError:
        body = None
    if isinstance(body, dict):
        err = body.get("error")
        if isinstance(err, dict):  # OpenAI-shaped
            err = err.get("message")
        if err:
            return str(err)
    text = _snippet(raw)
    return f"{status} {reason}" + (f": {text}" if text else "")


def _snippet(raw: bytes, limit: int = 200) -> str:
    text = raw.decode(errors="replace").strip().replace("\n", " ")
    return text if len(text) <= limit else text[:limit] + "…"


def _reason(e: BaseException) -> str:
    if isinstance(e, socket.timeout):
        return "timed out"
    return str(e) or type(e).__name__
