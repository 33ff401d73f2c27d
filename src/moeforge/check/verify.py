"""Verify a model directory against its moeforge.lock.json, then smoke-test it.

This is how a user checks a published merge they downloaded: every file the lock lists must
exist with the recorded sha256 (a single flipped byte fails, naming the file), nothing the lock
does not list may pretend to be part of the model, and the model must load strictly and run.
The source models the lock names are hashed again where they are on this machine (a local
directory, the Hugging Face cache): a source that changed since the build fails, naming the file.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from moeforge.check.report import write_report
from moeforge.check.smoke import SmokeOptions, run_smoke, stored_dtype
from moeforge.errors import BuildError
from moeforge.io.files import sha256_file, write_json
from moeforge.io.hashcache import HashCache
from moeforge.io.lockfile import LOCK_NAME, read_lock, source_file
from moeforge.plan.prompts import smoke_prompts
from moeforge.plan.recipe import parse_recipe
from moeforge.resources import generation_dtype
from moeforge.runtime.devices import computes_16bit
from moeforge.runtime.layerwise import CheckpointTensors


def check_lock(model_dir: Path) -> dict[str, Any]:
    """Compare every file against the lock; raise BuildError naming each mismatch."""
    lock_path = model_dir / LOCK_NAME
    if not lock_path.is_file():
        raise BuildError(f"no {LOCK_NAME}", str(model_dir), "only directories built by moeforge can be verified")
    lock = read_lock(lock_path)
    problems = []
    for name, expected in sorted(lock["files"].items()):
        path = model_dir / name
        if not path.is_file():
            problems.append(f"{name}: missing")
        elif sha256_file(path) != expected:
            problems.append(f"{name}: sha256 differs from the lock (file changed or corrupted)")
    extra = sorted(p.name for p in model_dir.iterdir()
                   if p.is_file() and p.name not in lock["files"] and p.name != LOCK_NAME
                   and p.suffix in (".safetensors", ".json", ".bin"))
    problems += [f"{name}: not listed in the lock" for name in extra]
    if problems:
        raise BuildError(f"{len(problems)} file(s) fail verification: " + "; ".join(problems), str(model_dir),
                         "re-download the model (or rebuild it); do not use it as it is")
    return {"files_verified": len(lock["files"]), "merge": lock["merge"], "output_family": lock["output_family"]}


def check_sources(lock: dict[str, Any], models_root: Path) -> dict[str, Any]:
    """Hash again each source file the lock names that is on this machine, through the model's stat cache
    under ``models_root`` (unchanged files cost a stat call); raise BuildError naming each changed file.

    A local model directory that is there but lacks a named file has changed too; a source not on this
    machine at all (a downloaded merge, a Hub model never fetched here) is counted, not checked.
    """
    problems, checked, absent = [], 0, 0
    for slug, source in sorted(lock["sources"].items()):
        cache = HashCache(models_root / slug / "sha256-cache.json")
        local_dir = Path(source["ref"]).expanduser() if source["kind"] == "local" else None
        for entry in source["files"]:
            path = source_file(source, entry["name"], models_root / slug)
            if path is None and local_dir is not None and local_dir.is_dir():
                problems.append(f"{local_dir / entry['name']}: missing")
            elif path is None:
                absent += 1
            else:
                checked += 1
                if cache.sha256(path, entry["name"]) != entry["sha256"]:
                    problems.append(f"{path}: sha256 differs from the lock")
        cache.save()
    if problems:
        raise BuildError(f"{len(problems)} source file(s) changed since the build: " + "; ".join(problems),
                         lock["merge"], "restore the source files, or rebuild the merge (snakemake) to build it from "
                                        "the sources as they are now")
    return {"source_files_verified": checked, "source_files_not_here": absent}


def verify_model(model_dir: Path, out_dir: Path, *, device: str, max_new_tokens: int, dtype: str = "auto",
                 memory_gb: float | None = None, models_root: Path) -> dict[str, Any]:
    """Hash check of the model, then of its sources on this machine (their stat caches under ``models_root``),
    then the smoke test (no base comparison: the base may not be at hand).

    Generation follows the smoke test's dtype policy (``dtype``, the config's ``smoke.dtype``), read from
    the model's own headers: a downloaded merge has no plan.
    """
    files = check_lock(model_dir)
    lock = read_lock(model_dir / LOCK_NAME)
    files |= check_sources(lock, models_root)
    recipe = parse_recipe(lock["recipe"], f"{model_dir / LOCK_NAME}: recipe")
    expert_prompts = {e.name: list(e.positive_prompts) for e in recipe.experts if e.positive_prompts}
    stored = stored_dtype(model_dir)
    size = sum(e.nbytes for e in CheckpointTensors(model_dir).entries().values())
    opts = SmokeOptions(prompts=smoke_prompts(recipe), max_new_tokens=max_new_tokens, device=device,
                        expert_prompts=expert_prompts, expert_names=[e.name for e in recipe.experts],
                        memory_gb=memory_gb,
                        dtype=generation_dtype(stored, size, dtype, computes_16bit(device)))
    report = run_smoke(model_dir, None, opts)
    report["lock"] = files
    write_report(report, out_dir / "report.json", out_dir / "report.md")
    write_json(out_dir / "lock_check.json", files)
    warnings = f" with {len(report['warnings'])} warning(s)" if report["warnings"] else ""
    logging.getLogger("moeforge").info("%s: all %d files match the lock; smoke test passed%s; see %s", model_dir,
                                       files["files_verified"], warnings, out_dir / "report.md")
    return report
