"""Two name layouts of one MoE checkpoint, read as one: the classic Hub names, tensor by tensor.

moeforge writes the classic names (Mixtral ``block_sparse_moe.experts.{e}.w1/w2/w3``, Qwen
``mlp.experts.{e}.gate_proj``...); mergekit-moe 0.1.5 writes transformers 5.x's fused layout
(``mlp.experts.gate_up_proj`` [E, 2I, H] with the gate rows first, ``mlp.experts.down_proj``
[E, H, I], ``mlp.gate.weight``). The output template's ``in_memory_5x`` rules say how one becomes the
other, so a fused tensor is read as its classic pieces, one expert's slice at a time: each
(layer, expert, matrix) is compared on its own and no whole fused tensor is held.
"""

from __future__ import annotations

import re
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors import safe_open

from moeforge.errors import ModelError
from moeforge.plan.templates import OutputFamily

ROLES = ("embeddings", "attention", "norms", "expert MLPs", "routers", "lm_head", "other")


@dataclass(frozen=True)
class Entry:
    """One classic tensor: where it is stored, and which expert's part of a fused tensor it is (if it is one)."""

    stored: str
    file: Path
    expert: int | None = None  # index along a fused tensor's first dimension
    part: int = 0  # which of ``parts`` equal pieces of that expert's slice (gate rows first)
    parts: int = 1


@dataclass(frozen=True)
class Place:
    """What a classic tensor is: its role group, layer and expert (for the report)."""

    role: str
    layer: int | None = None
    expert: int | None = None


def _pattern(text: str) -> str:
    return re.escape(text).replace(r"\{layer\}", r"(?P<layer>\d+)").replace(r"\{expert\}", r"(?P<expert>\d+)")


def _stored_names(model_dir: Path) -> dict[str, Path]:
    names: dict[str, Path] = {}
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as fh:
            names.update({name: path for name in fh.keys()})
    return names


def _fused_shape(path: Path, name: str) -> list[int]:
    with safe_open(str(path), framework="pt") as fh:
        return list(fh.get_slice(name).get_shape())


def _checked_fused(path: Path, name: str, parts: int) -> list[int]:
    """A fused expert tensor's shape: 3-D, [experts, parts x rows, columns], each dimension non-zero.

    Anything else cannot be split into per-expert pieces (mergekit-moe's gate_up_proj is [E, 2I, H], its
    down_proj [E, H, I]): the published model is damaged or in a layout this check does not know.
    """
    shape = _fused_shape(path, name)
    if len(shape) != 3 or 0 in shape or shape[1] % parts:
        layout = f"[experts, {parts} x intermediate, hidden]" if parts > 1 else "[experts, rows, columns]"
        raise ModelError(f"fused expert tensor {name!r} has shape {shape}, which does not split as {layout} into "
                         f"{parts} piece(s) per expert", f"published model ({path})",
                         "the published weights are damaged or not in transformers 5's fused expert layout; "
                         "re-download them, or compare against a merge in the classic layout")
    return shape


def _check_pieces_fit(pieces: dict[str, tuple[str, Path, tuple[int, int, int]]], family: OutputFamily) -> None:
    """The pieces of one layer, as [experts, rows, columns]: gate/up projections [E, I, H], down [E, H, I]."""
    down = family.experts.get("down_proj")
    projection = next((pieces[family.experts[role]] for role in ("gate_proj", "up_proj")
                       if family.experts.get(role) in pieces), None)
    if projection is None:
        return
    experts, inner, hidden = projection[2]
    for source, (name, path, shape) in pieces.items():
        want = (experts, hidden, inner) if source == down else (experts, inner, hidden)
        if shape != want:
            raise ModelError(f"fused expert tensor {name!r} holds {shape[0]} pieces of shape {list(shape[1:])}, but "
                             f"{projection[0]!r} implies {experts} of {list(want[1:])} (gate/up [E, 2I, H], down "
                             "[E, H, I])", f"published model ({path})",
                             "the published weights are damaged or not in transformers 5's fused expert layout; "
                             "re-download them")


def classic_view(model_dir: Path, family: OutputFamily) -> dict[str, Entry]:
    """Every tensor of a model directory under its classic name; fused tensors become one entry per piece,
    after their shapes are checked to split into pieces that fit together."""
    prefix = _pattern(family.layer_prefix)
    fused = [(re.compile(f"^{prefix}{re.escape(rule.target)}(?:\\.weight)?$"), rule) for rule in family.in_memory_5x]
    view: dict[str, Entry] = {}
    pieces: dict[int, dict[str, tuple[str, Path, tuple[int, int, int]]]] = {}
    for name, path in _stored_names(model_dir).items():
        hit = next(((m, rule) for regex, rule in fused if (m := regex.match(name))), None)
        if hit is None:
            view[name] = Entry(name, path)
            continue
        match, rule = hit
        layer = int(match["layer"])
        if rule.op == "rename":
            view[family.layer_name(layer, rule.sources[0])] = Entry(name, path)
            continue
        experts, rows, columns = _checked_fused(path, name, len(rule.sources))
        for source in rule.sources:
            pieces.setdefault(layer, {})[source] = (name, path, (experts, rows // len(rule.sources), columns))
        for expert in range(experts):
            for part, source in enumerate(rule.sources):
                view[family.layer_name(layer, source, expert)] = Entry(name, path, expert, part, len(rule.sources))
    for layer_pieces in pieces.values():
        _check_pieces_fit(layer_pieces, family)
    return view


def place_patterns(family: OutputFamily) -> list[tuple[re.Pattern[str], str]]:
    """(classic name pattern, role group) for every tensor the template names; built once per comparison."""
    prefix = _pattern(family.layer_prefix)
    out = [(re.compile(f"^{re.escape(family.globals[key])}$"), role)
           for key, role in (("embed", "embeddings"), ("lm_head", "lm_head"), ("final_norm", "norms"))
           if key in family.globals]
    for key, name in family.attention.items():
        out.append((re.compile(f"^{prefix}{_pattern(name)}$"), "norms" if key.endswith("norm") else "attention"))
    for name in [family.router, *([family.shared_expert_gate] if family.shared_expert_gate else [])]:
        out.append((re.compile(f"^{prefix}{_pattern(name)}$"), "routers"))
    for name in [*family.experts.values(), *family.shared_expert.values()]:
        out.append((re.compile(f"^{prefix}{_pattern(name)}$"), "expert MLPs"))
    return out


def place_of(name: str, patterns: list[tuple[re.Pattern[str], str]]) -> Place:
    """The role group, layer and expert of a classic tensor name ("other" for a name the template lacks)."""
    for regex, role in patterns:
        if match := regex.match(name):
            found = match.groupdict()
            return Place(role, *(int(found[k]) if found.get(k) else None for k in ("layer", "expert")))
    return Place("other")


class Reader:
    """Open safetensors files of one model; reads one classic tensor at a time."""

    def __init__(self, stack: ExitStack) -> None:
        self._stack = stack
        self._open: dict[Path, Any] = {}

    def _handle(self, path: Path) -> Any:
        if path not in self._open:
            self._open[path] = self._stack.enter_context(safe_open(str(path), framework="pt"))
        return self._open[path]

    def read(self, entry: Entry) -> torch.Tensor:
        """The tensor, or its expert's piece of a fused tensor (only that slice is read from disk)."""
        handle = self._handle(entry.file)
        if entry.expert is None:
            return handle.get_tensor(entry.stored)
        piece = handle.get_slice(entry.stored)[entry.expert]
        return piece.chunk(entry.parts, dim=0)[entry.part]


def natural_order(names: set[str]) -> Iterator[str]:
    """Names with their numbers compared as numbers: layer 2 before layer 10, as a reader expects."""
    yield from sorted(names, key=lambda n: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", n)])
