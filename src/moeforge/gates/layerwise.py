"""Layer-by-layer forward pass of a dense decoder-only checkpoint.

Gate computation needs per-layer hidden states of a handful of prompts, never the model's
output. Loading the whole model costs its full size in memory; running it one decoder layer at a
time costs one layer's weights, the embedding matrix (only while the prompts are embedded) and
the prompts' activations. The computing is done by the model's own transformers modules, built
on the meta device from its config and given real weights one layer at a time, so attention
variants, q/k/v biases, q/k norms, rotary scaling types and sliding windows behave exactly as in
the full model.

Two per-layer vectors are available:

* ``residual_in``: the residual stream entering layer ``i`` (``output_hidden_states[i]`` of the
  full model), before the layer's input norm;
* ``mlp_in``: the input of layer ``i``'s MLP, ``post_attention_layernorm(h + attn(input_layernorm(h)))``,
  which is what a router in place of that MLP actually sees.
"""

from __future__ import annotations

import ctypes
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm import tqdm

from moeforge.errors import ModelError
from moeforge.io.fetch import DAMAGED_FILE_FIX
from moeforge.io.files import read_json

WANTS = ("residual_in", "mlp_in")
_INDEX_NAME = "model.safetensors.index.json"
# Older checkpoints saved the rotary inverse frequencies inside every layer; they are derived
# from the config and the layer modules no longer carry them.
_DERIVED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointTensors:
    """Name -> file map of a safetensors checkpoint (single file or sharded with an index).

    Reading opens the files only for the duration of one call, so the memory map of the weights
    never keeps more than the tensors just read resident.
    """

    def __init__(self, base_dir: Path) -> None:
        self.base_dir = Path(base_dir)
        self.files = self._map_files()

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

    def with_prefix(self, prefix: str) -> list[str]:
        """All tensor names under ``prefix`` (e.g. ``model.layers.3.``), sorted."""
        return sorted(name for name in self.files if name.startswith(prefix))

    def read(self, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Read the named tensors (stored dtype, CPU), grouped by file."""
        by_file: dict[Path, list[str]] = {}
        for name in names:
            by_file.setdefault(self.files[name], []).append(name)
        tensors: dict[str, torch.Tensor] = {}
        for file, file_names in by_file.items():
            if not file.is_file():
                raise ModelError(
                    f"tensor {file_names[0]} is in {file.name}, which {_INDEX_NAME} names but the model lacks",
                    where=str(self.base_dir),
                    fix="re-download the model: that shard is missing",
                )
            with safe_open(file, framework="pt", device="cpu") as handle:
                for name in file_names:
                    tensors[name] = handle.get_tensor(name)
        return tensors


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


def _release_freed_memory() -> None:
    """Hand freed heap memory back to the operating system (glibc only; a no-op elsewhere).

    glibc raises its mmap threshold after the first large free, so later layers' weights land on
    the heap, and without a trim the resident size grows by about one layer per layer run: a
    16-layer model streamed this way would end up as resident as the whole model.
    """
    trim = getattr(ctypes.CDLL(None), "malloc_trim", None)
    if trim is not None:
        trim(0)


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


class _Runner:
    """Holds the skeleton and the checkpoint, and materialises one module at a time."""

    def __init__(self, base_dir: Path, device: torch.device, dtype: torch.dtype) -> None:
        self.config = load_config(base_dir)
        self.model = build_skeleton(self.config)
        self.base = self.model.base_model
        self.store = CheckpointTensors(base_dir)
        self.device = device
        self.dtype = dtype
        self.module_names = {id(m): n for n, m in self.model.named_modules()}

    def _checkpoint_name(self, name: str) -> str | None:
        """The checkpoint's name for a skeleton tensor (with or without the ``model.`` prefix)."""
        if name in self.store:
            return name
        stripped = name.split(".", 1)[1] if "." in name else name
        return stripped if stripped in self.store else None

    def materialise(self, module: torch.nn.Module) -> torch.nn.Module:
        """Give ``module`` its checkpoint weights (cast to the compute dtype) on the device."""
        prefix = self.module_names[id(module)] + "."
        wanted = list(module.state_dict().keys())
        found = {key: self._checkpoint_name(prefix + key) for key in wanted}
        missing = sorted(prefix + key for key, name in found.items() if name is None)
        if missing:
            raise ModelError(
                f"{len(missing)} tensor(s) missing from the checkpoint, e.g. {missing[0]}",
                where=str(self.store.base_dir),
                fix="check that the weights match config.json (model_type, layer count, biases)",
            )
        self._check_unexpected(found)
        read = self.store.read(list(found.values()))
        state = {key: read[name].to(device=self.device, dtype=self.dtype) for key, name in found.items()}
        module.load_state_dict(state, strict=True, assign=True)
        if any(t.is_meta for t in module.buffers()):
            raise ModelError(
                f"module {prefix[:-1]} has buffers that are not in the checkpoint",
                where=type(module).__name__,
                fix="this architecture cannot be run layer by layer; use a llama-style decoder",
            )
        return module

    def _check_unexpected(self, found: dict[str, str]) -> None:
        """Reject extra checkpoint tensors under a module: config.json does not describe the weights."""
        key, name = next(iter(found.items()))
        prefix = name[: len(name) - len(key)]
        used = set(found.values())
        extra = [n for n in self.store.with_prefix(prefix) if n not in used and not n.endswith(_DERIVED_SUFFIXES)]
        if extra:
            raise ModelError(
                f"checkpoint tensor {extra[0]} is not part of the model described by config.json",
                where=str(self.store.base_dir),
                fix="check config.json (e.g. attention_bias, model_type) against the weights",
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

    def masks(self, embeds: torch.Tensor, attention_mask: torch.Tensor, positions: torch.Tensor) -> dict:
        """The 4D masks of one batch for every attention kind the model uses."""
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
        return {
            kind: builders[kind](
                config=self.base.config,
                inputs_embeds=embeds,
                attention_mask=attention_mask,
                past_key_values=None,
                position_ids=positions,
            )
            for kind in sorted(kinds)
        }


@dataclass
class _Batch:
    hidden: torch.Tensor
    positions: torch.Tensor
    cos_sin: tuple[torch.Tensor, torch.Tensor]
    masks: dict


@torch.no_grad()
def _embed_batches(
    runner: _Runner, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]
) -> list[_Batch]:
    """Embed every batch, then drop the embedding matrix before any layer is loaded."""
    embed = runner.materialise(runner.base.embed_tokens)
    rotary = runner.rotary()
    prepared = []
    for input_ids, attention_mask in batches:
        ids = input_ids.to(runner.device)
        mask = attention_mask.to(runner.device)
        positions = position_ids_for(mask)
        hidden = embed(ids)
        prepared.append(
            _Batch(hidden, positions, rotary(hidden, positions), runner.masks(hidden, mask, positions))
        )
    embed.to("meta")
    _release_freed_memory()
    return prepared


def iter_layer_hidden_states(
    base_dir: Path,
    batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
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
    for index in tqdm(range(count), desc="layers", unit="layer", disable=not progress):
        residual_in = [b.hidden for b in prepared] if "residual_in" in want else None
        if "mlp_in" not in want and index == count - 1:
            yield LayerStates(index, residual_in, None)
            break
        mlp_in = _run_layer(runner, index, prepared, capture="mlp_in" in want)
        yield LayerStates(index, residual_in, mlp_in)


@torch.no_grad()
def _run_layer(runner: _Runner, index: int, prepared: list[_Batch], capture: bool) -> list[torch.Tensor] | None:
    """Run every batch through layer ``index`` in place; optionally capture the MLP inputs."""
    layer = runner.materialise(runner.base.layers[index])
    captured: list[torch.Tensor] = []
    hook = None
    if capture:
        hook = layer.mlp.register_forward_pre_hook(lambda _module, args: captured.append(args[0]))
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
        if hook is not None:
            hook.remove()
        layer.to("meta")
        _release_freed_memory()
    return captured if capture else None


def input_embeddings(base_dir: Path, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The input embedding matrix [V, H], read alone (no decoder layer is touched)."""
    runner = _Runner(Path(base_dir), torch.device("cpu"), dtype)
    embed = runner.materialise(runner.base.embed_tokens)
    return embed.weight.detach()
