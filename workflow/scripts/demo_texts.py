"""Write the packaged domains' train splits where the demo recipe names them."""
from pathlib import Path

from moeforge.io.domains import write_train_splits
from moeforge.runner import run

run(snakemake, lambda s: write_train_splits(Path(s.params.root)))  # noqa: F821
