"""Parameter-sharded training with torch's FSDP2 (``fully_shard``, FULL_SHARD semantics).

:func:`shard_model` shards a model's parameters across the processes of the default
process group (each decoder layer its own unit, then the root), so every process holds
about ``1 / world_size`` of every parameter. The trainers accept such a model as it is
(they do not wrap it in DDP; FSDP2 reduces the gradients). :func:`is_sharded` tells
whether a model holds FSDP2 modules, :func:`full_state_dict` gathers the whole state
dict (all ranks take part, rank 0 receives it, on CPU), :func:`gathered` keeps the full
parameters on every rank for a block of forwards that the ranks do not run in lockstep
(generation, evaluation on one rank), and :func:`check_equal_batches` refuses loaders
that would give the ranks different numbers of forwards (which would hang FSDP's
collectives).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn

from ..models import CausalLM, is_peft_model, unwrap_model

__all__ = ["check_equal_batches", "full_state_dict", "gathered", "is_sharded", "shard_model"]

_warned_gathered = False


def _fsdp_modules(model: nn.Module) -> list[nn.Module]:
    from torch.distributed.fsdp import FSDPModule

    return [m for m in model.modules() if isinstance(m, FSDPModule)]


def is_sharded(model: nn.Module) -> bool:
    """True when ``model`` (or a module inside it) is sharded with FSDP2 ``fully_shard``."""
    return bool(_fsdp_modules(model))


def _has_params(module: nn.Module | None) -> bool:
    return module is not None and any(True for _ in module.parameters())


def _units(module: nn.Module) -> list[nn.Module]:
    """``module``, or the modules with parameters inside it when it is a container
    without a forward of its own (``fully_shard`` needs a forward)."""
    if isinstance(module, (nn.ModuleList, nn.ModuleDict)):
        return [u for c in module.children() if _has_params(c) for u in _units(c)]
    return [module]


def _decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The repeated blocks of ``model``: the classes a Hugging Face model names in
    ``_no_split_modules``, else the entries of its longest ``nn.ModuleList`` of blocks
    with parameters (x-transformers' ``attn_layers.layers``: there the attention and
    feed-forward modules inside each entry, most hand-written stacks)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    if names:
        found = [m for m in model.modules() if type(m).__name__ in names and m is not model]
        if found:
            return found
    best: list[nn.Module] = []
    for m in model.modules():
        if isinstance(m, nn.ModuleList) and len(m) > len(best) and all(map(_has_params, m)):
            best = list(m)
    return [u for m in best for u in _units(m)]


def shard_model(
    model: nn.Module, *, mesh: Any = None, reshard_after_forward: bool = True
) -> nn.Module:
    """Shard ``model`` in place with FSDP2 ``fully_shard`` and return it.

    Each decoder layer (see :func:`_decoder_layers`) becomes one FSDP unit, then the root
    takes the remaining parameters (embeddings, final norm, output head). Needs an
    initialised process group (e.g. ``torchrun`` and ``torch.distributed.init_process_group``
    or an ``accelerate.Accelerator``); ``mesh`` defaults to all processes in one
    dimension. Every process must build the same model (same seed or checkpoint) before
    sharding. ``reshard_after_forward=False`` keeps the layers' full parameters from the
    forward to the backward (ZeRO-2-like memory, fewer all-gathers).
    """
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    if isinstance(model, CausalLM) or unwrap_model(model) is not model:
        raise TypeError(
            f"shard_model needs the bare model, got a {type(model).__name__} wrapper; pass "
            "unwrap_model(model) and give the trainer the sharded module"
        )
    if is_peft_model(model):
        raise ValueError(
            "shard_model does not support PEFT (LoRA) models; LoRA adapters are small, so "
            "train them with plain data parallelism (no shard_model)"
        )
    if is_sharded(model):
        raise ValueError("the model is already sharded (fully_shard was applied to it)")
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError(
            "shard_model needs an initialised process group: start the processes with "
            "torchrun (or accelerate launch) and create an accelerate.Accelerator (or call "
            "torch.distributed.init_process_group) before sharding"
        )
    if mesh is None:
        from torch.distributed.device_mesh import init_device_mesh

        device = next((p.device for p in model.parameters()), torch.device("cpu"))
        mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for layer in _decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The whole state dict of a sharded ``model``, gathered on CPU: rank 0 receives every
    tensor, the other ranks an empty dict. Every rank must call it (it all-gathers)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)


def load_full_state_dict(
    model: nn.Module, state_dict: dict[str, Tensor]
) -> tuple[list[str], list[str]]:
    """Load full (unsharded) tensors into a sharded ``model``, each rank keeping its shard;
    returns ``(missing, unexpected)`` keys. Every rank must call it with the same tensors."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    options = StateDictOptions(full_state_dict=True, strict=False)
    keys = set_model_state_dict(model, dict(state_dict), options=options)
    return list(keys.missing_keys), list(keys.unexpected_keys)


def _reshard_settings(module: nn.Module) -> tuple[Any, list[Any]]:
    # FSDP2 has a setter for reshard_after_forward but no getter: the state is read (and
    # restored) from its parameter groups, which is exactly what the setter writes
    state = module._get_fsdp_state()  # type: ignore[operator]
    groups = state._fsdp_param_groups
    return state._auto_reshard_after_forward, [g.post_forward_mesh_info for g in groups]


def _restore_reshard_settings(module: nn.Module, saved: tuple[Any, list[Any]]) -> None:
    state = module._get_fsdp_state()  # type: ignore[operator]
    state._auto_reshard_after_forward = saved[0]
    for group, info in zip(state._fsdp_param_groups, saved[1]):
        group.post_forward_mesh_info = info


@contextlib.contextmanager
def gathered(model: nn.Module) -> Iterator[None]:
    """Inside the block every rank holds ``model``'s full parameters, and its forwards run
    without collectives, so ranks may run different numbers of them (generation with
    its own stopping, an evaluation on the main process only). Every rank must enter
    and leave the block. Not sharded: does nothing. For use without gradients."""
    modules = _fsdp_modules(model)
    if not modules:
        yield
        return
    global _warned_gathered
    if not _warned_gathered:
        _warned_gathered = True
        warnings.warn(
            "a sharded model is gathered whole on every rank to generate or evaluate: this "
            "needs the memory of the full model on each process and decodes with the torch "
            "backend, which is slow; for large models generate with the vLLM backend "
            "(generation.vllm.VLLMBackend, see docs/backends.md)",
            stacklevel=3,
        )
    saved = [_reshard_settings(m) for m in modules]
    try:
        for m in modules:
            m.set_reshard_after_forward(False, recurse=False)  # type: ignore[operator]
            m.unshard()  # type: ignore[operator]
        yield
    finally:
        for m, s in zip(modules, saved):
            m.reshard()  # type: ignore[operator]
            _restore_reshard_settings(m, s)


def check_equal_batches(loader: Any, accelerator: Any, what: str) -> None:
    """Raise :class:`ValueError` on every rank unless ``loader`` gives each rank the same
    number of batches (a sharded model runs collectives in every forward, so a rank with
    an extra batch would wait for the others forever)."""
    if accelerator.num_processes <= 1:
        return
    mine = torch.tensor([len(loader)], device=accelerator.device)
    counts = [int(c) for c in accelerator.gather(mine).tolist()]
    if len(set(counts)) > 1:
        raise ValueError(
            f"{what}: the processes got different numbers of batches {counts} from the data "
            "loader; a sharded model needs the same number on every process. Keep "
            "accelerate's even_batches=True (its default: DataLoaderConfiguration("
            "even_batches=True)), or do not shard the model"
        )
