"""A published merge (``published: REF``): its files, and the recipe it was built from, read from the repo.

A published merge is a Hub repo (``org/name`` or ``org/name@revision``, served from the Hugging Face
cache when ``HF_HUB_OFFLINE=1``) or a local directory. Its recipe is ``mergekit_moe_config.yml``,
which mergekit-moe writes into every output; a model card written by hand often has only a YAML
block in README.md, so the first block there that is a mergekit-moe recipe (a mapping with
``base_model`` and ``experts``) is used next. A repo is listed as a snapshot, not asked for one file
at a time: offline, the cache cannot tell a file the repo lacks from one never downloaded, and the
README fallback must know that ``mergekit_moe_config.yml`` is absent.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from moeforge.errors import FetchError, RecipeError
from moeforge.io.fetch import hub_errors
from moeforge.io.files import read_text
from moeforge.io.lockfile import LOCK_NAME
from moeforge.io.refs import parse_ref
from moeforge.io.yaml_doc import YAML_LOADER, check_bounded, yaml_problem

RECIPE_NAME = "mergekit_moe_config.yml"
CARD_NAME = "README.md"
#: What the recipe look-up reads (a merge moeforge built has its lock beside the card); the comparison reads these
#: and the weights.
RECIPE_FILES = (RECIPE_NAME, CARD_NAME, "config.json", LOCK_NAME)
MODEL_FILES = ("*.safetensors", "*.json")
_FENCE = re.compile(r"^(```|~~~)\s*([A-Za-z0-9_-]*)[^\n]*\n(.*?)^\1\s*$", re.MULTILINE | re.DOTALL)
_NO_RECIPE_FIX = (f"give a merge mergekit-moe wrote (it writes {RECIPE_NAME}), or build it from its recipe with "
                  "`recipe:` instead")


@dataclass(frozen=True)
class PublishedRef:
    """Where a published merge is: a directory on this machine, or a Hub repo at the commit it was read at."""

    raw: str
    model_dir: Path | None = None
    repo_id: str | None = None
    revision: str | None = None

    def directory(self, patterns: tuple[str, ...] = MODEL_FILES) -> Path:
        """The model's files on this machine (a Hub repo's matching files are downloaded into the cache)."""
        if self.model_dir is not None:
            return self.model_dir
        return _snapshot(self.repo_id or "", self.revision, patterns, self.raw)

    def local_files(self, names: tuple[str, ...] | None = None) -> list[str]:
        """The model's files (or only ``names``) when they are on this machine: rule inputs, so an edit in place
        reruns what read them (a Hub commit's files do not change)."""
        if self.model_dir is None:
            return []
        return sorted(str(p) for p in self.model_dir.iterdir() if p.is_file() and (names is None or p.name in names))


@dataclass(frozen=True)
class FoundRecipe:
    """A recipe document as the repo holds it, and where in the repo it was found (for messages and reports)."""

    document: dict[str, Any]
    source: str


def _snapshot(repo_id: str, revision: str | None, patterns: tuple[str, ...], raw: str) -> Path:
    """The repo's files matching ``patterns``, from the cache when they are there (offline too)."""
    from huggingface_hub import snapshot_download

    with hub_errors(raw, subject="the repository", not_local=", and there is no local directory of that name"):
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=list(patterns)))


def resolve_published(raw: str) -> tuple[PublishedRef, Path]:
    """The published merge, and a directory holding at least its recipe files (the model's own for a local one)."""
    path = Path(raw).expanduser()
    if path.is_dir():
        return PublishedRef(raw, model_dir=path), path
    ref = parse_ref(raw)
    if ref.kind != "hub":
        raise FetchError("no such model directory", str(path.absolute()),
                         "check the `published:` path (relative paths are relative to the working directory)")
    snapshot = _snapshot(ref.repo_id or "", ref.revision, RECIPE_FILES, raw)
    # The cache keeps a revision's files under snapshots/<commit>/: later reads use that commit.
    return PublishedRef(raw, repo_id=ref.repo_id, revision=snapshot.name), snapshot


def _is_recipe(data: Any) -> bool:
    return isinstance(data, dict) and "base_model" in data and isinstance(data.get("experts"), list)


def _from_config_file(path: Path, where: str) -> FoundRecipe:
    text = read_text(path, "", RecipeError, "save it as UTF-8")
    try:
        data = yaml.load(text, Loader=YAML_LOADER)
    except yaml.YAMLError as exc:
        raise RecipeError(f"{RECIPE_NAME} is not valid YAML: {yaml_problem(exc)}", where,
                          "fix the file in the repo, or build the merge from a corrected copy with `recipe:`") from None
    check_bounded(data, f"{where}: {RECIPE_NAME}", RecipeError)
    if not _is_recipe(data):
        raise RecipeError(f"{RECIPE_NAME} is not a mergekit-moe recipe (a mapping with base_model and experts)",
                          where, "fix the file in the repo, or build the merge from a recipe with `recipe:`")
    return FoundRecipe(data, RECIPE_NAME)


def _from_card(path: Path, where: str) -> FoundRecipe | None:
    """The first fenced YAML block of the card that is a recipe; a block that looks like one but does not parse
    is an error (skipping it would pick a later, different block or say there is none)."""
    text = read_text(path, "", RecipeError, "save the model card as UTF-8")
    for match in _FENCE.finditer(text):
        if match[2].lower() not in ("yaml", "yml", ""):
            continue
        first_line = text.count("\n", 0, match.start(3)) + 1
        try:
            data = yaml.load(match[3], Loader=YAML_LOADER)
        except yaml.YAMLError as exc:
            if "base_model" in match[3] and "experts" in match[3]:
                raise RecipeError(f"the recipe in {CARD_NAME} (the YAML block at line {first_line}) is not valid "
                                  f"YAML: {yaml_problem(exc, first_line)}", where,
                                  "fix the block in the model card, or build the merge from a corrected copy with "
                                  "`recipe:`") from None
            continue
        if _is_recipe(data):
            check_bounded(data, f"{where}: {CARD_NAME} (YAML block at line {first_line})", RecipeError)
            return FoundRecipe(data, f"{CARD_NAME} (YAML block at line {first_line})")
    return None


def find_recipe(directory: Path, where: str) -> FoundRecipe:
    """``mergekit_moe_config.yml``, else the card's first recipe block; a repo with neither is one message."""
    if (directory / RECIPE_NAME).is_file():
        return _from_config_file(directory / RECIPE_NAME, where)
    if (directory / CARD_NAME).is_file() and (found := _from_card(directory / CARD_NAME, where)):
        return found
    card = "no YAML block with base_model and experts in" if (directory / CARD_NAME).is_file() else "no"
    raise RecipeError(f"no mergekit-moe recipe: no {RECIPE_NAME}, and {card} {CARD_NAME}", where, _NO_RECIPE_FIX)
