"""The README stays short and its layout map names every module of the library."""

from __future__ import annotations

import re
from pathlib import Path

import moeforge

README = Path(__file__).resolve().parents[1] / "README.md"
ROOT = Path(moeforge.__file__).parent


def test_the_readme_is_at_most_200_lines():
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 200


def test_the_layout_map_names_every_module():
    layout = README.read_text(encoding="utf-8").split("## Repository layout", 1)[1]
    words = set(re.findall(r"[a-z_0-9]+", layout))
    missing = [str(path.relative_to(ROOT)) for path in ROOT.rglob("*.py")
               if path.stem != "__init__" and path.stem not in words]
    assert not missing, f"the README's layout map does not name: {missing}"
