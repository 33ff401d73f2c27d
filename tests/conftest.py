"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def required_tool(env: str, candidates: list[Path], setup: str, what: str) -> Path:
    """An executable the tests need: ``$env``, else the first of ``candidates`` that exists.

    Tests that need it are skipped when none exists, except under CI, which must run them.
    """
    for candidate in [os.environ.get(env), *candidates]:
        if candidate and Path(candidate).is_file():
            return Path(candidate)
    message = f"no {what}: run {setup} or set {env}"
    if os.environ.get("CI"):
        pytest.fail(f"{message} (CI must run the tests that use it)")
    pytest.skip(message)


@pytest.fixture(scope="session")
def tf4_python() -> Path:
    """A Python interpreter with transformers 4.x installed, for checking that outputs load there."""
    return required_tool("MOEFORGE_TF4_PYTHON", [REPO / ".venv-tf4" / "bin" / "python"], "tests/setup_tf4.sh",
                         "transformers 4.x interpreter")


@pytest.fixture(scope="session")
def mergekit_moe() -> Path:
    """mergekit-moe 0.1.5, which makes the published merges the rebuild tests compare against."""
    return required_tool("MOEFORGE_MERGEKIT_MOE", [REPO / ".venv-mergekit" / "bin" / "mergekit-moe",
                                                   REPO / "benchmarks" / ".peer-venv" / "bin" / "mergekit-moe"],
                         "tests/setup_mergekit.sh", "mergekit-moe")


@pytest.fixture(scope="session")
def llamacpp_converter() -> Path:
    """llama.cpp's converter directory, when llama-cpp-python is installed beside it (tests/setup_llamacpp.sh)."""
    import importlib.util
    import sys

    default = Path(sys.prefix) / "share" / "llama.cpp-convert" / "convert_hf_to_gguf.py"
    candidates = [default] if importlib.util.find_spec("llama_cpp") else []
    return required_tool("MOEFORGE_LLAMACPP_CONVERTER", candidates, "tests/setup_llamacpp.sh",
                         "llama-cpp-python with llama.cpp's converter").parent


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """The demo tokenizer, trained once per test session."""
    from moeforge.demo.tiny_models import train_tokenizer

    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(out)
    return out


@pytest.fixture(scope="session")
def base_and_experts(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    """A tiny seeded Llama base and two experts derived from it (MLP noise), shared read-only by tests."""
    from moeforge.demo.tiny_models import build_dense_model

    root = tmp_path_factory.mktemp("base_and_experts")
    base = build_dense_model(root / "base", "llama", seed=0, tokenizer_dir=tokenizer_dir)
    return {"base": base, **{f"e{i}": build_dense_model(root / f"e{i}", derive_from=base, seed=20 + i, mlp_noise=0.05)
                             for i in range(2)}}
