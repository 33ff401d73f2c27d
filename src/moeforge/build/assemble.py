"""Assembly: the Hub-ready staging model, built under a temporary name and renamed when complete.

The smoke test checks it where it stands; only then is it published (moeforge.build.publish).

Shard files are hard-linked, not rewritten (a 4x7B output is ~48 GB). Tokenizer files are
byte copies of the base's: re-saving a tokenizer with transformers 5.x records a class that
4.x cannot load. moeforge.lock.json records what went in (recipe, each source's resolved
commit and file hashes, library versions) and the sha256 of every file that came out, so a
rerun or a downloaded copy can be checked byte for byte, and the merge rebuilt (a `lock:` merge).
"""

from __future__ import annotations

import json
import shutil
from importlib import metadata
from pathlib import Path
from typing import Any, Mapping, Sequence

import yaml

from moeforge.build.markdown import cell, code, fenced
from moeforge.io.fetch import TOKENIZER_FILES
from moeforge.io.files import (
    atomic_dir,
    dumps_json,
    link_or_copy,
    sha256_file,
    write_json,
    write_text,
)
from moeforge.io.lockfile import LOCK_NAME, LOCK_VERSION
from moeforge.io.refs import parse_ref
from moeforge.io.safetensors_file import read_header
from moeforge.plan.class_check import require_checked
from moeforge.plan.plan_json import Plan, read_plan

LIBRARIES = ("moeforge", "torch", "transformers", "safetensors", "huggingface_hub", "tokenizers", "snakemake")


def shard_name(index: int, total: int) -> str:
    return f"model-{index:05d}-of-{total:05d}.safetensors"


def place_shards(shards: Sequence[Path], out_dir: Path) -> tuple[dict[str, Any], list[str]]:
    """Put shard files in place under Hub names; returns model.safetensors.index.json and the names."""
    weight_map: dict[str, str] = {}
    names = []
    total = 0
    for i, shard in enumerate(shards, start=1):
        name = shard_name(i, len(shards))
        names.append(name)
        link_or_copy(shard, out_dir / name)
        _, entries = read_header(shard)
        for entry in entries.values():
            weight_map[entry.name] = name
            total += entry.nbytes
    return {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, names


def library_versions() -> dict[str, str | None]:
    versions: dict[str, str | None] = {}
    for lib in LIBRARIES:
        try:
            versions[lib] = metadata.version(lib)
        except metadata.PackageNotFoundError:
            versions[lib] = None
    return versions


def _card_names(sources: Mapping[str, Any]) -> dict[str, str]:
    """How the card names each source reference: a Hub repo at the commit the build used, a local model by
    its directory name (never a path of the building machine). A rebuild from the lock, whose Hub
    references are pinned, names them the same, so its card is byte-identical."""
    names = {}
    for src in sources.values():
        ref = parse_ref(src["ref"])
        if ref.kind == "hub":
            names[src["ref"]] = f"{ref.repo_id}@{src['resolved_revision']}"
        else:
            names[src["ref"]] = Path(src["ref"]).expanduser().resolve().name
    return names


def _base_model_ids(sources: Mapping[str, Any]) -> list[str]:
    """The card's base_model list: Hub repo ids without revision, which the Hub links; a local model is not
    a Hub id (the Hub would flag the card), so it is named in the card's text and sources table instead."""
    return list(dict.fromkeys(parse_ref(s["ref"]).repo_id for s in sources.values() if s["kind"] == "hub"))


def _card_recipe(recipe: Mapping[str, Any], names: Mapping[str, str]) -> dict[str, Any]:
    """The resolved recipe with every source as the card names it."""
    out = dict(recipe)
    out["base_model"] = names[recipe["base_model"]]
    for key in ("experts", "shared_experts"):
        out[key] = [{**e, "source_model": names[e["source_model"]]} for e in recipe[key]]
    return out


def _card_lock(merge: str, sources: Mapping[str, Any], names: Mapping[str, str]) -> list[str]:
    """The lock in brief, and how to rebuild the merge from it."""
    lines = ["## Reproduce", "",
             f"`{LOCK_NAME}` records the resolved recipe above, each source's commit and weight-file sha256, the "
             "library versions and the sha256 of every file here. moeforge rebuilds the merge from it and "
             "compares the result with these files, tensor by tensor:", "",
             "```yaml", "merges:", f"  {merge}:",
             "    lock: org/name@revision   # this repository, or a local copy of it", "```", "",
             "| source | roles | revision | weight files |", "|---|---|---|---|"]
    for src in sources.values():
        revision = f"`{src['resolved_revision']}`" if src["kind"] == "hub" else "local (sha256 in the lock)"
        lines.append(f"| {code(names[src['ref']], in_table=True)} | {cell(', '.join(src['roles']))} | {revision} | "
                     f"{len(src['files'])} |")
    return lines + [""]


def model_card(plan: Plan, translation: Mapping[str, Any], sources: Mapping[str, Any]) -> str:
    """README.md with Hub front matter: sources, tags, what was done to make the model, and how to rebuild it.

    `sources` is the lock's record of them: the card names each source as it was resolved, so the
    card of a rebuild from the lock is the same bytes.
    """
    names = _card_names(sources)
    recipe = _card_recipe(plan.recipe.to_dict(), names)
    hub_ids = _base_model_ids(sources)
    front = {**({"base_model": hub_ids} if hub_ids else {}), "tags": ["moe", "merge", "moeforge"],
             "library_name": "transformers"}
    lines = ["---", yaml.safe_dump(front, sort_keys=False).rstrip(), "---", "",
             f"# {plan.merge}", "",
             f"A {plan.output_family} Mixture-of-Experts model with {plan.num_experts} experts "
             f"({recipe['experts_per_token']} active per token), built with moeforge from "
             f"{code(recipe['base_model'])} (attention, norms, embeddings) and the MLPs of the experts below.", "",
             "## Experts", "", "| # | name | source | positive prompts | negative prompts |", "|---|---|---|---|---|"]
    for i, e in enumerate(recipe["experts"]):
        lines.append(f"| {i} | {cell(e['name'])} | {code(e['source_model'], in_table=True)} | "
                     f"{_prompts_cell(e['positive_prompts'])} | {_prompts_cell(e['negative_prompts'])} |")
    lines += ["", "## Routing", "", f"Gate mode: `{recipe['gate_mode']}`, seed {recipe['seed']}." + _training_line(recipe),
              "", "## Config translation", ""]
    for d in translation["decisions"]:
        lines.append(f"- {code(d['field'])} = {code(json.dumps(d['value']))}: {d['why']}")
    lines += ["", "## Recipe", "", *fenced(yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True).rstrip(), "yaml"),
              ""]
    lines += _card_lock(plan.merge, sources, names)
    return "\n".join(lines)


def _training_line(recipe: Mapping[str, Any]) -> str:
    """The router training, when the recipe has it: the routers are not the gate mode's any more."""
    training = recipe.get("router_training")
    if not training:
        return ""
    return (f" The routers were then trained on the experts' texts (`{training['method']}`, {training['steps']} "
            "steps, every other weight frozen; the lock records each text's sha256).")


def _prompts_cell(prompts: Sequence[str]) -> str:
    """An expert's prompts in one table cell, each kept whole (multi-line prompts stay in their row)."""
    return "; ".join(cell(p) for p in prompts)


def _sources_lock(plan: Plan, hashes: Sequence[Path]) -> dict[str, Any]:
    records = {record["slug"]: record for record in (json.loads(Path(h).read_text()) for h in hashes)}
    out = {}
    for slug, src in plan.sources.items():
        files = records.get(slug, {}).get("files", [])
        out[slug] = {"ref": src.ref, "kind": src.kind, "resolved_revision": src.resolved_revision,
                     "roles": list(src.roles), "files": [{"name": f["name"], "size": f["size"], "sha256": f["sha256"]}
                                                      for f in files]}
    return out


def assemble(plan_json: Path, shards: Sequence[Path], shard_digests: Sequence[str], config_dir: Path,
             checked: Path, base_meta: Path, hashes: Sequence[Path], out_dir: Path,
             training_reports: Sequence[Path] = ()) -> dict[str, Any]:
    """Build out_dir atomically; returns the lock record.

    `checked` is the class check's record, which must name config_dir's config.json;
    `shard_digests` are the shards' sha256 as their jobs computed them; `hashes` are the
    weights.sha256.json records of the sources; `training_reports` the router training's report (when the
    recipe trains the routers), whose record of each training text (path, size, sha256) the lock keeps.
    """
    plan = read_plan(plan_json)
    require_checked(config_dir / "config.json", checked)
    translation = json.loads((config_dir / "translation.json").read_text())
    with atomic_dir(out_dir) as tmp:
        index, names = place_shards(shards, tmp)
        write_json(tmp / "model.safetensors.index.json", index)
        for name in ("config.json", "generation_config.json"):
            shutil.copyfile(config_dir / name, tmp / name)
        for name in TOKENIZER_FILES:
            if (base_meta / name).is_file():
                shutil.copyfile(base_meta / name, tmp / name)
        sources = _sources_lock(plan, hashes)
        write_text(tmp / "README.md", model_card(plan, translation, sources))
        known = dict(zip(names, shard_digests, strict=True))
        files = {p.name: known.get(p.name) or sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
        lock = {"moeforge_lock_version": LOCK_VERSION, "merge": plan.merge, "recipe": plan.recipe.to_dict(),
                "seed": plan.recipe.seed, "output_family": plan.output_family,
                "sources": sources, "libraries": library_versions(), "files": files}
        for report in training_reports:
            lock["train_texts"] = [{k: text[k] for k in ("expert", "path", "size", "sha256")}
                                   for text in json.loads(Path(report).read_text())["texts"]]
        for path in tmp.iterdir():
            path.chmod(0o444)
        # Writable: the lock is the staging model's declared output, which Snakemake refuses to replace when
        # read-only, and a changed plan must reassemble. The published model's copy of it is read-only.
        (tmp / LOCK_NAME).write_text(dumps_json(lock))
    return lock
