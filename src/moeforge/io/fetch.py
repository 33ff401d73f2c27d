"""Model references: where a source model lives, and fetching it in steps.

A reference is a local directory, ``org/repo`` or ``org/repo@revision`` (mergekit-moe's
syntax). ``fetch_metadata`` gets only what validation needs (config, tokenizer files, the
safetensors headers) and records the resolved commit, so a bad recipe fails before hours of
downloading; ``locate_weights`` records where the weights are or will be, and their sha256 where
known without a download; ``fetch_weights``, once per merge after its plan, then downloads them into
the Hugging Face cache (no second copy per merge; a model another merge fetched is found there). The Hub token is read by huggingface_hub from the environment or
``hf auth login`` and is never written anywhere by moeforge.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Collection, Iterator, Mapping

from moeforge.errors import FetchError, ModelError, MoeforgeError
from moeforge.io.files import atomic_dir, read_json, sha256_file, write_json
from moeforge.io.hashcache import HashCache
from moeforge.io.model_config import checked_metadata
from moeforge.io.refs import ModelRef, parse_ref
from moeforge.io.safetensors_file import read_header

log = logging.getLogger(__name__)

META_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
    "model.safetensors.index.json",
)
TOKENIZER_FILES = tuple(f for f in META_FILES if f not in ("config.json", "generation_config.json",
                                                           "model.safetensors.index.json"))
SAFETENSORS_INDEX = "model.safetensors.index.json"
BIN_INDEX = "pytorch_model.bin.index.json"


@dataclass(frozen=True)
class FileInfo:
    name: str
    size: int | None
    sha256: str | None


def _weight_files(names: list[str]) -> tuple[str, list[str]]:
    """The weight format and files: safetensors whenever present, *.bin only as a fallback."""
    st = sorted(n for n in names if n.endswith(".safetensors") and "/" not in n)
    if st:
        return "safetensors", st
    bins = sorted(n for n in names if n.endswith(".bin") and "/" not in n and n.startswith("pytorch_model"))
    if bins:
        return "bin", bins
    return "none", []


#: What to do about a damaged metadata file of a source model, wherever it is read.
DAMAGED_FILE_FIX = ("restore the file from the model's origin (for a Hub model, delete the model's folder in the "
                    "Hugging Face cache and rerun to download it again)")
#: The same for a fetched copy (fetch_metadata checked the original, so the copy was damaged later).
REFETCH_FIX = "delete the fetched copy (the model's meta directory under results/) and rerun to fetch it again"


def _copy_meta_file(src: Path, dst: Path, ref: ModelRef) -> None:
    """Copy one metadata file; a JSON one must parse and be an object whose fields that are read have their
    types, so a damaged file is named where it lies (the local directory or the Hugging Face cache) instead of
    failing as a traceback in a later step."""
    if src.suffix == ".json":
        checked_metadata(read_json(src, f"model {ref.raw}", ModelError, DAMAGED_FILE_FIX), dst.name,
                         f"model {ref.raw} ({src})")
    shutil.copyfile(src, dst)


def _copy_meta(src_dir: Path, out_dir: Path, ref: ModelRef) -> list[str]:
    copied = []
    for name in META_FILES:
        if (src_dir / name).is_file():
            _copy_meta_file(src_dir / name, out_dir / name, ref)
            copied.append(name)
    return copied


def local_model_dir(ref: ModelRef) -> Path:
    """A local model's directory, resolved; one that is absent or holds no config.json is one clear error."""
    path = Path(ref.path or "").expanduser()
    if not path.is_dir():
        near = near_local_model(ref.path or "")
        fix = (f"did you mean {near}?" if near else
               "write a revision after '@' (org/name@main), or drop the '@'" if ref.raw.endswith("@") else
               "check the path in the recipe (relative paths are relative to the working directory)")
        raise FetchError(f"no such local directory: {path.absolute()}", ref.raw, fix)
    if not (path / "config.json").is_file():
        raise ModelError("no config.json in the model directory", ref.raw,
                         "point the recipe at a Hugging Face model directory (config.json + weights)")
    return path.resolve()


def check_new_refs(refs: Mapping[str, str], models_root: Path, built_here: Collection[str] = (),
                   used_by: Mapping[str, str] | None = None) -> None:
    """What fetch_metadata would refuse about a model not fetched yet, found without the network when the
    workflow is read, so that a dry run (-n) catches it too: a local directory that is not there (unless a
    rule of the run builds it: the demo's models), an ``org/name`` one typo away from a local model.

    ``refs`` maps each slug to its reference; a model whose metadata is already under ``models_root`` was
    fetched, and a finished build is not refused for a source deleted since. ``used_by`` says, per slug, where
    the reference was given (a merge, a search's candidate and the grid value that named the model).
    """
    built = {os.path.normpath(path) for path in built_here}
    for slug, raw in refs.items():
        if (models_root / slug / "meta").exists():
            continue
        ref = parse_ref(raw)
        try:
            if ref.kind == "hub":
                _check_not_a_mistyped_path(ref)
            elif os.path.normpath(ref.path or "") not in built:
                local_model_dir(ref)
        except MoeforgeError as exc:
            raise exc.within(used_by[slug]) if used_by and slug in used_by else exc from None


def near_local_model(text: str) -> str | None:
    """An existing local model directory whose path is a likely typo of ``text`` (component by component)."""
    from moeforge.io.schema import closest  # jsonschema's import, only on this error path

    path = Path(text).expanduser()
    current = Path(path.anchor) if path.is_absolute() else Path(".")
    for part in path.parts[1:] if path.is_absolute() else path.parts:
        if not (current / part).is_dir():
            try:
                children = [c.name for c in current.iterdir() if c.is_dir()]
            except OSError:
                return None
            part = closest(part, children, cutoff=0.7) or ""  # one swap of two letters in a 4-letter name: 0.75
            if not part:
                return None
        current = current / part
    same = current.absolute() == path.absolute()
    return None if same or not (current / "config.json").is_file() else str(current)


def _check_not_a_mistyped_path(ref: ModelRef) -> None:
    """``org/name`` that is one typo away from a local model directory is refused before any Hub lookup.

    Otherwise a mistyped local path would be looked up on the Hub, and downloaded if a stranger owns
    that repo name. A revision (``org/name@main``) says the Hub is meant.
    """
    near = near_local_model(ref.raw) if ref.revision is None else None
    if near:
        raise FetchError(f"no such local directory ./{ref.raw}, but the local model {near} exists", ref.raw,
                         f"write {near} if you meant that directory; to use the Hub repo {ref.repo_id}, pin its "
                         f"revision: {ref.repo_id}@main")


def _also_not_local(ref: ModelRef) -> str:
    """For a Hub ref that could also be a path: say that the local directory was looked for too, or that the
    local directory it names takes no revision."""
    if ref.revision is None:
        return f"; there is no local directory ./{ref.raw} either"
    if Path(ref.repo_id or "").expanduser().is_dir():
        return f"; ./{ref.repo_id} is a local directory, but a local model takes no @revision (drop '@{ref.revision}')"
    return ""


def _other_revisions(raw: str) -> str:
    """When the cache holds the repo but not the asked revision, say so: the repo name is right."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    try:
        ref = parse_ref(raw)
    except MoeforgeError:
        return ""
    if ref.kind != "hub" or not ref.revision:
        return ""
    folder = Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=ref.repo_id, repo_type="model")
    return f" (it holds {ref.repo_id}, but not its revision {ref.revision!r})" if folder.is_dir() else ""


def _hub_offline() -> bool:
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


@contextmanager
def hub_errors(raw: str, subject: str = "", not_local: str = "") -> Iterator[None]:
    """Hugging Face Hub failures as one FetchError each, naming ``raw`` and what to do: one wording for
    every Hub read.

    ``subject`` names what was read when it is not the repository (a file); ``not_local`` says what
    was looked for on this machine first, for the messages that say nothing was found. A file missing
    from an existing repo (EntryNotFoundError) is left to the caller, which knows what that means.
    """
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    try:
        yield
    except LocalEntryNotFoundError:
        raise FetchError(f"{subject + ' is ' if subject else ''}not in the Hugging Face cache{_other_revisions(raw)} "
                         f"and the Hub cannot be reached (HF_HUB_OFFLINE is set or there is no network){not_local}", raw,
                         ("for a local model, fix the path (./ in front makes it one); " if not_local else "")
                         + "for the Hub repo, download it once with network access, or unset HF_HUB_OFFLINE") from None
    except EntryNotFoundError:
        raise
    except RepositoryNotFoundError:
        raise FetchError(f"repository not found or access denied{not_local}", raw,
                         "check the name; for gated or private repos run `hf auth login` or set HF_TOKEN") from None
    except RevisionNotFoundError:
        raise FetchError(f"the repository has no revision {raw.partition('@')[2]!r}", raw,
                         "check the revision after '@'") from None
    except HfHubHTTPError as exc:
        raise FetchError(f"Hub request failed: {exc}", raw, "check the name, the revision and your access") from None


def _hub_snapshot(ref: ModelRef, patterns: list[str] | None) -> Path:
    """A cached snapshot folder; offline this only reads the cache."""
    from huggingface_hub import snapshot_download

    with hub_errors(ref.raw, not_local=_also_not_local(ref)):
        return Path(snapshot_download(ref.repo_id, revision=ref.revision, allow_patterns=patterns))


def _hub_metadata(ref: ModelRef, out_dir: Path) -> dict[str, Any]:
    """Online: commit and file list from the API, small files, headers by range requests."""
    from huggingface_hub import HfApi, get_safetensors_metadata, hf_hub_download

    with hub_errors(ref.raw, not_local=_also_not_local(ref)):
        info = HfApi().model_info(ref.repo_id, revision=ref.revision, files_metadata=True)
    files = [FileInfo(s.rfilename, s.size, s.lfs.sha256 if s.lfs else None) for s in info.siblings or []]
    names = [f.name for f in files]
    for name in META_FILES:
        if name in names:
            _copy_meta_file(Path(hf_hub_download(ref.repo_id, name, revision=info.sha)), out_dir / name, ref)
    fmt, weights = _weight_files(names)
    headers: dict[str, dict[str, Any]] = {}
    if fmt == "safetensors":
        meta = get_safetensors_metadata(ref.repo_id, revision=info.sha)
        headers = {fname: {t: {"dtype": i.dtype, "shape": list(i.shape), "data_offsets": list(i.data_offsets)}
                           for t, i in fm.tensors.items()} for fname, fm in meta.files_metadata.items()}
    return {"resolved_revision": info.sha, "files": [asdict(f) for f in files], "weight_format": fmt,
            "weight_files": weights, "headers": headers}


def _dir_metadata(src_dir: Path, out_dir: Path, ref: ModelRef, hash_small: bool) -> dict[str, Any]:
    """Metadata of a directory on disk (a local model or a cached snapshot)."""
    names = sorted(p.name for p in src_dir.iterdir() if p.is_file())
    copied = set(_copy_meta(src_dir, out_dir, ref))
    files = [FileInfo(n, (src_dir / n).stat().st_size,
                      sha256_file(src_dir / n) if hash_small and n in copied else None) for n in names]
    fmt, weights = _weight_files(names)
    return {"files": [asdict(f) for f in files], "weight_format": fmt, "weight_files": weights,
            "headers": None, "local_path": str(src_dir)}


def content_id(ref: ModelRef, resolved_revision: str | None, content_record: Path | None) -> str:
    """What a source's bytes are known by, whatever its path or slug: a Hub model's commit; a local model's
    file names, sizes and sha256 (its content record, rule hash_source's, else hashed now), hashed.

    Plans key the shards read from a source by it, so a changed source gives new shard files, never an old one.
    """
    if ref.kind == "hub":
        return f"{ref.repo_id}@{resolved_revision}"
    if content_record is not None:
        files = json.loads(content_record.read_text())["files"]
    else:
        directory = local_model_dir(ref)
        files = [{"name": p.name, "size": p.stat().st_size, "sha256": sha256_file(p)}
                 for p in sorted(directory.iterdir()) if p.is_file()]
    return "sha256:" + hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()


def fetch_metadata(raw: str, out_dir: Path, content_record: Path | None = None) -> dict[str, Any]:
    """Write ``out_dir`` (atomically): source.json, config.json, tokenizer files, inventory.tsv.

    ``content_record``: a local model's content record (moeforge.io.source_content), from which its
    ``content_id`` is taken without reading the files again.
    """
    from moeforge.io.inventory import write_inventory

    ref = parse_ref(raw)
    if ref.kind == "hub":
        _check_not_a_mistyped_path(ref)
    with atomic_dir(out_dir) as tmp:
        if ref.kind == "local":
            meta = _dir_metadata(local_model_dir(ref), tmp, ref, hash_small=True)
            meta["resolved_revision"] = None
        elif _hub_offline():
            snapshot = _hub_snapshot(ref, None)
            meta = _dir_metadata(snapshot, tmp, ref, hash_small=True)
            meta["resolved_revision"] = snapshot.name
        else:
            meta = _hub_metadata(ref, tmp)
        if not (tmp / "config.json").is_file():
            raise ModelError("the model has no config.json", ref.raw, "is this a Hugging Face transformers model?")
        if meta["weight_format"] == "none":
            raise ModelError("no weights found (*.safetensors or pytorch_model*.bin)", ref.raw,
                             "check that the repository/directory holds a full model")
        headers = meta.pop("headers")
        meta["warnings"] = index_warnings(tmp, meta["weight_files"]) if meta["weight_format"] == "safetensors" \
            else []
        for warning in meta["warnings"]:
            log.warning("model %s: %s", ref.raw, warning)
        if meta["weight_format"] == "bin":
            headers = _convert_bin(ref, meta, tmp)
        source = {"ref": ref.raw, "kind": ref.kind, "repo_id": ref.repo_id, "requested_revision": ref.revision,
                  "slug": ref.slug, **meta,
                  "content_id": content_id(ref, meta["resolved_revision"], content_record)}
        write_inventory(source, headers, tmp / "inventory.tsv")
        write_json(tmp / "source.json", source)
    return source


def index_warnings(meta_dir: Path, weight_files: list[str]) -> list[str]:
    """What the model's safetensors index says that its files do not: shards it names that are not there.

    The weights are read from the files present (their headers say which tensors each holds), so a stale or
    hand-edited index does not stop a build; a tensor it places in a missing shard and no file holds is refused
    by the plan, naming the tensor. The user still hears of it: an index that disagrees is how a half-copied
    model usually shows.
    """
    index = meta_dir / SAFETENSORS_INDEX
    if not index.is_file():
        return []
    # The copy in meta_dir was checked when made (_copy_meta_file): an object whose weight_map, if any, maps
    # tensor names to file names.
    weight_map = json.loads(index.read_text(encoding="utf-8")).get("weight_map")
    if weight_map is None:
        return [f"{SAFETENSORS_INDEX} has no weight_map, so it is not used: the weight files are read as found"]
    named = list(weight_map.values())
    missing = sorted(set(named) - set(weight_files))
    if not missing:
        return []
    listed = sum(file in missing for file in named)
    return [f"{SAFETENSORS_INDEX} names {', '.join(missing)}, which the model does not have ({listed} tensor(s) "
            f"listed there); its tensors are read from the files present: {', '.join(weight_files)}"]


CONVERTED_DIR = "weights"


def _convert_bin(ref: ModelRef, meta: dict[str, Any], out_dir: Path) -> dict[str, Any]:
    """Convert .bin-only weights into out_dir/weights; meta then describes the safetensors copy."""
    from moeforge.io.binweights import convert
    from moeforge.io.inventory import local_headers

    if ref.kind == "local":
        src = Path(meta["local_path"])
    else:
        src = _hub_snapshot(ModelRef(ref.raw, "hub", repo_id=ref.repo_id, revision=meta["resolved_revision"]),
                            list(meta["weight_files"]))
    meta["converted_from"] = meta["weight_files"]
    meta["weight_files"] = convert(src, meta["weight_files"], out_dir / CONVERTED_DIR)
    for name in META_FILES:  # the converted copy is a complete model directory
        if (out_dir / name).is_file():
            shutil.copyfile(out_dir / name, out_dir / CONVERTED_DIR / name)
    meta["weight_format"] = "safetensors"
    return local_headers(out_dir / CONVERTED_DIR, meta["weight_files"])


def _snapshot_dir(repo_id: str, commit: str) -> Path:
    """Where huggingface_hub keeps (or will keep) a commit's files: known without asking the Hub."""
    from huggingface_hub import constants
    from huggingface_hub.file_download import repo_folder_name

    return Path(constants.HF_HUB_CACHE) / repo_folder_name(repo_id=repo_id, repo_type="model") / "snapshots" / commit


def _on_hub(located: dict[str, Any]) -> bool:
    """Whether the weights come from the Hub (a .bin model's converted copy is written by fetch_metadata)."""
    return located["kind"] == "hub" and not located["converted"]


def locate_weights(source_json: Path, out_json: Path, cache_path: Path) -> dict[str, Any]:
    """Where a model's weight files are, or will be once a merge fetches them, with sizes and sha256 (no download).

    A file on disk (a local model, a converted copy) is hashed through the stat cache; a Hub file's
    sha256 is the Hub's LFS record or the name of the cache blob it links to, else left for fetch_weights.
    The record is per model: every merge's fetch_weights reads it, so none hashes the model again.
    """
    source = json.loads(source_json.read_text())
    converted = bool(source.get("converted_from"))
    if converted:
        directory = source_json.parent / CONVERTED_DIR
    elif source["kind"] == "local":
        directory = Path(source["local_path"])
    else:
        directory = _snapshot_dir(source["repo_id"], source["resolved_revision"])
    located = {"slug": source["slug"], "ref": source["ref"], "kind": source["kind"], "repo_id": source["repo_id"],
               "revision": source["resolved_revision"], "converted": converted, "dir": str(directory)}
    recorded = {f["name"]: f for f in source["files"]}
    cache = HashCache(cache_path)
    files = []
    for name in source["weight_files"]:
        path = directory / name
        if _on_hub(located):
            info = recorded.get(name, {})
            files.append({"name": name, "size": info.get("size"), "sha256": _known_sha256(path, info.get("sha256"))})
            continue
        if not path.is_file():
            raise FetchError(f"weight file {name} is missing", str(directory), "restore the model's files and rerun")
        files.append({"name": name, "size": path.stat().st_size, "sha256": cache.sha256(path, name)})
    cache.save()
    record = {**located, "files": files}
    write_json(out_json, record)
    return record


def _hub_weights(located: dict[str, Any]) -> Path:
    """The snapshot folder holding a Hub model's weights, downloading what the cache lacks (no request when
    every weight file of the pinned commit is already there)."""
    directory = Path(located["dir"])
    if all((directory / f["name"]).is_file() for f in located["files"]):
        return directory
    ref = ModelRef(raw=located["ref"], kind="hub", repo_id=located["repo_id"], revision=located["revision"])
    patterns = [f["name"] for f in located["files"]] + [SAFETENSORS_INDEX, BIN_INDEX, *META_FILES]
    fetched = _hub_snapshot(ref, patterns)
    if fetched.resolve() != directory.resolve():
        raise FetchError(f"downloaded to {fetched}, but the model was located at {directory}", located["ref"],
                         "rerun with the same HF_HUB_CACHE (or HF_HOME) as the run that located the model")
    return directory


def fetch_weights(weights_json: Path, out_json: Path, cache_path: Path) -> dict[str, Any]:
    """Make sure of one merge's source weights: downloaded (Hub) or present (local), checked, with their sha256.

    One job per (merge, model), after that merge's plan: a merge's weights are fetched only once it has
    validated, and another merge of the same models neither waits for it nor reruns it. A second merge
    costs a look into the cache and stat calls: the model was located and hashed once (locate_weights).
    Each file's header is checked again, now against the file's size (Hub headers were checked without
    it), and a file whose size changed since the model was located is refused.
    """
    located = json.loads(weights_json.read_text())
    directory = _hub_weights(located) if _on_hub(located) else Path(located["dir"])
    cache = HashCache(cache_path)
    files = []
    for entry in located["files"]:
        name, path = entry["name"], directory / entry["name"]
        if not path.is_file():
            raise FetchError(f"weight file {name} is missing", str(directory), "re-download the model")
        size = path.stat().st_size
        if entry["size"] is not None and size != entry["size"]:
            raise ModelError(f"{path}: {size} bytes, {entry['size']} when the model was located", located["ref"],
                             "the model changed during the run: rerun")
        read_header(path)
        known = _known_sha256(path, entry["sha256"]) if _on_hub(located) else None
        files.append({"name": name, "size": size, "sha256": known or cache.sha256(path, name)})
    cache.save()
    record = {"slug": located["slug"], "dir": str(directory), "files": files}
    write_json(out_json, record)
    return record


def _known_sha256(path: Path, recorded: str | None) -> str | None:
    """A sha256 that needs no read: the Hub's LFS record, or the HF cache blob the file links to."""
    if recorded:
        return recorded
    if path.is_symlink():
        blob = Path(os.readlink(path)).name
        if re.fullmatch(r"[0-9a-f]{64}", blob):
            return blob
    return None


def weights_dir_of(weights_json: Path) -> Path:
    """Where a model's weight files are (a locate_weights or fetch_weights record)."""
    return Path(json.loads(Path(weights_json).read_text())["dir"])


def weight_dirs_from(records: list[Path]) -> dict[str, Path]:
    """slug -> weights directory, from fetch_weights' records."""
    dirs = {}
    for path in records:
        record = json.loads(Path(path).read_text())
        dirs[record["slug"]] = Path(record["dir"])
    return dirs
