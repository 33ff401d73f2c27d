"""Publish the checked staging model as results/<merge>/model (hard links)."""
from pathlib import Path

from moeforge.runner import job_imports, run

with job_imports():
    from moeforge.build.publish import publish

run(snakemake, lambda s: publish(Path(s.input.staging).parent, Path(s.output.lock).parent))  # noqa: F821
