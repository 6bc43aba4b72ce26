"""Shared fixtures: offline settings, a tiny random Llama with a locally trained tokenizer, a fresh store."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402

from bench.fixtures import build_tiny_model  # noqa: E402

ARTIFACTS = os.path.join(os.path.dirname(__file__), "artifacts")


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A 2-layer random Llama and a byte-level BPE tokenizer with a chat template, saved to a folder."""
    return build_tiny_model(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_loaded(tiny_model_dir):
    from playground.serving.models import load_model

    return load_model(str(tiny_model_dir), "cpu")


@pytest.fixture
def store(tmp_path):
    from store import Store

    s = Store(tmp_path / "test.db")
    yield s
    s.close()


@pytest.fixture(scope="session")
def artifacts_dir():
    os.makedirs(ARTIFACTS, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def bundled_loaded():
    """The real bundled SmolLM2-135M-Instruct (converted once into data/models, like `make run`)."""
    from playground.serving.models import load_model

    return load_model("bundled", "cpu")
