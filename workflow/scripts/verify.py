"""Verify every model directory named for verification: lock hashes (model and sources), then the smoke test."""
from pathlib import Path

from moeforge.check.verify import verify_model
from moeforge.runner import run


def main(s):
    for name, model in s.params.models.items():
        verify_model(Path(model), Path("results/verify") / name, device=s.params.device,
                     max_new_tokens=s.params.max_new_tokens, dtype=s.params.dtype, memory_gb=s.params.memory_gb,
                     models_root=Path(s.params.sources))


run(snakemake, main)  # noqa: F821
