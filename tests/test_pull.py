"""`pull` through a real hippod against a local stand-in of the Hugging Face hub (HF_ENDPOINT)."""

from __future__ import annotations

import hashlib

import ollama
import pytest

from tests.hubstub import start_hub
from tests.modelfiles import make_tiny_llama

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_repo(tmp_path_factory):
    return make_tiny_llama(tmp_path_factory.mktemp("repo") / "tiny", seed=7)


def test_pull_catalog_name_from_hub(tiny_repo, daemon_factory):
    # The catalog maps smollm2-135m to this repo; the stub serves a tiny llama under its name.
    with start_hub({"mlx-community/SmolLM2-135M-Instruct-8bit": tiny_repo}) as hub:
        d = daemon_factory("a", env={"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_TELEMETRY": "1"})
        client = ollama.Client(host=d.url)
        events = list(client.pull("smollm2-135m", stream=True))
        statuses = [e.status for e in events]
        assert statuses[0] == "pulling manifest" and statuses[-1] == "success"
        completed = [e.completed for e in events if e.completed is not None and e.total]
        assert completed and completed[-1] > 0
    models = {m.model: m for m in client.list().models}
    assert "smollm2-135m:latest" in models
    # Files recorded by sha256 are byte-identical to the repo's.
    _, shown = d.request("POST", "/api/show", {"model": "smollm2-135m"})
    files = {f["name"]: f for f in shown["hippo"]["files"]}
    src = tiny_repo / "model.safetensors"
    assert files["model.safetensors"]["sha256"] == hashlib.sha256(src.read_bytes()).hexdigest()
    assert (d.home / "blobs" / f"sha256-{files['model.safetensors']['sha256']}").read_bytes() == src.read_bytes()
    # And the pulled model serves.
    r = client.generate(model="smollm2-135m", prompt="hi", options={"num_predict": 3, "temperature": 0})
    assert r.eval_count == 3


def test_pull_explicit_repo_and_errors(tiny_repo, daemon_factory):
    with start_hub({"acme/Tiny-Model": tiny_repo}) as hub:
        d = daemon_factory("b", env={"HF_ENDPOINT": hub.endpoint})
        client = ollama.Client(host=d.url)
        client.pull("hf.co/acme/Tiny-Model")
        assert "hf.co/acme/tiny-model:latest" in {m.model for m in client.list().models}
        with pytest.raises(ollama.ResponseError) as e:
            client.pull("hf.co/acme/does-not-exist")
        assert "not found" in e.value.error
        with pytest.raises(ollama.ResponseError) as e:
            client.pull("not-in-the-catalog")
        assert e.value.status_code == 404 or "not in the catalog" in e.value.error
    # Hub gone: a clear error, quickly, and the daemon lives on.
    status, body = d.request("POST", "/api/pull", {"model": "hf.co/acme/other", "stream": False}, timeout=60)
    assert status >= 400 and "cannot reach" in body["error"]
    assert d.ping()


def test_interrupted_pull_resumes(tmp_path, daemon_factory):
    tiny_repo = make_tiny_llama(tmp_path / "wide", hidden_size=128, seed=3)
    with start_hub({"acme/tiny": tiny_repo}) as hub:
        d = daemon_factory("c", env={"HF_ENDPOINT": hub.endpoint})
        size = (tiny_repo / "model.safetensors").stat().st_size
        # The hub client writes 10 MiB chunks: cut after the first so there is something to resume.
        assert size > 11 * 2**20
        hub.cut_downloads(after_bytes=size - 2**19, times=1, filename="model.safetensors")
        client = ollama.Client(host=d.url)
        client.pull("hf.co/acme/tiny")
        assert hub.range_requests(), "the cut transfer was not resumed with a Range request"
    _, shown = d.request("POST", "/api/show", {"model": "hf.co/acme/tiny"})
    sha = {f["name"]: f["sha256"] for f in shown["hippo"]["files"]}["model.safetensors"]
    assert sha == hashlib.sha256((tiny_repo / "model.safetensors").read_bytes()).hexdigest()
