"""Compare a rebuilt `lock:` merge with the recorded one: each file, and each tensor of a differing one."""
from pathlib import Path

from moeforge.check.reproduce import reproduce
from moeforge.runner import run

run(snakemake, lambda s: reproduce(s.wildcards.merge, s.params.ref, Path(s.input.lock).parent,  # noqa: F821
                                   Path(s.output.json), Path(s.output.md)))
