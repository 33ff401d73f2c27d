"""Checkpoint tensors into model parameters, converted the way transformers' own loader converts them.

A checkpoint's names are not always the model's: transformers 5.x keeps an MoE block's experts
fused (``experts.gate_up_proj`` [E, 2I, H], ``experts.down_proj`` [E, H, I]) while checkpoints,
moeforge's outputs among them, store one tensor per expert (``experts.3.w1.weight``), and
``from_pretrained`` stacks and concatenates them by rules registered per model type. A model run
one module at a time must load each module through the very same rules, or a streamed layer
would not compute what the loaded model computes. So this module hands transformers' loader
(``convert_and_load_state_dict_in_model``, the function ``from_pretrained`` calls) one module's
tensors at a time, and, for a strict check that reads no weight at all, every tensor of the
checkpoint as a meta tensor of its stored shape. (transformers 5.x only, like the layer-by-layer
engine that uses it.)
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from copy import deepcopy
from dataclasses import dataclass

import torch
from transformers.conversion_mapping import get_model_conversion_mapping
from transformers.core_model_loading import WeightConverter, convert_and_load_state_dict_in_model, rename_source_key
from transformers.modeling_utils import LoadStateDictConfig

#: Older checkpoints saved the rotary inverse frequencies inside every layer; they are derived
#: from the config, and the model drops them on load.
DERIVED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class LoadOutcome:
    """What did not load exactly, in the terms ``from_pretrained(output_loading_info=True)`` uses."""

    missing_keys: list[str]
    unexpected_keys: list[str]
    mismatched_keys: list[str]
    error_msgs: list[str]

    def problems(self) -> list[tuple[str, list[str]]]:
        """(kind, names) for every non-empty kind, in a fixed order."""
        kinds = ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs")
        return [(kind, getattr(self, kind)) for kind in kinds if getattr(self, kind)]


class KeyConversion:
    """Maps checkpoint names onto a (meta) causal-LM skeleton and loads tensors into it."""

    def __init__(self, model: torch.nn.Module, checkpoint_names: list[str]) -> None:
        self.model = model
        self.expected = model.state_dict()
        self.mapping = get_model_conversion_mapping(model)
        self._renamings = [m for m in self.mapping if not isinstance(m, WeightConverter)]
        self._converters = [m for m in self.mapping if isinstance(m, WeightConverter)]
        self.targets = {name: self._target(name) for name in checkpoint_names
                        if not name.endswith(DERIVED_SUFFIXES)}

    def _target(self, name: str) -> str:
        """The model key a checkpoint tensor loads into (the fused key for a tensor that is fused)."""
        target, _ = rename_source_key(name, self._renamings, self._converters, self.model.base_model_prefix,
                                      self.expected)
        if target not in self.expected and name in self.expected:
            return name
        return target

    def sources_under(self, prefix: str) -> list[str]:
        """Checkpoint names whose tensors load into parameters under module path ``prefix`` (ends in '.')."""
        return sorted(name for name, target in self.targets.items() if target.startswith(prefix))

    def load(self, tensors: dict[str, torch.Tensor], device: torch.device | str,
             dtype: torch.dtype) -> LoadOutcome:
        """Convert and assign ``tensors`` (checkpoint names) into the model; report what did not fit.

        Keys of the model that ``tensors`` do not cover are not reported missing: a caller loading
        one module checks its own keys. Meta tensors on the meta device check names and shapes
        without reading or allocating anything.
        """
        config = LoadStateDictConfig(device_map={"": device}, dtype=dtype, weight_mapping=deepcopy(self.mapping))
        with _quiet_progress():
            info, _ = convert_and_load_state_dict_in_model(self.model, tensors, config)
        covered = {self.targets.get(name, name) for name in tensors}
        return LoadOutcome(
            missing_keys=sorted(k for k in info.missing_keys if k in covered),
            unexpected_keys=sorted(info.unexpected_keys),
            mismatched_keys=sorted(f"{k} (file {list(a)} vs model {list(b)})" for k, a, b in info.mismatched_keys),
            error_msgs=[f"{key}: {str(error).strip().splitlines()[-1]}"
                        for key, error in sorted(info.conversion_errors.items())],
        )

    def check_all(self, shapes: dict[str, tuple[int, ...]]) -> LoadOutcome:
        """Load the whole checkpoint as meta tensors: every name and shape problem, no weight read.

        Mirrors what ``from_pretrained`` reports: tied parameters (``lm_head`` when the config ties
        it to the input embeddings) and the keys the model class says to ignore are not missing.
        """
        meta = {name: torch.empty(shape, device="meta") for name, shape in shapes.items() if name in self.targets}
        outcome = self.load(meta, "meta", torch.float32)
        loaded = {self.targets[name] for name in meta}
        missing = [k for k in self.expected if k not in loaded and k not in self.tied_parameters()]
        outcome.missing_keys = _without(sorted(set(missing) | set(outcome.missing_keys)),
                                        self.model._keys_to_ignore_on_load_missing)
        outcome.unexpected_keys = _without(outcome.unexpected_keys, self.model._keys_to_ignore_on_load_unexpected)
        return outcome

    def tied_parameters(self) -> dict[str, str]:
        """Parameters the model takes from another one (``lm_head.weight`` -> the input embedding), by key."""
        output, inputs = self.model.get_output_embeddings(), self.model.get_input_embeddings()
        if output is None or not getattr(self.model.config.get_text_config(), "tie_word_embeddings", False):
            return {}
        names = {id(module): name for name, module in self.model.named_modules()}
        return {f"{names[id(output)]}.weight": f"{names[id(inputs)]}.weight"}


def _without(keys: list[str], patterns: list[str] | set[str] | None) -> list[str]:
    """``keys`` minus those matching a model class's ignore patterns (regular expressions)."""
    if not patterns:
        return keys
    pattern = re.compile("|".join(f"({p})" for p in patterns))
    return [k for k in keys if not pattern.search(k)]


@contextlib.contextmanager
def _quiet_progress() -> Iterator[None]:
    """transformers' loader draws a progress bar per call; one per streamed layer would flood the log."""
    from transformers.utils import logging

    was_enabled = logging.is_progress_bar_enabled()
    logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            logging.enable_progress_bar()
