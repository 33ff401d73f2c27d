"""The domain texts that ship with moeforge: Python code, arithmetic word problems, cooking recipes.

The demo's experts are fine-tuned on these texts' train splits, and the evaluation stage measures
per-domain perplexity on their held-out splits, so a new user sees routing that means something
without downloading anything. The texts were written for this repository (generated from
templates with varied names, numbers and structure); each block is separated by a blank line.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from importlib import resources
from pathlib import Path
from typing import Any

from moeforge.errors import RecipeError
from moeforge.io.files import write_text

#: The packaged domains, in the order of the demo's experts.
DOMAINS = ("code", "math", "cooking")
SPLITS = ("train", "heldout")


def domain_path(domain: str, split: str) -> Path:
    """The packaged file of one domain's split (a real path: the package is installed as files)."""
    if domain not in DOMAINS or split not in SPLITS:
        raise ValueError(f"no packaged text for domain {domain!r}, split {split!r}; domains: {DOMAINS}, "
                         f"splits: {SPLITS}")
    return Path(str(resources.files("moeforge").joinpath(f"data/domains/{domain}/{split}.txt")))


def domain_text(domain: str, split: str) -> str:
    """One domain's split as text."""
    return domain_path(domain, split).read_text(encoding="utf-8")


def write_train_splits(out_dir: Path) -> list[Path]:
    """Each domain's train split as ``{out_dir}/{domain}.txt``: files a recipe's train_texts can name."""
    paths = []
    for domain in DOMAINS:
        paths.append(Path(out_dir) / f"{domain}.txt")
        write_text(paths[-1], domain_text(domain, "train"))
    return paths


def heldout_paths() -> dict[str, Path]:
    """Domain name -> held-out text: the evaluation's default domains."""
    return {domain: domain_path(domain, "heldout") for domain in DOMAINS}


def eval_domains(configured: Mapping[str, str] | None) -> dict[str, str]:
    """The evaluation's domains: the config's ``eval.domains`` (name -> text file), else the packaged ones."""
    if configured:
        missing = [f"{name}: {path}" for name, path in configured.items() if not Path(path).is_file()]
        if missing:
            raise RecipeError(f"no such text file: {', '.join(missing)}", "config: eval.domains",
                              "give each domain a UTF-8 text file (relative paths are read from the working "
                              "directory)")
        return dict(configured)
    return {name: str(path) for name, path in heldout_paths().items()}


def eval_key(domains: Mapping[str, str], options: Mapping[str, Any]) -> str:
    """16 hex digits naming one evaluation setting (each domain's text file, and the options): a dense model's
    scores are kept under it, so two settings never share a file, and one setting's scores serve every merge."""
    setting = {"domains": dict(domains), "options": dict(options)}
    return hashlib.sha256(json.dumps(setting, sort_keys=True).encode()).hexdigest()[:16]
