"""Verify one model directory named for verification: lock hashes (model and sources), then the smoke test."""
from pathlib import Path

from moeforge.check.verify import verify_model
from moeforge.runner import run

run(snakemake, lambda s: verify_model(Path(s.params.model), Path(s.output.json).parent,  # noqa: F821
                                      device=s.params.device, max_new_tokens=s.params.max_new_tokens,
                                      dtype=s.params.dtype, memory_gb=s.params.memory_gb,
                                      models_root=Path(s.params.sources)))
