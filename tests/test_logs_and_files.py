"""Everything a step prints reaches its log; damaged input files are one moeforge error, not a traceback."""

from __future__ import annotations

import errno
import json
import logging
import re
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest

from hfcache import offline_env, populate
from moeforge.demo.tiny_models import build_dense_model
from moeforge.errors import ModelError, RecipeError
from moeforge.io.fetch import fetch_metadata
from moeforge.io.files import write_text
from moeforge.io.hf_load import load_tokenizer
from moeforge.plan.recipe import load_recipe
from moeforge.plan.sources import load_source
from moeforge.runner import run

#: A step that does what library code does (print, warn, log through transformers' own handler,
#: which it binds to stderr at import) and then fails unexpectedly or with a user-facing error.
STEP = """
import sys, types, warnings
from transformers.utils import logging as hf_logging
from moeforge.errors import RecipeError
from moeforge.runner import run

def step(smk):
    print("printed by the step")
    warnings.warn("a library warning")
    hf_logging.get_logger("transformers.modeling_utils").warning("a transformers warning")
    if sys.argv[2] == "user":
        raise RecipeError("gate_mode is wrong", "recipe.yaml", "fix it")
    if sys.argv[2] == "immutable":  # what writing into a chattr +i directory raises
        raise PermissionError(1, "Operation not permitted", "results/m/.class_check.json.tmp-1")
    raise RuntimeError("an unexpected failure")

run(types.SimpleNamespace(log=[sys.argv[1]]), step)
"""


def _run_step(tmp_path: Path, failure: str) -> tuple[subprocess.CompletedProcess, str]:
    log = tmp_path / "logs" / "step.log"
    proc = subprocess.run([sys.executable, "-c", STEP, str(log), failure], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, cwd=tmp_path)
    return proc, log.read_text(encoding="utf-8")


def test_unexpected_failure_leaves_everything_in_the_log(tmp_path):
    proc, log = _run_step(tmp_path, "bug")
    assert proc.returncode != 0
    for text in ("printed by the step", "UserWarning: a library warning", "a transformers warning",
                 "Traceback (most recent call last)", "RuntimeError: an unexpected failure"):
        assert text in log, (text, log)
    assert "printed by the step" in proc.stdout
    assert "Traceback" in proc.stderr and "a library warning" in proc.stderr


def test_user_error_is_one_line_without_traceback(tmp_path):
    proc, log = _run_step(tmp_path, "user")
    assert proc.returncode == 1
    errors = [line for line in log.splitlines() if line.startswith("ERROR")]
    assert errors == ["ERROR moeforge: recipe.yaml: gate_mode is wrong -> fix it"]
    assert "Traceback" not in log and "Traceback" not in proc.stderr
    assert "a library warning" in log


def test_a_directory_that_may_not_be_changed_is_one_line(tmp_path):
    proc, log = _run_step(tmp_path, "immutable")
    assert proc.returncode == 1
    errors = [line for line in log.splitlines() if line.startswith("ERROR")]
    assert len(errors) == 1 and errors[0].startswith("ERROR moeforge: results/m/.class_check.json.tmp-1: "
                                                     "Operation not permitted -> ")
    assert "Traceback" not in log


def test_a_full_disk_names_the_outputs_file_system_not_the_file_being_read(tmp_path):
    """ENOSPC can carry the name of a source file being read; the message names where the job writes."""
    source = tmp_path / "resources" / "base" / "model.safetensors"
    source.parent.mkdir(parents=True)
    source.write_bytes(b"x")
    (tmp_path / "results" / "m").mkdir(parents=True)
    job = types.SimpleNamespace(log=[str(tmp_path / "logs" / "shard.log")],
                                output=[str(tmp_path / "results" / "m" / "shards" / "layers-0-1.safetensors")])

    def step(smk):
        raise OSError(errno.ENOSPC, "No space left on device", str(source))

    with pytest.raises(SystemExit):
        run(job, step)
    errors = [line for line in (tmp_path / "logs" / "shard.log").read_text().splitlines() if line.startswith("ERROR")]
    free = shutil.disk_usage(tmp_path).free / 2**20
    assert len(errors) == 1, errors
    assert errors[0].startswith(f"ERROR moeforge: {tmp_path / 'results' / 'm'}: No space left on device (the file "
                                "system of this job's outputs; "), errors
    assert re.search(r"; (\d+\.\d) MiB free now\) -> free disk space", errors[0]), errors
    assert abs(float(re.search(r"(\d+\.\d) MiB free", errors[0]).group(1)) - free) < 64
    assert str(source) not in errors[0]


def test_a_really_full_file_system_is_named(tmp_path):
    """A 1 MiB tmpfs (root only; skipped elsewhere) filled by a job's output: one line naming its directory."""
    disk = tmp_path / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(disk)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        job = types.SimpleNamespace(log=[str(tmp_path / "job.log")], output=[str(disk / "results" / "m" / "out.txt")])
        with pytest.raises(SystemExit):
            run(job, lambda smk: write_text(Path(smk.output[0]), "x" * (2 << 20)))
        errors = [line for line in (tmp_path / "job.log").read_text().splitlines() if line.startswith("ERROR")]
        assert len(errors) == 1 and errors[0].startswith(f"ERROR moeforge: {disk / 'results' / 'm'}: No space left on "
                                                         "device (the file system of this job's outputs; "), errors
        assert not (disk / "results" / "m" / "out.txt").exists()
    finally:
        subprocess.run(["umount", str(disk)], check=True)


#: A job as Snakemake runs a ``script:``: the module-level ``snakemake`` object in ``__main__``.
JOB = """
import atexit, sys, types
from pathlib import Path
from moeforge.runner import run

atexit.register(lambda: Path("exit-handler").write_text("ran"))

def step(smk):
    Path(smk.output[0]).write_text("output")
    print("job printed this")
    if sys.argv[1] == "fail":
        raise RuntimeError("the job failed")

snakemake = types.SimpleNamespace(log=["logs/job.log"], output=["out.txt"], rule="job")
run(snakemake, step)
"""


@pytest.mark.parametrize(("outcome", "code"), [("succeed", 0), ("fail", 1)])
def test_a_job_process_ends_with_the_jobs_exit_code(tmp_path, outcome, code):
    """A job's process ends as any Python process does (its exit handlers run), with exit code 1 when the
    step failed, and with its output and everything it printed in the log."""
    proc = subprocess.run([sys.executable, "-c", JOB, outcome], capture_output=True, text=True,
                          stdin=subprocess.DEVNULL, cwd=tmp_path)
    assert proc.returncode == code, proc.stderr
    assert (tmp_path / "out.txt").read_text() == "output"
    log = (tmp_path / "logs" / "job.log").read_text()
    assert "job printed this" in log and "job printed this" in proc.stdout
    assert ("RuntimeError: the job failed" in log) == (outcome == "fail")
    assert (tmp_path / "exit-handler").read_text() == "ran"


def _failing_step(smk: types.SimpleNamespace) -> None:
    print("second step")
    logging.getLogger("moeforge").info("second log")
    raise ZeroDivisionError("a bug")


def test_in_process_runs_restore_the_streams(tmp_path):
    """Two steps in one process: each log gets its own output, the streams and logging are put back."""
    before = sys.stdout, sys.stderr, logging.getLogger().handlers[:]
    run(types.SimpleNamespace(log=[tmp_path / "one.log"]), lambda smk: print("first step"))
    with pytest.raises(SystemExit):
        run(types.SimpleNamespace(log=[tmp_path / "two.log"]), _failing_step)
    assert (sys.stdout, sys.stderr, logging.getLogger().handlers) == before
    assert (tmp_path / "one.log").read_text() == "first step\n"
    two = (tmp_path / "two.log").read_text()
    assert "first step" not in two and "INFO moeforge: second log" in two and "ZeroDivisionError" in two
    print("after the steps")  # a closed log file must not break later output
    sys.stderr.write("after the steps\n")


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tokenizer_dir) -> Path:
    return build_dense_model(tmp_path_factory.mktemp("tiny") / "model", tokenizer_dir=tokenizer_dir)


def _damaged_copy(model: Path, dst: Path, name: str) -> Path:
    """A copy of `model` whose file `name` is cut short after its third line."""
    shutil.copytree(model, dst)
    lines = (dst / name).read_text().splitlines(keepends=True)
    (dst / name).write_text("".join(lines[:3]))
    return dst


@pytest.mark.parametrize("name", ["config.json", "tokenizer_config.json", "generation_config.json"])
def test_fetch_names_a_truncated_json_file(tmp_path, tiny_model, name):
    model = _damaged_copy(tiny_model, tmp_path / "model", name)
    with pytest.raises(ModelError) as info:
        fetch_metadata(str(model), tmp_path / "meta")
    message = str(info.value)
    assert f"model {model} ({model / name}): not valid JSON: line " in message
    assert "->" in message and "\n" not in message
    assert not (tmp_path / "meta").exists()


def test_fetch_from_the_hub_cache_names_the_cached_file(tmp_path, tiny_model):
    """Offline from the Hugging Face cache, through the runner: one line naming the file in the cache."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    model = _damaged_copy(tiny_model, tmp_path / "model", "config.json")
    snapshot = populate(tmp_path / "hub", "acme/tiny", model, commit)
    code = ("import sys, types; from pathlib import Path; from moeforge.runner import run; "
            "from moeforge.io.fetch import fetch_metadata; "
            "run(types.SimpleNamespace(log=['fetch.log']), lambda s: fetch_metadata('acme/tiny', Path('meta')))")
    proc = subprocess.run([sys.executable, "-c", code], env=offline_env(tmp_path / "hub"), cwd=tmp_path,
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    assert proc.returncode == 1
    log = (tmp_path / "fetch.log").read_text()
    assert f"model acme/tiny ({snapshot / 'config.json'}): not valid JSON" in log
    assert "Traceback" not in log and "Traceback" not in proc.stderr


def test_load_source_names_a_damaged_fetched_config(tmp_path, tiny_model):
    fetch_metadata(str(tiny_model), tmp_path / "meta")
    (tmp_path / "meta" / "config.json").write_text('{"model_type": "llama",\n  "hidden_size": 64\n  "x": 1}')
    with pytest.raises(ModelError, match=r"\(.*meta/config.json\): not valid JSON: line 3 column 3: "
                                         r"Expecting ',' delimiter -> delete the fetched copy"):
        load_source(str(tiny_model), tmp_path / "meta")


@pytest.mark.parametrize("name", ["tokenizer.json", "tokenizer_config.json"])
def test_load_tokenizer_names_the_broken_file(tmp_path, tiny_model, name):
    model = _damaged_copy(tiny_model, tmp_path / "model", name)
    with pytest.raises(ModelError) as info:
        load_tokenizer(model, ModelError, "the base model's tokenizer", "refetch the base model")
    assert str(info.value).startswith(f"the base model's tokenizer ({model / name}): not valid JSON: line ")


def test_recipe_that_is_not_utf8(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_bytes("base_model: org/base\nexperts:\n  - source_model: org/caf\u00e9\n".encode("latin-1"))
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not UTF-8 text (byte 0xe9 at position 55, line 3)")
    assert "save the recipe as UTF-8" in message


def test_recipe_yaml_error_is_one_line_with_its_place(tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("base_model: org/base\nexperts: [unclosed\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    message = str(info.value)
    assert message.startswith(f"{path}: not valid YAML: line 3 column 1: ") and "\n" not in message


# ---- publishing a checked model ---------------------------------------------------------------

def _staging(root: Path) -> Path:
    """A staging model: two files, a lock listing them, and a file the lock does not list (not published)."""
    from moeforge.io.files import sha256_file

    staging = root / "staging" / "model"
    staging.mkdir(parents=True)
    (staging / "config.json").write_text('{"model_type": "mixtral"}\n')
    (staging / "model-00001-of-00001.safetensors").write_bytes(bytes(range(256)) * 64)
    (staging / "notes.txt").write_text("not part of the model\n")
    files = {name: sha256_file(staging / name) for name in ("config.json", "model-00001-of-00001.safetensors")}
    (staging / "moeforge.lock.json").write_text(json.dumps({"files": files}))
    return staging


def test_publish_links_the_locked_files_and_copies_the_lock(tmp_path):
    """Each file the lock lists is the staging file itself (same inode); the lock is a read-only copy, so its
    modification time is the publish's own; no temporary is left, and a stale model is replaced whole."""
    from moeforge.build.publish import publish

    staging = _staging(tmp_path)
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.safetensors").write_text("from an earlier build")
    assert publish(staging, out) == []
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model-00001-of-00001.safetensors",
                                                      "moeforge.lock.json"]
    for name in ("config.json", "model-00001-of-00001.safetensors"):
        assert (out / name).stat().st_ino == (staging / name).stat().st_ino
    lock = out / "moeforge.lock.json"
    assert lock.stat().st_ino != (staging / "moeforge.lock.json").stat().st_ino
    assert lock.read_bytes() == (staging / "moeforge.lock.json").read_bytes()
    assert lock.stat().st_mode & 0o777 == 0o444
    assert list(tmp_path.glob(".*.tmp-*")) == []


@pytest.mark.skipif(Path("/dev/shm").stat().st_dev == Path(__file__).stat().st_dev,
                    reason="needs /dev/shm on another file system than the tests")
def test_publish_across_file_systems_copies_and_says_so(tmp_path, caplog):
    """Where a hard link is impossible (another file system), the files are copied, and the log says so."""
    import tempfile

    from moeforge.build.publish import publish

    with tempfile.TemporaryDirectory(dir="/dev/shm") as shm:
        staging = _staging(Path(shm))
        caplog.set_level(logging.INFO, logger="moeforge")
        copied = publish(staging, tmp_path / "model")
        assert copied == ["config.json", "model-00001-of-00001.safetensors"]
        for name in copied:
            assert (tmp_path / "model" / name).read_bytes() == (staging / name).read_bytes()
            assert (tmp_path / "model" / name).stat().st_mode & 0o777 == 0o444
    assert "2 of 2 file(s) copied into" in caplog.text and "not hard-linked" in caplog.text
