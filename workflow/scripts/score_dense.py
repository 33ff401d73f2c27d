"""One dense model's scores on the evaluation's domain windows, shared by every merge that has it."""
from pathlib import Path

from moeforge.check.evaluate import EvalOptions, dense_stage
from moeforge.runner import run

run(snakemake, lambda s: dense_stage(Path(s.input.weights), Path(s.input.tokenizer),  # noqa: F821
                                     {name: Path(path) for name, path in s.params.domains.items()},
                                     EvalOptions(**s.params.options), Path(s.output[0])))
