"""Frozen earlier models of a run, by reference: ``"initial"`` (the weights the run
started with) or the name of a finished stage (its checkpoint). A preference stage's
``rejected_from`` samples its anchor responses from one, ``judge_model`` judges with
one; :class:`Snapshots` loads each once into a frozen copy of the policy and frees it
when no later stage needs it."""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from torch import nn

from ..config import ConfigError
from ..generation import TorchBackend
from ..generation.selection import BackendConfig
from ..models import CausalLM, wrap_model
from ..trainers.checkpoint import load_checkpoint
from .stages import PreferenceStage, SFTStage, SPINStage, Stage

__all__ = [
    "INITIAL",
    "POLICY",
    "Snapshots",
    "capture_base",
    "check_references",
    "check_support",
    "needs_base",
    "policy_reference",
    "references",
]

#: the live policy (no snapshot)
POLICY = "policy"
#: the weights the run started with
INITIAL = "initial"
#: the stages that write a checkpoint (the ones a reference may name)
_TRAINING = (SFTStage, SPINStage, PreferenceStage)


def references(stage: Stage) -> set[str]:
    """The frozen models a stage names (``rejected_from``, a self judge's ``judge_model``)."""
    if not isinstance(stage, PreferenceStage):
        return set()
    refs = {stage.rejected_from, stage.judge_model if stage.judge == "self" else POLICY}
    return refs - {POLICY}


def _may_freeze(stage: Stage) -> bool:
    health = getattr(stage, "judge_health", None)
    return health is not None and health.action == "freeze"


def needs_base(stages: Sequence[Stage]) -> bool:
    """Whether a run needs the weights it started with kept (SFT ``init: base``, a
    reference to ``"initial"``, or a judge that may be frozen to them)."""
    return any(
        (isinstance(s, SFTStage) and s.init == "base") or INITIAL in references(s) or _may_freeze(s)
        for s in stages
    )


def capture_base(model: nn.Module) -> dict[str, torch.Tensor]:
    """The trainable weights of ``model`` as they are now, on CPU (frozen ones, e.g. a
    LoRA model's base, never change)."""
    return {
        k: p.detach().to("cpu", copy=True) for k, p in model.named_parameters() if p.requires_grad
    }


def check_references(stages: Sequence[Stage], names: Sequence[str], pre: str, at: Callable) -> None:
    """Each reference must be ``"policy"``, ``"initial"`` or an earlier stage that writes a
    checkpoint; ``judge_model`` needs the self judge. ``at(i, name, key)`` names a key the
    way the user wrote it; ``pre`` prefixes the message."""
    for i, (stage, name) in enumerate(zip(stages, names)):
        if not isinstance(stage, PreferenceStage):
            continue
        if stage.judge_model != POLICY and stage.judge != "self":
            raise ConfigError(
                f"{pre}{at(i, name, 'judge_model')}: {stage.judge_model!r} chooses the weights "
                f"the self judge samples with, but this stage's judge is {stage.judge!r}; "
                "remove judge_model or judge with judge: self"
            )
        for key in ("rejected_from", "judge_model"):
            ref = getattr(stage, key)
            if ref in (POLICY, INITIAL):
                continue
            earlier = [n for s, n in zip(stages[:i], names[:i]) if isinstance(s, _TRAINING)]
            if ref in earlier:
                continue
            if ref in names[i:]:
                problem = "is this stage or a later one, which has not finished when this one runs"
            elif ref in names:
                problem = "trains nothing, so it has no checkpoint"
            else:
                problem = "is not a stage of this plan"
            raise ConfigError(
                f"{pre}{at(i, name, key)}: {ref!r} {problem}; use {POLICY!r}, {INITIAL!r} or "
                f"an earlier training stage ({', '.join(map(repr, earlier)) or 'none'})"
            )


def check_support(
    stages: Sequence[Stage], names: Sequence[str], sharded: bool, config_of: Callable
) -> None:
    """Refuse frozen models where they are not supported: a sharded policy, or a stage
    that samples with another backend than torch (``config_of(stage, name)``: its
    backend config or given backend)."""
    for stage, name in zip(stages, names):
        if not (references(stage) or _may_freeze(stage)):
            continue
        what = "rejected_from / judge_model / judge_health.action: freeze"
        if sharded:
            raise ConfigError(
                f"stage {name}: {what} sample a frozen copy of the whole policy, which a "
                "sharded run (shard_parameters) does not hold; run without shard_parameters "
                "or remove these keys"
            )
        config = config_of(stage, name)
        backend = config.backend if isinstance(config, BackendConfig) else type(config).__name__
        if backend not in ("torch", "TorchBackend"):
            raise ConfigError(
                f"stage {name}: {what} sample frozen models with the torch engine, so the "
                f"stage's candidates must come from it too, but it samples with {backend!r}; "
                "set the stage's generation: {backend: torch} or remove these keys"
            )


def policy_reference(names: Sequence[str], finished: dict[str, dict], index: int) -> str:
    """The reference of the weights the policy holds when stage ``index`` starts: the
    latest earlier stage with a checkpoint, else ``"initial"``."""
    for name in reversed(names[:index]):
        if finished.get(name, {}).get("checkpoint"):
            return name
    return INITIAL


class Snapshots:
    """Frozen copies of the policy at earlier references, each loaded once (deep copy of
    ``model`` + the weights; eval mode, no gradients) and sampled with a TorchBackend."""

    def __init__(
        self, model: nn.Module, base_weights: Callable[[], dict | None], run_dir: Path
    ) -> None:
        self.model, self.base_weights, self.run_dir = model, base_weights, run_dir
        self._loaded: dict[str, CausalLM] = {}

    def lm(self, ref: str, finished: dict[str, dict]) -> CausalLM:
        """The frozen model of ``ref`` (``finished``: the run's finished stage records)."""
        if ref not in self._loaded:
            frozen = copy.deepcopy(self.model)
            if ref == INITIAL:
                base = self.base_weights()
                if base is None:  # needs_base() decides the capture: a bug if reached
                    raise RuntimeError("the run's initial weights were not kept")
                frozen.load_state_dict(base, strict=False)
            else:
                checkpoint = finished.get(ref, {}).get("checkpoint")
                if not checkpoint:
                    raise RuntimeError(
                        f"stage {ref} has not finished with a checkpoint, so its model "
                        "cannot be loaded; run the stages before it first"
                    )
                load_checkpoint(frozen, self.run_dir / checkpoint)
            frozen.requires_grad_(False)
            frozen.eval()
            self._loaded[ref] = wrap_model(frozen)
        return self._loaded[ref]

    def backend(self, ref: str, finished: dict[str, dict]) -> TorchBackend:
        """A torch backend sampling the frozen model of ``ref``."""
        return TorchBackend(self.lm(ref, finished))

    def release(self, keep: set[str]) -> None:
        """Free every loaded model not in ``keep``."""
        for ref in list(self._loaded):
            if ref not in keep:
                del self._loaded[ref]

    def keep_for(self, later: Sequence[Stage]) -> set[str]:
        """The references the ``later`` stages may still need (every loaded one while a
        later stage may freeze its judge)."""
        if any(_may_freeze(s) for s in later):
            return set(self._loaded)
        return set().union(*(references(s) for s in later)) if later else set()
