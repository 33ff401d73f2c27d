"""Build speed of moeforge against mergekit-moe and against the machine's I/O floor.

A MoE merge with router gates that need no forward pass (``gate_mode: random`` or
``uniform_random``) is almost pure data movement: every output byte is a byte of some input
tensor. Its cost is therefore best judged against two references measured in the same
invocation, on the same inputs, with the same page-cache state:

* the **peer**, ``mergekit-moe`` (installed in its own virtual environment, ``--peer``), run on
  the very same recipe file, alternating with moeforge (moeforge, peer, moeforge, peer, ...) so
  that drift of a shared machine hits both alike;
* the **I/O floor**: one sequential pass reading every input weight file, plus writing a file of
  the output's size and fsyncing it. No merge tool can beat that on this disk.

Inputs are seeded random bf16 Llama checkpoints written directly as safetensors by this script
(building them through transformers would take longer than the merges being measured); their
tensor names and config.json are those of a Hub Llama checkpoint, and the tokenizer is the
project's fixture tokenizer. The models are cached under ``--data-dir`` between invocations.

What is measured, and how:

* wall time: around the whole command (``snakemake ... --cores N`` or ``mergekit-moe``), plus
  the time of an ``os.sync()`` right after it (moeforge fsyncs its shards; mergekit-moe leaves
  dirty pages behind, so "wall + flush" is the fair comparison of durable output);
* peak RSS per process: every Python process started during a run (the Snakemake scheduler,
  each job's script process, mergekit-moe) loads a ``sitecustomize`` hook through
  ``PYTHONPATH`` that records, at exit, its ``VmHWM`` (the kernel's high-water mark of the
  process's resident memory: exact, no sampling), its CPU time, its ``/proc/self/io`` counters
  and, inside a Snakemake job, the rule and wildcards. The workflow's rules are not touched.
  ``/usr/bin/time -v`` around each command gives the largest process of the tree as a
  cross-check (for Snakemake that is at least the scheduler: a forked job inherits its peak);
* bytes read and written: the command's own ``/proc/<pid>/io`` at its exit, which the kernel
  has made the total of the whole process tree (a reaped child's counters are added to its
  parent's), at two levels: ``storage`` (``read_bytes``/``write_bytes``: what reached the block layer, page-cache hits
  excluded, mmap page faults included) and ``syscall`` (``rchar``/``wchar``: what passed through
  read/write/copy_file_range calls, cache hits included, mmap excluded). The input and output
  sizes computed from the files are reported beside them;
* cache state: before every run (and before the floor's read pass) the pages of the input
  weight files are evicted with ``posix_fadvise(POSIX_FADV_DONTNEED)`` and dirty data is synced;
  Python packages stay cached. That is "cold weights, warm software": a fresh merge on a
  machine where the tools have run before. ``--cache warm`` skips the eviction.

Run ``python benchmarks/build_speed.py --help`` for the options, and see benchmarks/README.md
for how to read the output.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from moeforge.runtime.memory_cap import MemoryCgroup, memory_cgroup, parse_size

REPO = Path(__file__).resolve().parent.parent
BENCH_DIR = Path(__file__).resolve().parent
PEER_VENV = REPO / ".venv-mergekit"
MERGE = "bench"
GB = 10**9
CHUNK = 16 << 20
PROC_DIR_ENV = "BUILD_SPEED_PROC_DIR"

#: Distinct prompts per expert: mergekit-moe refuses experts whose prompts are all identical, and
#: gate_mode hidden needs them. random / uniform_random gates ignore them.
PROMPTS = [
    ["def fibonacci(n):", "import numpy as np", "for i in range(10):"],
    ["The derivative of x squared is", "Solve for x: 3x + 5 = 20", "The sum of the angles of a triangle"],
    ["Preheat the oven to", "Whisk the eggs with sugar", "Simmer the sauce until it thickens"],
    ["The history of the Roman empire", "In 1492 Columbus", "The French revolution began"],
    ["Dear hiring manager,", "Please find attached", "I am writing to apply"],
    ["The patient presents with", "Symptoms include", "The recommended dose is"],
    ["Once upon a time", "The dragon flew over", "The princess opened the door"],
    ["SELECT * FROM users", "CREATE TABLE orders", "INSERT INTO items VALUES"],
]

#: Written into a directory put first on PYTHONPATH; Python imports it at start-up in every
#: process of the run. Recording at exit (atexit, registered first so it runs last) reads the
#: kernel's own peak (VmHWM) instead of sampling, so short peaks are not missed.
SITECUSTOMIZE = '''\
"""Per-process accounting for benchmarks/build_speed.py: peak RSS and I/O of this process."""
import atexit as _atexit
import os as _os
import sys as _sys
import time as _time

_DIR = _os.environ.get("BUILD_SPEED_PROC_DIR")


def _record() -> None:
    import json
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    rec = {"pid": _os.getpid(), "ppid": _os.getppid(), "argv": _sys.argv[:6], "start": _START,
           "end": _time.time(), "maxrss_kb": own.ru_maxrss, "cpu_s": own.ru_utime + own.ru_stime}
    try:
        # VmHWM: the high-water mark of this program's own address space. ru_maxrss is not used
        # as the figure: Linux carries the parent's peak into it when a forked child execs
        # without a second fork (sh -c CMD execs CMD), so every job would show the scheduler's size.
        with open("/proc/self/status") as fh:
            rec["vmhwm_kb"] = next(int(l.split()[1]) for l in fh if l.startswith("VmHWM:"))
    except (OSError, StopIteration):
        rec["vmhwm_kb"] = rec["maxrss_kb"]
    try:
        # Includes the I/O of every child this process has reaped (the kernel adds it at wait()).
        with open("/proc/self/io") as fh:
            rec["io"] = {k: int(v) for k, v in (line.split(": ") for line in fh.read().splitlines())}
    except OSError:
        rec["io"] = {}
    smk = getattr(_sys.modules.get("__main__"), "snakemake", None)
    if smk is not None:
        try:
            rec["rule"] = str(smk.rule)
            rec["wildcards"] = {k: str(v) for k, v in smk.wildcards.items()}
        except Exception:
            pass
    with open(_os.path.join(_DIR, f"{_os.getpid()}.json"), "w") as fh:
        json.dump(rec, fh)


if _DIR:
    _START = _time.time()
    _atexit.register(_record)
'''


# --------------------------------------------------------------------------- model shapes


@dataclass(frozen=True)
class Dims:
    """The shape of one dense Llama expert (the defaults: ~0.30B parameters, 0.60 GB in bf16)."""

    layers: int = 20
    hidden: int = 1024
    intermediate: int = 2816
    vocab: int = 32000
    heads: int = 16
    kv_heads: int = 8
    experts: int = 4
    tied: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def tag(self) -> str:
        return (f"L{self.layers}-H{self.hidden}-I{self.intermediate}-V{self.vocab}-A{self.heads}"
                f"-KV{self.kv_heads}{'-tied' if self.tied else ''}")

    def dense_tensors(self) -> list[tuple[str, tuple[int, ...]]]:
        """Tensor names and shapes of a Hub Llama checkpoint, in Hub order."""
        h, i, kv = self.hidden, self.intermediate, self.kv_heads * self.head_dim
        out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (self.vocab, h))]
        for n in range(self.layers):
            p = f"model.layers.{n}"
            out += [(f"{p}.input_layernorm.weight", (h,)),
                    (f"{p}.self_attn.q_proj.weight", (h, h)), (f"{p}.self_attn.k_proj.weight", (kv, h)),
                    (f"{p}.self_attn.v_proj.weight", (kv, h)), (f"{p}.self_attn.o_proj.weight", (h, h)),
                    (f"{p}.post_attention_layernorm.weight", (h,)),
                    (f"{p}.mlp.gate_proj.weight", (i, h)), (f"{p}.mlp.up_proj.weight", (i, h)),
                    (f"{p}.mlp.down_proj.weight", (h, i))]
        out.append(("model.norm.weight", (h,)))
        if not self.tied:  # tied checkpoints (SmolLM2, Llama 3.2) store no lm_head.weight
            out.append(("lm_head.weight", (self.vocab, h)))
        return out

    def dense_params(self) -> int:
        return sum(int(np.prod(s)) for _, s in self.dense_tensors())

    def moe_params(self) -> int:
        """Parameters of the Mixtral output: base non-MLP tensors, E copies of each MLP, routers."""
        mlp = 3 * self.hidden * self.intermediate * self.layers
        return self.dense_params() + (self.experts - 1) * mlp + self.experts * self.hidden * self.layers


def llama_config(d: Dims, bos: int, eos: int) -> dict[str, Any]:
    """config.json as published Llama checkpoints write it (4.x style, top-level rope_theta)."""
    return {"architectures": ["LlamaForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
            "bos_token_id": bos, "eos_token_id": eos, "hidden_act": "silu", "hidden_size": d.hidden,
            "initializer_range": 0.02, "intermediate_size": d.intermediate, "max_position_embeddings": 4096,
            "mlp_bias": False, "model_type": "llama", "num_attention_heads": d.heads,
            "num_hidden_layers": d.layers, "num_key_value_heads": d.kv_heads, "pretraining_tp": 1,
            "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0, "tie_word_embeddings": d.tied,
            "torch_dtype": "bfloat16", "transformers_version": "4.43.0", "use_cache": True,
            "vocab_size": d.vocab}


# --------------------------------------------------------------------------- input generation


def _bf16(values: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns (round to nearest even), as uint16."""
    bits = values.astype(np.float32, copy=False).view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))
    return (rounded >> 16).astype(np.uint16)


def _tensor_values(name: str, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """N(0, 1/fan_in) matrices and 1 + N(0, 0.1²) norms: a forward pass stays finite (gate_mode hidden)."""
    noise = rng.standard_normal(int(np.prod(shape)), dtype=np.float32)
    if len(shape) == 2:
        noise *= np.float32(shape[1] ** -0.5)
    else:
        noise = np.float32(1.0) + np.float32(0.1) * noise
    return _bf16(noise)


def write_safetensors_bf16(path: Path, tensors: Sequence[tuple[str, tuple[int, ...]]], seed: int) -> None:
    """A bf16 safetensors file, tensor by tensor, so memory stays at one tensor whatever the model size."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        nbytes = 2 * int(np.prod(shape))
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    rng = np.random.default_rng(seed)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        for name, shape in tensors:
            _tensor_values(name, shape, rng).tofile(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def ensure_tokenizer(data_dir: Path, vocab: int) -> Path:
    """The project's fixture tokenizer (byte-level BPE, <pad>=0 <s>=1 </s>=2), trained once and cached."""
    out = data_dir / f"tokenizer-{vocab}"
    if not (out / "tokenizer.json").is_file():
        # imports transformers: only when the tokenizer is not cached yet
        from moeforge.demo.tiny_models import train_tokenizer

        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        train_tokenizer(tmp, vocab_size=vocab)
        os.replace(tmp, out)
    return out


def ensure_experts(data_dir: Path, d: Dims, log: Callable[[str], None]) -> list[Path]:
    """E seeded random bf16 Llama checkpoints of shape ``d`` (cached; rebuilt if incomplete)."""
    tokenizer = ensure_tokenizer(data_dir, d.vocab)
    vocab_in_tokenizer = len(json.loads((tokenizer / "tokenizer.json").read_text())["model"]["vocab"])
    if vocab_in_tokenizer > d.vocab:
        raise SystemExit(f"--vocab {d.vocab} is smaller than the tokenizer's {vocab_in_tokenizer} tokens")
    dirs = []
    for e in range(d.experts):
        out = data_dir / "models" / d.tag / f"expert_{e}"
        if not (out / "complete").is_file():
            log(f"  writing input model {out} ({d.dense_params() / 1e9:.2f}B params)")
            shutil.rmtree(out, ignore_errors=True)
            out.mkdir(parents=True)
            for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                shutil.copyfile(tokenizer / name, out / name)
            (out / "config.json").write_text(json.dumps(llama_config(d, bos=1, eos=2), indent=2) + "\n")
            (out / "generation_config.json").write_text(
                json.dumps({"bos_token_id": 1, "eos_token_id": 2, "do_sample": False}, indent=2) + "\n")
            write_safetensors_bf16(out / "model.safetensors", d.dense_tensors(), seed=1000 + e)
            (out / "complete").write_text("")
        dirs.append(out)
    return dirs


def recipe_document(experts: Sequence[Path], gate_mode: str) -> dict[str, Any]:
    """One mergekit-moe recipe over ``experts`` (base = expert 0, as in most recipes), each with its prompts."""
    return {"base_model": str(experts[0]), "gate_mode": gate_mode, "dtype": "bfloat16", "experts_per_token": 2,
            "experts": [{"source_model": str(p), "positive_prompts": PROMPTS[i % len(PROMPTS)]}
                        for i, p in enumerate(experts)]}


def write_recipe(path: Path, experts: Sequence[Path], gate_mode: str) -> None:
    """The recipe file both tools read unchanged."""
    path.write_text(yaml.safe_dump(recipe_document(experts, gate_mode), sort_keys=False))


# --------------------------------------------------------------------------- measurement helpers


def evict(paths: Iterable[Path]) -> None:
    """Drop the files' pages from the page cache (clean pages only, hence the sync first)."""
    os.sync()
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def weight_files(model_dirs: Iterable[Path]) -> list[Path]:
    return sorted({p.resolve() for d in model_dirs for p in Path(d).glob("*.safetensors")})


def tree_bytes(root: Path, pattern: str = "*") -> int:
    return sum(p.stat().st_size for p in Path(root).rglob(pattern) if p.is_file()) if Path(root).exists() else 0


def io_floor(inputs: Sequence[Path], out_bytes: int, scratch: Path, cold: bool) -> dict[str, float]:
    """Read every input once (sequential, 16 MiB reads), then write out_bytes and fsync.

    The written buffer is random (not zeros) so no layer can shortcut it; the file is removed and
    its pages dropped afterwards so it does not crowd the page cache of the runs that follow.
    """
    if cold:
        evict(inputs)
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    read = 0
    t0 = time.perf_counter()
    for path in inputs:
        with open(path, "rb", buffering=0) as fh:
            while n := fh.readinto(view):
                read += n
    t1 = time.perf_counter()
    block = np.random.default_rng(0).integers(0, 256, CHUNK, dtype=np.uint8).tobytes()
    target = scratch / "io-floor.bin"
    with open(target, "wb", buffering=0) as fh:
        left = out_bytes
        while left > 0:
            left -= fh.write(block[: min(left, CHUNK)])
        os.fsync(fh.fileno())
    t2 = time.perf_counter()
    fd = os.open(target, os.O_RDONLY)
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    target.unlink()
    return {"read_s": t1 - t0, "write_s": t2 - t1, "total_s": t2 - t0, "read_bytes": read,
            "write_bytes": out_bytes, "read_gbps": read / (t1 - t0) / GB, "write_gbps": out_bytes / (t2 - t1) / GB}


_TIME_FIELDS = {
    "Maximum resident set size (kbytes)": "max_rss_kb",
    "File system inputs": "fs_inputs_blocks",
    "File system outputs": "fs_outputs_blocks",
    "User time (seconds)": "user_s",
    "System time (seconds)": "sys_s",
    "Exit status": "exit_status",
}


def parse_time_v(path: Path) -> dict[str, float]:
    """The numbers of GNU time's -v report (fs blocks are 512-byte units)."""
    out: dict[str, float] = {}
    for line in path.read_text(errors="replace").splitlines():
        key, _, value = line.strip().rpartition(": ")
        if key in _TIME_FIELDS:
            out[_TIME_FIELDS[key]] = float(value)
    return out


def _label(rec: dict[str, Any]) -> str:
    """A readable name for a process: the Snakemake rule (+ wildcards), 'snakemake', or the program."""
    if "rule" in rec:
        wc = ",".join(f"{k}={v}" for k, v in rec.get("wildcards", {}).items() if k != "merge")
        return f"{rec['rule']}[{wc}]" if wc else rec["rule"]
    argv = rec.get("argv") or [""]
    names = [Path(a).name for a in argv]
    if any("snakemake" in n for n in names[:3]):
        return "snakemake"
    if any("mergekit" in n for n in names[:3]):
        return "mergekit-moe"
    return " ".join(names[:3])


def read_proc_records(proc_dir: Path, t0: float) -> list[dict[str, Any]]:
    """The hook's records, compacted: label, peak RSS (MiB), start/end relative to launch, I/O counters."""
    recs = []
    for path in sorted(proc_dir.glob("*.json")):
        rec = json.loads(path.read_text())
        io = rec.get("io", {})
        recs.append({"label": _label(rec), "rule": rec.get("rule"), "pid": rec["pid"], "ppid": rec["ppid"],
                     "cpu_s": rec.get("cpu_s", 0.0),
                     "rss_mib": rec.get("vmhwm_kb", rec["maxrss_kb"]) / 1024, "start_s": rec["start"] - t0, "end_s": rec["end"] - t0,
                     "rchar": io.get("rchar", 0), "wchar": io.get("wchar", 0),
                     "read_bytes": io.get("read_bytes", 0), "write_bytes": io.get("write_bytes", 0)})
    return sorted(recs, key=lambda r: r["start_s"])


def summarize_processes(recs: list[dict[str, Any]], root_parent: int) -> dict[str, Any]:
    """Per rule: jobs, peak RSS, busy seconds and bytes; the largest job; the scheduler; I/O totals.

    The totals are the root process's counters alone: the kernel folds a reaped child's I/O into
    its parent's, so the command's own record already covers every job (summing would double count).
    """
    jobs = [r for r in recs if r["rule"]]
    rules: dict[str, dict[str, Any]] = {}
    for r in jobs:
        s = rules.setdefault(r["rule"], {"jobs": 0, "max_rss_mib": 0.0, "busy_s": 0.0, "max_s": 0.0,
                                         "read_bytes": 0, "write_bytes": 0, "rchar": 0, "wchar": 0})
        dur = r["end_s"] - r["start_s"]
        s["jobs"] += 1
        s["max_rss_mib"] = max(s["max_rss_mib"], r["rss_mib"])
        s["busy_s"] += dur
        s["max_s"] = max(s["max_s"], dur)
        for k in ("read_bytes", "write_bytes", "rchar", "wchar"):
            s[k] += r[k]
    largest = max(jobs, key=lambda r: r["rss_mib"], default=None)
    sched = [r for r in recs if r["label"] == "snakemake"]
    return {
        "rules": rules,
        "largest_job": {"label": largest["label"], "rss_mib": largest["rss_mib"]} if largest else None,
        "largest_process_mib": max((r["rss_mib"] for r in recs), default=0.0),
        "scheduler_rss_mib": max((r["rss_mib"] for r in sched), default=None),
        "first_job_start_s": min((r["start_s"] for r in jobs), default=None),
        "last_job_end_s": max((r["end_s"] for r in jobs), default=None),
        "io": {k: sum(r[k] for r in recs if r["ppid"] == root_parent)
               for k in ("read_bytes", "write_bytes", "rchar", "wchar")},
        "root_cpu_s": sum(r["cpu_s"] for r in recs if r["ppid"] == root_parent),
    }


def run_measured(cmd: list[str], cwd: Path, log_path: Path, env_extra: dict[str, str], scratch: Path,
                 timeout: float, cap_bytes: int | None = None, may_fail: bool = False) -> dict[str, Any]:
    """Run cmd under /usr/bin/time -v with the accounting hook; wall, flush, time -v and per-process data.

    ``cap_bytes``: run it in a memory cgroup made for it (a limit the kernel enforces); the result
    then holds the cgroup's peak and out-of-memory kill count. ``may_fail``: a non-zero exit is a
    result (``returncode``), not the end of the benchmark.
    """
    with contextlib.ExitStack() as stack:
        group = stack.enter_context(memory_cgroup(cap_bytes)) if cap_bytes else None
        out = _run_measured(cmd, cwd, log_path, env_extra, scratch, timeout, group)
    if out["returncode"] != 0 and not may_fail:
        tail = log_path.read_text(errors="replace")[-3000:]
        raise SystemExit(f"command failed ({out['returncode']}): {' '.join(cmd)}\n--- {log_path} ---\n{tail}")
    return out


def _run_measured(cmd: list[str], cwd: Path, log_path: Path, env_extra: dict[str, str], scratch: Path,
                  timeout: float, group: MemoryCgroup | None) -> dict[str, Any]:
    """One measured command, in ``group`` when given (the child joins it before exec)."""
    proc_dir = scratch / "proc"
    shutil.rmtree(proc_dir, ignore_errors=True)
    proc_dir.mkdir(parents=True)
    hook = scratch / "hook"
    hook.mkdir(exist_ok=True)
    (hook / "sitecustomize.py").write_text(SITECUSTOMIZE)
    paths = [str(hook)] + [x for x in (env_extra.get("PYTHONPATH"), os.environ.get("PYTHONPATH")) if x]
    env = {**os.environ, **env_extra, PROC_DIR_ENV: str(proc_dir), "HF_HUB_OFFLINE": "1",
           "TRANSFORMERS_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(paths)}
    time_file = scratch / "time-v.txt"
    load_before = os.getloadavg()[0]
    t_wall = time.time()
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        join = (lambda: group.add(os.getpid())) if group else None
        proc = subprocess.Popen(["/usr/bin/time", "-v", "-o", str(time_file), *cmd], cwd=cwd, env=env,
                                stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, preexec_fn=join)
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise SystemExit(f"timed out after {timeout} s: {' '.join(cmd)}") from None
    wall = time.perf_counter() - t0
    t1 = time.perf_counter()
    os.sync()
    flush = time.perf_counter() - t1
    recs = read_proc_records(proc_dir, t_wall)
    # The 1-minute load average before and after: other work on a shared machine shows up here.
    out = {"returncode": proc.returncode, "wall_s": wall, "flush_s": flush, "wall_flush_s": wall + flush,
           "time_v": parse_time_v(time_file), "loadavg_1m": [load_before, os.getloadavg()[0]],
           "summary": summarize_processes(recs, proc.pid), "processes": recs}
    if group:
        out["cap"] = {"limit_bytes": group.limit_bytes, "peak_bytes": group.peak(), "oom_kills": group.oom_kills()}
    return out


# --------------------------------------------------------------------------- the two tools


@dataclass
class Case:
    """One input size: its models, recipe and scratch directories."""

    dims: Dims
    experts: list[Path]
    inputs: list[Path]
    root: Path
    gate_mode: str

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def input_bytes(self) -> int:
        return sum(p.stat().st_size for p in self.inputs)


def snakemake_bin() -> str:
    """The snakemake of the environment running this script (the project's venv)."""
    local = Path(sys.executable).parent / "snakemake"
    return str(local) if local.exists() else (shutil.which("snakemake") or "snakemake")


def run_moeforge(case: Case, cores: int, cold: bool, timeout: float, extra: Sequence[str] = (),
                 workflow: Path = REPO, smoke: bool = False, cap_bytes: int | None = None) -> dict[str, Any]:
    """A full build from dense checkpoints to the assembled model, fresh working directory; then,
    with ``smoke``, a second fresh build whose one command goes on to the smoke report, as
    ``snakemake --cores N`` does for a user (one Snakemake start, the smoke test included).

    ``workflow`` is the checkout whose Snakefile runs; when it is not this repository, its ``src``
    goes first on PYTHONPATH so scheduler and jobs import that checkout's moeforge (to compare a
    branch or a candidate change against this one). ``cap_bytes``: both commands run under a
    kernel-enforced memory cap (see ``moeforge.runtime.memory_cap``); a failure is then recorded, not fatal.
    """
    work = case.root / "moeforge"
    config = work / "config.yaml"
    env = {"PYTHONPATH": str(workflow / "src")} if workflow.resolve() != REPO and (workflow / "src").is_dir() else {}

    def build(target: str, log_name: str) -> dict[str, Any]:
        """One command from a fresh working directory (and, with ``cold``, evicted inputs) to ``target``."""
        for sub in ("results", "resources", "logs", ".snakemake"):
            shutil.rmtree(work / sub, ignore_errors=True)
        work.mkdir(parents=True, exist_ok=True)
        config.write_text(yaml.safe_dump({"merges": {MERGE: {"recipe": str(case.recipe)}}}))
        if cold:
            evict(case.inputs)
        cmd = [snakemake_bin(), "-s", str(workflow / "Snakefile"), "-d", str(work), "--configfile", str(config),
               "--cores", str(cores), *extra, target]
        return run_measured(cmd, work, case.root / log_name, env, case.root / "mf-scratch", timeout, cap_bytes,
                            may_fail=cap_bytes is not None)

    # The assembled model, before its smoke test (publishing it needs the test passed).
    out = build(f"results/{MERGE}/staging/model/moeforge.lock.json", "moeforge.log")
    out["output_bytes"] = tree_bytes(work / "results" / MERGE / "staging" / "model")
    out["output_weight_bytes"] = tree_bytes(work / "results" / MERGE / "staging" / "model", "*.safetensors")
    if smoke and out["returncode"] == 0:
        checked = build(f"results/{MERGE}/smoke/report.json", "moeforge-smoke.log")
        out["smoke"] = {k: checked[k] for k in ("returncode", "wall_s", "summary", "time_v", "cap") if k in checked}
        report = work / "results" / MERGE / "smoke" / "report.json"
        if report.is_file():
            memory = json.loads(report.read_text()).get("memory", {})
            out["smoke"]["generation"] = memory.get("generation")
            out["smoke"]["generation_note"] = memory.get("generation_note")
    return out


def peer_python() -> Path:
    return PEER_VENV / "bin" / "python"


def ensure_peer(log: Callable[[str], None]) -> str:
    """mergekit-moe as the tests pin it (tests/setup_mergekit.sh builds .venv-mergekit)."""
    if not (PEER_VENV / "bin" / "mergekit-moe").exists():
        log(f"installing mergekit-moe into {PEER_VENV} (tests/setup_mergekit.sh)")
        subprocess.run(["bash", str(REPO / "tests" / "setup_mergekit.sh")], check=True)
    version = subprocess.run([str(peer_python()), "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
                             capture_output=True, text=True, check=True).stdout.strip()
    return version


def run_peer(case: Case, cold: bool, timeout: float, cap_bytes: int | None = None) -> dict[str, Any]:
    """mergekit-moe on the same recipe file, CPU, default options (5B-parameter shards, tokenizer copied)."""
    out_dir = case.root / "peer-out"
    shutil.rmtree(out_dir, ignore_errors=True)
    if cold:
        evict(case.inputs)
    cmd = [str(PEER_VENV / "bin" / "mergekit-moe"), str(case.recipe), str(out_dir), "--device", "cpu",
           "--quiet", "--i-understand-this-is-not-useful-without-training"]
    out = run_measured(cmd, case.root, case.root / "peer.log", {}, case.root / "peer-scratch", timeout, cap_bytes,
                       may_fail=cap_bytes is not None)
    out["output_bytes"] = tree_bytes(out_dir)
    out["output_weight_bytes"] = tree_bytes(out_dir, "*.safetensors")
    shutil.rmtree(out_dir, ignore_errors=True)
    return out


# --------------------------------------------------------------------------- orchestration and report


def median(values: Sequence[float]) -> float:
    return float(statistics.median(values))


def spread(values: Sequence[float]) -> dict[str, float]:
    return {"median": median(values), "min": float(min(values)), "max": float(max(values))}


def aggregate(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians (and min/max) over the counted runs of one tool at one size."""
    s = [r["summary"] for r in runs]
    agg: dict[str, Any] = {
        "runs": len(runs),
        "wall_s": spread([r["wall_s"] for r in runs]),
        "flush_s": spread([r["flush_s"] for r in runs]),
        "wall_flush_s": spread([r["wall_flush_s"] for r in runs]),
        "time_v_max_rss_mib": spread([r["time_v"].get("max_rss_kb", 0) / 1024 for r in runs]),
        "largest_process_mib": spread([x["largest_process_mib"] for x in s]),
        "io_storage_read_bytes": median([x["io"]["read_bytes"] for x in s]),
        "io_storage_write_bytes": median([x["io"]["write_bytes"] for x in s]),
        "io_syscall_read_bytes": median([x["io"]["rchar"] for x in s]),
        "io_syscall_write_bytes": median([x["io"]["wchar"] for x in s]),
        "time_v_fs_read_bytes": median([r["time_v"].get("fs_inputs_blocks", 0) * 512 for r in runs]),
        "time_v_fs_write_bytes": median([r["time_v"].get("fs_outputs_blocks", 0) * 512 for r in runs]),
        "cpu_s": median([r["time_v"].get("user_s", 0) + r["time_v"].get("sys_s", 0) for r in runs]),
        "output_bytes": runs[-1]["output_bytes"],
        "output_weight_bytes": runs[-1]["output_weight_bytes"],
    }
    agg["returncodes"] = [r["returncode"] for r in runs]
    if any("cap" in r for r in runs):
        agg["cap"] = [r.get("cap") for r in runs]
    smoked = [r["smoke"] for r in runs if "smoke" in r]
    if smoked:
        agg["smoke_wall_s"] = spread([x["wall_s"] for x in smoked])
        agg["smoke_returncodes"] = [x["returncode"] for x in smoked]
        agg["smoke_cap"] = [x.get("cap") for x in smoked]
        agg["smoke_generation"] = smoked[-1].get("generation")
        agg["smoke_generation_note"] = smoked[-1].get("generation_note")
    jobs = [j for j in (largest_job(r) for r in runs) if j]
    if jobs:
        agg["largest_job_rss_mib"] = spread([j["rss_mib"] for j in jobs])
        agg["largest_job"] = max(jobs, key=lambda j: j["rss_mib"])["label"]
        agg["scheduler_rss_mib"] = spread([x["scheduler_rss_mib"] for x in s])
        agg["first_job_start_s"] = median([x["first_job_start_s"] for x in s])
        rules = sorted({k for x in s for k in x["rules"]})
        agg["rules"] = {rule: {"jobs": s[-1]["rules"].get(rule, {}).get("jobs", 0),
                               "max_rss_mib": max(x["rules"][rule]["max_rss_mib"] for x in s if rule in x["rules"]),
                               "busy_s": median([x["rules"][rule]["busy_s"] for x in s if rule in x["rules"]]),
                               "max_job_s": median([x["rules"][rule]["max_s"] for x in s if rule in x["rules"]]),
                               "storage_read_bytes": median([x["rules"][rule]["read_bytes"] for x in s
                                                             if rule in x["rules"]]),
                               "syscall_read_bytes": median([x["rules"][rule]["rchar"] for x in s
                                                             if rule in x["rules"]])}
                        for rule in rules}
    return agg


def probe_startup(log: Callable[[str], None], peer: bool) -> dict[str, float]:
    """Seconds to start Python with what each kind of process imports (median of 3, software cached)."""
    probes = {
        "python -c pass": [sys.executable, "-c", "pass"],
        "import snakemake (job preamble)": [sys.executable, "-c", "import snakemake.script"],
        "import moeforge.build.shards": [sys.executable, "-c", "import moeforge.build.shards, moeforge.plan.make"],
        "import torch": [sys.executable, "-c", "import torch"],
        "snakemake --version": [snakemake_bin(), "--version"],
    }
    if peer:
        probes["import mergekit.scripts.moe (peer)"] = [str(peer_python()), "-c", "import mergekit.scripts.moe"]
    out = {}
    for name, cmd in probes.items():
        times = []
        for _ in range(4):
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, capture_output=True)
            times.append(time.perf_counter() - t0)
        out[name] = median(times[1:])
        log(f"  start-up probe  {name:<36} {out[name]:6.2f} s")
    return out


def bench_case(case: Case, args: argparse.Namespace, log: Callable[[str], None]) -> dict[str, Any]:
    """Warm-up, then alternating counted runs: floor, moeforge, peer; each with cold input pages."""
    cold = args.cache == "cold"
    expected_out = 2 * case.dims.moe_params()
    mf_runs: list[dict[str, Any]] = []
    peer_runs: list[dict[str, Any]] = []
    floors: list[dict[str, float]] = []
    scratch = case.root / "floor"
    scratch.mkdir(parents=True, exist_ok=True)
    for rep in range(args.warmup + args.runs):
        counted = rep >= args.warmup
        tag = f"run {rep - args.warmup + 1}/{args.runs}" if counted else "warm-up"
        if counted and not args.no_floor:
            floors.append(io_floor(case.inputs, expected_out, scratch, cold))
            log(f"  {tag:<10} I/O floor {floors[-1]['total_s']:7.2f} s "
                f"(read {floors[-1]['read_gbps']:.2f} GB/s, write+fsync {floors[-1]['write_gbps']:.2f} GB/s)")
        mf = run_moeforge(case, args.cores, cold, args.timeout, shlex.split(args.snakemake_args),
                          args.workflow.resolve(), args.smoke, args.cap_bytes)
        largest = largest_job(mf)
        log(f"  {tag:<10} moeforge  {mf['wall_s']:7.2f} s (exit {mf['returncode']})"
            + (f"; with smoke test {mf['smoke']['wall_s']:.2f} s (exit {mf['smoke']['returncode']})" if "smoke" in mf else "")
            + (f"  largest job {largest['rss_mib']:7.0f} MiB ({largest['label']})" if largest else "")
            + (f"  cgroup peak {mf['cap']['peak_bytes'] / 2**30:.2f} GiB" if "cap" in mf else ""))
        if counted:
            mf_runs.append(compact(mf))
        if args.peer:
            pr = run_peer(case, cold, args.timeout, args.cap_bytes)
            log(f"  {tag:<10} peer      {pr['wall_s']:7.2f} s (exit {pr['returncode']})  peak "
                f"{pr['time_v'].get('max_rss_kb', 0) / 1024:7.0f} MiB"
                + (f"  out-of-memory kills {pr['cap']['oom_kills']}" if "cap" in pr else ""))
            if counted:
                peer_runs.append(compact(pr))
    result: dict[str, Any] = {
        "dims": asdict(case.dims), "dense_params": case.dims.dense_params(), "moe_params": case.dims.moe_params(),
        "input_files": len(case.inputs), "input_bytes": case.input_bytes, "expected_output_bytes": expected_out,
        "moeforge": aggregate(mf_runs), "moeforge_runs": mf_runs,
    }
    if floors:
        result["floor"] = {k: median([f[k] for f in floors]) for k in floors[0]}
        result["floor_runs"] = floors
    if peer_runs:
        result["peer"] = aggregate(peer_runs)
        result["peer_runs"] = peer_runs
    if peer_runs and all(p["returncode"] == 0 for p in peer_runs):  # a killed peer has no time to compare
        pairs = list(zip(mf_runs, peer_runs))
        result["ratio"] = {
            "wall": spread([m["wall_s"] / p["wall_s"] for m, p in pairs]),
            "wall_flush": spread([m["wall_flush_s"] / p["wall_flush_s"] for m, p in pairs]),
            "largest_job_rss_vs_peer_peak": spread(
                [largest_job(m)["rss_mib"] / (p["time_v"]["max_rss_kb"] / 1024) for m, p in pairs]),
        }
        if all("smoke" in m for m in mf_runs):
            result["ratio"]["wall_with_smoke"] = spread([m["smoke"]["wall_s"] / p["wall_s"] for m, p in pairs])
    return result


def largest_job(run: dict[str, Any]) -> dict[str, Any] | None:
    """The largest Snakemake job of a moeforge run, the smoke test's included."""
    jobs = [x["largest_job"] for x in (run["summary"], run.get("smoke", {}).get("summary", {})) if x.get("largest_job")]
    return max(jobs, key=lambda j: j["rss_mib"], default=None)


def compact(run: dict[str, Any]) -> dict[str, Any]:
    """A run without its per-process records (they hold this machine's paths and are only for a look now)."""
    out = {k: v for k, v in run.items() if k != "processes"}
    if "smoke" in out:
        out["smoke"] = {k: v for k, v in out["smoke"].items() if k != "processes"}
    return out


def fit_line(points: Sequence[tuple[float, float]]) -> tuple[float, float]:
    """Least-squares intercept and slope of y over x."""
    xs, ys = np.array([p[0] for p in points]), np.array([p[1] for p in points])
    slope, intercept = np.polyfit(xs, ys, 1)
    return float(intercept), float(slope)


#: 4 x Mistral-7B (hidden 4096, intermediate 14336, 32 layers, 8 KV heads, vocab 32000) -> Mixtral.
SEVEN_B = Dims(layers=32, hidden=4096, intermediate=14336, vocab=32000, heads=32, kv_heads=8, experts=4)


def fit_wall(points: Sequence[tuple[int, int, float]], three_terms: bool) -> dict[str, Any] | None:
    """Fit wall over (layers, output bytes) points.

    With sizes that vary layers and bytes independently (e.g. 20 and 40 layers plus a wider
    model), three terms: ``a + layers * per_layer + bytes / rate``, so per-job overhead (one shard
    job per layer) is not mistaken for a byte rate. Otherwise two: ``a + bytes / rate``, which
    lumps per-layer overhead into the rate and overestimates models with larger layers.
    """
    if len(points) < 2:
        return None
    layers = np.array([p[0] for p in points], dtype=float)
    gbytes = np.array([p[1] for p in points], dtype=float) / GB
    wall = np.array([p[2] for p in points], dtype=float)
    three = np.column_stack([np.ones_like(wall), layers, gbytes])
    if three_terms and len(points) >= 3 and np.linalg.matrix_rank(three) == 3:
        (a, per_layer, per_gb), *_ = np.linalg.lstsq(three, wall, rcond=None)
        return {"model": "wall_s = a + layers * per_layer_s + output_bytes / rate", "a_s": float(a),
                "per_layer_s": float(per_layer), "rate_gbps": 1 / per_gb if per_gb > 0 else None,
                "points": [{"layers": int(p[0]), "output_bytes": int(p[1]), "wall_s": p[2]} for p in points]}
    a, per_gb = fit_line(list(zip(gbytes, wall)))
    return {"model": "wall_s = a + output_bytes / rate", "a_s": a, "per_layer_s": 0.0,
            "rate_gbps": 1 / per_gb if per_gb > 0 else None,
            "points": [{"layers": int(p[0]), "output_bytes": int(p[1]), "wall_s": p[2]} for p in points]}


def predict(fit: dict[str, Any], layers: int, out_bytes: int) -> float:
    rate = fit["rate_gbps"]
    return fit["a_s"] + layers * fit["per_layer_s"] + (out_bytes / GB / rate if rate else 0.0)


def extrapolate(sizes: list[dict[str, Any]], startup: dict[str, Any] | None) -> dict[str, Any] | None:
    """Each tool's fitted wall over the measured sizes (tiny build included), evaluated for 4x7B, and the floor."""
    cases = sizes + ([startup] if startup else [])
    out_7b = 2 * SEVEN_B.moe_params()
    in_7b = 2 * SEVEN_B.dense_params() * SEVEN_B.experts
    result: dict[str, Any] = {"target_4x7b": {"layers": SEVEN_B.layers, "output_bytes": out_7b,
                                              "input_bytes": in_7b}}
    # Three terms only when the measured sizes differ in bytes per layer (a wider model among
    # them); the tiny build alone is too far from the others to separate the two slopes.
    three = len({(s["dims"]["hidden"], s["dims"]["intermediate"], s["dims"]["experts"]) for s in sizes}) >= 2
    for tool in ("moeforge", "peer"):
        fit = fit_wall([(c["dims"]["layers"], c[tool]["output_weight_bytes"], c[tool]["wall_s"]["median"])
                        for c in cases if tool in c], three)
        if fit:
            fit["wall_4x7b_s"] = predict(fit, SEVEN_B.layers, out_7b)
            result[tool] = fit
    floors = [s["floor"] for s in sizes if "floor" in s]
    if floors:
        rd = median([f["read_gbps"] for f in floors]) * GB
        wr = median([f["write_gbps"] for f in floors]) * GB
        result["floor_4x7b_s"] = in_7b / rd + out_7b / wr
        result["floor_rates_gbps"] = {"read": rd / GB, "write": wr / GB}
    return result if "moeforge" in result else None


def targets(sizes: list[dict[str, Any]], startup: dict[str, Any] | None, default: Dims) -> list[dict[str, Any]]:
    """The three targets of the issue, each with the numbers it was judged on."""
    out = []
    base = next((s for s in sizes if s["dims"] == asdict(default) and "peer" in s), None)
    if base:
        r = base["ratio"]["wall"]["median"]
        out.append({"target": "wall <= 0.5 x mergekit-moe (first --layers size)", "value": r, "limit": 0.5, "met": r <= 0.5,
                    "detail": f"median paired ratio {r:.2f} (moeforge {base['moeforge']['wall_s']['median']:.2f} s, "
                              f"peer {base['peer']['wall_s']['median']:.2f} s)"})
        m = base["ratio"]["largest_job_rss_vs_peer_peak"]["median"]
        out.append({"target": "largest per-job peak RSS <= 0.25 x mergekit-moe peak RSS", "value": m, "limit": 0.25,
                    "met": m <= 0.25,
                    "detail": f"{base['moeforge']['largest_job_rss_mib']['median']:.0f} MiB "
                              f"({base['moeforge']['largest_job']}) vs {base['peer']['time_v_max_rss_mib']['median']:.0f}"
                              f" MiB"})
    large = max(sizes, key=lambda s: s["expected_output_bytes"])
    if "floor" in large and startup:
        s0 = startup["moeforge"]["wall_s"]["median"]
        bound = 2 * large["floor"]["total_s"] + s0
        wall = large["moeforge"]["wall_s"]["median"]
        out.append({"target": "wall (largest size) <= 2 x I/O floor + start-up term", "value": wall, "limit": bound,
                    "met": wall <= bound,
                    "detail": f"{wall:.2f} s vs 2 x {large['floor']['total_s']:.2f} s + {s0:.2f} s (start-up term = "
                              f"median wall of the tiny build) = {bound:.2f} s"})
    return out


def print_report(report: dict[str, Any]) -> None:
    """The table: one block per size, one row per tool, then ratios, targets and the extrapolation."""
    def gb(x: float) -> str:
        return f"{x / GB:6.2f}"

    head = (f"{'case':<24} {'tool':<10} {'wall s':>16} {'+flush s':>8} {'peak MiB':>9} {'job MiB':>8} "
            f"{'rd GB':>6} {'wr GB':>6} {'out GB':>6} {'GB/s':>5}")
    print()
    print(head)
    print("-" * len(head))
    cases = list(report["sizes"])
    if report.get("startup"):
        cases.append(report["startup"])
    for s in cases:
        d = s["dims"]
        name = f"{d['experts']}x L{d['layers']} H{d['hidden']}"
        for tool in ("moeforge", "peer"):
            if tool not in s:
                continue
            a = s[tool]
            w = a["wall_s"]
            job = f"{a['largest_job_rss_mib']['median']:8.0f}" if "largest_job_rss_mib" in a else f"{'-':>8}"
            print(f"{name:<24} {tool:<10} {w['median']:6.2f} [{w['min']:.1f}-{w['max']:.1f}] "
                  f"{a['flush_s']['median']:8.2f} {a['time_v_max_rss_mib']['median']:9.0f} {job} "
                  f"{gb(a['io_storage_read_bytes'])} {gb(a['io_storage_write_bytes'])} {gb(a['output_weight_bytes'])} "
                  f"{a['output_weight_bytes'] / w['median'] / GB:5.2f}")
        if "floor" in s:
            f = s["floor"]
            print(f"{name:<24} {'I/O floor':<10} {f['total_s']:6.2f} {'':>9} {'':>8} {'':>9} {'':>8} "
                  f"{gb(f['read_bytes'])} {gb(f['write_bytes'])}  (read {f['read_gbps']:.2f} GB/s, "
                  f"write+fsync {f['write_gbps']:.2f} GB/s)")
        if "ratio" in s:
            r = s["ratio"]
            print(f"{name:<24} {'ratio':<10} wall {r['wall']['median']:.2f} [{r['wall']['min']:.2f}-"
                  f"{r['wall']['max']:.2f}], wall+flush {r['wall_flush']['median']:.2f}, largest job / peer peak "
                  f"{r['largest_job_rss_vs_peer_peak']['median']:.3f}")
    print("\npeak MiB: largest process of the tree (/usr/bin/time -v); job MiB: largest Snakemake job (VmHWM);"
          "\nrd/wr GB: storage-level bytes (/proc/<pid>/io read_bytes/write_bytes, all processes); out GB: weight files")
    mf = cases[0].get("moeforge", {})
    if mf.get("rules"):
        print(f"\nper rule ({cases[0]['dims']['layers']} layers, medians):")
        print(f"  {'rule':<16} {'jobs':>4} {'max MiB':>8} {'busy s':>7} {'max job s':>9} {'st. read GB':>11}")
        for rule, r in mf["rules"].items():
            print(f"  {rule:<16} {r['jobs']:>4} {r['max_rss_mib']:8.0f} {r['busy_s']:7.2f} {r['max_job_s']:9.2f} "
                  f"{r['storage_read_bytes'] / GB:11.2f}")
        print(f"  first job starts at {mf['first_job_start_s']:.2f} s; scheduler peak "
              f"{mf['scheduler_rss_mib']['median']:.0f} MiB")
    if report.get("startup_probes"):
        print("\nstart-up probes (s): " + ", ".join(f"{k} {v:.2f}" for k, v in report["startup_probes"].items()))
    ex = report.get("extrapolation")
    if ex:
        t = ex["target_4x7b"]
        print(f"\nextrapolation to 4x7B -> Mixtral ({t['layers']} layers, {t['output_bytes'] / GB:.1f} GB out, "
              f"{t['input_bytes'] / GB:.1f} GB in):")
        for tool in ("moeforge", "peer"):
            if tool in ex:
                f = ex[tool]
                rate = f"{f['rate_gbps']:.3f} GB/s" if f["rate_gbps"] else "inf"
                layer = f" + layers x {f['per_layer_s']:.2f} s" if f["per_layer_s"] else ""
                print(f"  {tool:<9} wall = {f['a_s']:.2f} s{layer} + output_bytes / {rate}  ->  {f['wall_4x7b_s']:.0f} s")
        if "floor_4x7b_s" in ex:
            print(f"  I/O floor {t['input_bytes'] / GB:.1f} GB / {ex['floor_rates_gbps']['read']:.2f} GB/s + "
                  f"{t['output_bytes'] / GB:.1f} GB / {ex['floor_rates_gbps']['write']:.2f} GB/s  ->  "
                  f"{ex['floor_4x7b_s']:.0f} s")
    if report.get("targets"):
        print("\ntargets:")
        for t in report["targets"]:
            print(f"  [{'met' if t['met'] else 'MISSED'}] {t['target']}: {t['detail']}")


# --------------------------------------------------------------------------- named cases


@dataclass(frozen=True)
class Preset:
    """A named case: the input shape and gate mode, what is timed, and a memory cap if any."""

    dims: Dims
    what: str
    gate_mode: str = "hidden"
    smoke: bool = True
    floor: bool = False
    cap_bytes: int | None = None
    runs: int = 3
    warmup: int = 1


#: SmolLM2-135M's shape (head_dim 64, tied embeddings) and a 1B-class Llama (Llama 3.2 1B's widths,
#: 16 layers, tied): four of them make a 7.3 GB Mixtral.
SMOLLM2 = Dims(layers=30, hidden=576, intermediate=1536, vocab=49152, heads=9, kv_heads=3, experts=3, tied=True)
LLAMA_1B = Dims(layers=16, hidden=2048, intermediate=8192, vocab=128256, heads=32, kv_heads=8, experts=4, tied=True)
CASES = {
    "smollm2-135m": Preset(SMOLLM2, "SmolLM2-135M shape, 3 experts, hidden gates (3 prompts each)"),
    "llama-1b": Preset(LLAMA_1B, "1B-class Llama, 4 experts -> 7.3 GB MoE, hidden gates", floor=True, runs=1,
                       warmup=0),
    "llama-1b-cap3g": Preset(LLAMA_1B, "the same under a 3 GiB memory cgroup (kernel-enforced), both tools",
                             cap_bytes=3 << 30, runs=1, warmup=0),
}


def run_case(name: str, args: argparse.Namespace, data_dir: Path, log: Callable[[str], None]) -> dict[str, Any]:
    """One named case, measured as ``bench_case`` measures a size; with its targets judged."""
    preset = CASES[name]
    experts = ensure_experts(data_dir, preset.dims, log)
    root = data_dir / "runs" / name
    root.mkdir(parents=True, exist_ok=True)
    case = Case(preset.dims, experts, weight_files(experts), root, preset.gate_mode)
    write_recipe(case.recipe, experts, preset.gate_mode)
    log(f"case {name}: {preset.what}; {case.input_bytes / GB:.2f} GB in, {2 * preset.dims.moe_params() / GB:.2f} GB out")
    settings = {"smoke": preset.smoke, "cap_bytes": preset.cap_bytes, "peer": True,
                "no_floor": args.no_floor or not preset.floor,
                "runs": args.runs if args.runs is not None else preset.runs,
                "warmup": args.warmup if args.warmup is not None else preset.warmup}
    result = bench_case(case, argparse.Namespace(**{**vars(args), **settings}), log)
    result.update(case=name, what=preset.what, gate_mode=preset.gate_mode, cap_bytes=preset.cap_bytes)
    result["targets"] = case_targets(name, result)
    return result


def case_targets(name: str, r: dict[str, Any]) -> list[dict[str, Any]]:
    """The targets each case is judged on, with the numbers behind each verdict."""
    def target(what: str, value: float, limit: float) -> dict[str, Any]:
        return {"target": what, "value": value, "limit": limit, "met": value <= limit}

    ratio = r.get("ratio", {})
    if name == "smollm2-135m":
        return [target("to the assembled model / mergekit-moe", ratio["wall"]["median"], 1.0),
                target("including the smoke test / mergekit-moe", ratio["wall_with_smoke"]["median"], 2.0)]
    if name == "llama-1b":
        peer_peak = r["peer"]["time_v_max_rss_mib"]["median"]
        build_peak = median([m["summary"]["largest_job"]["rss_mib"] for m in r["moeforge_runs"]])
        out = [target("to the assembled model / mergekit-moe", ratio["wall"]["median"], 0.7),
               target("largest job's peak RSS / mergekit-moe's peak", ratio["largest_job_rss_vs_peer_peak"]["median"],
                      0.1),
               # the smoke test's whole-model generation runs when its memory budget allows it; without it:
               target("largest job's peak RSS to the assembled model / mergekit-moe's peak", build_peak / peer_peak,
                      0.1)]
        if "floor" in r:
            out.append(target("to the assembled model / I/O floor",
                              r["moeforge"]["wall_s"]["median"] / r["floor"]["total_s"], 1.3))
        return out
    ok = all(c == 0 for c in r["moeforge"]["returncodes"] + r["moeforge"].get("smoke_returncodes", [1]))
    return [{"target": "moeforge completes under the cap, smoke test included", "value": float(ok), "limit": 1.0,
             "met": ok}]


README_BEGIN, README_END = "<!-- build-speed:begin -->", "<!-- build-speed:end -->"


def readme_table(results: dict[str, dict[str, Any]]) -> str:
    """The medians table of the named cases, and their targets, as markdown."""
    rows = ["| case | moeforge to model s | with smoke test s | mergekit-moe s | ratio to model | ratio incl. smoke "
            "| I/O floor s | largest job MiB (rule) | mergekit-moe peak MiB | under cap |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    notes = []
    for name, r in results.items():
        mf, peer, ratio = r["moeforge"], r.get("peer", {}), r.get("ratio", {})
        smoke = mf.get("smoke_wall_s", {}).get("median")
        cap = "-"
        if r.get("cap_bytes"):
            peaks = [c["peak_bytes"] for c in (mf.get("cap") or []) + (mf.get("smoke_cap") or []) if c]
            peer_caps = peer.get("cap") or [{}]
            cap = (f"moeforge exit {max(map(abs, mf['returncodes'] + mf.get('smoke_returncodes', [])))}, cgroup peak "
                   f"{max(peaks, default=0) / 2**30:.2f} GiB, generation {mf.get('smoke_generation') or 'skipped'}; "
                   f"mergekit-moe exit {peer.get('returncodes', ['-'])[0]}, "
                   f"{peer_caps[0].get('oom_kills', '-')} OOM kill(s)")
        rows.append(f"| {name} | {_num(mf['wall_s']['median'])} | {_num(smoke)} | {_num(peer.get('wall_s', {}).get('median'))} "
                    f"| {_num(ratio.get('wall', {}).get('median'))} | {_num(ratio.get('wall_with_smoke', {}).get('median'))} "
                    f"| {_num(r.get('floor', {}).get('total_s'))} | {_num(mf.get('largest_job_rss_mib', {}).get('median'), 0)} "
                    f"({mf.get('largest_job', '-')}) "
                    f"| {_num(peer.get('time_v_max_rss_mib', {}).get('median'), 0)} | {cap} |")
        notes += [f"- {name}: {t['target']} = {t['value']:.2f} (target <= {t['limit']:g}): "
                  f"{'met' if t['met'] else 'missed'}" for t in r.get("targets", [])]
    machine = next(iter(results.values()))["machine"]
    head = (f"Medians of each case's counted runs ({machine['cpus']} cores, {machine['mem_bytes'] / 2**30:.0f} GiB, "
            f"torch {machine['torch']}, mergekit {machine['mergekit']}; inputs evicted from the page cache "
            f"before each run). Written by `python benchmarks/build_speed.py --case ...`.")
    return "\n".join([head, "", *rows, "", *notes])


def _num(value: float | None, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def write_readme(results_dir: Path, readme: Path) -> None:
    """Replace the table between the README's markers with the stored results of every named case."""
    results = {name: json.loads((results_dir / f"{name}.json").read_text())
               for name in CASES if (results_dir / f"{name}.json").is_file()}
    if not results:
        return
    text = readme.read_text()
    before, _, rest = text.partition(README_BEGIN)
    _, _, after = rest.partition(README_END)
    readme.write_text(f"{before}{README_BEGIN}\n{readme_table(results)}\n{README_END}{after}")


def machine_info(peer_version: str | None) -> dict[str, Any]:
    def version(pkg: str) -> str | None:
        from importlib import metadata
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    mem = int(re.search(r"MemTotal:\s+(\d+)", Path("/proc/meminfo").read_text()).group(1)) * 1024
    return {"cpus": os.cpu_count(), "cpu": cpu, "mem_bytes": mem, "kernel": platform.release(),
            "python": platform.python_version(), "snakemake": version("snakemake"), "moeforge": version("moeforge"),
            "torch": version("torch"), "mergekit": peer_version,
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z")}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--layers", default="20", help="decoder layers; a comma list measures several sizes")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--extra-size", action="append", default=[], metavar="LxHxI",
                        help="another size, layers x hidden x intermediate (repeatable): a wider model "
                             "separates per-layer overhead from the byte rate in the fit")
    parser.add_argument("--gate-mode", default="random", choices=["random", "uniform_random", "hidden"],
                        help="random/uniform_random need no forward pass (pure data movement); hidden runs the "
                             "base model on the prompts in both tools")
    parser.add_argument("--case", action="append", choices=sorted(CASES), default=[],
                        help="a named case (repeatable): its own shape, gate mode, runs and cap; results go to "
                             "benchmarks/results/CASE.json and the table in benchmarks/README.md")
    parser.add_argument("--runs", type=int, default=None, help="counted runs of each tool per size (default 3; a "
                                                                   "case's own number with --case)")
    parser.add_argument("--warmup", type=int, default=None,
                        help="uncounted runs first, software into the page cache (default 1; a case's own with --case)")
    parser.add_argument("--smoke", action="store_true",
                        help="also time moeforge to the smoke report (a second fresh build, one command)")
    parser.add_argument("--memory-cap", type=parse_size, default=None, metavar="SIZE",
                        help="run both tools in a memory cgroup of this size (e.g. 3G; needs root)")
    parser.add_argument("--peer", action="store_true", help="also time mergekit-moe (installed on first use)")
    parser.add_argument("--cores", type=int, default=2, help="snakemake --cores")
    parser.add_argument("--workflow", type=Path, default=REPO,
                        help="checkout whose Snakefile (and src/, first on PYTHONPATH) is benchmarked")
    parser.add_argument("--snakemake-args", default="",
                        help="extra snakemake options, one string (e.g. '--scheduler greedy'), to try settings")
    parser.add_argument("--cache", choices=["cold", "warm"], default="cold",
                        help="cold: evict the input weights' pages before every run")
    parser.add_argument("--no-floor", action="store_true", help="skip the I/O floor measurement")
    parser.add_argument("--no-probes", action="store_true", help="skip the import-time probes")
    parser.add_argument("--no-startup", action="store_true",
                        help="skip the tiny build that measures the fixed start-up term")
    parser.add_argument("--data-dir", type=Path, default=BENCH_DIR / ".data",
                        help="input models (cached) and scratch space")
    parser.add_argument("--keep-data", action="store_true", help="keep the input models and outputs afterwards")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed for one build")
    parser.add_argument("--out", type=Path, default=None,
                        help="result JSON of free-form sizes (default: DATA_DIR/results/..., not committed)")
    args = parser.parse_args(argv)
    if not Path("/usr/bin/time").exists():
        raise SystemExit("/usr/bin/time is missing: install it (Debian: apt-get install time)")
    layer_list = [int(x) for x in str(args.layers).split(",")]

    def log(msg: str) -> None:
        print(msg, flush=True)

    peer_version = ensure_peer(log) if args.peer or args.case else None
    data_dir = args.data_dir.resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    usage = shutil.disk_usage(data_dir)
    log(f"data dir {data_dir}: {usage.free / GB:.0f} GB free")
    if args.case:
        return run_cases(args, data_dir, peer_version, log)
    args.runs = 3 if args.runs is None else args.runs
    args.warmup = 1 if args.warmup is None else args.warmup
    args.cap_bytes = args.memory_cap
    base = Dims(hidden=args.hidden, intermediate=args.intermediate, vocab=args.vocab, heads=args.heads,
                kv_heads=args.kv_heads, experts=args.experts)

    def make_case(d: Dims) -> Case:
        experts = ensure_experts(data_dir, d, log)
        root = data_dir / "runs" / d.tag
        root.mkdir(parents=True, exist_ok=True)
        case = Case(d, experts, weight_files(experts), root, args.gate_mode)
        write_recipe(case.recipe, experts, args.gate_mode)
        return case

    report: dict[str, Any] = {"machine": machine_info(peer_version),
                              "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                              "gate_mode_note": "random / uniform_random routers need no forward pass: the build is "
                                                "data movement only" if args.gate_mode != "hidden" else
                                                "hidden: both tools run the base model on the prompts",
                              "sizes": []}
    if not args.no_probes:
        report["startup_probes"] = probe_startup(log, args.peer)
    if not args.no_startup:
        # A tiny build: the cost of the stages themselves (start-ups, scheduling, metadata), ~no bytes.
        tiny = Dims(layers=2, hidden=64, intermediate=128, vocab=args.vocab, heads=4, kv_heads=2, experts=args.experts)
        log(f"start-up term: tiny build ({tiny.tag}, {tiny.experts} experts)")
        tiny_args = argparse.Namespace(**{**vars(args), "no_floor": True})
        report["startup"] = bench_case(make_case(tiny), tiny_args, log)
    extra = [Dims(*(int(x) for x in spec.lower().split("x")), vocab=args.vocab, heads=args.heads,
                  kv_heads=args.kv_heads, experts=args.experts) for spec in args.extra_size]
    for d in [replace(base, layers=layers) for layers in layer_list] + extra:
        case = make_case(d)
        log(f"size {d.tag}, {d.experts} experts: {case.input_bytes / GB:.2f} GB in, "
            f"{2 * d.moe_params() / GB:.2f} GB out")
        report["sizes"].append(bench_case(case, args, log))
    report["extrapolation"] = extrapolate(report["sizes"], report.get("startup"))
    report["targets"] = targets(report["sizes"], report.get("startup"), replace(base, layers=layer_list[0]))
    out = args.out or data_dir / "results" / (
        f"build_speed-L{'_'.join(map(str, layer_list))}-H{args.hidden}"
        f"{''.join('+' + spec for spec in args.extra_size)}-E{args.experts}-{args.gate_mode}"
        f"{'-peer' if args.peer else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1) + "\n")
    print_report(report)
    print(f"\nresults: {out}")
    if not args.keep_data:
        shutil.rmtree(data_dir / "runs", ignore_errors=True)
        shutil.rmtree(data_dir / "models", ignore_errors=True)
    return 0


def run_cases(args: argparse.Namespace, data_dir: Path, peer_version: str | None,
              log: Callable[[str], None]) -> int:
    """Every named case in turn; each result to benchmarks/results/CASE.json, then the README's table."""
    results_dir = BENCH_DIR / "results"
    results_dir.mkdir(parents=True, exist_ok=True)
    for name in args.case:
        result = {"machine": machine_info(peer_version), **run_case(name, args, data_dir, log)}
        (results_dir / f"{name}.json").write_text(json.dumps(result, indent=1, sort_keys=True) + "\n")
        for t in result["targets"]:
            log(f"  [{'met' if t['met'] else 'MISSED'}] {t['target']}: {t['value']:.2f} (<= {t['limit']:g})")
        if not args.keep_data:
            shutil.rmtree(data_dir / "runs" / name, ignore_errors=True)
    write_readme(results_dir, BENCH_DIR / "README.md")
    print(readme_table({n: json.loads((results_dir / f"{n}.json").read_text()) for n in args.case}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
