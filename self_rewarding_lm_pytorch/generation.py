"""Batched sampling from any :class:`~self_rewarding_lm_pytorch.models.CausalLM`.

PLACEHOLDER ENGINE: this file currently holds the public signature and a correct but
slow reference loop. The fast engine (KV cache, micro-batching, prefix reuse) replaces
the body of :func:`generate` while keeping its signature and outputs.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace

import torch
from torch import Tensor, nn

from .models import CausalLM, wrap_model

__all__ = ["GenerationConfig", "GenerationOutput", "generate", "reference_generate"]


@dataclass
class GenerationConfig:
    """Sampling settings. ``temperature == 0`` means greedy decoding."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    eos_token_id: int | Sequence[int] | None = None
    stop_strings: Sequence[str] = field(default_factory=tuple)
    num_return_sequences: int = 1


@dataclass
class GenerationOutput:
    """New tokens per returned row (EOS and stop strings excluded), grouped by prompt:
    row ``i * num_return_sequences + j`` is the ``j``-th sample of prompt ``i``."""

    sequences: list[list[int]]
    finish_reasons: list[str]  # "eos", "stop" or "length"
    logprobs: list[list[float]] | None = None


def _eos_set(eos: int | Sequence[int] | None) -> set[int]:
    if eos is None:
        return set()
    if isinstance(eos, int):
        return {eos}
    return {int(e) for e in eos}


@torch.no_grad()
def reference_generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig | None = None,
    *,
    generator: torch.Generator | None = None,
    decode: Callable[[Sequence[int]], str] | None = None,
    **overrides,
) -> GenerationOutput:
    """One row at a time, full forward pass per token: the obviously-correct reference."""
    config = replace(config or GenerationConfig(), **overrides)
    lm = wrap_model(model)
    eos = _eos_set(config.eos_token_id)
    sequences, reasons, logprobs = [], [], []
    device = lm.device
    for prompt in prompts:
        for _ in range(config.num_return_sequences):
            ids = list(prompt)
            new: list[int] = []
            lps: list[float] = []
            reason = "length"
            for _ in range(config.max_new_tokens):
                logits = lm(torch.tensor([ids], device=device))[0, -1].float()
                token, lp = _sample(logits[None], config, generator)
                token, lp = int(token[0]), float(lp[0])
                if token in eos:
                    reason = "eos"
                    break
                new.append(token)
                lps.append(lp)
                ids.append(token)
                if decode is not None and config.stop_strings:
                    text = decode(new)
                    if any(s in text for s in config.stop_strings):
                        reason = "stop"
                        break
            sequences.append(new)
            reasons.append(reason)
            logprobs.append(lps)
    return GenerationOutput(sequences, reasons, logprobs)


def _sample(
    logits: Tensor, config: GenerationConfig, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Pick one token per row of ``logits`` (batch, vocab); returns (tokens, log-probs)."""
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    if config.temperature == 0:
        tokens = logits.argmax(dim=-1)
    else:
        probs = torch.softmax(logits.float() / config.temperature, dim=-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def generate(
    model: nn.Module | CausalLM,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig | None = None,
    *,
    generator: torch.Generator | None = None,
    decode: Callable[[Sequence[int]], str] | None = None,
    return_logprobs: bool = False,
    **overrides,
) -> GenerationOutput:
    """Sample continuations of token-id ``prompts`` (ragged lengths allowed)."""
    out = reference_generate(model, prompts, config, generator=generator, decode=decode, **overrides)
    if not return_logprobs:
        out.logprobs = None
    return out
