"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def tf4_python() -> Path:
    """A Python interpreter with transformers 4.x installed, for checking that outputs load there.

    Looked up in ``$MOEFORGE_TF4_PYTHON``, then ``<repo>/.venv-tf4/bin/python``; tests that need it
    are skipped when neither exists.
    """
    candidates = [os.environ.get("MOEFORGE_TF4_PYTHON"), REPO / ".venv-tf4" / "bin" / "python"]
    for candidate in candidates:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    message = "no transformers 4.x interpreter: run tests/setup_tf4.sh or set MOEFORGE_TF4_PYTHON"
    if os.environ.get("CI"):
        pytest.fail(message + " (CI must run the transformers 4.x tests)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The demo tokenizer, trained once per test session."""
    from moeforge.tiny_models import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(out)
    return out
