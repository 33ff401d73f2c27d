"""Router training: recipe keys, the layerwise and end-to-end methods on tiny models, and their refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from moeforge.check.evaluate import EvalOptions, domain_ids, domain_windows, score
from moeforge.demo.tiny_models import build_preset
from moeforge.errors import ModelError, RecipeError
from moeforge.io.domains import domain_path
from moeforge.io.hf_load import load_tokenizer
from moeforge.io.schema import package_schema
from moeforge.plan.recipe import RouterTraining, parse_recipe
from moeforge.plan.train_texts import check_train_texts
from moeforge.train.texts import training_windows
from pipeline import build, logits, plan_only, sha256_tree

DOMAINS = ("code", "math")


def recipe(base: Path, experts: list[Path], training: dict | None, texts: list[list[str]] | None = None,
           **extra) -> dict:
    texts = texts if texts is not None else [[str(domain_path(d, "train"))] for d in DOMAINS]
    out = {"base_model": str(base), "gate_mode": "random", "seed": 3, **extra,
           "experts": [{"source_model": str(e), **({"train_texts": t} if training is not None else {})}
                       for e, t in zip(experts, texts, strict=True)]}
    if training is not None:
        out["router_training"] = training
    return out


@pytest.fixture(scope="module")
def models(base_and_experts):
    return base_and_experts


def experts_of(models) -> list[Path]:
    return [models["e0"], models["e1"]]


def heldout_accuracy(model_dir: Path) -> list[float]:
    """Per domain, the share of its held-out tokens' first choices (over all layers) that are its own expert."""
    tokenizer = load_tokenizer(model_dir, ModelError, "tokenizer", "")
    opts = EvalOptions(context=64, max_tokens=1024)
    windows = {d: domain_windows(domain_ids(tokenizer, d, domain_path(d, "heldout"), opts.max_tokens),
                                 tokenizer.bos_token_id, opts, d) for d in DOMAINS}
    scores = score(model_dir, windows, opts)
    return [scores[d].top1[i] / sum(scores[d].top1) for i, d in enumerate(DOMAINS)]


# ---- recipe keys ------------------------------------------------------------------------------------

def test_every_seed_the_schema_allows_seeds_the_training():
    import torch

    top = package_schema("recipe")["properties"]["router_training"]["properties"]["seed"]["maximum"]
    assert parse_recipe(recipe(Path("b"), [Path("e0"), Path("e1")], {"seed": top})).router_training.seed == top
    torch.Generator().manual_seed(top)


def test_the_resolved_recipe_makes_every_training_default_explicit():
    parsed = parse_recipe(recipe(Path("b"), [Path("e0"), Path("e1")], {}))
    assert parsed.router_training == RouterTraining()
    assert parsed.to_dict()["router_training"]["method"] == "layerwise"


@pytest.mark.parametrize(("change", "says"), [
    ({"router_training": {"steps": 0}}, "router_training.steps: 0 is less than the minimum of 1"),
    ({"router_training": {"learning_rate": 3}}, "router_training.learning_rate: 3 is greater than the maximum of 1"),
    ({"router_training": {"method": "adam"}}, "router_training.method"),
    ({"router_training": {"method": "end_to_end", "label_smoothing": 0.2}}, "applies to method layerwise"),
    ({"router_training": {"seed": 2**64}}, "router_training.seed: 18446744073709551616 is greater than the maximum"),
])
def test_settings_out_of_range_are_refused_by_key(change, says):
    with pytest.raises(RecipeError) as caught:
        parse_recipe({**recipe(Path("b"), [Path("e0"), Path("e1")], {}), **change})
    assert says in str(caught.value)


@pytest.mark.parametrize(("written", "key", "write"), [
    ("1e9", "steps", "write 1000000000"), ("1e-3", "learning_rate", "write 0.001"),
    ("2.0e5", "tokens_per_expert", "write 200000"), ("5E-11", "learning_rate", "write 5.0e-11"),
])
def test_a_number_yaml_reads_as_text_says_how_to_write_it(written, key, write):
    """YAML 1.1 reads an exponent without a decimal point and a sign as text: the message says so, and the
    number it suggests is one YAML reads."""
    import yaml

    from moeforge.io.yaml_doc import parse_yaml

    data = recipe(Path("b"), [Path("e0"), Path("e1")], {})
    del data["router_training"]
    document = parse_yaml(yaml.safe_dump(data) + f"router_training: {{{key}: {written}}}\n", "r", RecipeError)
    assert document["router_training"] == {key: written}
    with pytest.raises(RecipeError) as caught:
        parse_recipe(document)
    assert f"router_training.{key}: '{written}' is read as text, not a number" in str(caught.value)
    assert write in str(caught.value)
    suggested = str(caught.value).split("; write ")[1].split()[0]
    assert yaml.safe_load(suggested) == pytest.approx(float(written))


def test_an_expert_without_train_texts_is_named():
    data = recipe(Path("b"), [Path("e0"), Path("e1")], {})
    del data["experts"][1]["train_texts"]
    with pytest.raises(RecipeError, match=r"experts\[1\] \(e1\).*no train_texts|no train_texts.*experts\[1\]"):
        parse_recipe(data)


def test_train_texts_without_router_training_are_refused():
    data = recipe(Path("b"), [Path("e0"), Path("e1")], {})
    del data["router_training"]
    with pytest.raises(RecipeError, match="no router_training to read them"):
        parse_recipe(data)


# ---- the texts ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("content", "says"), [
    (None, "not found"),
    ("", "is empty"),
    ("def f():\n    return 1\n", "fewer than the two windows"),
    ("路由器训练需要专家领域的文本。" * 200, "mostly in another vocabulary"),
    (b"def f(x):\n    return x\n" * 40 + b"\xff\xfe", "UTF-8"),
])
def test_unusable_texts_are_refused_at_validation_and_before_training(tmp_path, tokenizer_dir, content, says):
    """Validation refuses them before any weight is fetched (two windows' worth read); training again as it reads
    them in full."""
    text = tmp_path / "t.txt"
    if isinstance(content, bytes):
        text.write_bytes(content)
    elif content is not None:
        text.write_text(content, encoding="utf-8")
    parsed = parse_recipe(recipe(Path("b"), [Path("e0"), Path("e1")], {},
                                 texts=[[str(domain_path("code", "train"))], [str(text)]]))
    tokenizer = load_tokenizer(tokenizer_dir, ModelError, "tokenizer", "")
    for check in (lambda: check_train_texts(parsed, tokenizer, "recipe"),
                  lambda: training_windows(parsed, tokenizer, parsed.router_training, "recipe")):
        with pytest.raises(RecipeError) as caught:
            check()
        assert says in str(caught.value) and "e1" in str(caught.value)


def _refusal(parsed, tokenizer) -> list[str]:
    """The message of each place that refuses the recipe's texts: validation, and training as it reads them."""
    messages = []
    for check in (lambda: check_train_texts(parsed, tokenizer, "recipe"),
                  lambda: training_windows(parsed, tokenizer, parsed.router_training, "recipe")):
        with pytest.raises(RecipeError) as caught:
            check()
        messages.append(str(caught.value))
    return messages


def test_validation_reads_as_far_as_training_will(tmp_path, tokenizer_dir):
    """A fault past the first windows but within tokens_per_expert is refused at validation, not by the training
    job after the gates and shards; past tokens_per_expert training never reads it, and neither does validation."""
    good = domain_path("math", "train").read_bytes()
    text = tmp_path / "t.txt"
    text.write_bytes(good[:6000] + b"\xff" + good[6000:])
    tokenizer = load_tokenizer(tokenizer_dir, ModelError, "tokenizer", "")
    for tokens, refused in ((4096, True), (512, False)):
        parsed = parse_recipe(recipe(Path("b"), [Path("e0"), Path("e1")], {"tokens_per_expert": tokens},
                                     texts=[[str(domain_path("code", "train"))], [str(text)]]))
        if refused:
            with pytest.raises(RecipeError, match=r"e1: train_texts: .*t.txt: not UTF-8 text \(byte 0xff at position "
                                                  r"6000"):
                check_train_texts(parsed, tokenizer, "recipe")
        else:
            check_train_texts(parsed, tokenizer, "recipe")
            training_windows(parsed, tokenizer, parsed.router_training, "recipe")


def test_the_jobs_that_read_the_texts_ask_for_the_memory_reading_takes():
    """Reading a row's texts as far as tokens_per_expert peaks at about 1.7 KiB per token (the tokenizer's
    encoding; 2 GB at 10^6 tokens per expert on the demo's tokenizer): validation and training ask for it."""
    from moeforge.io.progress import MIB
    from moeforge.resources import validate_mem_mb

    def parsed(tokens: int):
        return parse_recipe(recipe(Path("b"), [Path("e0"), Path("e1")], {"tokens_per_expert": tokens}))

    assert validate_mem_mb(parsed(8192)) < 2100
    assert validate_mem_mb(parsed(10**6)) >= 2000 + 10**6 * 1700 // MIB
    assert validate_mem_mb(parse_recipe(recipe(Path("b"), [Path("e0"), Path("e1")], None))) == 2000


@pytest.mark.parametrize(("entry", "says", "fix"), [
    ("texts", "is a directory, not a text file", "list the text files in it"),
    ("texts/*.txt", "patterns are not expanded", "list each text file"),
    ("dangling.txt", "is a link to nowhere.txt, which does not exist", "point the link at the text"),
    ("blank.txt", "holds only whitespace", "UTF-8 text files of its domain"),
    ("pipe", "is not a regular file", "give a text file"),
    ("$HOME/a.txt", "names an environment variable", "write the path out"),
    ("aaa.txt", "repeats 1 token(s) over and over", "UTF-8 text files of its domain"),
    ("zeros.txt", "repeats 1 token(s) over and over", "UTF-8 text files of its domain"),
    ("blank.txt ", "'blank.txt ' is not there, but 'blank.txt' is", "remove the spaces around the path"),
    ("/proc/self/mem", "cannot be read: Input/output error", "make the text readable"),
])
def test_entries_that_are_no_usable_text_say_what_they_are(tmp_path, tokenizer_dir, monkeypatch, entry, says, fix):
    import os

    monkeypatch.chdir(tmp_path)
    os.mkfifo(tmp_path / "pipe")
    (tmp_path / "texts").mkdir()
    (tmp_path / "texts" / "a.txt").write_text("def f():\n    return 1\n" * 100, encoding="utf-8")
    (tmp_path / "dangling.txt").symlink_to("nowhere.txt")
    (tmp_path / "blank.txt").write_text(" \n\t\n" * 50, encoding="utf-8")
    (tmp_path / "aaa.txt").write_text("a" * 20000, encoding="utf-8")
    (tmp_path / "zeros.txt").write_bytes(bytes(20000))
    parsed = parse_recipe(recipe(Path("b"), [Path("e0"), Path("e1")], {},
                                 texts=[[str(domain_path("code", "train"))], [entry]]))
    tokenizer = load_tokenizer(tokenizer_dir, ModelError, "tokenizer", "")
    for message in _refusal(parsed, tokenizer):
        assert says in message and fix in message and "e1: train_texts" in message and "not found" not in message


def test_a_text_path_with_a_tilde_resolves_like_a_local_model_path(tmp_path, tokenizer_dir, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "math.txt").write_bytes(domain_path("math", "train").read_bytes())
    parsed = parse_recipe(recipe(Path("b"), [Path("e0"), Path("e1")], {"tokens_per_expert": 512},
                                 texts=[[str(domain_path("code", "train"))], ["~/math.txt"]]))
    tokenizer = load_tokenizer(tokenizer_dir, ModelError, "tokenizer", "")
    check_train_texts(parsed, tokenizer, "recipe")
    windows = training_windows(parsed, tokenizer, parsed.router_training, "recipe")
    assert windows.records[1].path == "~/math.txt"
    assert windows.records[1].size == domain_path("math", "train").stat().st_size


def test_a_text_path_with_a_tilde_is_an_input_of_the_jobs_that_read_it(models, tmp_path):
    """The workflow names the file ``~`` stands for as validation's and training's input, so an edit of the text
    validates and trains again (a dry run, as a user reads the workflow)."""
    import os
    import subprocess
    import sys

    import yaml

    home = tmp_path / "home"
    home.mkdir()
    (home / "code.txt").write_bytes(domain_path("code", "train").read_bytes())
    data = recipe(models["base"], experts_of(models), {}, texts=[["~/code.txt"], [str(domain_path("math", "train"))]])
    (tmp_path / "m.yaml").write_text(yaml.safe_dump(data))
    repo = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-m", "snakemake", "-s", str(repo / "Snakefile"), "-d", str(tmp_path), "-n",
                           "--cores", "1", "--config", "recipe=m.yaml"], cwd=repo, capture_output=True, text=True,
                          env={**os.environ, "HOME": str(home)}, stdin=subprocess.DEVNULL, timeout=300)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-3000:]
    inputs = [line for line in output.splitlines() if line.strip().startswith("input:") and "m.yaml" in line]
    assert inputs and str(home / "code.txt") in inputs[0], output[-3000:]


@pytest.mark.parametrize(("texts", "says"), [
    ([["code.txt", "code.txt"], ["math.txt"]], "train text code.txt is the same file as code.txt (also listed)"),
    ([["code.txt", "./code.txt"], ["math.txt"]], "./code.txt is the same file as code.txt (also listed)"),
    ([["code.txt"], ["link.txt"]], "link.txt is the same file as code.txt (listed for e0)"),
    ([["code.txt"], ["copy.txt", "math.txt"]], "copy.txt is a copy of code.txt (listed for e0)"),
])
def test_a_text_given_twice_under_any_name_is_refused(tmp_path, tokenizer_dir, monkeypatch, texts, says):
    """Twice for one expert it counts double; for two experts the same windows are labelled with both."""
    monkeypatch.chdir(tmp_path)
    for name, domain in (("code.txt", "code"), ("copy.txt", "code"), ("math.txt", "math")):
        (tmp_path / name).write_bytes(domain_path(domain, "train").read_bytes())
    (tmp_path / "link.txt").symlink_to("code.txt")
    parsed = parse_recipe(recipe(Path("b"), [Path("e0"), Path("e1")], {}, texts=texts))
    tokenizer = load_tokenizer(tokenizer_dir, ModelError, "tokenizer", "")
    for message in _refusal(parsed, tokenizer):
        assert says in message and "give each text once" in message


@pytest.mark.parametrize(("training", "key", "says"), [
    ({"seq_len": 4096}, "router_training.seq_len", "longer than the base model's context"),
    ({"tokens_per_expert": 256, "seq_len": 512}, "router_training.tokens_per_expert",
     "tokens_per_expert 256 is fewer than the two windows of 511 tokens"),
])
def test_windows_the_settings_cannot_give_are_refused_at_validation_by_key(models, training, key, says):
    """The base's context bounds a window; tokens_per_expert must hold two: both are known before any weight."""
    from moeforge.plan.prompt_check import check_token_inputs

    parsed = parse_recipe(recipe(models["base"], experts_of(models), training))
    with pytest.raises(RecipeError) as caught:
        check_token_inputs(parsed, models["base"])
    assert f"recipe: {key}: " in str(caught.value) and says in str(caught.value)


def test_texts_no_gate_row_reads_are_refused():
    """A shared expert's texts under shared_gate: always train nothing: it has no gate row."""
    data = recipe(Path("b"), [Path("e0"), Path("e1")], {}, shared_gate="always", architecture="qwen")
    data["shared_experts"] = [{"source_model": "s", "train_texts": ["cooking.txt"]}]
    with pytest.raises(RecipeError, match=r"shared_experts\[0\] \(s\).*shared_gate: always gives the shared experts "
                                          r"no gate to train"):
        parse_recipe(data)


def test_a_text_path_snakemake_would_read_as_a_wildcard_is_refused_by_name():
    data = recipe(Path("b"), [Path("e0"), Path("e1")], {}, texts=[["code.txt"], ["texts/{domain}.txt"]])
    with pytest.raises(RecipeError, match=r"experts\[1\] \(e1\): train_texts: train text 'texts/\{domain\}.txt' has a "
                                          r"brace.*rename the file"):
        parse_recipe(data)


def test_router_training_with_one_expert_is_refused():
    data = recipe(Path("b"), [Path("e0")], {}, texts=[["code.txt"]], experts_per_token=1)
    with pytest.raises(RecipeError, match="router_training: router_training with one expert has nothing to learn"):
        parse_recipe(data)


def test_a_lock_whose_texts_changed_names_the_texts_not_a_source_model(tmp_path):
    from moeforge.plan.lock_merge import check_local_hashes, check_local_sizes

    text = tmp_path / "code.txt"
    text.write_text("def f():\n    return 1\n", encoding="utf-8")
    lock = {"sources": {}, "train_texts": [
        {"expert": "e0", "path": str(text), "size": text.stat().st_size, "sha256": "0" * 64},
        {"expert": "e1", "path": str(tmp_path / "gone" / "math.txt"), "size": 10, "sha256": "0" * 64}]}
    with pytest.raises(ModelError) as caught:
        check_local_sizes(lock, "lock")
    message = str(caught.value)
    assert f"train text(s) differ from the lock: {tmp_path}/gone/math.txt: missing" in message
    assert "restore the training texts" in message and "source model" not in message
    del lock["train_texts"][1]
    with pytest.raises(ModelError, match=r"train text\(s\) differ from the lock: .*code.txt: sha256 "):
        check_local_hashes(lock, "lock")


# ---- layerwise ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def layerwise(models, tmp_path_factory):
    """The same recipe with and without layerwise training, and the trained one built twice."""
    root = tmp_path_factory.mktemp("layerwise")
    training = {"steps": 60, "tokens_per_expert": 4096}
    return {"gates": build(root / "gates", recipe(models["base"], experts_of(models), None)),
            "trained": build(root / "a", recipe(models["base"], experts_of(models), training)),
            "again": build(root / "b", recipe(models["base"], experts_of(models), training))}


def test_the_layerwise_objective_scores_the_weight_the_moe_gives_the_text_expert():
    """Mixtral renormalises the top-k softmax: the text's expert's weight is its share of the top-k; outside the
    top-k its softmax probability stands in. Qwen MoE without norm_topk_prob mixes raw softmax probabilities."""
    from transformers import MixtralConfig, Qwen2MoeConfig

    from moeforge.train.layerwise import Mixing

    logits, e = torch.tensor([[2.0, 1.0, 0.0], [2.0, 1.0, 0.0]]), math.e
    mixtral = Mixing.of(MixtralConfig(num_local_experts=3, num_experts_per_tok=2))
    assert mixtral == Mixing(top_k=2, renormalise=True)
    assert float(mixtral.expert_nll(logits[:1], torch.tensor([1]))) == pytest.approx(math.log(1 + e))
    assert float(mixtral.expert_nll(logits[:1], torch.tensor([2]))) == pytest.approx(math.log(e * e + e + 1))
    assert float(mixtral.expert_nll(logits, torch.tensor([0, 1]))) == pytest.approx(
        (math.log(1 + 1 / e) + math.log(1 + e)) / 2)
    qwen = Mixing.of(Qwen2MoeConfig(num_experts=3, num_experts_per_tok=2, norm_topk_prob=False))
    assert not qwen.renormalise
    assert float(qwen.expert_nll(logits[:1], torch.tensor([1]))) == pytest.approx(math.log(e * e + e + 1) - 1)


def test_layerwise_training_is_deterministic(layerwise):
    routers = [b.model_dir.parents[0] / "routers" / "trained.safetensors" for b in (layerwise["trained"],
                                                                                    layerwise["again"])]
    assert routers[0].read_bytes() == routers[1].read_bytes()
    assert sha256_tree(layerwise["trained"].model_dir) == sha256_tree(layerwise["again"].model_dir)


def test_layerwise_routes_heldout_text_to_its_expert_better_than_its_initialisation(layerwise):
    before = heldout_accuracy(layerwise["gates"].model_dir)
    after = heldout_accuracy(layerwise["trained"].model_dir)
    assert all(a > b + 0.05 for a, b in zip(after, before, strict=True)), (before, after)


def test_the_trained_routers_replace_only_the_routers(layerwise):
    out = layerwise["trained"].model_dir.parent
    gates, trained = load_file(out / "gates.safetensors"), load_file(out / "routers" / "trained.safetensors")
    assert gates.keys() == trained.keys() and all(gates[n].dtype == trained[n].dtype for n in gates)
    assert all(not torch.equal(gates[n], trained[n]) for n in gates)
    ids = torch.tensor([[1, 17, 45, 98, 203, 7, 88]])
    assert logits(layerwise["trained"].model_dir, ids).isfinite().all()  # a strict load


def test_the_report_and_the_lock_record_the_training(layerwise):
    out = layerwise["trained"].model_dir.parent
    report = json.loads((out / "routers" / "report.json").read_text())
    assert [row["layer"] for row in report["layers"]] == list(range(len(report["layers"])))
    assert all(row["heldout_after"]["all"] > row["heldout_before"]["all"] for row in report["layers"])
    assert (out / "routers" / "report.md").is_file() and (out / "routers" / "training.png").stat().st_size > 0
    lock = json.loads((layerwise["trained"].model_dir / "moeforge.lock.json").read_text())
    from moeforge.io.files import sha256_file

    assert [(t["path"], t["sha256"]) for t in lock["train_texts"]] == [
        (str(domain_path(d, "train")), sha256_file(domain_path(d, "train"))) for d in DOMAINS]
    assert lock["recipe"]["router_training"]["steps"] == 60


@pytest.mark.slow
def test_a_lock_rerun_reproduces_the_trained_routers(layerwise, tmp_path):
    from test_reproduce import report_of, snakemake, without_lock

    original = layerwise["trained"].model_dir
    proc = snakemake(tmp_path, {"again": {"lock": str(original)}})
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert report_of(tmp_path, "again")["verdict"] == "identical"
    assert without_lock(sha256_tree(tmp_path / "results/again/model")) == without_lock(sha256_tree(original))
    checked = json.loads((tmp_path / "results/again/reproduce/sources.json").read_text())["local_files_checked"]
    assert {c["file"] for c in checked} >= {str(domain_path(d, "train")) for d in DOMAINS}


# ---- end to end ---------------------------------------------------------------------------------------

def test_end_to_end_training_is_deterministic_and_trains_the_routers(models, tmp_path):
    training = {"method": "end_to_end", "steps": 8, "batch_size": 4, "tokens_per_expert": 2048}
    first = build(tmp_path / "a", recipe(models["base"], experts_of(models), training))
    second = build(tmp_path / "b", recipe(models["base"], experts_of(models), training))
    assert sha256_tree(first.model_dir) == sha256_tree(second.model_dir)
    out = first.model_dir.parent
    gates, trained = load_file(out / "gates.safetensors"), load_file(out / "routers" / "trained.safetensors")
    assert all(not torch.equal(gates[n], trained[n]) for n in gates)
    report = json.loads((out / "routers" / "report.json").read_text())
    assert len(report["loss_curves"][0]["losses"]) == 8


def test_end_to_end_over_the_recipes_memory_budget_is_refused_at_validation_with_the_numbers(models, tmp_path):
    """The recipe's own budget and the model's size (the plan's) are both known before any weight is fetched."""
    training = {"method": "end_to_end", "memory_gb": 0.001}
    with pytest.raises(RecipeError) as caught:
        plan_only(tmp_path, recipe(models["base"], experts_of(models), training))
    message = str(caught.value)
    assert "needs the whole model in memory" in message and "over the budget of 0.00 GiB" in message
    assert "router_training.memory_gb" in message and "method: layerwise" in message
    assert not (tmp_path / "results" / "m" / "plan.json").exists()
    assert not (tmp_path / "results" / "m" / "weights").exists()


# ---- Qwen2-MoE's shared expert gate -------------------------------------------------------------------

def test_the_shared_expert_gate_is_trained_too(tmp_path, tokenizer_dir):
    qwen = build_preset(tmp_path / "qwen2", "qwen2.5", tokenizer_dir=tokenizer_dir)
    data = recipe(qwen, [qwen, qwen], {"steps": 30, "tokens_per_expert": 2048})
    data["shared_experts"] = [{"source_model": str(qwen), "train_texts": [str(domain_path("cooking", "train"))]}]
    result = build(tmp_path / "build", data)
    out = result.model_dir.parent
    gates, trained = load_file(out / "gates.safetensors"), load_file(out / "routers" / "trained.safetensors")
    assert "layer.0.shared_expert_gate" in trained
    assert not torch.equal(gates["layer.0.shared_expert_gate"], trained["layer.0.shared_expert_gate"])
    report = json.loads((out / "routers" / "report.json").read_text())
    assert all(row["shared_gate"]["heldout_after"] > row["shared_gate"]["heldout_before"] for row in report["layers"])
    assert logits(result.model_dir, torch.tensor([[1, 17, 45, 98]])).isfinite().all()
