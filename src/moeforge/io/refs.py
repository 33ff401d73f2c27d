"""Model references: a local directory, ``org/repo`` or ``org/repo@revision`` (mergekit-moe's syntax).

A reference is parsed once, here, and gives every later stage a stable, filesystem-safe slug
for its resources directory.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from pathlib import Path

HUB_REF = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*/[\w.-]+)(?:@(?P<rev>[\w./-]+))?$")


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference."""

    raw: str
    kind: str  # "local" | "hub"
    path: str | None = None
    repo_id: str | None = None
    revision: str | None = None

    @property
    def slug(self) -> str:
        """A filesystem-safe, stable name for this reference's resources directory."""
        digest = hashlib.sha256(self.raw.encode()).hexdigest()[:8]
        if self.kind == "hub":
            assert self.repo_id is not None
            name = self.repo_id.replace("/", "--")
            return _safe(f"hub--{name}--{self.revision or 'main'}") + f"--{digest}"
        return _safe(f"local--{Path(self.path or '.').name}") + f"--{digest}"


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", text)


def parse_ref(raw: str) -> ModelRef:
    """Local directory or Hub repo: a path that exists, or that has no single org/name shape, is local."""
    text = raw.strip()
    match = HUB_REF.match(text)
    looks_local = text.startswith(("/", "./", "../", "~")) or Path(text).expanduser().is_dir()
    if match and not looks_local:
        return ModelRef(raw=text, kind="hub", repo_id=match["repo"], revision=match["rev"])
    return ModelRef(raw=text, kind="local", path=text)
