"""The generation backend protocol, and the torch engine behind it.

A backend turns token-id prompts into sampled continuations with the
:class:`~.config.GenerationOutput` contract (rows grouped by prompt, EOS excluded, finish
reasons), gives next-token log-probabilities for the expected-score judge, serves new
weights after a training stage, and releases what it holds on :meth:`close`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from ..models import CausalLM, wrap_model
from ..utils import eval_mode, make_generator
from .config import GenerationConfig, GenerationOutput
from .engine import generate

__all__ = ["GenerationBackend", "TorchBackend", "as_backend", "is_backend"]


@runtime_checkable
class GenerationBackend(Protocol):
    """What every sampler offers.

    ``generator`` is a ``torch.Generator`` (its state advances, as the torch engine's does),
    an int seed, or None; a backend that seeds requests itself draws its seeds from it, so
    a run stays reproducible from one seed either way.
    """

    max_seq_len: int | None  # context length: prompt + max_new_tokens must fit, per row

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        config: GenerationConfig,
        *,
        generator: torch.Generator | int | None = None,
        decode: Callable[[Sequence[int]], str] | None = None,
        return_logprobs: bool = False,
        max_new_tokens_per_prompt: Sequence[int] | None = None,
        progress: bool = False,
    ) -> GenerationOutput: ...

    def next_token_logprobs(
        self, sequences: Sequence[Sequence[int]], token_ids: Sequence[Sequence[int]]
    ) -> list[list[float]]:
        """``out[i][j] = log p(token_ids[i][j] | sequences[i])`` (temperature 1, full vocab)."""
        ...

    def load_weights(self, checkpoint: str | Path) -> None:
        """Serve the weights saved in ``checkpoint`` (a stage's checkpoint folder)."""
        ...

    def close(self) -> None: ...


class TorchBackend:
    """The library's own KV-cache engine (:func:`~.engine.generate`) on a live model.

    The backend samples from the module it was given; when that module is the one being
    trained, new weights are seen as soon as they are written, so :meth:`load_weights`
    only loads a checkpoint into it when asked to serve a different one.
    """

    def __init__(self, model: nn.Module | CausalLM, **engine_kwargs: Any) -> None:
        self.lm = wrap_model(model)
        self.engine_kwargs = engine_kwargs  # token_budget, use_cache, share_prefix
        self.max_seq_len = self.lm.max_seq_len

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        config: GenerationConfig,
        *,
        generator: torch.Generator | int | None = None,
        decode: Callable[[Sequence[int]], str] | None = None,
        return_logprobs: bool = False,
        max_new_tokens_per_prompt: Sequence[int] | None = None,
        progress: bool = False,
    ) -> GenerationOutput:
        return generate(
            self.lm,
            prompts,
            config,
            generator=make_generator(generator, self.lm.device),
            decode=decode,
            return_logprobs=return_logprobs,
            max_new_tokens_per_prompt=max_new_tokens_per_prompt,
            progress=progress,
            **self.engine_kwargs,
        )

    @torch.no_grad()
    def next_token_logprobs(
        self, sequences: Sequence[Sequence[int]], token_ids: Sequence[Sequence[int]]
    ) -> list[list[float]]:
        if len(sequences) != len(token_ids):
            raise ValueError(f"{len(sequences)} sequences but {len(token_ids)} lists of token ids")
        if not sequences:
            return []
        # one right-padded forward for the whole call (the caller sizes the batch)
        device = self.lm.device
        width = max(len(seq) for seq in sequences)
        input_ids = torch.zeros(len(sequences), width, dtype=torch.long, device=device)
        mask = torch.zeros_like(input_ids)
        for b, seq in enumerate(sequences):
            input_ids[b, : len(seq)] = torch.tensor(list(seq), dtype=torch.long)
            mask[b, : len(seq)] = 1
        with eval_mode(self.lm):
            logits = self.lm(input_ids, attention_mask=mask)
        last = logits[torch.arange(len(sequences), device=device), mask.sum(1) - 1].float()
        logprobs = torch.log_softmax(last, dim=-1)
        return [logprobs[b, list(ids)].tolist() for b, ids in enumerate(token_ids)]

    def load_weights(self, checkpoint: str | Path) -> None:
        from ..trainers.checkpoint import load_checkpoint

        load_checkpoint(self.lm.module, checkpoint)

    def close(self) -> None:
        """Nothing to release: the module belongs to the caller."""


def is_backend(obj: Any) -> bool:
    """Whether ``obj`` is a generation backend (and not a model to wrap in one)."""
    return isinstance(obj, GenerationBackend) and not isinstance(obj, nn.Module)


def as_backend(model_or_backend: Any, **engine_kwargs: Any) -> GenerationBackend:
    """A backend as given, or a :class:`TorchBackend` over a model."""
    if is_backend(model_or_backend):
        return model_or_backend
    return TorchBackend(model_or_backend, **engine_kwargs)
