"""User-facing errors.

Every error a user can cause carries three parts: *what* is wrong, *where* (file, key,
model, tensor) and *what to do*. The workflow scripts print ``str(error)`` and exit
non-zero; no traceback from library internals reaches the user for these.
"""

from __future__ import annotations

#: The most characters of each part of a message: a part quoting a user's value (a prompt of a megabyte,
#: a value written out from YAML aliases) is cut, so no message floods a console or a log.
MAX_PART = 2000


def bounded(text: str, limit: int = MAX_PART) -> str:
    """``text`` cut to ``limit`` characters, its control characters but the line breaks moeforge writes shown
    escaped (a terminal escape sequence in a value could rewrite the console)."""
    text = "".join(c if c.isprintable() or c in " \n" else repr(c)[1:-1] for c in text[:limit + 1])
    if len(text) <= limit:
        return text
    return f"{text[:limit]}… [cut: the value is longer]"


class MoeforgeError(Exception):
    """Base class: a problem the user can fix, described in one message (each part bounded in size)."""

    def __init__(self, what: str, where: str = "", fix: str = "") -> None:
        self.what = bounded(what)
        self.where = bounded(where)
        self.fix = bounded(fix)
        super().__init__(self.message)

    def within(self, where: str) -> MoeforgeError:
        """The same error, said under ``where`` too: a problem found in a file or a model, told under the merge or
        search that uses it (which of a config's many that is, the file's own message cannot say)."""
        return type(self)(self.what, f"{where}: {self.where}" if self.where else where, self.fix)

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
