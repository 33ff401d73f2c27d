"""Pre-flight validation: recipes, templates and models are checked before any weight is read.

Each bad input must give one message that names the culprit (file, key, model, tensor) and
what to do.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hfcache import offline_env, populate
from moeforge.demo.tiny_models import build_dense_model, build_preset, train_tokenizer
from moeforge.errors import FetchError, ModelError, RecipeError, TemplateError
from moeforge.io.fetch import fetch_metadata
from moeforge.io.names import WORKFLOW_DIRS, check_merge_name
from moeforge.plan.recipe import load_recipe, parse_recipe
from moeforge.plan.sources import load_source
from moeforge.plan.templates import load_template
from pipeline import plan_only

REPO = Path(__file__).resolve().parents[1]
PROMPT = ["hello"]


def ok_recipe(**extra):
    return {"base_model": "org/base", "experts": [{"source_model": "org/e1", "positive_prompts": PROMPT},
                                                  {"source_model": "org/e2", "positive_prompts": ["world"]}], **extra}


# ---- recipes -------------------------------------------------------------------------------

def test_published_recipe_parses_unchanged():
    recipe = load_recipe(REPO / "config/recipes/published-example.yaml")
    assert recipe.gate_mode == "hidden" and recipe.dtype == "bfloat16" and recipe.experts_per_token == 2
    assert recipe.experts[1].negative_prompts == ("chat",)
    assert recipe.experts[2].source_model == "codellama/CodeLlama-7b-Instruct-hf@main"
    assert recipe.experts[3].noise_scale == 0.01 and recipe.experts[3].residual_scale == 0.9


BAD_RECIPES = [
    ("unknown key", ok_recipe(experts_per_tok=2), "experts_per_tok: unknown key 'experts_per_tok'; did you mean 'experts_per_token'?"),
    ("nested unknown key", {"base_model": "a/b", "experts": [{"source_model": "x/y", "postive_prompts": PROMPT}]},
     "experts[0].postive_prompts: unknown key 'postive_prompts'; did you mean 'positive_prompts'?"),
    ("bad gate_mode", ok_recipe(gate_mode="hiden"), "gate_mode: 'hiden' is not one of"),
    ("too many experts per token", ok_recipe(experts_per_token=3), "experts_per_token is 3 but the recipe has only 2"),
    ("missing prompts", {"base_model": "a/b", "experts": [{"source_model": "x/y"}, {"source_model": "x/z"}]},
     "'y' (x/y) has no positive_prompts"),
    ("bad dtype", ok_recipe(dtype="int8"), "dtype: 'int8' is not one of"),
    ("wrong type", ok_recipe(experts_per_token="two"), "experts_per_token: 'two' is not of type 'integer'"),
    ("missing base_model", {"experts": [{"source_model": "x/y", "positive_prompts": PROMPT}]},
     "'base_model' is a required property"),
    ("no experts", {"base_model": "a/b", "experts": []}, "experts: [] should be non-empty"),
    ("token_reduction without router_input", ok_recipe(token_reduction="mean"),
     "token_reduction only applies to gate_mode router_input"),
    ("negative noise", ok_recipe(experts=[{"source_model": "x/y", "positive_prompts": PROMPT, "noise_scale": -1},
                                          {"source_model": "x/z", "positive_prompts": PROMPT}]),
     "experts[0].noise_scale: -1 is less than the minimum of 0"),
    ("not a mapping", ["base_model"], "a recipe must be a YAML mapping"),
]


@pytest.mark.parametrize("text,key,value", [
    ("residual_scale: .nan", "experts[0].residual_scale", "nan"),
    ("noise_scale: .inf", "experts[0].noise_scale", "inf"),
    ("noise_scale: .NaN", "experts[0].noise_scale", "nan"),
    ("residual_scale: -.inf", "experts[0].residual_scale", "-inf"),
])
def test_a_nonfinite_recipe_number_names_its_key(tmp_path, text, key, value):
    """JSON Schema's minimum/maximum let NaN through; the YAML spellings of NaN and inf are refused by key."""
    path = tmp_path / "r.yaml"
    path.write_text(f"base_model: a/b\nexperts:\n  - source_model: x/y\n    positive_prompts: [hi]\n    {text}\n"
                    "  - source_model: x/z\n    positive_prompts: [ho]\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert f"{key}: {value} is not a finite number" in str(info.value), str(info.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_a_nonfinite_router_scale_names_it(value):
    with pytest.raises(RecipeError, match=rf"router_scale: {value!r} is not a finite number"):
        parse_recipe(ok_recipe(router_scale=value), "r.yaml")


@pytest.mark.parametrize("case,data,message", BAD_RECIPES, ids=[c[0] for c in BAD_RECIPES])
def test_bad_recipe_messages(case, data, message):
    with pytest.raises(RecipeError) as info:
        parse_recipe(data, "r.yaml")
    assert message in str(info.value), str(info.value)
    assert str(info.value).startswith("r.yaml")


def test_null_keys_read_as_unset_as_mergekit_moe_reads_them():
    """Recipes written for mergekit-moe carry ``key: null`` for unset keys; they mean the defaults."""
    plain = {"base_model": "m/base", "gate_mode": "cheap_embed",
             "experts": [{"source_model": "m/a", "positive_prompts": ["x"]},
                         {"source_model": "m/b", "positive_prompts": ["y"]}]}
    nulls = plain | {"dtype": None, "architecture": None, "shared_experts": None, "sliding_window": None,
                     "experts": [e | {"negative_prompts": None, "noise_scale": None, "residual_scale": None}
                                 for e in plain["experts"]]}
    assert parse_recipe(nulls) == parse_recipe(plain)


@pytest.mark.parametrize("key, value", [("tokenizer_source", "union"), ("tokenizer", {"source": "base"}),
                                        ("chat_template", "chatml")])
def test_tokenizer_keys_of_other_mergekit_configs_say_what_the_output_gets(key, value):
    data = {"base_model": "m/base", "gate_mode": "random", key: value,
            "experts": [{"source_model": "m/a"}, {"source_model": "m/b"}]}
    with pytest.raises(RecipeError, match=rf"{key}: moeforge, like mergekit-moe, always gives .* base model's "
                                          "tokenizer and chat template") as info:
        parse_recipe(data)
    assert f"remove {key}" in info.value.fix


def test_random_modes_need_no_prompts():
    recipe = parse_recipe({"base_model": "a/b", "gate_mode": "uniform_random",
                           "experts": [{"source_model": "x/y"}, {"source_model": "x/z"}]})
    assert recipe.gate_mode == "uniform_random"


def test_invalid_yaml_file(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("base_model: [unclosed\n")
    with pytest.raises(RecipeError, match="not valid YAML"):
        load_recipe(path)


@pytest.mark.parametrize("name", ["../evil", "a/b", "", ".hidden", "x" * 65, "sp ace", "demo\n", "demo\nx", "a\x00",
                                  "..", 7])
def test_bad_merge_names(name):
    with pytest.raises(RecipeError, match="is not allowed"):
        check_merge_name(name, "config: merges", RecipeError)


@pytest.mark.parametrize("name", sorted(WORKFLOW_DIRS))
def test_a_merge_may_not_take_a_directory_of_the_workflows_own(name):
    """A merge named `search` would have a search named `model` write its ranking into the merge's published model."""
    with pytest.raises(RecipeError, match=f"merge name '{name}' is taken: results/{name}/ holds the workflow's own"):
        check_merge_name(name, "config: merges", RecipeError)


def test_every_directory_the_workflow_writes_under_results_is_refused_as_a_merge_name():
    """The rules' own results/<dir>/ paths, read from the rules: a new one is refused as a merge name too."""
    rules = "\n".join(p.read_text() for p in (REPO / "workflow/rules").glob("*.smk"))
    written = set(re.findall(r'"results/([A-Za-z0-9_.-]+)/', rules))
    assert written and written <= WORKFLOW_DIRS, written - WORKFLOW_DIRS


@pytest.mark.parametrize("name", ["a" * 20, "ab" * 20, "moe-" + "x" * 30, "v1" + "12" * 25])
def test_merge_names_snakemake_takes_for_recursion_are_refused_first(name):
    """The same names Snakemake's own detector refuses as wildcard values, in moeforge's words."""
    from snakemake.io import PeriodicityDetector

    assert PeriodicityDetector().is_periodic(name) is not None
    with pytest.raises(RecipeError, match="which Snakemake refuses in a wildcard"):
        check_merge_name(name, "config: merges", RecipeError)


@pytest.mark.parametrize("name", ["a" * 19, "ab" * 19 + "c", "demo", "m-" + "ab" * 9])
def test_merge_names_snakemake_takes_are_accepted(name):
    from snakemake.io import PeriodicityDetector

    assert PeriodicityDetector().is_periodic(name) is None
    check_merge_name(name, "config: merges", RecipeError)


@pytest.mark.parametrize("architecture", ["deepseek", "llama", "", "mixtral-8x7b"])
def test_an_architecture_no_output_has_is_refused_when_the_recipe_is_read(architecture):
    """Before any metadata is fetched: the recipe alone decides it names nothing moeforge builds."""
    with pytest.raises(RecipeError) as info:
        parse_recipe({"base_model": "a/b", "gate_mode": "random", "architecture": architecture,
                      "experts": [{"source_model": "x/m"}, {"source_model": "y/m"}]}, "r.yaml")
    assert str(info.value) == (
        f"r.yaml: architecture: architecture {architecture!r} names no supported output architecture -> use one "
        "of: mixtral (Mixtral); qwen2_moe (qwen, qwen2, Qwen MoE); qwen3_moe (qwen3, Qwen3 MoE), or a prefix of "
        "one, in any case")


@pytest.mark.parametrize("architecture", ["Mixtral", "mix", "Qwen MoE", "qwen2_moe", "QWEN3"])
def test_architectures_as_mergekit_moe_writes_them_are_read(architecture):
    parse_recipe({"base_model": "a/b", "gate_mode": "random", "architecture": architecture,
                  "experts": [{"source_model": "x/m"}, {"source_model": "y/m"}]}, "r.yaml")


def test_expert_names_are_unique():
    recipe = parse_recipe({"base_model": "a/b", "gate_mode": "random",
                           "experts": [{"source_model": "x/m"}, {"source_model": "y/m"}]})
    assert [e.name for e in recipe.experts] == ["m", "m-2"]


# ---- templates -----------------------------------------------------------------------------

def test_builtin_templates_load():
    from moeforge.plan.templates import load_all

    inputs, outputs = load_all()
    assert {"llama", "mistral", "qwen2", "qwen3"} <= set(inputs)
    assert "mixtral" in outputs
    assert inputs["qwen2"].attention["q_bias"].when == "qkv_bias" and "o_bias" not in inputs["qwen2"].attention


def _template_copy(tmp_path, edit):
    src = REPO / "src/moeforge/architectures/llama.yaml"
    data = yaml.safe_load(src.read_text())
    edit(data)
    path = tmp_path / "llama.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.mark.parametrize("edit,message", [
    (lambda d: d["attention"]["q_proj"].update(shape=["num_attention_head * head_dim", "hidden_size"]),
     "attention.q_proj: unknown parameter 'num_attention_head' in shape expression"),
    (lambda d: d["mlp"]["gate_proj"].update(when="mlp_biass"), "mlp.gate_proj: unknown condition 'mlp_biass'"),
    (lambda d: d["mlp"]["up_proj"].pop("name"), "'name' is a required property"),
    (lambda d: d.update(agree=["hidden_sise"]), "unknown parameter 'hidden_sise'"),
    (lambda d: d.pop("layer_prefix"), "layer_prefix"),
], ids=["misnamed shape parameter", "misnamed condition", "missing field", "misnamed agree", "missing prefix"])
def test_malformed_template_names_file_and_field(tmp_path, edit, message):
    """Report 3's class: a naming mismatch in an architecture description is a clear error."""
    path = _template_copy(tmp_path, edit)
    with pytest.raises(TemplateError) as info:
        load_template(path)
    assert str(path) in str(info.value) and message in str(info.value), str(info.value)


def test_template_extends_missing_parent(tmp_path):
    path = tmp_path / "child.yaml"
    path.write_text("name: child\nkind: input\nextends: nowhere\ndescription: x\nmodel_types: [c]\n")
    with pytest.raises(TemplateError, match="extends 'nowhere'"):
        load_template(path)


# ---- models --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def zoo(tmp_path_factory, tokenizer_dir):
    """A base, a good expert and the bad models, built once."""
    root = tmp_path_factory.mktemp("zoo")
    tok = tokenizer_dir
    z = {"tok": tok, "base": build_dense_model(root / "base", "llama", tokenizer_dir=tok)}
    z["expert"] = build_dense_model(root / "expert", derive_from=z["base"], seed=1, mlp_noise=0.05)
    z["mistral"] = build_dense_model(root / "mistral", "mistral", seed=2, tokenizer_dir=tok)
    z["layers6"] = build_dense_model(root / "layers6", "llama", seed=3, num_layers=6, tokenizer_dir=tok)
    z["qwen15"] = build_preset(root / "qwen15", "qwen1.5", tokenizer_dir=tok)
    z["qwen2tied"] = build_preset(root / "qwen2tied", "qwen2-0.5b", tokenizer_dir=tok)
    z["scaled"] = build_dense_model(root / "scaled", "llama", seed=4, tokenizer_dir=tok,
                                    rope_scaling={"type": "linear", "factor": 2.0})
    small_tok = root / "small_tok"
    train_tokenizer(small_tok, vocab_size=400)
    z["vocab"] = build_dense_model(root / "vocab", "llama", seed=5, tokenizer_dir=small_tok)
    return z


def variant(src: Path, dst: Path, config_edit=None) -> Path:
    shutil.copytree(src, dst)
    if config_edit:
        config = json.loads((dst / "config.json").read_text())
        config_edit(config)
        (dst / "config.json").write_text(json.dumps(config))
    return dst


def recipe(base, *experts, **extra):
    return {"base_model": str(base), "gate_mode": "random",
            "experts": [{"source_model": str(e)} for e in experts], **extra}


def expect(tmp_path, data, error, *fragments):
    with pytest.raises(error) as info:
        plan_only(tmp_path, data)
    for fragment in fragments:
        assert fragment in str(info.value), str(info.value)
    return str(info.value)


def test_unknown_model_type(tmp_path, zoo):
    bad = variant(zoo["expert"], tmp_path / "gemma", lambda c: c.update(model_type="gemma"))
    expect(tmp_path, recipe(zoo["base"], bad, zoo["expert"]), ModelError,
           "model_type 'gemma' is not supported", str(bad), "use a model of a supported type: llama, mistral, qwen2, qwen3")


def test_layer_count_mismatch(tmp_path, zoo):
    expect(tmp_path, recipe(zoo["base"], zoo["layers6"], zoo["expert"]), ModelError,
           "num_hidden_layers is 6 but the base model", str(zoo["layers6"]))


def test_vocab_size_mismatch(tmp_path, zoo):
    expect(tmp_path, recipe(zoo["base"], zoo["vocab"], zoo["expert"]), ModelError,
           "vocab_size is 400 but the base model", str(zoo["vocab"]))


def test_tokenizer_vocabulary_mismatch(tmp_path, zoo):
    other = variant(zoo["expert"], tmp_path / "retok")
    data = json.loads((other / "tokenizer.json").read_text())
    vocab = data["model"]["vocab"]
    first = sorted(vocab, key=vocab.get)[300]
    vocab["zz_" + first] = vocab.pop(first)
    (other / "tokenizer.json").write_text(json.dumps(data))
    expect(tmp_path, recipe(zoo["base"], other, zoo["expert"]), ModelError,
           "tokenizer vocabulary differs from the base's", str(other))


WRONG_CONFIG_VALUES = [
    ("hidden_size", "128x", "hidden_size is '128x', not a positive integer"),
    ("num_hidden_layers", 2.5, "num_hidden_layers is 2.5, not a positive integer up to 100000"),
    ("num_hidden_layers", 1e300, "num_hidden_layers is 1e+300, not a positive integer up to 100000"),
    ("rope_theta", None, "rope_theta is null, not a positive finite number"),
    ("rope_scaling", "linear", "rope_scaling is 'linear', not an object"),
    ("rope_scaling", {"type": "linear", "factor": "2"}, "rope_scaling.factor is '2', not a positive finite number"),
    ("num_attention_heads", -4, "num_attention_heads is -4, not a positive integer"),
    ("vocab_size", True, "vocab_size is True, not a positive integer"),
    ("rms_norm_eps", "1e-5", "rms_norm_eps is '1e-5', not a positive finite number"),
    ("tie_word_embeddings", "yes", "tie_word_embeddings is 'yes', not true or false"),
    ("max_window_layers", [4], "max_window_layers is [4], not an integer >= 0"),
    ("eos_token_id", "</s>", "eos_token_id is '</s>', not a token id or a list of token ids"),
]


@pytest.mark.parametrize("key,value,message", WRONG_CONFIG_VALUES, ids=[f"{c[0]}={c[1]!r}" for c in WRONG_CONFIG_VALUES])
def test_a_config_value_of_the_wrong_type_names_model_file_and_key(tmp_path, zoo, key, value, message):
    bad = variant(zoo["expert"], tmp_path / "bad", lambda c: c.update({key: value}))
    text = expect(tmp_path, recipe(zoo["base"], bad, zoo["expert"]), ModelError,
                  f"model {bad} ({bad / 'config.json'}): {message}", "-> fix or re-download the model's config.json")
    assert "\n" not in text


@pytest.mark.parametrize("name,document,message", [
    ("config.json", [1, 2], "config.json holds a list, not a JSON object"),
    ("config.json", "llama", "config.json holds a string, not a JSON object"),
    ("config.json", 7, "config.json holds a number, not a JSON object"),
    ("tokenizer_config.json", ["<s>"], "tokenizer_config.json holds a list, not a JSON object"),
    ("tokenizer_config.json", {"eos_token": 2}, "eos_token is 2, not a token string or an object with its content"),
    ("tokenizer_config.json", {"chat_template": 5}, "chat_template is 5, not a template string"),
    ("generation_config.json", "greedy", "generation_config.json holds a string, not a JSON object"),
    ("generation_config.json", {"eos_token_id": [2, "x"]}, "eos_token_id is [2, 'x'], not a token id"),
    ("special_tokens_map.json", None, "special_tokens_map.json holds null, not a JSON object"),
    ("model.safetensors.index.json", {"weight_map": ["model.safetensors"]},
     "weight_map is ['model.safetensors'], not an object of tensor names to file names"),
])
def test_a_metadata_file_of_the_wrong_shape_names_model_and_file(tmp_path, zoo, name, document, message):
    bad = variant(zoo["expert"], tmp_path / "bad")
    (bad / name).write_text(json.dumps(document))
    expect(tmp_path, recipe(zoo["base"], bad, zoo["expert"]), ModelError, f"model {bad} ({bad / name}): {message}",
           f"-> fix or re-download the model's {name}")


def test_a_fetched_config_edited_to_the_wrong_type_is_named_when_planned(tmp_path, zoo):
    fetch_metadata(str(zoo["expert"]), tmp_path / "meta")
    config = json.loads((tmp_path / "meta" / "config.json").read_text())
    (tmp_path / "meta" / "config.json").write_text(json.dumps({**config, "hidden_size": "128x"}))
    with pytest.raises(ModelError, match=rf"^model {zoo['expert']} \(config.json\): hidden_size is '128x', not a "
                                         "positive integer -> fix or re-download"):
        load_source(str(zoo["expert"]), tmp_path / "meta")


@pytest.mark.parametrize("edit", [lambda d: d.update(model=["BPE"]), lambda d: d["model"].update(vocab="abc"),
                                  lambda d: d.update(added_tokens=[["<s>", 1]])], ids=["model", "vocab", "added"])
def test_a_tokenizer_json_of_the_wrong_shape_names_it(tmp_path, zoo, edit):
    bad = variant(zoo["expert"], tmp_path / "bad")
    data = json.loads((bad / "tokenizer.json").read_text())
    edit(data)
    (bad / "tokenizer.json").write_text(json.dumps(data))
    expect(tmp_path, recipe(zoo["base"], bad, zoo["expert"]), ModelError, f"model {bad} (tokenizer.json): model.vocab "
           "or added_tokens is not in the tokenizers library's format")


def _drop_tensor(model_dir: Path, name: str) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(model_dir / "model.safetensors")
    tensors.pop(name)
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})


def test_missing_tensor(tmp_path, zoo):
    bad = variant(zoo["expert"], tmp_path / "holey")
    _drop_tensor(bad, "model.layers.2.mlp.up_proj.weight")
    expect(tmp_path, recipe(zoo["base"], bad, zoo["expert"]), ModelError,
           "tensor 'model.layers.2.mlp.up_proj.weight' is missing", str(bad))


def test_missing_attention_in_base(tmp_path, zoo):
    bad = variant(zoo["base"], tmp_path / "noattn")
    _drop_tensor(bad, "model.layers.0.self_attn.k_proj.weight")
    expect(tmp_path, recipe(bad, zoo["expert"], zoo["expert"]), ModelError,
           "'model.layers.0.self_attn.k_proj.weight' is missing", str(bad))


def test_config_disagrees_with_weights(tmp_path, zoo):
    bad = variant(zoo["expert"], tmp_path / "liar", lambda c: c.update(intermediate_size=96))
    msg = expect(tmp_path, recipe(bad, zoo["expert"], zoo["expert"]), ModelError, "config.json implies [96, 64]")
    assert str(bad) in msg


def test_truncated_safetensors(tmp_path, zoo):
    bad = variant(zoo["expert"], tmp_path / "short")
    path = bad / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(ModelError, match="file is truncated") as info:
        fetch_metadata(str(bad), tmp_path / "meta")
    assert str(path) in str(info.value)
    assert not (tmp_path / "meta").exists()  # nothing half-written left looking complete


def test_corrupt_header(tmp_path, zoo):
    bad = variant(zoo["expert"], tmp_path / "garbled")
    path = bad / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[10:20] = b"\x00" * 10
    path.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="cannot read safetensors header"):
        fetch_metadata(str(bad), tmp_path / "meta")


def test_missing_local_path(tmp_path):
    with pytest.raises(FetchError, match="no such local directory"):
        fetch_metadata(str(tmp_path / "nowhere"), tmp_path / "meta")


def test_directory_without_config(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelError, match="no config.json"):
        fetch_metadata(str(tmp_path / "empty"), tmp_path / "meta")


def test_mistral_and_llama_mix(tmp_path, zoo):
    """Different model_types with identical shapes and semantics may be mixed."""
    plan = plan_only(tmp_path, recipe(zoo["base"], zoo["mistral"], zoo["expert"]))
    assert plan.output_family == "mixtral"
    assert any("mistral" in d["what"] for d in plan.decisions)


def test_rope_mismatch_refused_unless_allowed(tmp_path, zoo):
    expect(tmp_path, recipe(zoo["base"], zoo["scaled"], zoo["expert"]), ModelError,
           "rope settings differ", "allow_rope_mismatch")
    plan = plan_only(tmp_path / "ok", recipe(zoo["base"], zoo["scaled"], zoo["expert"], allow_rope_mismatch=True))
    assert any("rope settings differ" in w for w in plan.warnings)


def test_qwen15_is_recognised(zoo, tmp_path):
    """Report 4: Qwen1.5 (model_type qwen2, Qwen2ForCausalLM) must not be rejected by a type check."""
    fetch_metadata(str(zoo["qwen15"]), tmp_path / "meta")
    source = load_source(str(zoo["qwen15"]), tmp_path / "meta")
    assert source.family.name == "qwen2" and source.params["qkv_bias"] is True


def test_qwen_biases_cannot_become_mixtral(tmp_path, zoo):
    q = zoo["qwen15"]
    expect(tmp_path, recipe(q, q, q, architecture="mixtral"), ModelError,
           "self_attn.q_proj.bias", "mixtral has no place for")


def test_tied_base_without_lm_head_plans(tmp_path, zoo):
    """Report 5: a tied Qwen2-0.5B-style base has no lm_head.weight on disk: no KeyError."""
    fetch_metadata(str(zoo["qwen2tied"]), tmp_path / "meta")
    source = load_source(str(zoo["qwen2tied"]), tmp_path / "meta")
    assert "lm_head.weight" not in source.inventory and source.params["tied"]


def test_validation_reads_no_weights(tmp_path, zoo):
    """Plan from metadata only: the weight files are gone when validation runs."""
    base = variant(zoo["base"], tmp_path / "b")
    expert = variant(zoo["expert"], tmp_path / "e")
    data = recipe(base, expert, expert)
    from pipeline import fetch_all

    fetch_all(tmp_path / "w", [str(base), str(expert)])
    for model in (base, expert):
        (model / "model.safetensors").unlink()
    plan = plan_only(tmp_path / "w", data)
    checked = json.loads((tmp_path / "w" / "results" / "m" / "class_check.json").read_text())
    assert plan.num_layers == 4 and checked["tensors"] > 0


def test_offline_hub_cache_resolves_commit(tmp_path, zoo):
    """fetch_metadata on org/repo@rev from a populated HF cache with HF_HUB_OFFLINE=1."""
    cache = tmp_path / "hub"
    commit = "0123456789abcdef0123456789abcdef01234567"
    populate(cache, "acme/tiny-llama", zoo["base"], commit)
    code = ("import json, sys; from pathlib import Path; from moeforge.io.fetch import fetch_metadata; "
            "print(json.dumps(fetch_metadata(sys.argv[1], Path(sys.argv[2]))))")
    for ref in ("acme/tiny-llama", "acme/tiny-llama@main", f"acme/tiny-llama@{commit}"):
        out = tmp_path / ref.replace("/", "_").replace("@", "_")
        proc = subprocess.run([sys.executable, "-c", code, ref, str(out)], env=offline_env(cache),
                              capture_output=True, text=True, stdin=subprocess.DEVNULL)
        assert proc.returncode == 0, proc.stderr
        source = json.loads(proc.stdout)
        assert source["resolved_revision"] == commit and source["kind"] == "hub"
        assert (out / "inventory.tsv").is_file() and (out / "tokenizer.json").is_file()
    absent = "f" * 40
    proc = subprocess.run([sys.executable, "-c", code, f"acme/tiny-llama@{absent}", str(tmp_path / "absent")],
                          env=offline_env(cache), capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert proc.returncode != 0
    assert f"(it holds acme/tiny-llama, but not its revision '{absent}')" in proc.stderr, proc.stderr[-2000:]


def test_offline_without_cache_is_a_clear_error(tmp_path):
    code = ("from pathlib import Path; from moeforge.runner import run; from moeforge.io.fetch import fetch_metadata; "
            "import types; run(types.SimpleNamespace(log=[]), lambda s: fetch_metadata('acme/absent', Path('x')))")
    proc = subprocess.run([sys.executable, "-c", code], env=offline_env(tmp_path / "hub"), cwd=tmp_path,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1
    assert "acme/absent: not in the Hugging Face cache" in proc.stderr and "Traceback" not in proc.stderr


def test_an_expert_of_another_family_is_a_warning(tmp_path, tokenizer_dir):
    """Shapes that fit are not enough: a Qwen2 MLP beside a Llama base's attention computes poorly unless both
    come from one pretrained model, so the plan says so (mergekit-moe refuses it for Mixtral)."""
    llama = build_dense_model(tmp_path / "llama", "llama", seed=1, tokenizer_dir=tokenizer_dir)
    qwen = build_dense_model(tmp_path / "qwen", "qwen2", seed=2, tokenizer_dir=tokenizer_dir)
    recipe = {"base_model": str(llama), "gate_mode": "random",
              "experts": [{"source_model": str(llama)}, {"source_model": str(qwen)}]}
    plan = plan_only(tmp_path / "run", recipe)
    assert [w for w in plan.warnings if f"expert {qwen} is a qwen2 model and the base {llama} a llama" in w]
