"""A second engine for the assembled model: llama.cpp, through its own converter and llama-cpp-python.

moeforge writes the classic Hub tensor names so that other engines read its outputs; this proves it
for llama.cpp (GGUF), where most merged MoEs are run. The model is converted by llama.cpp's
``convert_hf_to_gguf.py``, the one from the llama.cpp sources llama-cpp-python was built from, to
f16 (the file users take) and f32 (for an exact check), and each GGUF runs the smoke prompts in
llama-cpp-python. Both engines are fed the same token ids, so a tokenizer difference can neither
hide nor fake a mismatch; whether llama.cpp's own tokenizer gives those ids is reported beside.
A GGUF passes when it predicts transformers' next token after every prompt and its max |Δlogit|
over every position is within the tolerance of its type (``TOLERANCE``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any, Iterator, Mapping, Sequence

from moeforge.check.gguf_convert import UNKNOWN_TOKENIZER, UNSUPPORTED
from moeforge.errors import BuildError
from moeforge.io.files import atomic_path, sha256_file, write_json, write_text
from moeforge.io.progress import MIB, Progress
from moeforge.io.safetensors_file import read_header
from moeforge.numbers import fmt, report_number
from moeforge.plan.params import rope_of, sliding_window_of
from moeforge.plan.plan_json import Plan, read_plan
from moeforge.runner import LOG_ONLY

_log = logging.getLogger("moeforge.gguf")

#: Where the converter is looked for when this variable is unset: <environment>/share/llama.cpp-convert,
#: where tests/setup_llamacpp.sh puts it (convert_hf_to_gguf.py, conversion/, gguf-py/, VERSION).
CONVERTER_ENV = "MOEFORGE_LLAMACPP_CONVERTER"

#: Max |Δlogit| a GGUF may differ from transformers (float32), as a fraction of transformers' largest
#: |logit| (taken as at least 1). Measured on the tiny test models (Mixtral tied and untied, Qwen3-MoE)
#: and the demo: f32 at most 2.1e-5 of it (summation order only; the KV cache is kept in f32). f16
#: at most 5.0e-3 on experts near their base (MLP noise 0.05) and 5.2e-2 on experts far apart (noise
#: 1.0): its weights, and llama.cpp's f16 matrix products, round to 11 bits, and the error grows with
#: the activations. The f32 check is the exact one; the f16 one proves that the file users take loads
#: and predicts the same next tokens.
TOLERANCE = {"f32": 1e-4, "f16": 1e-1}

#: The GGUF users take; the f32 one exists only while it is checked.
DELIVERED = "f16"

#: Where llama.cpp's graph for an output family computes something else than transformers (read in
#: src/models/*.cpp of the llama.cpp that llama-cpp-python 0.3.36 vendors, and measured).
KNOWN_DIFFERENCES = {
    "qwen2_moe": "llama.cpp's Qwen2-MoE graph never renormalises the top-k routing weights (it ignores "
                 "norm_topk_prob: true), and computes the shared-expert gate as silu(x)/x, which is NaN "
                 "wherever an all-zero shared_expert_gate (a build without shared experts) gives x = 0",
}


#: Config settings llama.cpp's graphs leave out, with what that changes: the check's prompts are short, so
#: it passes such a GGUF, and the report says where it stops matching.
CONFIG_DIFFERENCES = (
    (lambda c: (rope_of(c, 0.0)["scaling"] or {}).get("rope_type") == "dynamic",
     "llama.cpp has no dynamic NTK rope scaling: the GGUF computes unscaled rope, which matches only within the "
     "original context ({max_position_embeddings} tokens)"),
    (lambda c: sliding_window_of(c) is not None,
     "llama.cpp applies no sliding window to this architecture: inputs longer than the window ({sliding_window} "
     "tokens) compute differently"),
)


def known_differences(family: str, config: Mapping[str, Any]) -> str | None:
    """What llama.cpp computes differently for this family and config, or None."""
    found = [KNOWN_DIFFERENCES[family]] if family in KNOWN_DIFFERENCES else []
    found += [text.format(**config) for applies, text in CONFIG_DIFFERENCES if applies(config)]
    return "; ".join(found) or None


class UnsupportedByConverter(BuildError):
    """llama.cpp's converter has no class for the model's architecture: no GGUF can be made."""


def converter_dir() -> Path:
    """The llama.cpp converter to use: ``$MOEFORGE_LLAMACPP_CONVERTER``, else the environment's own."""
    path = Path(os.environ.get(CONVERTER_ENV) or Path(sys.prefix) / "share" / "llama.cpp-convert")
    if not (path / "convert_hf_to_gguf.py").is_file() or not (path / "gguf-py").is_dir():
        raise BuildError("llama.cpp's converter (convert_hf_to_gguf.py with gguf-py) is not there", str(path),
                         f"run tests/setup_llamacpp.sh, or set {CONVERTER_ENV} to a llama.cpp source directory")
    return path


def converter_version(converter: Path) -> str:
    """The converter's origin as reports name it: the llama-cpp-python release it came from."""
    version = converter / "VERSION"
    return version.read_text(encoding="utf-8").strip() if version.is_file() else f"llama.cpp at {converter}"


def gguf_mem_mb(plan: Plan | None) -> int:
    """The f32 GGUF, which llama.cpp maps and reads whole, plus one transformers layer in float32."""
    from moeforge.resources import ITEMSIZE, layer_mem_mb

    if not plan:
        return 2000
    params = plan.total_bytes // ITEMSIZE[plan.dtype_out]
    return int(layer_mem_mb(plan) + 4 * params / MIB)


# ---------------------------------------------------------------------------------------------
# conversion


def convert(model_dir: Path, outfile: Path, outtype: str, converter: Path) -> float:
    """Convert ``model_dir`` to ``outfile`` with llama.cpp's converter; return the seconds it took.

    The file appears complete or not at all. The converter's output goes to the log.
    """
    started = time.monotonic()
    progress = Progress(f"GGUF conversion ({outtype})", expected_gguf_bytes(model_dir, outtype) / MIB, "MiB written")
    with atomic_path(outfile) as tmp:
        proc = _run_reporting_size(
            [sys.executable, "-m", "moeforge.check.gguf_convert", str(converter), str(model_dir),
             "--outtype", outtype, "--outfile", str(tmp)], Path(tmp), progress)
        logging.getLogger(LOG_ONLY).info("llama.cpp converter (%s, %s):\n%s", converter_version(converter), outtype,
                                         proc.stderr.strip())
        if proc.returncode:
            raise _conversion_error(proc, model_dir, converter)
    _explain_known_warnings(proc.stderr)
    seconds = time.monotonic() - started
    _log.info("converted to GGUF (%s) in %.1f s with llama.cpp's converter (%s); its output is in the log",
              outtype, seconds, converter_version(converter))
    return seconds


def expected_gguf_bytes(model_dir: Path, outtype: str) -> int:
    """About the size of the converter's GGUF, from the safetensors headers: every tensor in ``outtype``, but
    vectors (norms, biases), which it keeps in float32. Metadata and the routers it keeps in float32 are left
    out: an estimate, for the time left."""
    itemsize = 4 if outtype == "f32" else 2
    return sum(math.prod(entry.shape) * (4 if len(entry.shape) <= 1 else itemsize)
               for path in sorted(model_dir.glob("*.safetensors")) for entry in read_header(path)[1].values())


def _run_reporting_size(cmd: list[str], out: Path, progress: Progress) -> subprocess.CompletedProcess:
    """Run the converter, its output captured; while it runs (minutes at 7B, silently), advance ``progress``
    to the size ``out`` has reached, held under the estimated total until the converter has succeeded; the
    last line gives the size written."""
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          stdin=subprocess.DEVNULL) as proc:
        while True:
            try:
                stdout, stderr = proc.communicate(timeout=1)
                break
            except subprocess.TimeoutExpired:  # retrying communicate loses no output
                written = out.stat().st_size / MIB if out.exists() else 0.0
                progress.advance(min(written, 0.99 * progress.total) - progress.done)
    if proc.returncode == 0:
        progress.total = out.stat().st_size / MIB
        progress.advance(progress.total - progress.done)
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


#: Converter warnings that look alarming and are not, each with what it means for this model.
KNOWN_CONVERTER_WARNINGS = {
    "Unknown RoPE type: default": "transformers 5 names unscaled RoPE 'default', a name the converter does not "
                                  "list; it writes no scaling, which is what 'default' means (not a problem)",
}


def _explain_known_warnings(output: str) -> None:
    for warning, meaning in KNOWN_CONVERTER_WARNINGS.items():
        if warning in output:
            _log.info("the converter's %r: %s", warning, meaning)


def _conversion_error(proc: subprocess.CompletedProcess, model_dir: Path, converter: Path) -> BuildError:
    """One message per way the converter can refuse a model."""
    version = converter_version(converter)
    if proc.returncode == UNSUPPORTED:
        config = json.loads((model_dir / "config.json").read_text(encoding="utf-8"))
        return UnsupportedByConverter(
            f"unsupported by llama.cpp converter {version}: no class for {config.get('architectures')}",
            str(model_dir), f"convert with a newer llama.cpp ({CONVERTER_ENV}), or build a Mixtral output")
    if proc.returncode == UNKNOWN_TOKENIZER:
        return BuildError(f"the llama.cpp converter ({version}) does not know the tokenizer's pre-tokenizer",
                          str(model_dir / "tokenizer.json"),
                          "use the tokenizer of a published model, which the converter knows, or register "
                          "this one with llama.cpp's convert_hf_to_gguf_update.py")
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    return BuildError(f"the llama.cpp converter ({version}) failed: {lines[-1] if lines else proc.returncode}",
                      str(model_dir), "see the log for the converter's output")


# ---------------------------------------------------------------------------------------------
# running both engines


def encode_prompts(model_dir: Path, prompts: Sequence[str]) -> list[list[int]]:
    """Each prompt's token ids as the model's own tokenizer gives them (special tokens included)."""
    from moeforge.io.hf_load import load_tokenizer

    tokenizer = load_tokenizer(model_dir, BuildError, "the tokenizer", "rerun the assemble step")
    return [tokenizer(text).input_ids for text in prompts]


def reference_logits(model_dir: Path, ids: Sequence[Sequence[int]]) -> list[Any]:
    """transformers' float32 logits [T, V] per prompt, one layer of the model in memory at a time."""
    import torch

    from moeforge.runtime.layerwise import stream_sequences

    streamed = stream_sequences(model_dir, [torch.tensor(seq) for seq in ids])
    return [logits[0].numpy() for logits in streamed.logits]


def gguf_outputs(gguf: Path, ids: Sequence[Sequence[int]], prompts: Sequence[str],
                 threads: int = 1) -> tuple[list[Any], list[list[int]]]:
    """llama.cpp's logits [T, V] for each id sequence, and its own tokenization of each prompt.

    The KV cache is kept in float32 (llama.cpp's default is f16), so an f32 GGUF computes what
    transformers computes up to summation order.
    """
    import numpy as np
    from llama_cpp import GGML_TYPE_F32, Llama

    n_ctx = max(len(seq) for seq in ids)
    # llama.cpp's own log (hundreds of lines) goes to the rule's log alone.
    with _native_stderr() as log:
        try:
            try:
                llm = Llama(model_path=str(gguf), n_ctx=n_ctx, n_batch=n_ctx, n_ubatch=n_ctx, logits_all=True,
                            type_k=GGML_TYPE_F32, type_v=GGML_TYPE_F32, n_threads=threads, verbose=True)
            except ValueError as exc:
                raise BuildError(f"llama.cpp cannot load the GGUF: {_load_error(log) or exc}", str(gguf),
                                 _LOAD_FIX) from exc
            try:
                logits = []
                for seq in ids:
                    llm.reset()
                    llm.eval(list(seq))
                    logits.append(np.array(llm.scores[: len(seq)], dtype=np.float32))
                tokens = [llm.tokenize(text.encode("utf-8"), add_bos=True, special=False) for text in prompts]
            finally:
                llm.close()
        finally:
            log.seek(0)
            logging.getLogger(LOG_ONLY).info("llama.cpp (%s):\n%s", gguf.name,
                                             log.read().decode("utf-8", "replace").strip())
    _log.info("ran %s in llama-cpp-python on %d prompt(s); llama.cpp's output is in the log", gguf.name, len(ids))
    return logits, tokens


def compare_logits(reference: Sequence[Any], got: Sequence[Any], outtype: str) -> dict[str, Any]:
    """max |Δlogit| against the tolerance of ``outtype``, and next-token (top-1) agreement."""
    import numpy as np

    scale = max(1.0, *(float(np.abs(r).max()) for r in reference))
    deltas = [float(np.abs(g - r).max()) for r, g in zip(reference, got, strict=True)]
    worst = float(np.max(deltas))  # NaN when any logit is: a non-finite GGUF output fails
    next_token = [int(g[-1].argmax()) == int(r[-1].argmax()) for r, g in zip(reference, got, strict=True)]
    positions = sum(int((g.argmax(-1) == r.argmax(-1)).sum()) for r, g in zip(reference, got, strict=True))
    tolerance = TOLERANCE[outtype] * scale
    return {"outtype": outtype, "max_abs_dlogit": report_number(worst),
            "tolerance": report_number(tolerance), "max_abs_logit": report_number(scale),
            "non_finite_logits": sum(int((~np.isfinite(g)).sum()) for g in got),
            "next_token_agree": sum(next_token), "prompts": len(next_token),
            "top1_positions_agree": positions, "positions": sum(len(r) for r in reference),
            "per_prompt_max_abs_dlogit": [report_number(d) for d in deltas],
            "passed": bool(worst <= tolerance) and all(next_token)}


#: What to do when llama.cpp refuses a GGUF its own converter wrote. A missing ``output.weight``: the
#: architecture's llama.cpp graph needs an explicit output head (Qwen2-MoE), which a tied model lacks.
_LOAD_FIX = ("if llama.cpp names a missing 'output.weight', its graph for this architecture needs an untied output "
             "head: rebuild with tie_word_embeddings: untie in the recipe; otherwise the converter and "
             "llama-cpp-python must come from the same release (tests/setup_llamacpp.sh)")


@contextlib.contextmanager
def _native_stderr() -> Iterator[IO[bytes]]:
    """Catch what native code writes to the process's stderr (llama.cpp's loading log) in a temporary file."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as log:
        os.dup2(log.fileno(), 2)
        try:
            yield log
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def _load_error(log: IO[bytes]) -> str | None:
    """llama.cpp's own reason for refusing a model: the first line of its loading log that reports an error."""
    log.seek(0)
    lines = log.read().decode("utf-8", "replace").splitlines()
    return next((line.strip() for line in lines if "error" in line.lower() or "not found" in line), None)


def check_ggufs(files: Mapping[str, Path], model_dir: Path, prompts: Sequence[str],
                threads: int = 1) -> dict[str, dict[str, Any]]:
    """Compare GGUFs (by type: f32, f16) with the model directory they should be conversions of.

    transformers' logits are computed once. Any GGUF can be checked against any model: one
    converted from something else than ``model_dir`` (a damaged copy, another build) fails.
    """
    ids = encode_prompts(model_dir, prompts)
    reference = reference_logits(model_dir, ids)
    checks = {}
    for outtype, path in files.items():
        got, tokens = gguf_outputs(path, ids, prompts, threads)
        checks[outtype] = compare_logits(reference, got, outtype)
        checks[outtype]["tokenization_agree"] = sum(t == list(i) for t, i in zip(tokens, ids, strict=True))
    return checks


# ---------------------------------------------------------------------------------------------
# the workflow step


def gguf_stage(model_dir: Path, plan_json: Path, smoke_md: Path, out_json: Path, out_md: Path,
               threads: int = 1) -> dict[str, Any]:
    """Convert the checked model to GGUF (f16 kept, f32 for the check), run both, write the reports.

    An architecture the converter lacks fails the step with UnsupportedByConverter (the GGUF is a
    declared output: no step succeeds without it). A GGUF that does not compute what the model
    computes fails the step; it and its reports are kept in ``failed/`` beside (Snakemake removes the
    outputs of a failed job), so nothing unchecked stands where a checked GGUF would.
    """
    from moeforge.plan.prompts import smoke_prompts

    plan = read_plan(plan_json)
    config = json.loads((model_dir / "config.json").read_text())
    converter = converter_dir()
    out_dir = out_json.parent
    shutil.rmtree(out_dir / "failed", ignore_errors=True)
    report: dict[str, Any] = {"merge": plan.merge, "output_family": plan.output_family,
                              "converter": converter_version(converter), "tolerance": TOLERANCE,
                              "known_differences": known_differences(plan.output_family, config),
                              "prompts": smoke_prompts(plan.recipe)}
    files = {outtype: out_dir / f"model-{outtype}.gguf" for outtype in TOLERANCE}
    report["conversion_seconds"] = {t: round(convert(model_dir, path, t, converter), 1) for t, path in files.items()}
    try:
        report["checks"] = check_ggufs(files, model_dir, report["prompts"], threads)
    except BuildError:  # llama.cpp could not load it: no unchecked GGUF stays where a checked one would
        _set_aside(files[DELIVERED])
        raise
    finally:
        files["f32"].unlink(missing_ok=True)
    report["passed"] = all(check["passed"] for check in report["checks"].values())
    report["status"] = "pass" if report["passed"] else "fail"
    delivered = files[DELIVERED]
    if not report["passed"]:
        delivered, out_json, out_md = (_set_aside(path) for path in (delivered, out_json, out_md))
    report["gguf"] = {"file": delivered.name, "bytes": delivered.stat().st_size, "sha256": sha256_file(delivered)}
    _write(report, smoke_md, out_json, out_md)
    if not report["passed"]:
        cause = (report["known_differences"]
                 or f"the converter ({report['converter']}) may read these tensors differently")
        raise BuildError(f"the GGUF does not compute what the model computes: {_summary(report)}", str(delivered),
                         f"see {out_md}; {cause}")
    return report


def _set_aside(path: Path) -> Path:
    """Where a failed GGUF and its reports go: ``failed/`` beside, outside the job's declared outputs."""
    failed = path.parent / "failed" / path.name
    failed.parent.mkdir(exist_ok=True)
    if path.exists():
        shutil.move(path, failed)
    return failed


def _write(report: dict[str, Any], smoke_md: Path, out_json: Path, out_md: Path) -> dict[str, Any]:
    """report.json, and report.md: the GGUF result followed by the smoke report it extends."""
    write_json(out_json, report)
    write_text(out_md, render_markdown(report) + "\n---\n\n" + smoke_md.read_text(encoding="utf-8"))
    return report


def _summary(report: Mapping[str, Any]) -> str:
    return "; ".join(f"{t}: max |Δlogit| {fmt(c['max_abs_dlogit'])} (tolerance {fmt(c['tolerance'])}), "
                     f"next token {c['next_token_agree']}/{c['prompts']}" for t, c in report["checks"].items())


def render_markdown(report: Mapping[str, Any]) -> str:
    """The GGUF section: verdict, converter, and one row per GGUF type."""
    lines = [f"# GGUF (llama.cpp): {report['status'].upper()}", "",
             f"Converted by llama.cpp's convert_hf_to_gguf.py from {report['converter']}; run in "
             "llama-cpp-python on the smoke prompts, fed the token ids transformers was fed. "
             f"Kept: `{report['gguf']['file']}` ({report['gguf']['bytes']} bytes).", "",
             *([f"Known difference: {report['known_differences']}.", ""] if report["known_differences"] else []),
             "| GGUF | max abs dlogit | tolerance | next token | top-1, all positions | llama.cpp tokenization |",
             "|---|---|---|---|---|---|"]
    for outtype, c in report["checks"].items():
        lines.append(f"| {outtype} | {fmt(c['max_abs_dlogit'])} | {fmt(c['tolerance'])} | "
                     f"{c['next_token_agree']}/{c['prompts']} | {c['top1_positions_agree']}/{c['positions']} | "
                     f"{c['tokenization_agree']}/{c['prompts']} prompts identical |")
    return "\n".join(lines) + "\n"
