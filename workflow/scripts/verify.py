"""Verify one model directory named for verification: lock hashes, then the smoke test."""
from pathlib import Path

from moeforge.runner import job_imports, run

with job_imports():
    from moeforge.check.verify import verify_model

run(snakemake, lambda s: verify_model(Path(s.params.model), Path(s.output.json).parent,  # noqa: F821
                                      device=s.params.device, max_new_tokens=s.params.max_new_tokens,
                                      dtype=s.params.dtype, memory_gb=s.params.memory_gb))
