"""Long jobs say how far they are: counts, time so far, time left; short ones stay quiet."""

from __future__ import annotations

import logging
import types

import torch
from transformers import AutoTokenizer

from moeforge.check.smoke import scan_tensors
from moeforge.io import progress as progress_module
from moeforge.io.files import sha256_file
from moeforge.io.progress import Progress, tracked
from moeforge.runner import run
from moeforge.runtime.generation import generate_all
from moeforge.runtime.layerwise import stream_sequences, streamed_model


def test_a_progress_line_counts_and_estimates(monkeypatch):
    clock = iter([0.0, 6.0, 12.0, 30.0])
    monkeypatch.setattr(progress_module.time, "monotonic", lambda: next(clock))
    p = Progress("gates", 4, "layers")
    assert p.line(6.0) == "gates: 0/4 layers (0%), 6 s so far"
    p.done = 1
    assert p.line(6.0) == "gates: 1/4 layers (25%), 6 s so far, about 18 s left"
    p.done = 4
    assert p.line(30.0) == "gates: 4 layers done in 30 s"


def test_a_short_job_writes_nothing_and_a_long_one_writes_as_it_goes(caplog, monkeypatch):
    caplog.set_level(logging.INFO, logger="moeforge.progress")
    list(tracked(range(3), "quick", 3, "items"))
    assert not caplog.records
    monkeypatch.setattr(progress_module, "EVERY", 0.0)
    list(tracked(range(3), "slow", 3, "items"))
    assert [r.getMessage().split(",")[0] for r in caplog.records] == [
        "slow: 1/3 items (33%)", "slow: 2/3 items (67%)", "slow: 3 items done in 0 s"]


def test_the_layer_streamed_engine_reports_per_layer(base_and_experts, caplog, monkeypatch):
    """Every job that streams a model's layers (gates, smoke test, evaluation, verify) reports through it."""
    caplog.set_level(logging.INFO, logger="moeforge.progress")
    monkeypatch.setattr(progress_module, "EVERY", 0.0)
    stream_sequences(base_and_experts["base"], [torch.tensor([1, 2, 3])])
    lines = [r.getMessage() for r in caplog.records]
    assert lines[0].startswith("base: layer-streamed pass: 1/") and lines[-1].startswith("base: layer-streamed pass: ")
    assert "layers done in" in lines[-1]


def test_generation_reports_per_token_in_the_job_log(base_and_experts, tmp_path, monkeypatch):
    """Greedy generation, a whole forward pass per new token (a streamed one here), reports the tokens so far
    in the job's log: 2 prompts x 3 new tokens, counted for the batch at each step."""
    monkeypatch.setattr(progress_module, "EVERY", 0.0)
    base = base_and_experts["base"]
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    prompts = [torch.tensor([tokenizer("The cat").input_ids]), torch.tensor([tokenizer("Two and two").input_ids])]
    model = streamed_model(base, "cpu", torch.float32)
    log = tmp_path / "smoke.log"
    run(types.SimpleNamespace(log=[log]), lambda _: generate_all(model, prompts, tokenizer, [], 3, name=str(base)))
    lines = [line.split("moeforge: ", 1)[1] for line in log.read_text().splitlines() if "greedy generation" in line]
    assert [line.split(",")[0] for line in lines] == [
        "base: greedy generation: 2/6 new tokens (33%)", "base: greedy generation: 4/6 new tokens (67%)",
        "base: greedy generation: 6 new tokens done in 0 s"]


def test_reading_a_whole_model_reports_the_mib_read(base_and_experts, tmp_path, caplog, monkeypatch):
    """Hashing a file (verify, reproduce, a local source) and the NaN/Inf scan (verify) read every byte."""
    caplog.set_level(logging.INFO, logger="moeforge.progress")
    monkeypatch.setattr(progress_module, "EVERY", 0.0)
    weights = tmp_path / "big.bin"
    weights.write_bytes(bytes(40 << 20))
    sha256_file(weights)
    scan_tensors(base_and_experts["base"])
    lines = [r.getMessage() for r in caplog.records]
    size = (base_and_experts["base"] / "model.safetensors").stat().st_size / (1 << 20)
    assert [line.split(",")[0] for line in lines[:2]] == [
        "sha256 of big.bin: 16/40 MiB hashed (40%)", "sha256 of big.bin: 32/40 MiB hashed (80%)"]
    assert lines[2].startswith("sha256 of big.bin: 40 MiB hashed done in")
    assert lines[-1].startswith(f"base: NaN/Inf scan: {size:.1f} MiB read done in")
