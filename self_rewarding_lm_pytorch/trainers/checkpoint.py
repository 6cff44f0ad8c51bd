"""Checkpoint files: safetensors weights (or a PEFT adapter folder) and ``trainer_state.json``,
written atomically (temp folder, fsync, rename) and loaded without unpickling anything."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file, save_model
from torch import Tensor, nn

from ..models import is_peft_model, unwrap_model, wrap_model
from .sharding import is_sharded, load_full_state_dict

__all__ = [
    "ADAPTER_CONFIG_NAME",
    "ADAPTER_WEIGHTS_NAME",
    "SAFETENSORS_NAME",
    "STATE_NAME",
    "load_checkpoint",
    "prune_checkpoints",
    "save_checkpoint",
]

SAFETENSORS_NAME = "model.safetensors"
STATE_NAME = "trainer_state.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


def _check_finite_params(state_dict: dict[str, Tensor]) -> None:
    for name, p in state_dict.items():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise FloatingPointError(
                f"refusing to save a checkpoint: parameter {name!r} holds NaN/inf values"
            )


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    model: nn.Module,
    path: str | Path,
    *,
    state: dict[str, Any] | None = None,
    overwrite: bool = True,
    state_dict: dict[str, Tensor] | None = None,
) -> Path:
    """Write ``model`` to the folder ``path`` with safetensors, atomically.

    A Hugging Face model (``kind == "hf"``) is saved with ``save_pretrained`` (config
    and ``model.safetensors``); a PEFT (LoRA) model as its adapter folder with PEFT's
    ``save_pretrained`` (``adapter_config.json`` + ``adapter_model.safetensors``, which
    ``PeftModel.from_pretrained(base, path)`` and ``hf.load_model(path)`` open; the base
    weights are not copied); anything else as ``model.safetensors`` holding its
    ``state_dict`` (shared / tied tensors stored once, via ``safetensors.torch.save_model``).
    The folder is written under a temporary name and renamed into place, so ``path``
    holds either the previous checkpoint or the complete new one. A model with NaN/inf
    parameters is never saved (:class:`FloatingPointError`). ``state`` (JSON-able) is
    written next to the weights as ``trainer_state.json``. ``state_dict`` (the whole
    tensors, e.g. :func:`~.sharding.full_state_dict` of a sharded model) is written in
    place of the model's own, in the same format; a sharded model needs it.
    """
    path = Path(path)
    module = unwrap_model(model)
    kind = wrap_model(module).kind
    if state_dict is None and is_sharded(module):
        raise ValueError(
            "save_checkpoint got a sharded model without its gathered tensors; pass "
            "state_dict=full_state_dict(model) (called on every process) or save through "
            "the trainer's save_checkpoint"
        )
    if is_peft_model(module) and state_dict is not None:
        raise ValueError(
            "save_checkpoint: state_dict cannot be given for a PEFT (LoRA) model, which "
            "saves its adapter folder; call it without state_dict"
        )
    _check_finite_params(module.state_dict() if state_dict is None else state_dict)
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"checkpoint {path} already exists; pass overwrite_checkpoints=True or choose "
            "another output folder"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    # a write killed mid-way leaves a full model copy in a temp folder: remove it
    for stale in (
        *path.parent.glob(f".{path.name}.tmp-*"),
        *path.parent.glob(f".{path.name}.old-*"),
    ):
        if stale.is_dir() and not path.exists() and ".old-" in stale.name:
            os.replace(stale, path)  # killed between the two renames: the old one is valid
        else:
            shutil.rmtree(stale, ignore_errors=True)
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    tmp = path.parent / f".{path.name}.tmp-{tag}"
    old = path.parent / f".{path.name}.old-{tag}"
    try:
        tmp.mkdir()
        if is_peft_model(module):
            module.save_pretrained(str(tmp), safe_serialization=True)
        elif kind == "hf":
            import inspect

            kwargs = {}
            if "safe_serialization" in inspect.signature(module.save_pretrained).parameters:
                kwargs["safe_serialization"] = True  # transformers < 5; v5 always uses it
            if state_dict is not None:
                kwargs["state_dict"] = state_dict
            module.save_pretrained(tmp, **kwargs)
        elif state_dict is not None:
            save_file(_distinct(state_dict), str(tmp / SAFETENSORS_NAME))
        else:
            save_model(module, str(tmp / SAFETENSORS_NAME))
        if state is not None:
            (tmp / STATE_NAME).write_text(json.dumps(state, indent=2, default=float) + "\n")
        for f in (*tmp.rglob("*"), tmp):  # on disk before the rename makes it visible
            _fsync_path(f)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_path(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return path


def _distinct(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """``state_dict`` with a tensor that shares storage with an earlier key (a tied
    weight) left out and every tensor contiguous, as ``save_model`` stores them."""
    out: dict[str, Tensor] = {}
    seen: set[int] = set()
    for key, t in state_dict.items():
        ptr = t.data_ptr()
        if ptr in seen and t.numel() > 0:
            continue
        seen.add(ptr)
        out[key] = t.contiguous()
    return out


def _data_ptr(t: Tensor) -> int:
    """Where ``t``'s (local) data starts: equal for tied tensors, sharded or not."""
    return t.to_local().data_ptr() if hasattr(t, "to_local") else t.data_ptr()


def load_checkpoint(model: nn.Module, path: str | Path, *, strict: bool = True) -> nn.Module:
    """Load safetensors weights from a checkpoint folder (or ``.safetensors`` file) into
    ``model`` in place and return it. Never unpickles anything.

    An adapter folder (``adapter_config.json``, as :func:`save_checkpoint` writes for a
    PEFT model) loads into a PEFT model's adapters of the same names.

    Sharded Hugging Face checkpoints (``model-0000x-of-0000y.safetensors``) are merged.
    Keys absent from the file are accepted only when they are tied to a loaded tensor
    (e.g. an output head sharing the embedding); with ``strict`` any other missing or
    unexpected key raises :class:`ValueError`. A model sharded with
    :func:`~.sharding.shard_model` keeps its shards: every process must call this.
    """
    path = Path(path)
    if path.is_dir() and (path / ADAPTER_CONFIG_NAME).exists():
        _load_adapter_checkpoint(unwrap_model(model), path, strict=strict)
        return model
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            extra = (
                " (found pickle files: this loader never unpickles; re-save with safetensors)"
                if any(path.glob("*.bin")) or any(path.glob("*.pt"))
                else ""
            )
            raise FileNotFoundError(f"no .safetensors file in checkpoint folder {path}{extra}")
    elif path.is_file() and path.suffix == ".safetensors":
        files = [path]
    else:
        raise FileNotFoundError(
            f"{path} is neither a checkpoint folder nor a .safetensors file; pass the folder "
            "written by save_checkpoint()"
        )
    module = unwrap_model(model)
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    tensors: dict[str, Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f), device=str(device)))
    own_shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    for key, tensor in tensors.items():
        if key in own_shapes and tuple(tensor.shape) != own_shapes[key]:
            raise ValueError(
                f"checkpoint {path} does not match the model: {key} has shape "
                f"{tuple(tensor.shape)} in the checkpoint but {own_shapes[key]} in the model; "
                "load it into the architecture it was saved from"
            )
    if is_sharded(module):
        missing, unexpected = load_full_state_dict(module, tensors)
    else:
        missing, unexpected = module.load_state_dict(tensors, strict=False)
    if wrap_model(module).kind == "hf" and hasattr(module, "tie_weights"):
        module.tie_weights()
    if strict:
        own = module.state_dict()
        loaded_ptrs = {_data_ptr(own[k]) for k in tensors if k in own}
        really_missing = [k for k in missing if _data_ptr(own[k]) not in loaded_ptrs]
        if really_missing or unexpected:
            raise ValueError(
                f"checkpoint {path} does not match the model: missing keys {really_missing[:8]}"
                f", unexpected keys {list(unexpected)[:8]}; load it into the same "
                "architecture it was saved from (or pass strict=False)"
            )
    return model


def _load_adapter_checkpoint(module: nn.Module, path: Path, *, strict: bool) -> None:
    """Load the adapter folder ``path`` (PEFT's layout: the ``default`` adapter at the top,
    any other adapter in a subfolder of its name) into the PEFT model ``module``."""
    if not is_peft_model(module):
        raise ValueError(
            f"checkpoint {path} holds LoRA adapter weights ({ADAPTER_CONFIG_NAME}), but the "
            "model has no LoRA adapters; apply the same LoRA first (lora: in the model "
            "config, or hf.apply_lora) or open the folder with hf.load_model"
        )
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    for name in module.peft_config:
        folder = path if name == "default" else path / name
        weights = folder / ADAPTER_WEIGHTS_NAME
        if not weights.exists():
            if not strict:
                continue
            raise FileNotFoundError(
                f"checkpoint {path} has no {weights.relative_to(path)} for the model's adapter "
                f"{name!r} (pickled adapter files are never loaded); load it into the model "
                "it was saved from, or pass strict=False"
            )
        tensors = load_file(str(weights), device=str(device))
        own = set(get_peft_model_state_dict(module, adapter_name=name))
        missing, unexpected = sorted(own - set(tensors)), sorted(set(tensors) - own)
        if strict and (missing or unexpected):
            raise ValueError(
                f"checkpoint {path} does not match the model's adapter {name!r}: missing keys "
                f"{missing[:8]}, unexpected keys {unexpected[:8]}; load it into a model with "
                "the LoRA settings (target modules) it was saved with (or pass strict=False)"
            )
        try:
            set_peft_model_state_dict(module, tensors, adapter_name=name)
        except RuntimeError as exc:  # a shape mismatch (e.g. another LoRA rank)
            raise ValueError(
                f"checkpoint {path} does not match the model's adapter {name!r}: {exc}; load "
                "it into a model with the LoRA settings it was saved with"
            ) from exc


def prune_checkpoints(folder: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` ``checkpoint-<step>`` folders in ``folder``."""
    found = sorted(
        (p for p in folder.glob("checkpoint-*") if p.is_dir() and p.name.split("-")[-1].isdigit()),
        key=lambda p: int(p.name.split("-")[-1]),
    )
    for old in found[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
