"""Is a rebuild from a lock the recorded merge? File by file, and where the weights differ, tensor by tensor.

The rebuilt model's own lock gives its files' sha256. They are compared with the published
files when the ``lock:`` reference has them (a model directory, or a Hub repo whose files are
downloaded into the Hugging Face cache): the published bytes are what users run, even where
they no longer match their lock. When a weight file differs, or the two models are split into
files differently (a lock made by a moeforge version that sharded otherwise), every tensor is
compared by name across the whole model, wherever each side stores it: the verdict is then
"same tensors" when only the layout differs. A bare lock file gives only the recorded sha256, so
a differing file can be named but its tensors cannot be compared. Tensors are read one pair at a
time, so no job holds a whole model.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from safetensors import safe_open

from moeforge.errors import BuildError
from moeforge.io.files import read_json, sha256_file, shown_path, write_json, write_text
from moeforge.io.lockfile import LOCK_NAME, LockRef, load_lock, read_lock
from moeforge.io.progress import tracked
from moeforge.numbers import fmt, report_number

log = logging.getLogger(__name__)


#: Elements compared at once: the masks and float64 differences stay small beside the two tensors.
_CHUNK = 1 << 24


def differing_elements(rebuilt: torch.Tensor, recorded: torch.Tensor) -> dict[str, Any] | None:
    """How two tensors of one dtype and shape differ: count and max |Δ|; None when every element is equal.

    NaN against NaN counts as equal (the same bytes, most likely); NaN against a number differs,
    and its |Δ| is not finite (null in the report).
    """
    new, old = rebuilt.reshape(-1), recorded.reshape(-1)
    count, worst = 0, []
    for start in range(0, new.numel(), _CHUNK):
        a, b = new[start:start + _CHUNK], old[start:start + _CHUNK]
        unequal = a != b
        if a.is_floating_point():
            unequal &= ~(a.isnan() & b.isnan())
        if n := int(unequal.sum()):
            count += n
            worst.append((a[unequal].double() - b[unequal].double()).abs().max())
    if not count:
        return None
    return {"max_abs_diff": report_number(torch.stack(worst).max()), "differing_elements": count,
            "elements": new.numel()}


def _dtype(tensor: torch.Tensor) -> str:
    return str(tensor.dtype).removeprefix("torch.")


#: The files that hold a model's weights and say where each tensor is.
_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"


def tensor_files(file_of: Callable[[str], Path | None]) -> dict[str, Path] | None:
    """Tensor name -> the file that stores it, from the index (or the single weight file); None without either.

    ``file_of`` gives a model file by name (a path in a directory, or a file fetched from the Hub).
    """
    index = file_of(_INDEX)
    if index is not None:
        weight_map = read_json(index, "", BuildError, "re-download the model: its index is damaged")["weight_map"]
        paths = {file: file_of(file) for file in set(weight_map.values())}
        return {name: paths[file] for name, file in weight_map.items() if paths[file] is not None}
    single = file_of(_SINGLE)
    if single is None:
        return None
    with safe_open(str(single), framework="pt") as handle:
        return dict.fromkeys(handle.keys(), single)


def compare_tensors(rebuilt: Mapping[str, Path], recorded: Mapping[str, Path]) -> dict[str, Any]:
    """Every tensor of two models by name, wherever each stores it, one pair in memory at a time; only the
    differing ones listed."""
    differing = []
    with ExitStack() as stack:
        handles: dict[Path, Any] = {}

        def get(files: Mapping[str, Path], name: str) -> torch.Tensor:
            path = files[name]
            if path not in handles:
                handles[path] = stack.enter_context(safe_open(str(path), framework="pt"))
            return handles[path].get_tensor(name)

        names = sorted(set(rebuilt) | set(recorded))
        for name in tracked(names, "tensor comparison with the recorded model", len(names), "tensors"):
            if name not in recorded:
                differing.append({"tensor": name, "problem": "not in the recorded model"})
            elif name not in rebuilt:
                differing.append({"tensor": name, "problem": "missing from the rebuild"})
            else:
                x, y = get(rebuilt, name), get(recorded, name)
                if x.dtype != y.dtype or x.shape != y.shape:
                    differing.append({"tensor": name, "problem": f"{_dtype(x)} {list(x.shape)} rebuilt, "
                                                                 f"{_dtype(y)} {list(y.shape)} recorded"})
                elif diff := differing_elements(x, y):
                    differing.append({"tensor": name, **diff})
    return {"tensors_compared": len(set(rebuilt) & set(recorded)), "differing": differing}


def _is_weights(name: str) -> bool:
    """A file that only holds weights or says where they are: its bytes may differ with the layout alone."""
    return name.endswith(".safetensors") or name == _INDEX


def _verdict(files: list[Mapping[str, Any]], tensors: Mapping[str, Any] | None) -> str:
    if all(f["status"] == "identical" for f in files):
        return "identical"
    layout_only = all(f["status"] == "identical" or _is_weights(f["name"]) for f in files)
    if layout_only and tensors is not None and not tensors["differing"]:
        return "same tensors"
    return "different"


def _library_warnings(recorded: Mapping[str, Any], rebuilt: Mapping[str, Any]) -> list[str]:
    return [f"{lib} {rebuilt.get(lib)} here, {version} when the merge was built"
            for lib, version in sorted(recorded.items()) if rebuilt.get(lib) != version]


def _compare_file(name: str, new_sha: str, ref: LockRef, rebuilt_dir: Path, recorded_sha: str,
                  warnings: list[str]) -> dict[str, Any]:
    """One file present on both sides: against the published copy when there is one, else the lock."""
    entry: dict[str, Any] = {"name": name, "rebuilt_sha256": new_sha, "recorded_sha256": recorded_sha}
    published = ref.model_file(name)
    if ref.has_model and published is None:
        warnings.append(f"{name}: listed in the recorded lock but not in the published model; compared with "
                        "the lock's sha256")
    if published is not None:
        published_sha = sha256_file(published)
        if published_sha != recorded_sha:
            warnings.append(f"{name}: the published file does not match its own lock; compared with the "
                            "published file")
        entry["recorded_sha256"] = published_sha
    entry["status"] = "identical" if new_sha == entry["recorded_sha256"] else "differs"
    return entry


def reproduce(merge: str, lock_ref: str, rebuilt_dir: Path, out_json: Path, out_md: Path) -> dict[str, Any]:
    """Compare the rebuilt model with the recorded one; write report.json and report.md; return the report.

    A difference is a finding, not a failure: the report says it and the job succeeds.
    """
    ref, recorded = load_lock(lock_ref)
    rebuilt = read_lock(rebuilt_dir / LOCK_NAME)
    warnings = _library_warnings(recorded["libraries"], rebuilt["libraries"])
    files = []
    for name in sorted(set(recorded["files"]) | set(rebuilt["files"])):
        if name not in rebuilt["files"]:
            files.append({"name": name, "status": "missing", "recorded_sha256": recorded["files"][name]})
        elif name not in recorded["files"]:
            files.append({"name": name, "status": "extra", "rebuilt_sha256": rebuilt["files"][name]})
        else:
            files.append(_compare_file(name, rebuilt["files"][name], ref, rebuilt_dir, recorded["files"][name],
                                       warnings))
    notes = [] if ref.has_model else [
        "the lock alone holds no tensors: differing files are named by sha256 only; give the model directory or "
        "Hub repo as `lock:` to compare them tensor by tensor"]
    tensors = None
    if ref.has_model and any(f["status"] != "identical" and _is_weights(f["name"]) for f in files):
        published = tensor_files(lambda name: ref.model_file(name) if name in recorded["files"] else None)
        if published is not None:
            tensors = compare_tensors(tensor_files(lambda name: _existing(rebuilt_dir / name)) or {}, published)
    verdict = _verdict(files, tensors)
    report = {"merge": merge, "recorded_merge": recorded["merge"], "lock": lock_ref, "lock_file": shown_path(ref.path),
              "compared_with": "published files" if ref.has_model else "lock sha256",
              "verdict": verdict, "files": files, "tensors": tensors, "warnings": warnings, "notes": notes}
    write_json(out_json, report)
    write_text(out_md, render_markdown(report))
    if verdict != "identical":
        log.warning("%s: the rebuild differs from %s; see %s", merge, lock_ref, out_md)
    return report


def _existing(path: Path) -> Path | None:
    return path if path.is_file() else None


def render_markdown(report: Mapping[str, Any]) -> str:
    """The verdict first, then each differing file, then each differing tensor."""
    same = [f for f in report["files"] if f["status"] == "identical"]
    other = [f for f in report["files"] if f["status"] != "identical"]
    against = ("the published files" if report["compared_with"] == "published files"
               else "the sha256 recorded in the lock")
    lines = [f"# Reproduce {report['merge']}: {report['verdict']}", "",
             f"Rebuilt `{report['recorded_merge']}` from the lock `{report['lock']}` and compared every output file "
             f"with {against}: {len(same)} identical, {len(other)} not.", ""]
    lines += _md_list("Warnings", report["warnings"]) + _md_list("Notes", report["notes"])
    if other:
        lines += ["## Files that differ", "", "| file | status |", "|---|---|"]
        lines += [f"| `{f['name']}` | {f['status']} |" for f in other] + [""]
    if report.get("tensors"):
        lines += _md_tensors(report["tensors"])
    return "\n".join(lines).rstrip("\n") + "\n"


def _md_list(title: str, items: list[str]) -> list[str]:
    return [f"## {title}", "", *[f"- {item}" for item in items], ""] if items else []


def _md_tensors(tensors: Mapping[str, Any]) -> list[str]:
    differing = tensors["differing"]
    lines = [f"## Tensors: {len(differing)} of {tensors['tensors_compared']} differ", ""]
    if not differing:
        return lines + ["Every tensor is identical: the weight files differ in their headers or in how the "
                        "model is split into files.", ""]
    lines += ["| tensor | max abs diff | differing elements |", "|---|---|---|"]
    for t in differing:
        if "problem" in t:
            lines.append(f"| `{t['tensor']}` | n/a | {t['problem']} |")
        else:
            lines.append(f"| `{t['tensor']}` | {fmt(t['max_abs_diff'])} | "
                         f"{t['differing_elements']} of {t['elements']} |")
    return lines + [""]
