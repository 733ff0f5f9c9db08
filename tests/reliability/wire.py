"""Plain HTTP for hostile tests: any method, any (percent-encoded) target, any body bytes.

http.client rather than a friendly client, so nothing on our side fixes up what we send; raw
sockets where even the request line must carry bytes http.client refuses (invalid UTF-8).
"""

from __future__ import annotations

import http.client
import json
import socket
import time
from dataclasses import dataclass, field


@dataclass
class Answer:
    status: int
    body: bytes
    headers: dict = field(default_factory=dict)
    seconds: float = 0.0

    @property
    def text(self) -> str:
        return self.body.decode(errors="replace")

    def json(self):
        return json.loads(self.body)


def send(port: int, method: str, target: str, body: bytes | None = None, headers: dict | None = None,
         timeout: float = 60.0, chunked: bool = False) -> Answer:
    """One request on its own connection; the whole answer (a stream is read to its end)."""
    t0 = time.monotonic()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        h = {"Content-Type": "application/json", **(headers or {})}
        if chunked and body is not None:
            pieces = [body[i:i + 65536] for i in range(0, len(body), 65536)] or [b""]
            conn.request(method, target, body=iter(pieces), headers=h, encode_chunked=True)
        else:
            conn.request(method, target, body=body, headers=h)
        resp = conn.getresponse()
        try:
            data = resp.read()
        except http.client.IncompleteRead as e:  # the server cut a stream short: keep what came
            data = e.partial
        return Answer(resp.status, data, {k.lower(): v for k, v in resp.getheaders()}, time.monotonic() - t0)
    finally:
        conn.close()


def send_raw(port: int, request: bytes, timeout: float = 30.0) -> Answer:
    """Write `request` as is, read until the server closes; parse only the status line."""
    t0 = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(request)
        data = b""
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.split(b"\r\n")
    try:
        status = int(lines[0].split()[1])
    except (IndexError, ValueError):
        status = 0
    headers = {}
    for line in lines[1:]:
        k, _, v = line.decode("latin-1").partition(":")
        headers[k.strip().lower()] = v.strip()
    return Answer(status, body, headers, time.monotonic() - t0)


def request_bytes(method: str, target: bytes, body: bytes = b"", headers: dict | None = None) -> bytes:
    h = {"Host": "127.0.0.1", "Content-Type": "application/json", "Content-Length": str(len(body)),
         "Connection": "close", **(headers or {})}
    return (method.encode() + b" " + target + b" HTTP/1.1\r\n"
            + b"".join(f"{k}: {v}\r\n".encode() for k, v in h.items()) + b"\r\n" + body)


SERVER_FAULT_MARKERS = ("Traceback", "internal error", 'File "/', "Error handling request")


def problems(answer: Answer, path: str) -> list[str]:
    """What is wrong with an answer to a hostile request (empty when it is a fair answer).

    Fair: any 2xx-4xx, or a 5xx the API promises (502 upstream, 503 busy, 507 no memory) with an
    error body in the route's shape; never a 500, never a traceback or "internal error" anywhere
    in the answer, streams included.
    """
    out = []
    if answer.status == 500 or answer.status >= 600 or answer.status < 100:
        out.append(f"status {answer.status}")
    elif answer.status >= 500 and answer.status not in (502, 503, 507):
        out.append(f"unexpected status {answer.status}")
    text = answer.text
    for marker in SERVER_FAULT_MARKERS:
        if marker in text:
            out.append(f"{marker!r} in the answer")
    ctype = answer.headers.get("content-type", "")
    if answer.status >= 400 and answer.body and "json" in ctype:
        try:
            err = answer.json()["error"]
        except (ValueError, KeyError, TypeError):
            out.append("error answer without an 'error' field")
        else:
            if path.startswith("/v1/"):
                if not (isinstance(err, dict) and isinstance(err.get("message"), str)):
                    out.append("OpenAI error without error.message")
            elif not isinstance(err, str):
                out.append("Ollama error that is not a string")
    elif answer.status >= 400 and answer.body and answer.status not in (400, 401, 403, 404, 405, 413):
        out.append(f"{answer.status} answer that is not JSON ({ctype})")
    return out
