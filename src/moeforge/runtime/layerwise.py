"""Layer-by-layer forward pass of a dense decoder-only checkpoint.

Gate computation needs per-layer hidden states of a handful of prompts, never the model's
output. Loading the whole model costs its full size in memory; running it one decoder layer at a
time costs one layer's weights, the embedding rows of the prompts' tokens and the prompts'
activations. The computing is done by the model's own transformers modules, built
on the meta device from its config and given real weights one layer at a time, so attention
variants, q/k/v biases, q/k norms, rotary scaling types and sliding windows behave exactly as in
the full model.

The same engine gives the logits of whole prompts (``stream_logits``: embeddings, every decoder
layer, final norm, output head) and, for MoE checkpoints, each sparse layer's router logits, so
the smoke test compares a merged model with its base in the memory of one layer. Each module's
weights go through transformers' own checkpoint conversion (see ``moeforge.runtime.key_conversion``),
so an MoE checkpoint with one tensor per expert fills the fused expert modules exactly as
``from_pretrained`` does.

Two per-layer vectors are available to the gates:

* ``residual_in``: the residual stream entering layer ``i`` (``output_hidden_states[i]`` of the
  full model), before the layer's input norm;
* ``mlp_in``: the input of layer ``i``'s MLP, ``post_attention_layernorm(h + attn(input_layernorm(h)))``,
  which is what a router in place of that MLP actually sees.
"""

from __future__ import annotations

import ctypes
import inspect
import logging
import os
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open

from moeforge.errors import ModelError
from moeforge.io.fetch import DAMAGED_FILE_FIX
from moeforge.io.files import read_json
from moeforge.io.progress import tracked
from moeforge.io.safetensors_file import TensorEntry, read_header
from moeforge.runtime.float32_linear import with_weight_major_linear
from moeforge.runtime.key_conversion import KeyConversion, LoadOutcome

WANTS = ("residual_in", "mlp_in")
_INDEX_NAME = "model.safetensors.index.json"


class CheckpointTensors:
    """Name -> file map of a safetensors checkpoint (single file or sharded with an index).

    Reading opens the files only for the duration of one call, so the memory map of the weights
    never keeps more than the tensors just read resident.
    """

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = Path(base_dir)
        self.files = self._map_files()
        #: model name -> the name the file stores it under, for tensors stored under other names
        self.stored_names: dict[str, str] = {}
        self._headers: dict[Path, tuple[int, dict[str, TensorEntry]]] = {}

    @classmethod
    def from_files(cls, files: Sequence[Path], renamed: Mapping[Path, Mapping[str, str]] | None = None
                   ) -> CheckpointTensors:
        """A checkpoint made of safetensors files named one by one, such as a merge's shards before assembly.

        ``renamed`` gives, for a file whose tensors are stored under other names than the model's (the gates
        file's ``layer.{i}.router``), stored name -> model name; only the tensors it names are taken from that
        file.
        """
        self = cls.__new__(cls)
        self.base_dir = Path(files[0]).parent if files else Path(".")
        self.files, self.stored_names, self._headers = {}, {}, {}
        renamed = renamed or {}
        for file in map(Path, files):
            names = read_header(file)[1]
            table = renamed.get(file)
            for stored in names:
                name = stored if table is None else table.get(stored)
                if name is not None:
                    self.files[name] = file
                    if name != stored:
                        self.stored_names[name] = stored
        return self

    def _map_files(self) -> dict[str, Path]:
        index = self.base_dir / _INDEX_NAME
        if index.is_file():
            weight_map = read_json(index, "", ModelError, DAMAGED_FILE_FIX)["weight_map"]
            files = {name: self.base_dir / file for name, file in weight_map.items()}
            _warn_missing_shards(index, set(files.values()))
            return files
        files = sorted(self.base_dir.glob("*.safetensors"))
        if not files:
            raise ModelError(
                "no safetensors weights found",
                where=str(self.base_dir),
                fix="fetch the model's weights (model.safetensors or an index with shards)",
            )
        names: dict[str, Path] = {}
        for file in files:
            with safe_open(file, framework="pt") as handle:
                names.update(dict.fromkeys(handle.keys(), file))
        return names

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def entries(self) -> dict[str, TensorEntry]:
        """Every tensor's dtype, shape and size, from the file headers alone (no tensor data read)."""
        found: dict[str, TensorEntry] = {}
        for file in sorted(set(self.files.values())):
            if file.is_file():
                found.update(read_header(file)[1])
        return {name: found[self.stored_names.get(name, name)] for name in self.files
                if self.stored_names.get(name, name) in found}

    def _files_of(self, names: Sequence[str]) -> dict[Path, list[str]]:
        """The named tensors grouped by the file that holds them; a file the index names but the model
        lacks is an error."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        for file, file_names in by_file.items():
            if not file.is_file():
                raise ModelError(
                    f"tensor {file_names[0]} is in {file.name}, which {_INDEX_NAME} names but the model lacks",
                    where=str(self.base_dir),
                    fix="re-download the model: that shard is missing",
                )
        return by_file

    def read(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Read the named tensors (stored dtype, CPU), grouped by file."""
        tensors: dict[str, torch.Tensor] = {}
        for file, file_names in self._files_of(names).items():
            with safe_open(file, framework="pt", device="cpu") as handle:
                for name in file_names:
                    tensors[name] = handle.get_tensor(self.stored_names.get(name, name))
        return tensors

    def prefetch(self, names: Sequence[str]) -> None:
        """Ask the kernel to start reading the named tensors' bytes now, in large requests.

        A memory-mapped tensor read from a cold file is a stream of page faults, each reading ahead
        a little: slow on disks and network file systems, and it competes badly with the other jobs'
        sequential reads. Called for the next layer while the current one computes, it also
        overlaps the reading with the work.
        """
        advise = getattr(os, "posix_fadvise", None)
        if advise is None:
            return
        for file, file_names in self._files_of(names).items():
            if file not in self._headers:
                self._headers[file] = read_header(file)
            start, entries = self._headers[file]
            fd = os.open(file, os.O_RDONLY)
            try:
                for name in file_names:
                    entry = entries[self.stored_names.get(name, name)]
                    advise(fd, start + entry.begin, entry.nbytes, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)

    def read_rows(self, name: str, rows: Sequence[int]) -> tuple[torch.Tensor, tuple[int, ...]]:
        """Rows ``rows`` of a stored matrix (stored dtype, CPU, in the order given) and its full shape.

        Through the file's memory map only those rows are touched: an embedding's rows for a few
        prompts' tokens instead of its whole matrix.
        """
        (file, _), = self._files_of([name]).items()
        with safe_open(file, framework="pt", device="cpu") as handle:
            view = handle.get_slice(self.stored_names.get(name, name))
            shape = tuple(view.get_shape())
            return torch.cat([view[row:row + 1] for row in rows]), shape


def _warn_missing_shards(index: Path, shards: set[Path]) -> None:
    """Say which shards the index names but the directory lacks; only reading from one is an error.

    Such an index is usable when the tensors it misses are never read (a partial download, an
    index left over from re-sharding), so it is not refused; the warning says why reading one of
    those tensors fails, before it does.
    """
    missing = sorted(path.name for path in shards if not path.is_file())
    if missing:
        logging.getLogger("moeforge").warning(
            "%s: names shard file(s) the model does not have: %s; tensors in them cannot be read",
            index, ", ".join(missing))


def release_freed_memory() -> None:
    """Hand freed heap memory back to the operating system (glibc only; a no-op elsewhere).

    glibc raises its mmap threshold after the first large free, so later layers' weights land on
    the heap, and without a trim the resident size grows by about one layer per layer run: a
    16-layer model streamed this way would end up as resident as the whole model.
    """
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


@dataclass(frozen=True)
class PackedSequences:
    """Unpadded token sequences in one row, in transformers' padding-free format.

    Positions restart at 0 with each sequence and no attention mask is given, so transformers' mask
    builders make attention block-diagonal: each sequence attends to itself alone, exactly as when it
    runs by itself, with no padding to mask or to leave out of statistics. One forward call per layer
    then serves every sequence: with a few tokens per prompt a layer's cost is reading its weights, so
    a dozen prompts packed cost about what one costs (a 135M-shape MoE's smoke pass: 3.9 s -> 1.8 s).
    """

    sequences: tuple[torch.Tensor, ...]

    def __post_init__(self) -> None:
        if not self.sequences or any(s.numel() == 0 for s in self.sequences):
            raise ValueError("packed sequences must be non-empty, each with at least one token")

    @property
    def lengths(self) -> list[int]:
        return [s.numel() for s in self.sequences]

    @property
    def input_ids(self) -> torch.Tensor:
        """[1, N]: the sequences one after another."""
        return torch.cat([s.reshape(-1) for s in self.sequences])[None]

    @property
    def positions(self) -> torch.Tensor:
        """[1, N]: each sequence's positions from 0."""
        return torch.cat([torch.arange(n) for n in self.lengths])[None]

    def split(self, tensor: torch.Tensor, dim: int) -> list[torch.Tensor]:
        """A packed result cut back into one tensor per sequence along ``dim`` (the token axis)."""
        return list(tensor.split(self.lengths, dim=dim))


@dataclass(frozen=True)
class LayerStates:
    """Per-batch activations of one layer; each list has one [B, T, H] tensor per input batch."""

    index: int
    residual_in: list[torch.Tensor] | None
    mlp_in: list[torch.Tensor] | None


def load_config(base_dir: Path):
    """The model's transformers config, never executing code shipped with the checkpoint."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(base_dir), trust_remote_code=False)
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(
            f"cannot read the model config: {exc}",
            where=str(Path(base_dir) / "config.json"),
            fix="use a transformers-native decoder-only checkpoint (llama, mistral, qwen2, qwen3)",
        ) from exc


def build_skeleton(config) -> torch.nn.Module:
    """The causal-LM module tree on the meta device: structure and forward code, no memory."""
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
    except ValueError as exc:
        raise ModelError(
            f"model type {config.model_type!r} is not a causal language model transformers knows: {exc}",
            where="config.json",
            fix="use a decoder-only checkpoint (llama, mistral, qwen2, qwen3)",
        ) from exc
    base = model.base_model
    for attribute in ("embed_tokens", "layers", "rotary_emb"):
        if not hasattr(base, attribute):
            raise ModelError(
                f"model type {config.model_type!r} has no {attribute!r} module",
                where=type(model).__name__,
                fix="layer-by-layer runs support llama-style decoders (llama, mistral, qwen2, qwen3)",
            )
    return model


def position_ids_for(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions counted from each sequence's first real token, so left padding shifts nothing."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)


def all_finite(tensor: torch.Tensor, chunk: int = 1 << 24) -> bool:
    """Whether a tensor holds no NaN or Inf.

    A NaN or an infinity anywhere makes the sum NaN or infinite, so a finite sum settles it; the
    sum runs at memory speed, 30 times faster than ``isfinite`` on these CPUs, which made this
    check the largest cost of a streamed pass. Only a sum that overflowed (or a real NaN) goes on
    to the exact check, in chunks so the mask stays small.
    """
    if not tensor.is_floating_point():
        return True
    if bool(torch.isfinite(tensor.sum())):
        return True
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(flat[start:start + chunk]).all()) for start in range(0, flat.numel(), chunk))


def _own_storage(module: torch.nn.Module) -> None:
    """Copy into memory of its own every parameter of ``module`` that lies in the memory-mapped checkpoint.

    A tensor read in the compute dtype is the file's mapped memory itself, and while one such tensor
    lives, every page of that file mapping touched so far stays resident: a kept 1B-class MoE in
    bfloat16 measured twice its size (its weights, plus the file pages read to fuse its experts).
    Memory torch did not allocate is what a non-resizable storage means; tensors the loading cast
    or fused own their memory already and are left as they are.
    """
    for param in module.parameters():
        if not param.untyped_storage().resizable():
            param.data = param.data.clone()


class _Runner:
    """Holds the skeleton and the checkpoint, and materialises one module at a time."""

    def __init__(self, base_dir: Path, device: torch.device, dtype: torch.dtype, keep: bool = False,
                 store: CheckpointTensors | None = None) -> None:
        self.keep = keep
        self.config = load_config(base_dir)
        self.model = build_skeleton(self.config).to(dtype)
        self.base = self.model.base_model
        self.store = store or CheckpointTensors(base_dir)
        self.conversion = KeyConversion(self.model, list(self.store.files))
        self.device = device
        self.dtype = dtype
        self.module_names = {id(m): n for n, m in self.model.named_modules()}

    def materialise(self, module: torch.nn.Module) -> torch.nn.Module:
        """Give ``module`` its checkpoint weights (cast to the compute dtype) on the device.

        A runner that keeps the model loads each module once: a module it already holds is returned as it is.
        """
        if self.keep and not any(p.is_meta for p in module.parameters()):
            return module
        prefix = self.module_names[id(module)] + "."
        tensors = self.store.read(self.conversion.sources_under(prefix))
        self._check_finite(tensors)
        for target, source in self.conversion.tied_parameters().items():
            if target.startswith(prefix):  # as transformers ties it: the input embedding, whatever is stored
                tensors = {n: t for n, t in tensors.items() if self.conversion.targets[n] != target}
                name = self._source_of(source)
                tensors[target] = self.store.read([name])[name]
        outcome = self.conversion.load(tensors, self.device, self.dtype)
        self._check_outcome(module, prefix, outcome)
        if self.keep:
            _own_storage(module)
        return module

    def release(self, *modules: torch.nn.Module) -> None:
        """Free the modules' weights (back to the meta device), unless this runner keeps the whole model;
        either way hand the loading's freed buffers back to the system."""
        if not self.keep:
            for module in modules:
                module.to("meta")
        release_freed_memory()

    def output_head(self) -> torch.nn.Module:
        """The output head, materialised; shared with the loaded input embedding when the config ties them,
        as the loaded model shares it (a kept model then holds the matrix once)."""
        head, embed = self.model.get_output_embeddings(), self.base.embed_tokens
        if self.keep and self.conversion.tied_parameters() and not embed.weight.is_meta:
            head.weight = embed.weight
            return head
        return self.materialise(head)

    def whole_model(self) -> torch.nn.Module:
        """The causal LM with every module loaded, ready to ``generate``: what a streamed pass of a keeping
        runner left resident, completed with whatever that pass did not load.

        The weights went through the same conversion as every streamed module, and the key check of the
        whole checkpoint (``check_loadable``) stands for ``from_pretrained``'s strictness, so this model is
        the one a user loads, without reading the checkpoint a second time.
        """
        for module in (self.base.embed_tokens, *self.base.layers, self.base.norm):
            self.materialise(module)
        self.output_head()
        self.base.rotary_emb = self.rotary()
        unloaded = [name for name, tensor in (*self.model.named_parameters(), *self.model.named_buffers())
                    if tensor.is_meta]
        if unloaded:
            raise ModelError(f"{len(unloaded)} tensor(s) of the model were not loaded, e.g. {unloaded[0]}",
                             where=str(self.store.base_dir),
                             fix="this architecture cannot be loaded module by module; use a llama-style decoder")
        return self.model.eval()

    def prefetch_layers(self, *indices: int) -> None:
        """Start reading these decoder layers' weights (those that exist) from disk; see CheckpointTensors.prefetch."""
        for index in (i for i in indices if i < len(self.base.layers)):
            prefix = self.module_names[id(self.base.layers[index])] + "."
            self.store.prefetch(self.conversion.sources_under(prefix))

    def embedding_rows(self, ids: torch.Tensor) -> torch.Tensor:
        """The input embedding's rows for ``ids`` (1-D), in the compute dtype on the device.

        Only these rows are read: the whole matrix would be the largest tensor a streamed pass holds
        (a 128k vocabulary at hidden 2048 is 1 GiB in float32, four times a 1B-class layer). An
        embedding module of another kind (one that scales its output) is loaded whole and applied, and
        so is every embedding of a runner that keeps the model (generation needs all of it).
        """
        module = self.base.embed_tokens
        prefix = self.module_names[id(module)] + "."
        names = self.conversion.sources_under(prefix)
        whole = self.keep or type(module) is not torch.nn.Embedding
        if whole or [self.conversion.targets[n] for n in names] != [prefix + "weight"]:
            rows = self.materialise(module)(ids.to(self.device))
            self.release(module)
            return rows
        rows, shape = self.store.read_rows(names[0], ids.tolist())
        expected = tuple(module.weight.shape)
        if shape != expected:
            raise self._shapes_error([f"{names[0]} (file {list(shape)} vs model {list(expected)})"])
        self._check_finite({names[0]: rows})
        return rows.to(self.device, self.dtype)

    def _check_finite(self, tensors: dict[str, torch.Tensor]) -> None:
        """Refuse NaN and Inf in the weights just read, by checkpoint name.

        Every weight passes here once, so this is the scan of the whole checkpoint at no extra
        read. It cannot be left to the outputs: a NaN weight does not always reach the logits
        (attention over an all-NaN query came out finite, and wrong, in a test).
        """
        bad = sorted(name for name, tensor in tensors.items() if not all_finite(tensor))
        if bad:
            raise ModelError(
                f"{len(bad)} tensor(s) contain NaN or Inf, e.g. {bad[0]}",
                where=str(self.store.base_dir),
                fix="a source model: re-download it; a moeforge output: rebuild it (its shard jobs refuse "
                    "non-finite values, so the file changed after it was written)",
            )

    def _source_of(self, key: str) -> str:
        """The checkpoint name of the tensor that loads into model key ``key``."""
        names = [n for n, target in self.conversion.targets.items() if target == key]
        if not names:
            raise ModelError(f"tensor {key} missing from the checkpoint", where=str(self.store.base_dir),
                             fix="check that the weights match config.json (tie_word_embeddings)")
        return names[0]

    def _shapes_error(self, wrong: list[Any]) -> ModelError:
        """The error for weights whose shapes config.json does not describe, naming the first."""
        return ModelError(
            f"{len(wrong)} tensor(s) do not fit the model's shapes, e.g. {wrong[0]}",
            where=str(self.store.base_dir),
            fix="check config.json (sizes, head counts, expert counts) against the weights",
        )

    def _check_outcome(self, module: torch.nn.Module, prefix: str, outcome: LoadOutcome) -> None:
        """Refuse a module whose weights did not load exactly: config.json does not describe them."""
        if outcome.unexpected_keys:
            raise ModelError(
                f"checkpoint tensor {outcome.unexpected_keys[0]} is not part of the model described by config.json",
                where=str(self.store.base_dir),
                fix="check config.json (e.g. attention_bias, model_type) against the weights",
            )
        if outcome.mismatched_keys or outcome.error_msgs:
            raise self._shapes_error([*outcome.mismatched_keys, *outcome.error_msgs])
        missing = sorted(prefix + name for name, p in module.named_parameters() if p.is_meta)
        if missing:
            raise ModelError(
                f"{len(missing)} tensor(s) missing from the checkpoint, e.g. {missing[0]}",
                where=str(self.store.base_dir),
                fix="check that the weights match config.json (model_type, layer count, biases)",
            )
        if any(t.is_meta for t in module.buffers()):
            raise ModelError(
                f"module {prefix[:-1]} has buffers that are not in the checkpoint",
                where=type(module).__name__,
                fix="this architecture cannot be run layer by layer; use a llama-style decoder",
            )

    def rotary(self) -> torch.nn.Module:
        """A real rotary module: its inverse frequencies are computed from the config, not stored."""
        skeleton = self.base.rotary_emb
        return type(skeleton)(config=self.base.config).to(self.device)

    def layer_type(self, index: int) -> str:
        """Which attention mask a layer uses, mirroring the model classes' own choice."""
        layer_types = getattr(self.config, "layer_types", None)
        if layer_types:
            return layer_types[index]
        return "sliding_attention" if getattr(self.config, "sliding_window", None) else "full_attention"

    def masks(self, embeds: torch.Tensor, attention_mask: torch.Tensor | None, positions: torch.Tensor) -> dict:
        """The 4D masks of one batch for every attention kind the model uses; without an attention mask,
        positions that restart at 0 mark packed sequences and the masks keep them apart."""
        from transformers.masking_utils import (
            create_causal_mask,
            create_sliding_window_causal_mask,
        )

        kinds = {self.layer_type(i) for i in range(self.config.num_hidden_layers)}
        builders = {"full_attention": create_causal_mask, "sliding_attention": create_sliding_window_causal_mask}
        unknown = kinds - builders.keys()
        if unknown:
            raise ModelError(
                f"unsupported attention layer type(s) {sorted(unknown)}",
                where="config.json layer_types",
                fix="layer-by-layer runs support full and sliding-window attention",
            )
        # No cache: the argument's name changed within transformers 5.x (past_key_values, then cache).
        no_cache = {"cache" if "cache" in inspect.signature(create_causal_mask).parameters else "past_key_values": None}
        return {
            kind: builders[kind](
                config=self.base.config,
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                position_ids=positions,
                **no_cache,
            )
            for kind in sorted(kinds)
        }


@dataclass
class _Batch:
    hidden: torch.Tensor
    positions: torch.Tensor
    cos_sin: tuple[torch.Tensor, torch.Tensor]
    masks: dict


#: One forward batch: left-padded ``(input_ids, attention_mask)`` [B, T] each, or packed sequences.
Batch = tuple[torch.Tensor, torch.Tensor] | PackedSequences


def _ids_mask_positions(batch: Batch, device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    if isinstance(batch, PackedSequences):
        return batch.input_ids, None, batch.positions.to(device)
    input_ids, attention_mask = batch
    mask = attention_mask.to(device)
    return input_ids, mask, position_ids_for(mask)


@torch.no_grad()
def _embed_batches(runner: _Runner, batches: Sequence[Batch]) -> list[_Batch]:
    """Embed every batch from the embedding rows of the tokens they hold (read once, for all batches)."""
    inputs = [_ids_mask_positions(batch, runner.device) for batch in batches]
    flat = [input_ids.reshape(-1) for input_ids, _, _ in inputs]
    unique, inverse = torch.unique(torch.cat(flat), return_inverse=True)
    vocab = runner.config.vocab_size
    if len(unique) and int(unique[-1]) >= vocab:
        raise ModelError(f"token id {int(unique[-1])} is outside the embedding's {vocab} rows",
                         where=str(runner.store.base_dir),
                         fix="the tokenizer does not belong to this model: check the tokenizer files and vocab_size")
    table = runner.embedding_rows(unique)
    rotary = runner.rotary()
    prepared = []
    for batch, (input_ids, mask, positions), rows in zip(batches, inputs, inverse.split([len(f) for f in flat]),
                                                          strict=True):
        hidden = table[rows.to(runner.device)].reshape(*input_ids.shape, -1)
        masks = runner.masks(hidden, mask, positions)
        if isinstance(batch, PackedSequences) and len(batch.sequences) > 1 and None in masks.values():
            import transformers  # a guard: without the block-diagonal mask, sequences would see each other

            raise ModelError("the installed transformers does not separate packed sequences (no attention mask "
                             "came back for them)", where=f"transformers {transformers.__version__}",
                             fix="install the transformers version in envs/requirements.txt")
        prepared.append(_Batch(hidden, positions, rotary(hidden, positions), masks))
    del table
    release_freed_memory()
    return prepared


def iter_layer_hidden_states(
    base_dir: Path,
    batches: Sequence[Batch],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    want: Sequence[str] = ("residual_in",),
    num_layers: int | None = None,
    progress: bool = True,
) -> Iterator[LayerStates]:
    """Yield the requested activations of layers ``0 .. num_layers-1``, one layer at a time.

    ``batches`` are ``(input_ids, attention_mask)`` pairs, left-padded ([B, T] each); positions
    are counted from each row's first real token. Only one decoder layer's weights are resident
    at a time. Layer ``i`` is not loaded at all when only its ``residual_in`` is wanted and it is
    the last layer asked for.
    """
    unknown = set(want) - set(WANTS)
    if unknown or not want:
        raise ValueError(f"want must be a non-empty subset of {WANTS}, got {tuple(want)}")
    runner = _Runner(Path(base_dir), torch.device(device), dtype)
    total = runner.config.num_hidden_layers
    count = total if num_layers is None else num_layers
    if not 0 < count <= total:
        raise ValueError(f"num_layers must be in 1..{total}, got {num_layers}")
    prepared = _embed_batches(runner, batches)
    for index in tracked(range(count), f"{Path(base_dir).name}: layer-streamed pass", count, "layers", progress):
        residual_in = [b.hidden for b in prepared] if "residual_in" in want else None
        if "mlp_in" not in want and index == count - 1:
            yield LayerStates(index, residual_in, None)
            break
        captured = _run_layer(runner, index, prepared, capture=("mlp_in",) if "mlp_in" in want else ())
        yield LayerStates(index, residual_in, captured.get("mlp_in"))


@torch.no_grad()
@with_weight_major_linear
def _run_layer(runner: _Runner, index: int, prepared: list[_Batch],
               capture: Sequence[str] = (), refit: Refit | None = None) -> dict[str, list[torch.Tensor]]:
    """Run every batch through layer ``index`` in place; capture per batch what ``capture`` names.

    ``mlp_in`` is the MLP's input [B, T, H]; ``router_logits`` the sparse block's router output
    [B*T, E], the tensor the whole model returns with ``output_router_logits``. ``refit``, when given,
    first sees every batch's ``mlp_in`` with the layer loaded and may change the layer's weights in place
    before the batches go through it.
    """
    runner.prefetch_layers(index, index + 1)
    layer = runner.materialise(runner.base.layers[index])
    if refit is not None:
        refit(index, layer, _mlp_inputs(runner, layer, index, prepared))
    captured: dict[str, list[torch.Tensor]] = {kind: [] for kind in capture}
    hooks = []
    if "mlp_in" in captured:
        hooks.append(layer.mlp.register_forward_pre_hook(lambda _module, args: captured["mlp_in"].append(args[0])))
    if "router_logits" in captured:
        hooks.append(router_of(layer).register_forward_hook(
            lambda _module, _args, out: captured["router_logits"].append(out[0] if isinstance(out, tuple) else out)))
    try:
        kind = runner.layer_type(index)
        for batch in prepared:
            output = layer(
                batch.hidden,
                attention_mask=batch.masks[kind],
                position_ids=batch.positions,
                position_embeddings=batch.cos_sin,
                use_cache=False,
            )
            batch.hidden = output[0] if isinstance(output, tuple) else output
    finally:
        for hook in hooks:
            hook.remove()
        runner.release(layer)
    return captured


#: ``refit(layer index, loaded decoder layer, its MLP's input per batch)``: changes the layer's weights in place.
Refit = Callable[[int, torch.nn.Module, list[torch.Tensor]], None]


class _MlpReached(Exception):
    """Raised by the hook on a layer's MLP input: a pass that wants only that input stops there."""


def _mlp_inputs(runner: _Runner, layer: torch.nn.Module, index: int, prepared: list[_Batch]) -> list[torch.Tensor]:
    """Every batch's MLP input at this layer, the batches' hidden states left as they are.

    Each batch stops at the MLP's input: the experts, most of a sparse layer's work, run once per layer (in
    the pass that follows, with the refitted router), not twice.
    """
    inputs: list[torch.Tensor] = []

    def stop(_module: torch.nn.Module, args: tuple) -> None:
        inputs.append(args[0])
        raise _MlpReached

    hook = layer.mlp.register_forward_pre_hook(stop)
    try:
        kind = runner.layer_type(index)
        for batch in prepared:
            try:
                layer(batch.hidden, attention_mask=batch.masks[kind], position_ids=batch.positions,
                      position_embeddings=batch.cos_sin, use_cache=False)
            except _MlpReached:
                pass
    finally:
        hook.remove()
    return inputs


def refit_layers(config_dir: Path, store: CheckpointTensors, batches: Sequence[Batch], refit: Refit, *,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 progress: bool = True) -> None:
    """Stream ``batches`` through an MoE, giving ``refit`` each sparse layer's router inputs before the layer runs.

    Layer ``i``'s inputs are those of the model whose layers below were already refitted, so a router is
    fitted to the hidden states it will really see; memory stays one layer's weights plus the batches'
    activations, whatever the model's size. ``config_dir`` holds the MoE's config.json, ``store`` its tensors.
    """
    runner = _Runner(Path(config_dir), torch.device(device), dtype, store=store)
    prepared = _embed_batches(runner, batches)
    layers = runner.config.num_hidden_layers
    for index in tracked(range(layers), "router training: layer-streamed pass", layers, "layers", progress):
        sparse = router_of(runner.base.layers[index]) is not None
        _run_layer(runner, index, prepared, refit=refit if sparse else None)


def whole_model_of(config_dir: Path, store: CheckpointTensors, device: str | torch.device,
                   dtype: torch.dtype) -> torch.nn.Module:
    """The causal LM of ``config_dir``'s config with ``store``'s tensors, loaded whole (see ``whole_model``)."""
    return _Runner(Path(config_dir), torch.device(device), dtype, keep=True, store=store).whole_model()


def shared_gate_of(layer: torch.nn.Module) -> torch.nn.Module | None:
    """The shared expert's gate of a decoder layer's sparse block (Qwen2-MoE), None where there is none."""
    block = next((child for child in layer.children() if hasattr(child, "experts")), None)
    return None if block is None else getattr(block, "shared_expert_gate", None)


def router_of(layer: torch.nn.Module) -> torch.nn.Module | None:
    """The router of a decoder layer's sparse MoE block; None for a dense layer.

    Found by structure, not by class name: the block is the child holding ``experts`` (``mlp`` in
    Qwen-MoE, ``mlp`` or ``block_sparse_moe`` in Mixtral), its router the module named ``gate``.
    """
    block = next((child for child in layer.children() if hasattr(child, "experts")), None)
    return None if block is None else block.gate


@dataclass
class StreamedLogits:
    """Whole-prompt outputs of a streamed forward pass, per input batch, float32 on the CPU.

    ``logits[b]`` is [B, T, V] (or what ``stream_logits``'s ``reduce`` made of it);
    ``router_logits[b]`` holds one [B*T, E] tensor per sparse layer, in the order of
    ``sparse_layers`` (decoder layer indices: Qwen2-MoE may keep layers dense).
    """

    logits: list[Any]
    router_logits: list[list[torch.Tensor]]
    sparse_layers: list[int]
    model: torch.nn.Module | None = None


def stream_logits(
    model_dir: Path,
    batches: Sequence[Batch],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    reduce: Callable[[int, torch.Tensor], Any] | None = None,
    keep: bool = False,
) -> StreamedLogits:
    """Run ``batches`` through the whole model, holding one module's weights at a time.

    Embeddings, then each decoder layer, then the final norm and the output head (the input
    embedding when the config ties them): the logits equal the loaded model's, in the memory of
    the largest of those modules plus the batches' activations. ``reduce(b, logits)``, when given,
    replaces batch b's logits as soon as they are computed, so many batches (a whole evaluation)
    go through one read of the weights while only one batch's logits exist at a time.

    ``keep`` keeps every module once loaded, for a caller whose memory budget holds the whole model and
    who goes on to generate: the result's ``model`` is then the whole model, read from disk once.
    """
    runner = _Runner(Path(model_dir), torch.device(device), dtype, keep=keep)
    sparse = [i for i, layer in enumerate(runner.base.layers) if router_of(layer) is not None]
    prepared = _embed_batches(runner, batches)
    routers: list[list[torch.Tensor]] = [[] for _ in prepared]
    layers = runner.config.num_hidden_layers
    for index in tracked(range(layers), f"{Path(model_dir).name}: layer-streamed pass", layers, "layers", progress):
        if index not in sparse:
            _run_layer(runner, index, prepared)
            continue
        captured = _run_layer(runner, index, prepared, capture=("router_logits",))
        for per_batch, router in zip(routers, captured["router_logits"], strict=True):
            per_batch.append(router.float().cpu())
    logits = _head_logits(runner, prepared, reduce or (lambda _, logits: logits))
    return StreamedLogits(logits, routers, sparse, runner.whole_model() if keep else None)


def stream_sequences(
    model_dir: Path,
    sequences: Sequence[torch.Tensor],
    *,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    progress: bool = True,
    keep: bool = False,
) -> StreamedLogits:
    """``stream_logits`` of unpadded token sequences ([1, T] or [T] each), packed into one forward batch
    (see ``PackedSequences``) and cut back apart: ``logits[i]`` is sequence i's [1, T_i, V] and
    ``router_logits[i]`` its [T_i, E] per sparse layer, as if each had run alone."""
    packed = PackedSequences(tuple(sequences))
    streamed = stream_logits(model_dir, [packed], device=device, dtype=dtype, progress=progress, keep=keep)
    per_layer = [packed.split(router, dim=0) for router in streamed.router_logits[0]]
    routers = [[layer[i] for layer in per_layer] for i in range(len(packed.sequences))]
    return StreamedLogits(packed.split(streamed.logits[0], dim=1), routers, streamed.sparse_layers, streamed.model)


@torch.no_grad()
@with_weight_major_linear
def _head_logits(runner: _Runner, prepared: list[_Batch], reduce: Callable[[int, torch.Tensor], Any]) -> list[Any]:
    """Final norm and output head over every batch's last hidden states, each batch's logits
    reduced at once; norm and head dropped afterwards."""
    norm = runner.materialise(runner.base.norm)
    head = runner.output_head()
    try:
        return [reduce(b, head(norm(batch.hidden)).float().cpu()) for b, batch in enumerate(prepared)]
    finally:
        runner.release(norm, head)


def whole_model(model_dir: Path, device: str | torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """The causal LM loaded whole in ``dtype``, ready to ``generate``: every module read once, through the
    conversion the streamed passes use (see ``_Runner.whole_model``)."""
    return _Runner(Path(model_dir), torch.device(device), dtype, keep=True).whole_model()


def streamed_model(model_dir: Path, device: str | torch.device, dtype: torch.dtype,
                   resident_layers: int = 0) -> torch.nn.Module:
    """The causal LM ready to ``generate`` in the memory of its input embedding, its first ``resident_layers``
    decoder layers and one more.

    Each other decoder layer (and an untied output head) loads its weights when it is called and frees them
    when it returns, through hooks, so ``generate`` runs as on a loaded model (cache, masks, positions,
    left padding) while a model of any size fits. Every new token reads those layers again (from the
    page cache where it fits there), the price of a model whose whole weights are over the memory budget;
    the resident layers, loaded once, are what the rest of the budget saves of it.
    The input embedding and the final norm stay loaded: ``generate`` takes the model's device from its
    first parameter, the embedding, and a tied output head is that same matrix.
    """
    runner = _Runner(Path(model_dir), torch.device(device), dtype)
    base = runner.base
    for name, child in base.named_children():
        if name not in ("layers", "rotary_emb"):
            runner.materialise(child)
    base.rotary_emb = runner.rotary()
    head = runner.model.get_output_embeddings()
    if runner.conversion.tied_parameters():
        head.weight = base.embed_tokens.weight
    else:
        _load_when_called(runner, head, lambda: None)
    count = len(base.layers)
    for index, layer in enumerate(base.layers):
        if index < resident_layers:
            _own_storage(runner.materialise(layer))
            release_freed_memory()
            continue
        after = index + 1 if index + 1 < count else resident_layers  # the next token's first streamed layer
        _load_when_called(runner, layer, lambda after=after: runner.prefetch_layers(after))
    return runner.model.eval()


def _load_when_called(runner: _Runner, module: torch.nn.Module, then: Callable[[], None]) -> None:
    """Hooks that give ``module`` its weights before each call (then run ``then``) and free them after."""

    def load(loaded: torch.nn.Module, _args: Any) -> None:
        runner.materialise(loaded)
        then()

    module.register_forward_pre_hook(load)
    module.register_forward_hook(lambda loaded, _args, _out: runner.release(loaded))


def check_loadable(model_dir: Path) -> tuple[LoadOutcome, int]:
    """Every name and shape problem ``from_pretrained`` would meet, and the parameter count.

    The checkpoint's tensors enter the skeleton as meta tensors of their stored shapes, through
    transformers' own conversion: nothing is read but the headers, whatever the model's size.
    """
    runner = _Runner(Path(model_dir), torch.device("meta"), torch.float32)
    parameters = sum(p.numel() for p in runner.model.parameters())  # before loading unties anything
    shapes = {name: entry.shape for name, entry in runner.store.entries().items()}
    return runner.conversion.check_all(shapes), parameters


def input_embeddings(base_dir: Path, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The input embedding matrix [V, H], read alone (no decoder layer is touched)."""
    runner = _Runner(Path(base_dir), torch.device("cpu"), dtype)
    embed = runner.materialise(runner.base.embed_tokens)
    return embed.weight.detach()
