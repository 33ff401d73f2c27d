"""Convert the checked model to GGUF with llama.cpp's converter and compare it with transformers."""
from pathlib import Path

from moeforge.check.gguf import gguf_stage
from moeforge.runner import run


def main(s):
    gguf_stage(Path(s.input.lock).parent, Path(s.input.plan), Path(s.input.smoke), Path(s.output.json),
               Path(s.output.md), threads=s.threads)


run(snakemake, main)  # noqa: F821
