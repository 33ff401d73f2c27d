"""Where one model's weights are (or will be, for the Hub), with sizes and sha256: no download."""
from pathlib import Path

from moeforge.io.fetch import locate_weights
from moeforge.runner import run

run(snakemake, lambda s: locate_weights(Path(s.input.meta) / "source.json", Path(s.output[0]),  # noqa: F821
                                        Path(s.params.cache)))
