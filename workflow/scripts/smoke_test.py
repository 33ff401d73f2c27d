"""Strict load, generation, comparison with the base, routing statistics, plots."""
from pathlib import Path

from moeforge.check.smoke_stage import smoke_stage
from moeforge.runner import run


def main(s):
    smoke_stage(Path(s.input.lock).parent, Path(s.input.plan), Path(s.input.gates), Path(s.input.translation),
                Path(s.input.base_weights),
                device=s.params.device, dtype=s.params.dtype, max_new_tokens=s.params.max_new_tokens,
                memory_gb=s.params.memory_gb, job_mem_mb=s.resources.mem_mb,
                out_json=Path(s.output.json), out_md=Path(s.output.md),
                load_png=Path(s.output.load), similarity_png=Path(s.output.similarity),
                outcome_json=Path(s.log.outcome))


run(snakemake, main)  # noqa: F821
