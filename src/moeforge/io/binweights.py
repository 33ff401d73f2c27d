"""Checkpoints published only as pytorch_model*.bin: converted once to safetensors.

A .bin file is a pickle: it has no header to read shapes from, and unpickling arbitrary data
can run code. So such a model is converted while its metadata is fetched: each file is loaded
with ``weights_only=True`` (tensors and plain containers only, never code) and written as
safetensors, after which every later stage (validation, streaming shard jobs) treats it like
any other model. The cost is that these models are read in full before validation.
"""

from __future__ import annotations

from pathlib import Path

from moeforge.errors import ModelError
from moeforge.io.files import write_json


def _name(index: int, total: int) -> str:
    return "model.safetensors" if total == 1 else f"model-{index:05d}-of-{total:05d}.safetensors"


def convert(src_dir: Path, bin_files: list[str], out_dir: Path) -> list[str]:
    """Convert each .bin file to one safetensors file in out_dir, named and indexed as
    save_pretrained names them (so out_dir, with the config and tokenizer beside, is a model
    directory transformers loads); returns the new file names."""
    import pickle

    import torch
    from safetensors.torch import save_file

    out_dir.mkdir(parents=True, exist_ok=True)
    names: list[str] = []
    weight_map: dict[str, str] = {}
    total = 0
    for index, name in enumerate(bin_files, start=1):
        try:
            state = torch.load(src_dir / name, map_location="cpu", weights_only=True, mmap=True)
        except (pickle.UnpicklingError, RuntimeError, OSError) as exc:
            raise ModelError(f"cannot load {name} safely (weights_only=True): {exc}", str(src_dir / name),
                             "the file holds more than tensors, or is corrupt; use a safetensors checkpoint") from None
        # clone: tied weights share storage in a .bin, which safetensors refuses to write twice
        tensors = {key: value.detach().clone().contiguous() for key, value in state.items()}
        out = _name(index, len(bin_files))
        save_file(tensors, str(out_dir / out), metadata={"format": "pt"})
        names.append(out)
        weight_map.update({key: out for key in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
    if len(names) > 1:
        write_json(out_dir / "model.safetensors.index.json",
                   {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))})
    return names
