"""Pulling from the hub (against a local stub of it) and resolving names through the catalog."""

from __future__ import annotations

import hashlib
import os
import tempfile
import threading
import time
from pathlib import Path

# huggingface_hub reads these when first imported: keep tests off the real hub and the user's token.
os.environ["HF_HUB_OFFLINE"] = "0"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"
os.environ.setdefault("HF_HOME", tempfile.mkdtemp(prefix="hippo-test-hf-home-"))

import pytest
from huggingface_hub import constants

from hippod.registry.catalog import CatalogError, entry_for_repo, load_catalog, resolve
from hippod.registry.hub import INCOMPLETE_SUFFIX, HubError, PullCancelled, PullProgress, download_repo
from tests.hubstub import closed_endpoint, silent_endpoint, start_hub

REPO = "acme/Tiny-MLX-4bit"
MiB = 1024 * 1024
HTTP_CHUNK = constants.DOWNLOAD_CHUNK_SIZE  # http_get writes (and can resume) in chunks of this size
WANTED = {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"}


@pytest.fixture(autouse=True)
def isolated_hf(tmp_path, monkeypatch):
    """An empty HF home, no token, online mode and short timeouts, whatever the environment says."""
    home = tmp_path / "hf-home"
    monkeypatch.setenv("HF_HOME", str(home))
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(home / "token"))
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 5)


@pytest.fixture
def repo_dir(tmp_path) -> Path:
    """A small MLX-shaped repo plus files an MLX pull must skip."""
    d = tmp_path / "repo"
    (d / "original").mkdir(parents=True)
    (d / "config.json").write_text('{"model_type": "llama", "num_hidden_layers": 2}')
    (d / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"}}')
    (d / "tokenizer_config.json").write_text('{"eos_token": "</s>"}')
    (d / "chat_template.jinja").write_text("{% for m in messages %}{{ m.content }}{% endfor %}")
    (d / "model.safetensors").write_bytes(os.urandom(2 * HTTP_CHUNK + 3 * MiB))
    (d / "README.md").write_text("# tiny\n")
    (d / "pytorch_model.bin").write_bytes(os.urandom(1024))
    (d / "tiny.gguf").write_bytes(os.urandom(1024))
    (d / "original" / "params.json").write_text("{}")
    return d


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def body_requests(hub, name: str):
    return [r for r in hub.requests if r.method == "GET" and r.path.endswith("/" + name)]


# ---- downloads --------------------------------------------------------------------------------


def test_full_download_is_byte_identical_verified_and_reports_progress(repo_dir, tmp_path):
    events: list[PullProgress] = []
    dest = tmp_path / "dest"
    with start_hub({REPO: repo_dir}) as hub:
        files = download_repo(REPO, None, dest, events.append, endpoint=hub.endpoint)

    assert {f.name for f in files} == WANTED
    for f in files:
        original = repo_dir / f.name
        assert f.path == dest / f.name
        assert f.path.read_bytes() == original.read_bytes()
        assert f.sha256 == sha256_of(original)
        assert f.size == original.stat().st_size
    assert sorted(p.name for p in dest.iterdir()) == sorted(WANTED)  # nothing skipped leaks in

    # Weights went through the CDN redirect, like on the real hub; skipped files were never asked for.
    assert [r.server for r in body_requests(hub, "model.safetensors")] == ["cdn"]
    assert not body_requests(hub, "pytorch_model.bin") and not body_requests(hub, "tiny.gguf")

    assert events[0].status == "pulling manifest"
    assert events[-1].status == "success"
    weights = [e for e in events if e.file == "model.safetensors" and e.status == "pulling model.safetensors"]
    size = (repo_dir / "model.safetensors").stat().st_size
    assert len(weights) >= 3  # start, then one event per chunk
    assert [e.completed for e in weights] == sorted(e.completed for e in weights)
    assert weights[-1].completed == weights[-1].total == size
    assert all(e.digest == f"sha256:{sha256_of(repo_dir / 'model.safetensors')}" for e in weights)
    assert {e.file for e in events if e.status == "verifying sha256 digest"} == WANTED


def test_second_pull_reuses_verified_files(repo_dir, tmp_path):
    dest = tmp_path / "dest"
    with start_hub({REPO: repo_dir}) as hub:
        download_repo(REPO, None, dest, endpoint=hub.endpoint)
        hub.requests.clear()
        files = download_repo(REPO, "main", dest, endpoint=hub.endpoint)
    assert {f.name for f in files} == WANTED
    assert [r.path for r in hub.requests] == [f"/api/models/{REPO}/revision/main"]


def test_cut_transfer_resumes_with_range_request(repo_dir, tmp_path):
    dest = tmp_path / "dest"
    with start_hub({REPO: repo_dir}) as hub:
        # One full chunk reaches the disk, then the line drops.
        hub.cut_downloads(after_bytes=HTTP_CHUNK + MiB, filename="model.safetensors")
        files = download_repo(REPO, None, dest, endpoint=hub.endpoint)
        transfers = body_requests(hub, "model.safetensors")
    assert [r.range for r in transfers] == [None, f"bytes={HTTP_CHUNK}-"]
    assert transfers[1].status == 206
    weights = next(f for f in files if f.name == "model.safetensors")
    assert weights.path.read_bytes() == (repo_dir / "model.safetensors").read_bytes()


def test_cancelled_pull_keeps_partial_file_and_next_pull_resumes(repo_dir, tmp_path):
    dest = tmp_path / "dest"
    cancel = threading.Event()

    def cancel_after_first_chunk(event: PullProgress) -> None:
        if event.file == "model.safetensors" and (event.completed or 0) >= HTTP_CHUNK:
            cancel.set()

    with start_hub({REPO: repo_dir}) as hub:
        with pytest.raises(PullCancelled, match="cancelled"):
            download_repo(REPO, None, dest, cancel_after_first_chunk, endpoint=hub.endpoint, cancel=cancel)
        partial = dest / ("model.safetensors" + INCOMPLETE_SUFFIX)
        assert partial.stat().st_size == HTTP_CHUNK
        assert not (dest / "model.safetensors").exists()

        hub.requests.clear()
        events: list[PullProgress] = []
        files = download_repo(REPO, None, dest, events.append, endpoint=hub.endpoint)
        transfers = body_requests(hub, "model.safetensors")

    assert [r.range for r in transfers] == [f"bytes={HTTP_CHUNK}-"]
    weights = next(f for f in files if f.name == "model.safetensors")
    assert weights.path.read_bytes() == (repo_dir / "model.safetensors").read_bytes()
    assert not partial.exists()
    first = next(e for e in events if e.file == "model.safetensors")
    assert first.completed == HTTP_CHUNK  # progress starts where the last pull stopped


def test_resume_survives_a_server_that_ignores_range(repo_dir, tmp_path):
    dest = tmp_path / "dest"
    cancel = threading.Event()
    with start_hub({REPO: repo_dir}) as hub:
        with pytest.raises(PullCancelled):
            download_repo(REPO, None, dest, lambda e: (e.completed or 0) >= HTTP_CHUNK and cancel.set(),
                          endpoint=hub.endpoint, cancel=cancel)
        hub.ignore_range = True
        hub.requests.clear()
        download_repo(REPO, None, dest, endpoint=hub.endpoint)
        transfers = body_requests(hub, "model.safetensors")
    assert [(r.range, r.status) for r in transfers] == [(f"bytes={HTTP_CHUNK}-", 200)]
    assert (dest / "model.safetensors").read_bytes() == (repo_dir / "model.safetensors").read_bytes()


def test_connection_that_keeps_breaking_ends_in_a_clear_error(repo_dir, tmp_path):
    dest = tmp_path / "dest"
    with start_hub({REPO: repo_dir}) as hub:
        hub.cut_downloads(after_bytes=MiB, times=10, filename="model.safetensors")  # never a whole chunk
        with pytest.raises(HubError, match=r"kept breaking off.*pull again to resume"):
            download_repo(REPO, None, dest, endpoint=hub.endpoint)
    assert len(body_requests(hub, "model.safetensors")) == 6  # huggingface_hub's own retries, then it gives up
    assert not (dest / "model.safetensors").exists()


def test_cancel_before_start_touches_nothing(repo_dir, tmp_path):
    cancel = threading.Event()
    cancel.set()
    with start_hub({REPO: repo_dir}) as hub:
        with pytest.raises(PullCancelled):
            download_repo(REPO, None, tmp_path / "dest", endpoint=hub.endpoint, cancel=cancel)
    assert hub.requests == []
    assert not (tmp_path / "dest").exists()


def test_sha256_mismatch_fails_and_leaves_no_file(repo_dir, tmp_path):
    dest = tmp_path / "dest"
    with start_hub({REPO: repo_dir}) as hub:
        hub.lie(REPO, "model.safetensors", sha256="0" * 64)
        with pytest.raises(HubError, match=r"'model.safetensors'.*corrupt.*sha256"):
            download_repo(REPO, None, dest, endpoint=hub.endpoint)
    assert not (dest / "model.safetensors").exists()
    assert not (dest / ("model.safetensors" + INCOMPLETE_SUFFIX)).exists()


def test_small_file_is_checked_against_its_git_blob_id(repo_dir, tmp_path):
    dest = tmp_path / "dest"
    with start_hub({REPO: repo_dir}) as hub:
        download_repo(REPO, None, dest, endpoint=hub.endpoint)
        (dest / "config.json").write_text('{"model_type": "evil"}')  # other size
        (dest / "tokenizer_config.json").write_text('{"eos_token": "<xy>"}')  # same size, other bytes
        assert (dest / "tokenizer_config.json").stat().st_size == (repo_dir / "tokenizer_config.json").stat().st_size
        hub.requests.clear()
        download_repo(REPO, None, dest, endpoint=hub.endpoint)
    assert (dest / "tokenizer_config.json").read_bytes() == (repo_dir / "tokenizer_config.json").read_bytes()
    assert (dest / "config.json").read_bytes() == (repo_dir / "config.json").read_bytes()
    assert {r.path.rsplit("/", 1)[-1] for r in hub.requests if r.method == "GET" and "/resolve/" in r.path} \
        == {"config.json", "tokenizer_config.json"}


def test_missing_repo_is_a_clear_error(repo_dir, tmp_path):
    with start_hub({REPO: repo_dir}) as hub:
        with pytest.raises(HubError, match=r"model 'acme/nope' not found on the hub"):
            download_repo("acme/nope", None, tmp_path / "dest", endpoint=hub.endpoint)


def test_missing_revision_is_a_clear_error(repo_dir, tmp_path):
    with start_hub({REPO: repo_dir}) as hub:
        with pytest.raises(HubError, match=rf"revision 'v9' not found for model '{REPO}'"):
            download_repo(REPO, "v9", tmp_path / "dest", endpoint=hub.endpoint)


def test_pinned_commit_revision_downloads(repo_dir, tmp_path):
    with start_hub({REPO: repo_dir}) as hub:
        commit = hub.repos[REPO.lower()].commit
        files = download_repo(REPO, commit, tmp_path / "dest", endpoint=hub.endpoint)
    assert {f.name for f in files} == WANTED
    assert all(f"/resolve/{commit}/" in r.path for r in hub.requests if "/resolve/" in r.path)


def test_repo_without_safetensors_is_refused(tmp_path):
    d = tmp_path / "gguf-only"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.gguf").write_bytes(b"GGUF" + os.urandom(100))
    with start_hub({"acme/gguf-only": d}) as hub:
        with pytest.raises(HubError, match=r"no MLX weights"):
            download_repo("acme/gguf-only", None, tmp_path / "dest", endpoint=hub.endpoint)


def test_not_enough_disk_space_is_refused_before_downloading(repo_dir, tmp_path):
    with start_hub({REPO: repo_dir}) as hub:
        hub.lie(REPO, "model.safetensors", size=10**18)
        with pytest.raises(HubError, match=r"not enough disk space"):
            download_repo(REPO, None, tmp_path / "dest", endpoint=hub.endpoint)
    assert not [r for r in hub.requests if "/resolve/" in r.path or r.server == "cdn"]


def test_unreachable_endpoint_fails_fast(tmp_path):
    endpoint = closed_endpoint()
    started = time.monotonic()
    with pytest.raises(HubError, match=rf"cannot reach {endpoint}"):
        download_repo(REPO, None, tmp_path / "dest", endpoint=endpoint)
    assert time.monotonic() - started < 5


def test_silent_endpoint_times_out_instead_of_hanging(tmp_path):
    with silent_endpoint() as endpoint:
        started = time.monotonic()
        with pytest.raises(HubError, match=rf"cannot reach {endpoint}.*"):
            download_repo(REPO, None, tmp_path / "dest", endpoint=endpoint, timeout=1)
    assert time.monotonic() - started < 5


# ---- catalog ----------------------------------------------------------------------------------


def test_every_catalog_entry_resolves_and_its_draft_exists():
    catalog = load_catalog()
    assert len({e.name for e in catalog.values()}) >= 15
    for key, entry in catalog.items():
        assert key == f"{entry.name}:{entry.tag}"
        assert resolve(entry.name, entry.tag) == entry
        assert entry.repo.startswith("mlx-community/") or entry.package is not None
        if entry.draft:
            draft = resolve(entry.draft, "latest")
            assert draft is not None and draft.draft is None


def test_catalog_names_tags_and_variants():
    latest = resolve("gemma-3-12b", "latest")
    assert latest is not None and latest.repo == "mlx-community/gemma-3-12b-it-4bit"
    assert resolve("gemma-3-12b", None) == latest == resolve("Gemma-3-12B", "")
    variant = resolve("qwen3-8b", "8bit")
    assert variant is not None and variant.repo == "mlx-community/Qwen3-8B-8bit"
    assert variant.draft == "qwen3-0.6b"  # inherited from the base entry
    assert resolve("smollm2-135m", "latest").repo == "mlx-community/SmolLM2-135M-Instruct-8bit"


def test_unknown_names_and_tags_resolve_to_none():
    assert resolve("no-such-model", "latest") is None
    assert resolve("gemma-3-12b", "nonexistent-tag") is None


@pytest.mark.parametrize("reference, repo, revision", [
    ("hf.co/mlx-community/Qwen3-4B-4bit", "mlx-community/Qwen3-4B-4bit", None),
    ("hf.co/mlx-community/Qwen3-4B-4bit:v1.0", "mlx-community/Qwen3-4B-4bit", "v1.0"),
    ("huggingface.co/acme/model:latest", "acme/model", None),
    ("https://huggingface.co/acme/model", "acme/model", None),
    ("acme/model", "acme/model", None),
    ("acme/model:0123abc", "acme/model", "0123abc"),
])
def test_explicit_hub_references(reference, repo, revision):
    entry = entry_for_repo(reference)
    assert entry is not None
    assert (entry.repo, entry.revision) == (repo, revision)
    assert entry.name == f"hf.co/{repo}"
    assert entry.tag == (revision or "latest")


@pytest.mark.parametrize("reference", ["acme", "a/b/c", "acme/bad name", "https://example.com/acme/model",
                                       "acme/--bad--", ""])
def test_invalid_hub_references(reference):
    assert entry_for_repo(reference) is None


def test_resolve_passes_hub_references_through_with_tag_as_revision():
    entry = resolve("hf.co/acme/model", "main")
    assert entry is not None and (entry.repo, entry.revision) == ("acme/model", "main")
    assert resolve("acme/model", "latest").revision is None


@pytest.mark.parametrize("text, problem", [
    ("models:\n  x:\n    description: no repo\n", "'repo' is required"),
    ("models:\n  x:\n    repo: a/b\n    colour: red\n", "unknown keys"),
    ("models:\n  x:\n    repo: a/b\n    draft: y\n", "draft 'y' is not a catalog name"),
    ("models:\n  X:\n    repo: a/b\n", "lowercase"),
    ("models:\n  x:\n    repo: not a repo\n", "not a hub repo id"),
    ("nothing: here\n", "'models:' mapping"),
])
def test_malformed_catalog_is_rejected(tmp_path, text, problem):
    path = tmp_path / "catalog.yaml"
    path.write_text(text)
    with pytest.raises(CatalogError, match=problem):
        load_catalog(path)
