"""Refuse a device this job's torch cannot use, before any weight is read.

Whether a GPU is there is known only in the job itself: on a cluster the workflow is parsed and
validated on a login node without one, and the job runs on a GPU node. So each job that computes
on a configured device checks it first, naming the key that chose it, instead of failing deep in
a forward pass with torch's "Torch not compiled with CUDA enabled".
"""

from __future__ import annotations

import torch

from moeforge.errors import RecipeError


def computes_16bit(device: str) -> bool:
    """Whether moeforge's forward passes on ``device`` compute in a model's 16-bit dtype: on accelerators.

    On a CPU they compute in float32 (a 16-bit model's layers upcast one at a time, see
    ``runtime.upcast``): torch's 16-bit CPU kernels round differently with and without AVX512-BF16 or
    AMX, so 16-bit numbers would depend on which CPU ran the job.
    """
    return torch.device(device).type != "cpu"


def require_device(device: str, key: str) -> None:
    """Raise unless torch can compute on ``device`` here; ``key`` is the recipe or config key that set it."""
    parsed = torch.device(device)
    if parsed.type == "cuda":
        if not torch.backends.cuda.is_built():
            why = f"this job's torch ({torch.__version__}) was built without CUDA"
        elif torch.cuda.device_count() <= (parsed.index or 0):
            why = f"this job sees {torch.cuda.device_count()} CUDA device(s)"
        else:
            return
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        why = "this job's machine has no Apple MPS device"
    else:
        return
    raise RecipeError(f"the device {device!r} is not usable here: {why}", key,
                      f"set {key}: cpu, or run this job where the device is (a CUDA build of torch, a GPU "
                      "visible to the job: on SLURM, ask for one for this rule with --set-resources)")
