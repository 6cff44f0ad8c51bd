"""Which backend samples each stage of a run: the run's ``generation`` choice merged with a
stage's own ``generation:``, built once per run (:class:`~..generation.selection.BackendPool`)
and kept serving the policy's latest weights."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from torch import nn

from ..config import ConfigError
from ..generation import GenerationBackend
from ..generation.selection import (
    BackendConfig,
    BackendPool,
    merge_generation,
    resolve_backend,
)
from .stages import SAMPLING_STAGES, Stage
from .steps import save_policy

__all__ = ["StageSamplers"]


class StageSamplers:
    """The run's sampling backends. ``backend`` is the run's choice (a name, a
    :class:`BackendConfig` or a ready backend); ``torch_backend()`` the torch engine over the
    live policy; ``model_path`` the Hugging Face folder the policy was loaded from, unchanged
    (where a vLLM engine starts while nothing is trained)."""

    def __init__(
        self,
        backend: Any,
        *,
        torch_backend: Callable[[], GenerationBackend],
        model: nn.Module,
        tokenizer: Any,
        accelerator: Callable[[], Any],
        run_dir: Path,
        model_path: str | Path | None = None,
    ) -> None:
        self.generation = resolve_backend(backend)
        self.torch_backend = torch_backend
        self.model, self.tokenizer, self.accelerator = model, tokenizer, accelerator
        self.run_dir = run_dir
        self.model_path = None if model_path is None else Path(model_path)
        self.weights: Path | None = None  # the latest stage checkpoint
        given = None if isinstance(self.generation, BackendConfig) else self.generation
        self.pool = BackendPool(
            torch_backend(),
            model=model,
            tokenizer=tokenizer,
            weights=self.current_weights,
            cache_dir=lambda name: run_dir / "http-cache" / name,
            given=given,
        )

    def config_of(self, stage: Stage, name: str) -> BackendConfig | GenerationBackend | None:
        """The backend config (or the given backend) a sampling stage samples the policy
        with (its ``generation:`` over the run's); ``None`` for a stage that does not sample."""
        if not isinstance(stage, SAMPLING_STAGES):
            return None
        if not stage.generation:
            return self.generation
        base = self.generation if isinstance(self.generation, BackendConfig) else BackendConfig()
        try:
            return merge_generation(base, stage.generation)
        except ConfigError as exc:
            raise ConfigError(f"stage {name}: {exc}") from exc

    def sampler(self, stage: Stage, name: str, folder: str) -> GenerationBackend:
        """The backend that samples the policy for ``stage`` (built on first use; an OpenAI
        backend of a stage's own ``generation:`` caches its requests under ``folder``)."""
        config = self.config_of(stage, name)
        if not isinstance(config, BackendConfig):
            return self.pool.get(None, name)
        if config.backend == "torch":
            return self.torch_backend()  # the live policy (an attribute callers may replace)
        same = config == self.generation or not stage.generation
        return self.pool.get(config, "generation" if same else folder)

    def current_weights(self) -> Path:
        """A Hugging Face folder of the policy as it is now: the latest stage checkpoint,
        else ``model_path``, else the policy written once to ``<run>/policy-initial``."""
        if self.weights is not None:
            return self.weights
        if self.model_path is not None:
            return self.model_path
        folder = self.run_dir / "policy-initial"
        if not any(folder.glob("*.safetensors")):  # the same on every rank: written once
            save_policy(self.model, self.tokenizer, self.accelerator(), folder)
        return folder

    def trained(self, checkpoint: Path) -> None:
        """A stage wrote ``checkpoint``: the policy's backends serve it before they sample."""
        self.weights = checkpoint
        self.pool.trained(checkpoint)
