"""The fixture factory: every checkpoint it builds must look and load like a real Hub checkpoint."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

import moeforge
from moeforge.demo.tiny_models import (
    PRESETS,
    TOKENIZER_FILES,
    build_demo,
    build_dense_model,
    build_preset,
    load_weights,
    seeded_model,
    train_tokenizer,
)

IDS = torch.tensor([[1, 40, 41, 300, 301, 7, 8, 9, 120, 2]])
TEXT = "def mean(values):\n    return sum(values) / len(values)  # 3x + 5 = 20, crème brûlée ✓"


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tokenizer")
    train_tokenizer(out)
    return out


def logits(model_dir: Path) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)(IDS).logits


def load_strict(model_dir: Path):
    """Load with transformers and fail on any missing, unexpected or mismatched tensor."""
    model, info = AutoModelForCausalLM.from_pretrained(model_dir, output_loading_info=True)
    assert {key: list(info[key]) for key in ("missing_keys", "unexpected_keys", "mismatched_keys")} == {
        "missing_keys": [], "unexpected_keys": [], "mismatched_keys": []
    }
    return model.eval()


def tensor_names(model_dir: Path) -> set[str]:
    return set(load_weights(model_dir))


def tree_hashes(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(root.rglob("*"))
        if path.is_file()
    }


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_preset_loads_strictly_with_reference_logits(preset, tmp_path, tokenizer_dir):
    out = build_preset(tmp_path / preset, preset, tokenizer_dir=tokenizer_dir)
    model = load_strict(out)
    reference = seeded_model(AutoConfig.from_pretrained(out), seed=0, dtype="float32")
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, reference(IDS).logits)
    hub = json.loads((out / "config.json").read_text())
    assert {"torch_dtype", "rope_theta", "architectures", "model_type"} <= hub.keys()
    assert "rope_parameters" not in hub and "dtype" not in hub
    # 5.x picks the tokenizer class from model_type for some families (Qwen2Tokenizer for qwen2)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert hub["vocab_size"] == len(tokenizer)
    assert tokenizer(TEXT)["input_ids"] == AutoTokenizer.from_pretrained(tokenizer_dir)(TEXT)["input_ids"]
    names = tensor_names(out)
    assert {"model.embed_tokens.weight", "model.norm.weight", "model.layers.3.mlp.down_proj.weight",
            "model.layers.0.self_attn.q_proj.weight", "model.layers.0.input_layernorm.weight"} <= names
    assert ("model.layers.0.self_attn.q_proj.bias" in names) == (hub["model_type"] == "qwen2")
    assert ("model.layers.0.self_attn.q_norm.weight" in names) == (hub["model_type"] == "qwen3")


def test_hub_configs_carry_each_generations_fields(tmp_path, tokenizer_dir):
    configs = {
        preset: json.loads((build_preset(tmp_path / preset, preset, tokenizer_dir=tokenizer_dir) / "config.json")
                           .read_text())
        for preset in ("mistral", "qwen1.5", "qwen2.5", "qwen3")
    }
    assert configs["mistral"]["sliding_window"] == 256 and "use_sliding_window" not in configs["mistral"]
    # Qwen2 checkpoints write a window they do not use; Qwen3 writes null
    assert configs["qwen1.5"]["use_sliding_window"] is False
    assert configs["qwen1.5"]["sliding_window"] == configs["qwen1.5"]["max_position_embeddings"]
    assert configs["qwen2.5"]["use_mrope"] is False and "use_mrope" not in configs["qwen1.5"]
    assert configs["qwen3"]["sliding_window"] is None and configs["qwen3"]["head_dim"] == 32
    assert configs["qwen3"]["attention_bias"] is False and configs["qwen3"]["rope_scaling"] is None


def test_tied_preset_has_no_lm_head_on_disk(tmp_path, tokenizer_dir):
    out = build_preset(tmp_path / "tied", "qwen2-0.5b", tokenizer_dir=tokenizer_dir)
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in tensor_names(out)
    model = load_strict(out)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    reference = seeded_model(AutoConfig.from_pretrained(out), seed=0, dtype="float32")
    with torch.no_grad():
        assert torch.equal(model(IDS).logits, reference(IDS).logits)


def test_sharded_output_has_a_correct_index(tmp_path, tokenizer_dir):
    whole = build_preset(tmp_path / "whole", "qwen2.5", tokenizer_dir=tokenizer_dir, dtype="bfloat16")
    out = build_preset(tmp_path / "sharded", "qwen2.5", tokenizer_dir=tokenizer_dir, dtype="bfloat16",
                       max_shard_size="200KB")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 1 and not (out / "model.safetensors").exists()
    assert files == [f"model-{i:05d}-of-{len(files):05d}.safetensors" for i in range(1, len(files) + 1)]
    total = 0
    for name in files:
        with safe_open(out / name, "pt") as handle:
            sizes = [handle.get_slice(key).get_shape() for key in handle.keys()]
            assert all(index["weight_map"][key] == name for key in handle.keys())
            shard_bytes = sum(torch.Size(shape).numel() * 2 for shape in sizes)
            assert shard_bytes <= 200_000 or len(sizes) == 1
            total += shard_bytes
    assert index["metadata"]["total_size"] == total
    whole_tensors, sharded_tensors = load_weights(whole), load_weights(out)
    assert set(index["weight_map"]) == set(whole_tensors) == set(sharded_tensors)
    assert all(torch.equal(whole_tensors[key], sharded_tensors[key]) for key in whole_tensors)
    assert load_strict(out).dtype == torch.bfloat16


def test_builds_are_byte_identical_across_processes(tmp_path):
    """The demo built in this process and by the CLI in a fresh one (new hash seeds) is the same bytes."""
    paths = build_demo(tmp_path / "here")
    assert set(paths) == {"tokenizer", "base", "expert_code", "expert_math", "expert_cooking"}
    env = {**os.environ, "PYTHONPATH": str(Path(moeforge.__file__).parents[1])}
    subprocess.run([sys.executable, "-m", "moeforge.demo.tiny_models", "demo", str(tmp_path / "cli")],
                   check=True, env=env, stdin=subprocess.DEVNULL, capture_output=True)
    here, cli = tree_hashes(tmp_path / "here"), tree_hashes(tmp_path / "cli")
    assert len(here) == 3 + 4 * 6 and here == cli  # tokenizer; base and experts: 3 model + 3 tokenizer files


def test_derived_expert_changes_only_mlp_matrices(tmp_path, tokenizer_dir):
    base = build_preset(tmp_path / "base", "qwen3", tokenizer_dir=tokenizer_dir)
    expert = build_dense_model(tmp_path / "expert", derive_from=base, seed=5, mlp_noise=0.02)
    for name in ("config.json", "generation_config.json", *TOKENIZER_FILES):
        assert (base / name).read_bytes() == (expert / name).read_bytes()
    parent, child = load_weights(base), load_weights(expert)
    assert parent.keys() == child.keys()
    for name in parent:
        if ".mlp." in name:
            assert 0.015 < (child[name] - parent[name]).std() < 0.025
        else:
            assert parent[name].numpy().tobytes() == child[name].numpy().tobytes()
    load_strict(expert)


def test_tf5_config_style(tmp_path, tokenizer_dir):
    scaling = {"rope_type": "linear", "factor": 4.0}
    hub = build_preset(tmp_path / "hub", "llama", tokenizer_dir=tokenizer_dir, rope_scaling=scaling)
    tf5 = build_preset(tmp_path / "tf5", "llama", tokenizer_dir=tokenizer_dir, rope_scaling=scaling,
                       config_style="tf5")
    config = json.loads((tf5 / "config.json").read_text())
    assert config["dtype"] == "float32" and config["rope_parameters"]["factor"] == 4.0
    assert not {"torch_dtype", "rope_theta", "rope_scaling"} & config.keys()
    assert scaling == {"rope_type": "linear", "factor": 4.0}
    assert torch.equal(logits(hub), logits(tf5))


def test_linear_rope_scaling_is_applied(tmp_path, tokenizer_dir):
    plain = build_preset(tmp_path / "plain", "llama", tokenizer_dir=tokenizer_dir)
    scaled = build_preset(tmp_path / "scaled", "llama", tokenizer_dir=tokenizer_dir,
                          rope_scaling={"rope_type": "linear", "factor": 4.0})
    assert tensor_names(plain) == tensor_names(scaled)
    model = load_strict(scaled)
    assert model.config.rope_parameters["rope_type"] == "linear"
    assert model.config.rope_parameters["rope_theta"] == PRESETS["llama"]["rope_theta"]
    assert (logits(plain) - logits(scaled)).abs().max() > 0.1


def test_tokenizer_round_trips_and_has_specials(tokenizer_dir):
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and "chat_template" in config
    assert sorted(path.name for path in tokenizer_dir.iterdir()) == sorted(TOKENIZER_FILES)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert len(tokenizer) == 512
    assert (tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    ids = tokenizer(TEXT)["input_ids"]
    assert ids[0] != tokenizer.bos_token_id and tokenizer.decode(ids) == TEXT
    marked = tokenizer("<s>hi</s>", add_special_tokens=False)["input_ids"]
    assert (marked[0], marked[-1]) == (1, 2)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                           add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"


def test_unsupported_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="attention_bias"):
        build_dense_model(tmp_path / "m", "mistral", attention_bias=True)
    with pytest.raises(ValueError, match="sliding-window"):
        build_dense_model(tmp_path / "l", "llama", sliding_window=64)
    with pytest.raises(ValueError, match="max_shard_size"):
        build_dense_model(tmp_path / "s", "llama", max_shard_size="lots")


TF4_SCRIPT = """
import json, sys, torch, transformers
from transformers import AutoModelForCausalLM, AutoTokenizer
job = json.loads(sys.argv[1])
result = {"version": transformers.__version__, "models": {}, "tokenizers": {}}
for path in job["models"]:
    model, info = AutoModelForCausalLM.from_pretrained(path, output_loading_info=True, torch_dtype=torch.float32)
    with torch.no_grad():
        result["models"][path] = {"info": {k: sorted(v) for k, v in info.items() if k != "error_msgs"},
                                  "logits": model(torch.tensor(job["ids"])).logits.tolist()}
for path in job["tokenizers"]:
    tokenizer = AutoTokenizer.from_pretrained(path)
    result["tokenizers"][path] = {"class": type(tokenizer).__name__, "ids": tokenizer(job["text"])["input_ids"],
                                  "specials": [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id]}
print(json.dumps(result))
"""


@pytest.mark.tf4
def test_loads_in_transformers_4(tf4_python, tmp_path, tokenizer_dir):
    """Hub-style outputs load in 4.x with no missing keys, the same logits and rope scaling applied."""
    models = [
        build_preset(tmp_path / "llama", "llama", tokenizer_dir=tokenizer_dir),
        build_preset(tmp_path / "scaled", "llama", tokenizer_dir=tokenizer_dir,
                     rope_scaling={"type": "linear", "factor": 4.0}),
        build_preset(tmp_path / "tied", "qwen2-0.5b", tokenizer_dir=tokenizer_dir, max_shard_size="200KB"),
        build_preset(tmp_path / "qwen3", "qwen3", tokenizer_dir=tokenizer_dir),
    ]
    job = {"ids": IDS.tolist(), "text": TEXT, "models": [str(path) for path in models],
           "tokenizers": [str(tokenizer_dir), str(models[2])]}
    run = subprocess.run([str(tf4_python), "-c", TF4_SCRIPT, json.dumps(job)], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    result = json.loads(run.stdout.splitlines()[-1])
    assert result["version"].startswith("4.")
    for path in job["models"]:
        loaded = result["models"][path]
        assert loaded["info"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": []}
        torch.testing.assert_close(torch.tensor(loaded["logits"]), logits(Path(path)), rtol=0, atol=1e-5)
    expected_ids = AutoTokenizer.from_pretrained(tokenizer_dir)(TEXT)["input_ids"]
    for path in job["tokenizers"]:
        assert result["tokenizers"][path] == {"class": "PreTrainedTokenizerFast", "ids": expected_ids,
                                              "specials": [0, 1, 2]}
