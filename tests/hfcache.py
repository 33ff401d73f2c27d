"""Populate a real Hugging Face cache directory from a local model, for offline tests.

The layout is huggingface_hub's own: ``models--org--name/blobs/<hash>``,
``snapshots/<commit>/<file>`` as relative symlinks into blobs, and ``refs/<branch>``
holding the commit. huggingface_hub then serves the model with ``HF_HUB_OFFLINE=1``
exactly as it would after a real download.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path


def populate(cache_dir: Path, repo_id: str, model_dir: Path, commit: str, branch: str = "main",
             only: tuple[str, ...] | None = None) -> Path:
    """Copy `model_dir`'s files into the cache as revision `commit` of `repo_id`; returns the snapshot dir."""
    repo = cache_dir / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    for path in sorted(model_dir.iterdir()):
        if not path.is_file() or (only is not None and path.name not in only):
            continue
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        blob = repo / "blobs" / digest
        shutil.copyfile(path, blob)
        link = snapshot / path.name
        if link.is_symlink() or link.exists():
            link.unlink()
        os.symlink(os.path.relpath(blob, snapshot), link)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / branch).write_text(commit)
    return snapshot


def offline_env(cache_dir: Path) -> dict[str, str]:
    """Environment for a subprocess that must use only this cache."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache_dir), "HF_HOME": str(cache_dir.parent / "hf_home"),
                "HF_HUB_DISABLE_TELEMETRY": "1"})
    return env
