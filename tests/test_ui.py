"""The chat page at /ui, driven in headless Chromium against a real hippod with an API key.

It asks for the key once, lists the models, streams an answer from the real SmolLM2, stops a
generation, regenerates an answer, pulls a model with a progress bar, and shows what is loaded,
the nodes and a split's layers. A screenshot is kept ($HIPPO_TEST_SCREENSHOT_DIR) to look at.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import struct
import time

import pytest

from bench.models import cache_dir
from tests.browser import Browser, chromium
from tests.hubstub import start_hub
from tests.test_auth import KeyedDaemon, call

KEY = "ui-test-key"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory, smol_gguf, tiny_model_dir):
    """A daemon with an API key, SmolLM2 pulled, and a hub stand-in holding a tiny model."""
    with start_hub({"acme/tiny-ui": tiny_model_dir}) as hub:
        env = {"HIPPO_CACHE_DIR": str(cache_dir()), "HF_ENDPOINT": hub.endpoint,
               "HF_HUB_DISABLE_TELEMETRY": "1", "HIPPO_ALLOWED_HOSTS": "hippo.lan"}
        with KeyedDaemon(tmp_path_factory.mktemp("ui-home"), key=KEY, env=env) as d:
            status, body = d.request("POST", "/api/pull", {"model": "smollm2", "stream": False},
                                     timeout=300)[:2]
            assert status == 200, body
            yield d


def test_the_page_is_served_without_the_key_and_nothing_else_is(keyed):
    status, page, headers = call(keyed.url, "GET", "/ui")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]
    assert "connect-src 'self'" in headers["Content-Security-Policy"]
    assert 'id="messages"' in page and "/api/chat" in page and "localStorage" in page
    assert call(keyed.url, "GET", "/api/tags")[0] == 401
    assert call(keyed.url, "POST", "/ui", {})[0] == 401
    status, html, _ = call(keyed.url, "GET", "/", key=KEY, headers={"Accept": "text/html"})
    assert status == 200 and 'href="/ui"' in html  # the status page links to the chat


def test_the_page_works_under_any_name_the_daemon_answers_to(keyed):
    """Opened from another Mac as http://hippo.lan:11434/ui, the page's own calls carry that
    Origin: same-origin, so allowed; another site's Origin still is not."""
    host = f"hippo.lan:{keyed.port}"
    own = {"Host": host, "Origin": f"http://{host}"}
    status, body, _ = call(keyed.url, "POST", "/api/show", {"model": "smollm2"}, key=KEY, headers=own)
    assert status == 200, body
    for origin in ("http://evil.example", f"http://hippo.lan:{keyed.port + 1}", f"https://{host}"):
        status, body, _ = call(keyed.url, "POST", "/api/show", {"model": "smollm2"}, key=KEY,
                               headers={"Host": host, "Origin": origin})
        assert status == 403 and "not allowed" in str(body), (origin, body)
    assert call(keyed.url, "GET", "/ui", headers={"Host": "evil.example"})[0] == 403  # rebinding


# The last answer once it is finished: its text and its stats line ("stopped" after Stop).
LAST_ANSWER = ("(() => { const b = [...document.querySelectorAll('.msg.assistant')].pop();"
               " return b && b.dataset.done === '1' ? {text: b.querySelector('.content').textContent,"
               " stats: [...b.querySelectorAll('.stats')].map(s => s.textContent).join('|')} : null })()")


async def _chat_scenario(d: KeyedDaemon, tmp_path, shot_path):
    async with Browser(tmp_path / "profile") as page:
        await page.goto(d.url + "/ui")
        # the key is asked for once; a wrong one is refused and asked again
        await page.wait("document.getElementById('keyform').classList.contains('shown')", 30, "the key form")
        await page.eval("document.getElementById('apikey').value = 'wrong';"
                        "document.querySelector('#keyform form').requestSubmit()")
        await page.wait("document.getElementById('keyerror').textContent.includes('refused')", 30)
        await page.eval(f"document.getElementById('apikey').value = '{KEY}';"
                        "document.querySelector('#keyform form').requestSubmit()")
        models = await page.wait("[...document.getElementById('model').options].map(o => o.value)"
                                 ".filter(Boolean).join(',')", 30, "the model list")
        assert "smollm2:latest" in models.split(","), models
        assert await page.eval("localStorage.getItem('hippo.apiKey')") == KEY

        # ask a question; the answer streams from the real model
        await page.eval("document.getElementById('model').value = 'smollm2:latest';"
                        "document.getElementById('temperature').value = '0';"
                        "document.getElementById('num_predict').value = '12';"
                        "document.getElementById('prompt').value = 'What is the capital of France?';"
                        "document.getElementById('composer').requestSubmit()")
        await page.wait("document.getElementById('stop').disabled === false", 30, "the stop button")
        answer = await page.wait(LAST_ANSWER, 180, "the answer")
        assert "Paris" in answer["text"] and "tok/s" in answer["stats"], answer
        loaded = await page.wait("document.getElementById('loaded').textContent.includes('smollm2:latest')"
                                 " && document.getElementById('loaded').textContent", 15, "the loaded list")
        assert "cpu" in loaded or "gpu" in loaded
        nodes = await page.wait("document.getElementById('nodes').querySelector('.item')?.textContent", 15)
        assert "this node" in nodes
        await page.screenshot(shot_path)

        # regenerate replaces the last answer (same settings: the same answer again)
        await page.eval("document.getElementById('regenerate').click()")
        await page.wait("document.querySelector('.msg.assistant')?.dataset.done !== '1'", 10)
        again = await page.wait(LAST_ANSWER, 180, "the regenerated answer")
        assert again["text"] == answer["text"]
        assert await page.eval("document.querySelectorAll('.msg.assistant').length") == 1
        assert await page.eval("document.querySelectorAll('.msg.user').length") == 1

        # stop a long generation after its first tokens
        await page.eval("document.getElementById('temperature').value = '1';"
                        "document.getElementById('num_predict').value = '2000';"
                        "document.getElementById('prompt').value = 'Tell me a very long story.';"
                        "document.getElementById('composer').requestSubmit()")
        await page.wait("(() => { const b = [...document.querySelectorAll('.msg.assistant')].pop();"
                        " return b && b !== document.querySelector('.msg.assistant')"
                        " && b.querySelector('.content').textContent.length > 0 })()", 120, "the first tokens")
        await page.eval("document.getElementById('stop').click()")
        stopped = await page.wait(LAST_ANSWER, 30, "the stopped answer")
        assert stopped["stats"] == "stopped", stopped
        assert await page.eval("document.getElementById('send').disabled") is False
        deadline = time.monotonic() + 20  # the daemon cancelled it: the model is idle again
        while d.request("GET", "/api/ps")[1]["models"][0]["hippo"]["busy"]:
            assert time.monotonic() < deadline, "the generation went on after Stop"
            await asyncio.sleep(0.3)

        # a reload keeps the key: not asked again
        await page.goto(d.url + "/ui")
        await page.wait("document.body.dataset.ready === '1'", 30)
        await page.wait("[...document.getElementById('model').options].some(o => o.value === 'smollm2:latest')", 30)
        assert not await page.eval("document.getElementById('keyform').classList.contains('shown')")

        # pull from the hub stand-in with a progress bar
        await page.eval("document.getElementById('pullname').value = 'hf.co/acme/tiny-ui';"
                        "document.getElementById('pullform').requestSubmit()")
        await page.wait("document.getElementById('pullstatus').textContent === 'success'", 120, "the pull")
        bar = await page.eval("(() => { const b = document.getElementById('pullbar');"
                              " return {hidden: b.hidden, value: b.value, max: b.max} })()")
        assert bar == {"hidden": False, "value": 1, "max": 1}, bar
        await page.wait("document.getElementById('model').value === 'hf.co/acme/tiny-ui:latest'", 10)

        # a split model's layers per node, and the layers this node runs for a peer
        text = await page.eval(
            "renderLoaded({models: [{name: 'big:latest', size: 8e9, hippo: {device: 'gpu', split: ["
            "{node: 'alpha', layers: [0, 16], bytes: 4e9}, {node: 'beta', layers: [16, 32], bytes: 4e9}]}}],"
            " hippo: {hosted: [{model: 'huge:latest', layers: [10, 20], rank: 1, world: 2, bytes: 2e9}]}});"
            " document.getElementById('loaded').textContent")
        assert "alpha: layers 0-15 (4.0 GB)" in text and "beta: layers 16-31" in text, text
        assert "layers 10-19 here, rank 1 of 2" in text, text

        # a reasoning model's stream (Ollama's message.thinking) is shown apart from the answer;
        # this one stream is played from a recording, as no reasoning model is small enough here
        await page.eval(
            "window.realFetch = window.fetch; window.fetch = async (path, init) => path !== '/api/chat'"
            " ? realFetch(path, init) : new Response(["
            "{message: {role: 'assistant', content: '', thinking: 'The user wants '}},"
            "{message: {role: 'assistant', content: '', thinking: 'a number.'}},"
            "{message: {role: 'assistant', content: '42'}},"
            "{message: {role: 'assistant', content: ''}, done: true, done_reason: 'stop', eval_count: 3,"
            " eval_duration: 1e8}].map(JSON.stringify).join('\\n') + '\\n');"
            "document.getElementById('prompt').value = 'Pick a number.';"
            "document.getElementById('composer').requestSubmit()")
        shown = await page.wait(LAST_ANSWER, 10, "the reasoning answer")
        assert shown["text"] == "42", shown
        thinking = await page.eval("[...document.querySelectorAll('.msg.assistant')].pop()"
                                   ".querySelector('details.thinking').textContent")
        assert thinking == "ThinkingThe user wants a number.", thinking
        await page.eval("window.fetch = window.realFetch")


@pytest.mark.slow
def test_chat_page_in_headless_chromium(keyed, tmp_path):
    if chromium() is None:
        pytest.skip("no chromium on this machine (Debian: apt-get install -y chromium)")
    shot = tmp_path / "chat.png"
    asyncio.run(_chat_scenario(keyed, tmp_path, shot))
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", data[16:24]) == (1200, 760) and len(data) > 20_000
    keep = os.environ.get("HIPPO_TEST_SCREENSHOT_DIR")
    if keep:  # for a human (or a reviewer) to look at
        shutil.copy(shot, os.path.join(keep, "chat.png"))
