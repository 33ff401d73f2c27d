"""User-facing errors.

Every error a user can cause carries three parts: *what* is wrong, *where* (file, key,
model, tensor) and *what to do*. The workflow scripts print ``str(error)`` and exit
non-zero; no traceback from library internals reaches the user for these.
"""

from __future__ import annotations


class MoeforgeError(Exception):
    """Base class: a problem the user can fix, described in one message."""

    def __init__(self, what: str, where: str = "", fix: str = "") -> None:
        self.what = what
        self.where = where
        self.fix = fix
        super().__init__(self.message)

    @property
    def message(self) -> str:
        parts = [f"{self.where}: {self.what}" if self.where else self.what]
        if self.fix:
            parts.append(f"-> {self.fix}")
        return " ".join(parts)


class RecipeError(MoeforgeError):
    """The recipe or the workflow config is malformed or contradictory."""


class ModelError(MoeforgeError):
    """A source model cannot be used: missing files, tensors, or incompatible settings."""


class TemplateError(MoeforgeError):
    """An architecture template is malformed (a packaging bug or a user-supplied template)."""


class FetchError(MoeforgeError):
    """A model reference cannot be resolved or fetched (offline, missing, no access)."""


class BuildError(MoeforgeError):
    """A build step found its own output inconsistent (load failure, hash mismatch)."""
