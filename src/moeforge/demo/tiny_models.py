"""Tiny dense checkpoints that look like real Hub checkpoints.

The workflow's offline demo and every test need dense decoder-only models to merge. Real
checkpoints are gigabytes and need the network, so this module builds small ones that carry
what matters to a merge: the Hub's tensor names and config fields (written the way the
published Llama / Mistral / Qwen checkpoints write them, including their quirks), tied or
untied embeddings, sharded weights, rope scaling, and a tokenizer with special tokens and a
chat template. Every output is byte-deterministic for the same arguments, so tests can pin
hashes and the workflow can rerun without rebuilding.

Command line: ``python -m moeforge.demo.tiny_models demo OUT_ROOT`` builds the demo base + experts.
"""

from __future__ import annotations

import argparse
import copy
import json
import re
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import load_file, save_file
from tokenizers import (
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)

if TYPE_CHECKING:
    from moeforge.demo.training import TrainingPlan

BOS, EOS, PAD = "<s>", "</s>", "<pad>"

#: ChatML-style turns; the markers are plain text so the three special tokens stay the only ones.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

#: Qwen2's pre-tokenizer split (GPT-4-style words, digits one by one). transformers 5.x loads the
#: tokenizer of any ``qwen2`` checkpoint as ``Qwen2Tokenizer`` whatever ``tokenizer_class`` says, and
#: that class rebuilds the pipeline as NFC + this split; using the same pipeline here makes every
#: loader, 4.x or 5.x, from a tokenizer or a model directory, encode alike.
SPLIT_PATTERN = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"""
    r"""|\s+(?!\S)|\s+"""
)

#: Files that make up a tokenizer directory; copied byte for byte between models.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")

CONFIG_STYLES = ("hub", "tf5")
SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
MLP_MATRIX = re.compile(r"^model\.layers\.\d+\.mlp\.(gate|up|down)_proj\.weight$")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


# --------------------------------------------------------------------------- tokenizer


def train_tokenizer(out_dir: Path, vocab_size: int = 512) -> None:
    """Train the demo byte-level BPE on the packaged corpus and save it Hub-style.

    Byte-level BPE never needs an unknown token, so ``<s>``, ``</s>`` and ``<pad>`` are the only
    specials (ids 1, 2, 0, as in Llama). Like Llama-3, encoding does not prepend ``<s>``; callers
    that want it add it themselves (as mergekit does for its gate prompts). Training is
    deterministic: the same corpus gives the same bytes in every process.
    """
    out_dir = Path(out_dir)
    corpus = resources.files("moeforge").joinpath("data/corpus.txt").read_text(encoding="utf-8")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[PAD, BOS, EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator([corpus], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token=BOS, eos_token=EOS, pad_token=PAD)
    fast.save_pretrained(str(out_dir))
    _write_tokenizer_config(out_dir)


def _write_tokenizer_config(out_dir: Path) -> None:
    """Rewrite the tokenizer config in the layout both transformers 4.x and 5.x load.

    transformers 5.x records ``tokenizer_class: TokenizersBackend`` (unknown to 4.x), writes the
    chat template to a separate ``chat_template.jinja`` and no ``special_tokens_map.json``. The
    layout of older Hub repos (template inside ``tokenizer_config.json``) is read by both.
    """
    (out_dir / "chat_template.jinja").unlink(missing_ok=True)
    specials = {"bos_token": BOS, "eos_token": EOS, "pad_token": PAD}
    config = {
        **specials,
        "chat_template": CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "tokenizer_class": "PreTrainedTokenizerFast",
        # explicit, or 5.x's Qwen2Tokenizer adds its default unk "<|endoftext|>" past the vocabulary
        "unk_token": None,
    }
    _write_json(out_dir / "tokenizer_config.json", config)
    _write_json(out_dir / "special_tokens_map.json", specials)


def _install_tokenizer(out_dir: Path, tokenizer_dir: Path | None) -> None:
    """Byte-copy the tokenizer from ``tokenizer_dir`` (so experts share it exactly) or train one."""
    if tokenizer_dir is None:
        train_tokenizer(out_dir)
        return
    for name in TOKENIZER_FILES:
        shutil.copyfile(Path(tokenizer_dir) / name, out_dir / name)


def _tokenizer_ids(tokenizer_dir: Path) -> dict[str, int]:
    """The model-side facts a config needs from the tokenizer: vocabulary size and special ids."""
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    specials = json.loads((tokenizer_dir / "special_tokens_map.json").read_text())
    return {
        "vocab_size": tokenizer.get_vocab_size(with_added_tokens=True),
        "bos_token_id": tokenizer.token_to_id(specials["bos_token"]),
        "eos_token_id": tokenizer.token_to_id(specials["eos_token"]),
    }


# --------------------------------------------------------------------------- Hub configs


@dataclass(frozen=True)
class _Arg:
    """A config field whose value comes from the build arguments (a shrunk size, an id, ...).

    ``fallback`` names the value to use when the argument is ``None``: Qwen2 checkpoints write an
    unused ``sliding_window`` equal to ``max_position_embeddings``, Qwen3 always writes ``head_dim``.
    """

    name: str
    fallback: str | None = None


@dataclass(frozen=True)
class Family:
    """What one dense architecture family supports, and how its Hub configs look.

    ``hub_config`` mirrors a published config field by field; literal values are copied as they
    are, ``_Arg`` fields are filled from the build arguments (the template also decides how a
    sliding window is switched on: Mistral by ``sliding_window`` alone, Qwen by
    ``use_sliding_window`` + ``max_window_layers``). ``attention_bias`` is the family's default,
    which the model class hard-codes unless ``attention_bias_field`` (the config has the field);
    ``mlp_bias`` and ``sliding_window`` say whether the model class supports them at all.
    """

    hub_config: dict[str, Any]
    attention_bias: bool
    attention_bias_field: bool
    mlp_bias: bool
    sliding_window: bool


_SIZES = {
    "hidden_size": _Arg("hidden_size"),
    "intermediate_size": _Arg("intermediate_size"),
    "num_hidden_layers": _Arg("num_hidden_layers"),
    "num_attention_heads": _Arg("num_attention_heads"),
    "num_key_value_heads": _Arg("num_key_value_heads"),
    "max_position_embeddings": _Arg("max_position_embeddings"),
    "rms_norm_eps": _Arg("rms_norm_eps"),
    "rope_theta": _Arg("rope_theta"),
    "tie_word_embeddings": _Arg("tie_word_embeddings"),
    "torch_dtype": _Arg("torch_dtype"),
    "vocab_size": _Arg("vocab_size"),
    "bos_token_id": _Arg("bos_token_id"),
    "eos_token_id": _Arg("eos_token_id"),
}

FAMILIES: dict[str, Family] = {
    # meta-llama/Llama-3.1-8B, without its llama3 rope scaling
    "llama": Family(
        hub_config={
            **_SIZES,
            "architectures": ["LlamaForCausalLM"],
            "attention_bias": _Arg("attention_bias"),
            "attention_dropout": 0.0,
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "mlp_bias": _Arg("mlp_bias"),
            "model_type": "llama",
            "pretraining_tp": 1,
            "rope_scaling": _Arg("rope_scaling"),
            "transformers_version": "4.43.0.dev0",
            "use_cache": True,
        },
        attention_bias=False,
        attention_bias_field=True,
        mlp_bias=True,
        sliding_window=False,
    ),
    # mistralai/Mistral-7B-v0.1
    "mistral": Family(
        hub_config={
            **_SIZES,
            "architectures": ["MistralForCausalLM"],
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "model_type": "mistral",
            "sliding_window": _Arg("sliding_window"),
            "transformers_version": "4.34.0.dev0",
            "use_cache": True,
        },
        attention_bias=False,
        attention_bias_field=False,
        mlp_bias=False,
        sliding_window=True,
    ),
    # Qwen/Qwen1.5-*, Qwen/Qwen2-*, Qwen/Qwen2.5-* (presets add each generation's differences)
    "qwen2": Family(
        hub_config={
            **_SIZES,
            "architectures": ["Qwen2ForCausalLM"],
            "attention_dropout": 0.0,
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "max_window_layers": _Arg("max_window_layers"),
            "model_type": "qwen2",
            "sliding_window": _Arg("sliding_window", fallback="max_position_embeddings"),
            "transformers_version": "4.40.1",
            "use_cache": True,
            "use_sliding_window": _Arg("use_sliding_window"),
        },
        attention_bias=True,
        attention_bias_field=False,
        mlp_bias=False,
        sliding_window=True,
    ),
    # Qwen/Qwen3-8B
    "qwen3": Family(
        hub_config={
            **_SIZES,
            "architectures": ["Qwen3ForCausalLM"],
            "attention_bias": _Arg("attention_bias"),
            "attention_dropout": 0.0,
            "head_dim": _Arg("head_dim", fallback="default_head_dim"),
            "hidden_act": "silu",
            "initializer_range": 0.02,
            "max_window_layers": _Arg("max_window_layers"),
            "model_type": "qwen3",
            "rope_scaling": _Arg("rope_scaling"),
            "sliding_window": _Arg("sliding_window"),
            "transformers_version": "4.51.0",
            "use_cache": True,
            "use_sliding_window": _Arg("use_sliding_window"),
        },
        attention_bias=False,
        attention_bias_field=True,
        mlp_bias=False,
        sliding_window=True,
    ),
}

#: Fields a family's Hub configs only carry when they are set (Mistral-7B has no ``head_dim``,
#: Qwen2 configs have no ``rope_scaling`` unless the checkpoint is scaled).
OPTIONAL_FIELDS = ("head_dim", "rope_scaling")

#: Named checkpoints: ``build_dense_model`` arguments mirroring one published model each.
PRESETS: dict[str, dict[str, Any]] = {
    "llama": {"family": "llama", "rope_theta": 500000.0},
    "mistral": {"family": "mistral", "sliding_window": 256},
    "qwen1.5": {  # Qwen/Qwen1.5-1.8B
        "family": "qwen2",
        "num_kv_heads": 4,
        "rope_theta": 1000000.0,
        "config_overrides": {"transformers_version": "4.37.0"},
    },
    "qwen2-0.5b": {  # Qwen/Qwen2-0.5B: tied embeddings
        "family": "qwen2",
        "rope_theta": 1000000.0,
        "tie_word_embeddings": True,
    },
    "qwen2.5": {  # Qwen/Qwen2.5-7B
        "family": "qwen2",
        "rope_theta": 1000000.0,
        "config_overrides": {"transformers_version": "4.43.1", "use_mrope": False},
    },
    "qwen3": {"family": "qwen3", "head_dim": 32, "rope_theta": 1000000.0},  # Qwen/Qwen3-8B
}


def hub_config(family: str, values: dict[str, Any], overrides: dict[str, Any] | None = None) -> dict[str, Any]:
    """Fill a family's Hub config template with ``values`` (argument name -> value)."""
    template = FAMILIES[family].hub_config
    config = {key: _fill(value, values) for key, value in template.items()}
    for key in OPTIONAL_FIELDS:
        if key not in config and values.get(key) is not None:
            config[key] = values[key]
    config.update(copy.deepcopy(overrides or {}))
    return config


def _fill(value: Any, values: dict[str, Any]) -> Any:
    if not isinstance(value, _Arg):
        return value
    filled = values[value.name]
    if filled is None and value.fallback is not None:
        filled = values[value.fallback]
    return copy.deepcopy(filled)


def _check_supported(
    family: str, attention_bias: bool | None, mlp_bias: bool, sliding_window: int | None, config_style: str
) -> Family:
    """Refuse settings the family's model class cannot represent instead of silently dropping them."""
    if config_style not in CONFIG_STYLES:
        raise ValueError(f"config_style must be one of {CONFIG_STYLES}, not {config_style!r}")
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; known: {sorted(FAMILIES)}")
    spec = FAMILIES[family]
    if not spec.attention_bias_field and attention_bias not in (None, spec.attention_bias):
        raise ValueError(f"{family}: attention_bias is fixed to {spec.attention_bias} by the model class")
    if mlp_bias and not spec.mlp_bias:
        raise ValueError(f"{family}: the model class has no MLP biases")
    if sliding_window is not None and not spec.sliding_window:
        raise ValueError(f"{family}: the model class has no sliding-window attention")
    return spec


def _config_values(
    *,
    hidden_size: int,
    intermediate_size: int,
    num_layers: int,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int | None,
    tie_word_embeddings: bool,
    rope_theta: float,
    rope_scaling: dict | None,
    attention_bias: bool,
    mlp_bias: bool,
    dtype: str,
    sliding_window: int | None,
    max_position_embeddings: int,
    rms_norm_eps: float,
    tokenizer_ids: dict[str, int],
) -> dict[str, Any]:
    """Every value a Hub config template may ask for, keyed by ``_Arg`` name."""
    sliding = sliding_window is not None
    return {
        **tokenizer_ids,
        "hidden_size": hidden_size,
        "intermediate_size": intermediate_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "default_head_dim": hidden_size // num_heads,
        "max_position_embeddings": max_position_embeddings,
        "rms_norm_eps": rms_norm_eps,
        "rope_theta": rope_theta,
        "rope_scaling": rope_scaling,
        "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": dtype,
        "attention_bias": attention_bias,
        "mlp_bias": mlp_bias,
        "sliding_window": sliding_window,
        "use_sliding_window": sliding,
        # Qwen: layers from max_window_layers on use the window, so 0 means "all layers".
        "max_window_layers": 0 if sliding else num_layers,
    }


def config_from_hub(hub: dict[str, Any]) -> PretrainedConfig:
    """The installed transformers' config object for a Hub-style config dict.

    A deep copy is passed because transformers 5.x edits a given ``rope_scaling`` dict in place.
    """
    fields = copy.deepcopy(hub)
    if "torch_dtype" in fields:
        fields["dtype"] = fields.pop("torch_dtype")
    return AutoConfig.for_model(fields.pop("model_type"), **fields)


# --------------------------------------------------------------------------- weights


def seeded_model(config: PretrainedConfig, seed: int, dtype: str) -> PreTrainedModel:
    """The model ``build_dense_model`` writes for ``config`` and ``seed``, in memory.

    transformers' own init draws from the global RNG and gives near-constant norms, so every
    tensor is redrawn from a private generator in name order: matrices N(0, 1/fan_in) keep
    activations O(1) so rope, routing and expert noise visibly change logits; norm weights are
    1 + N(0, 0.1²) and biases N(0, 0.1²) so that copying them wrongly is detectable. Values are
    drawn in float32 and rounded once to ``dtype``; the model is created in ``dtype`` (not cast
    afterwards) so its rope buffers match a model loaded with ``from_pretrained``.
    """
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config), dtype=DTYPES[dtype])
    generator = torch.Generator().manual_seed(seed)
    tied = set(_tied_names(model))
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict(keep_vars=True).items()):
            if name not in tied:
                tensor.copy_(_draw(name, tensor, generator))
    return model.eval()


def _draw(name: str, tensor: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
    if tensor.ndim == 2:
        return noise / tensor.shape[1] ** 0.5
    if "norm" in name:
        return 1.0 + 0.1 * noise
    return 0.1 * noise


def _tied_names(model: PreTrainedModel) -> list[str]:
    """State-dict names that share storage with an earlier name (``lm_head`` when tied)."""
    seen: dict[int, str] = {}
    tied = []
    for name, tensor in model.state_dict(keep_vars=True).items():
        if tensor.data_ptr() in seen:
            tied.append(name)
        seen.setdefault(tensor.data_ptr(), name)
    return tied


def _disk_tensors(model: PreTrainedModel) -> dict[str, torch.Tensor]:
    """The tensors a Hub checkpoint stores: tied copies are omitted, as ``save_pretrained`` does."""
    tied = set(_tied_names(model))
    return {name: t.detach().contiguous() for name, t in model.state_dict().items() if name not in tied}


def _derived_tensors(parent: Path, mlp_noise: float, seed: int) -> dict[str, torch.Tensor]:
    """A simulated fine-tune of ``parent``: MLP matrices perturbed, every other tensor unchanged."""
    tensors = load_weights(parent)
    generator = torch.Generator().manual_seed(seed)
    for name in sorted(tensors):
        if MLP_MATRIX.match(name):
            base = tensors[name]
            noise = torch.randn(base.shape, generator=generator, dtype=torch.float32)
            tensors[name] = (base.float() + mlp_noise * noise).to(base.dtype)
    return tensors


def load_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a single-file or sharded safetensors checkpoint."""
    model_dir = Path(model_dir)
    index = model_dir / INDEX_FILE
    files = sorted(set(json.loads(index.read_text())["weight_map"].values())) if index.exists() else [SINGLE_FILE]
    tensors: dict[str, torch.Tensor] = {}
    for name in files:
        tensors.update(load_file(model_dir / name))
    return tensors


def write_weights(out_dir: Path, tensors: dict[str, torch.Tensor], max_shard_size: str | None = None) -> None:
    """Write tensors as ``model.safetensors`` or as Hub shards plus an index.

    Shards hold whole tensors, filled in Hub order (embeddings, layers by index, final norm,
    ``lm_head``) until the next tensor would pass ``max_shard_size``; like ``save_pretrained``, a
    checkpoint that fits in one shard is written as a single file without an index.
    """
    names = sorted(tensors, key=_hub_order)
    shards = _split(names, tensors, _parse_size(max_shard_size)) if max_shard_size else [names]
    if len(shards) == 1:
        save_file({n: tensors[n] for n in names}, str(out_dir / SINGLE_FILE), metadata={"format": "pt"})
        return
    weight_map = {}
    for number, shard in enumerate(shards, start=1):
        file_name = f"model-{number:05d}-of-{len(shards):05d}.safetensors"
        save_file({n: tensors[n] for n in shard}, str(out_dir / file_name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, file_name))
    total_size = sum(_nbytes(t) for t in tensors.values())
    _write_json(out_dir / INDEX_FILE, {"metadata": {"total_size": total_size}, "weight_map": weight_map})


def _split(names: list[str], tensors: dict[str, torch.Tensor], limit: int) -> list[list[str]]:
    shards: list[list[str]] = [[]]
    size = 0
    for name in names:
        nbytes = _nbytes(tensors[name])
        if shards[-1] and size + nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _hub_order(name: str) -> tuple:
    """Sort key: ``lm_head`` last, layer numbers compared as numbers."""
    parts = tuple((0, int(p), "") if p.isdigit() else (1, 0, p) for p in name.split("."))
    return (name.startswith("lm_head"), parts)


def _parse_size(size: str) -> int:
    """Bytes in a Hub-style size string: ``"200KB"``, ``"1.5MB"``, ``"2GiB"`` (KB = 1000 B, KiB = 1024 B)."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", size)
    unit = match.group(2).upper() if match else None
    if unit not in SIZE_UNITS:
        raise ValueError(f"max_shard_size {size!r} is not a size such as '200KB', '5GB' or '2GiB'")
    return int(float(match.group(1)) * SIZE_UNITS[unit])


# --------------------------------------------------------------------------- models


def build_dense_model(
    out_dir: Path,
    family: str = "llama",
    *,
    seed: int = 0,
    hidden_size: int = 64,
    intermediate_size: int = 128,
    num_layers: int = 4,
    num_heads: int = 4,
    num_kv_heads: int = 2,
    head_dim: int | None = None,
    tie_word_embeddings: bool = False,
    rope_theta: float = 10000.0,
    rope_scaling: dict | None = None,
    attention_bias: bool | None = None,
    mlp_bias: bool = False,
    dtype: str = "float32",
    sliding_window: int | None = None,
    max_position_embeddings: int = 512,
    rms_norm_eps: float = 1e-6,
    max_shard_size: str | None = None,
    derive_from: Path | None = None,
    mlp_noise: float = 0.0,
    config_style: str = "hub",
    config_overrides: dict | None = None,
    tokenizer_dir: Path | None = None,
) -> Path:
    """Build a small dense checkpoint directory and return its path.

    ``family`` picks the architecture (``llama``, ``mistral``, ``qwen2``, ``qwen3``);
    ``attention_bias=None`` means the family's default (on for Qwen2, off elsewhere).
    ``config_style="hub"`` writes config.json as published 4.x-era checkpoints do (``torch_dtype``,
    top-level ``rope_theta`` / ``rope_scaling``); ``"tf5"`` writes it as transformers 5.x
    ``save_pretrained`` does (``dtype``, ``rope_parameters``). ``config_overrides`` is applied to
    the config dict last, so tests can reproduce odd real-world fields.

    With ``derive_from`` the model is a simulated fine-tune of that checkpoint: its config,
    generation config and (unless ``tokenizer_dir`` is given) tokenizer are copied, every non-MLP
    tensor is kept byte-identical and each MLP matrix gets ``mlp_noise`` * N(0, 1) noise drawn with
    ``seed``; the architecture arguments are then ignored.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    if derive_from is not None:
        return _build_derived(out_dir, Path(derive_from), seed, mlp_noise, max_shard_size, tokenizer_dir)
    spec = _check_supported(family, attention_bias, mlp_bias, sliding_window, config_style)
    _install_tokenizer(out_dir, tokenizer_dir)
    values = _config_values(
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=num_kv_heads,
        head_dim=head_dim,
        tie_word_embeddings=tie_word_embeddings,
        rope_theta=rope_theta,
        rope_scaling=rope_scaling,
        attention_bias=spec.attention_bias if attention_bias is None else attention_bias,
        mlp_bias=mlp_bias,
        dtype=dtype,
        sliding_window=sliding_window,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=rms_norm_eps,
        tokenizer_ids=_tokenizer_ids(out_dir),
    )
    hub = hub_config(family, values, config_overrides)
    config = config_from_hub(hub)
    model = seeded_model(config, seed, dtype)
    _write_config(out_dir, hub, config, config_style)
    _write_generation_config(out_dir, hub)
    write_weights(out_dir, _disk_tensors(model), max_shard_size)
    return out_dir


def _build_derived(
    out_dir: Path, parent: Path, seed: int, mlp_noise: float, max_shard_size: str | None, tokenizer_dir: Path | None
) -> Path:
    return derive_checkpoint(out_dir, parent, _derived_tensors(parent, mlp_noise, seed), max_shard_size,
                             tokenizer_dir)


def derive_checkpoint(out_dir: Path, parent: Path, tensors: dict[str, torch.Tensor],
                      max_shard_size: str | None = None, tokenizer_dir: Path | None = None) -> Path:
    """A checkpoint of ``parent``'s architecture with new weights: a fine-tune as the Hub holds one.

    Config, generation config and (unless ``tokenizer_dir`` is given) tokenizer are byte copies of
    the parent's, so a merge sees sources that agree on everything but their weights.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    for name in ("config.json", "generation_config.json"):
        shutil.copyfile(parent / name, out_dir / name)
    _install_tokenizer(out_dir, tokenizer_dir or parent)
    write_weights(out_dir, tensors, max_shard_size)
    return out_dir


def _write_config(out_dir: Path, hub: dict[str, Any], config: PretrainedConfig, style: str) -> None:
    if style == "hub":
        _write_json(out_dir / "config.json", hub)
    else:
        config.save_pretrained(str(out_dir))


def _write_generation_config(out_dir: Path, hub: dict[str, Any]) -> None:
    """Greedy decoding with the model's special ids, so smoke generations are reproducible."""
    fields = {"bos_token_id": hub["bos_token_id"], "do_sample": False, "eos_token_id": hub["eos_token_id"]}
    _write_json(out_dir / "generation_config.json", fields)


def build_preset(out_dir: Path, preset: str, **overrides: Any) -> Path:
    """Build one of ``PRESETS``; keyword arguments override the preset's ``build_dense_model`` arguments."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; known: {sorted(PRESETS)}")
    return build_dense_model(out_dir, **{**copy.deepcopy(PRESETS[preset]), **overrides})


#: The demo experts (name -> the packaged domain each one's MLP is fine-tuned on).
DEMO_EXPERTS = {"expert_code": "code", "expert_math": "math", "expert_cooking": "cooking"}


def build_demo(out_root: Path, plan: TrainingPlan | None = None) -> dict[str, Path]:
    """Build the offline demo: a tokenizer, a Llama-style base and three experts fine-tuned from it.

    The base is the ``llama`` preset pre-trained on every packaged domain; each expert is the base
    with its MLP fine-tuned on one domain (see ``moeforge.demo.training``; ``plan`` None: the defaults).
    """
    from moeforge.demo.training import TrainingPlan, domain_tokens, finetune_mlp, pretrain
    from moeforge.train.loop import reproducible

    plan = plan or TrainingPlan()
    out_root = Path(out_root)
    tokenizer_dir = out_root / "tokenizer"
    tokenizer_dir.mkdir(parents=True, exist_ok=True)
    train_tokenizer(tokenizer_dir)
    base = build_preset(out_root / "base", "llama", seed=plan.seed, tokenizer_dir=tokenizer_dir)
    paths = {"tokenizer": tokenizer_dir, "base": base}
    tokens = domain_tokens(tokenizer_dir)
    bos_id = _tokenizer_ids(tokenizer_dir)["bos_token_id"]
    with reproducible(plan.threads):
        model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
        pretrain(model, tokens, plan, bos_id)
        trained = {name: tensor.clone() for name, tensor in _disk_tensors(model).items()}
        write_weights(base, trained)
        for offset, (name, domain) in enumerate(DEMO_EXPERTS.items(), start=1):
            model.load_state_dict(trained)
            finetune_mlp(model, tokens[domain], plan, bos_id, plan.seed + offset, name)
            paths[name] = derive_checkpoint(out_root / name, base, _disk_tensors(model))
    return paths


def _write_json(path: Path, data: dict[str, Any]) -> None:
    """JSON the way the Hub's files are written: sorted keys, 2-space indent, final newline."""
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n", encoding="utf-8")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m moeforge.demo.tiny_models", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="build the demo tokenizer, base model and experts")
    demo.add_argument("out_root", type=Path)
    args = parser.parse_args(argv)
    for name, path in build_demo(args.out_root).items():
        print(f"{name}\t{path}")


if __name__ == "__main__":
    main()
