"""Publish the checked staging model as results/<merge>/model (hard links)."""
from pathlib import Path

from moeforge.build.publish import publish
from moeforge.runner import run

run(snakemake, lambda s: publish(Path(s.input.staging).parent, Path(s.output.lock).parent))  # noqa: F821
