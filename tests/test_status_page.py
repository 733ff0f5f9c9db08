"""GET / : the status page for browsers (checked in headless Chromium), "Ollama is running" for APIs."""

from __future__ import annotations

import os
import shutil
import struct
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.browser import FLAGS as BROWSER_FLAGS
from tests.browser import chromium

TINY = "tiny:latest"


def get(url: str, accept: str | None = None, method: str = "GET") -> tuple[int, str, str]:
    headers = {"Accept": accept} if accept is not None else {}
    with urllib.request.urlopen(urllib.request.Request(url, headers=headers, method=method), timeout=30) as r:
        return r.status, r.headers.get("Content-Type", ""), r.read().decode()


def browse(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    profile = tmp_path / f"profile-{len(list(tmp_path.glob('profile-*')))}"
    profile.mkdir()
    return subprocess.run([chromium(), *BROWSER_FLAGS, f"--user-data-dir={profile}", *args],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="module")
def served(tmp_path_factory, tiny_model_dir):
    """A daemon with the tiny model loaded and one audited request."""
    from tests.daemon import Daemon

    with Daemon(tmp_path_factory.mktemp("page")) as d:
        status, body = d.request("POST", "/api/create", {"model": "tiny", "from": str(tiny_model_dir), "stream": False})
        assert status == 200, body
        status, body = d.request("POST", "/api/generate", {"model": "tiny", "prompt": "hi", "stream": False,
                                                           "options": {"num_predict": 4}})
        assert status == 200, body
        yield d


def test_api_clients_still_get_ollama_is_running(served):
    for accept in (None, "*/*", "application/json", "text/plain", "application/json, text/html;q=0.5"):
        status, ctype, body = get(served.url + "/", accept)
        assert (status, body) == (200, "Ollama is running"), accept
        assert ctype.startswith("text/plain")
    assert get(served.url + "/", "text/html", method="HEAD")[0] == 200


@pytest.mark.slow
def test_browsers_get_the_status_page(served):
    accept = "text/html,application/xhtml+xml,application/xml;q=0.9,image/avif,image/webp,*/*;q=0.8"
    status, ctype, page = get(served.url + "/", accept)
    assert status == 200 and ctype.startswith("text/html")
    assert '<meta http-equiv="refresh" content="5">' in page
    assert f"<td>{TINY}</td>" in page  # loaded models
    assert "/api/generate" in page and "<th>Source</th>" in page  # recent requests, how each got its model
    assert f"<td>{TINY}</td><td>local</td>" in page
    assert "no peers found" in page
    assert "budget" in page and "<script" not in page and len(page) < 20_000
    assert '<a href="/ui"' in page  # the chat page


@pytest.mark.slow
def test_status_page_in_headless_chromium(served, tmp_path):
    if chromium() is None:
        pytest.skip("no chromium on this machine (Debian: apt-get install -y chromium)")
    dom = browse(tmp_path, "--dump-dom", served.url + "/")
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "hippo on " in dom.stdout and TINY in dom.stdout and "Loaded models" in dom.stdout
    shot = tmp_path / "status.png"
    run = browse(tmp_path, f"--screenshot={shot}", "--window-size=1100,700", served.url + "/")
    assert run.returncode == 0 and shot.is_file(), run.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1100, 700) and len(data) > 10_000  # a rendered page, not a blank one
    keep = os.environ.get("HIPPO_TEST_SCREENSHOT")
    if keep:  # for a human (or a reviewer) to look at
        shutil.copy(shot, keep)
