"""Where one model's weights are (or will be, for the Hub), with sizes and sha256: no download."""
from pathlib import Path

from moeforge.runner import job_imports, run

with job_imports():
    from moeforge.io.fetch import locate_weights

run(snakemake, lambda s: locate_weights(Path(s.input.meta) / "source.json", Path(s.output[0]),  # noqa: F821
                                        Path(s.params.cache)))
