"""Token sampling: logit filters (temperature, top-k, top-p, min-p), one sampling step, and
the one-row-at-a-time reference decoder the engine is tested against."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import Tensor, nn

from ..models import wrap_model
from ..utils import eval_mode
from .config import GenerationConfig, GenerationOutput, _eos_set

__all__ = ["filter_logits", "reference_generate", "sample_next"]


def filter_logits(
    logits: Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 0,
    top_p: float = 1.0,
    min_p: float = 0.0,
) -> Tensor:
    """Return ``logits / temperature`` with filtered-out tokens set to ``-inf``.

    ``logits`` is ``(batch, vocab)``.  Top-k keeps the ``k`` largest logits (ties with the
    k-th are kept); top-p (nucleus, Holtzman et al. 2020) keeps the smallest set of most
    likely tokens whose probability sums to at least ``p``; min-p keeps tokens whose
    probability is at least ``min_p`` times the largest one.  The most likely token is
    always kept.  ``temperature`` must be > 0 here (greedy decoding does not filter).
    """
    if temperature <= 0:
        raise ValueError(f"filter_logits needs temperature > 0, got {temperature}")
    x = logits.float() / temperature if temperature != 1.0 else logits.float()
    vocab = x.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(x, top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, float("-inf"))
    if top_p < 1.0:
        sorted_x, order = torch.sort(x, dim=-1, descending=True)
        probs = torch.softmax(sorted_x, dim=-1)
        mass_before = torch.cumsum(probs, dim=-1) - probs  # mass of strictly more likely tokens
        drop_sorted = mass_before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        x = x.masked_fill(drop, float("-inf"))
    if min_p > 0.0:
        probs = torch.softmax(x, dim=-1)
        threshold = probs.amax(dim=-1, keepdim=True) * min_p
        x = x.masked_fill(probs < threshold, float("-inf"))
    return x


def sample_next(
    logits: Tensor,
    config: GenerationConfig,
    generator: torch.Generator | None = None,
    *,
    need_logprobs: bool = True,
) -> tuple[Tensor, Tensor | None]:
    """Pick one token per row of ``logits`` ``(batch, vocab)``.

    Returns ``(tokens, logprobs)`` where ``logprobs`` is log softmax of the raw logits
    (temperature 1, unfiltered) at the chosen tokens, or ``None`` when not needed.
    """
    if config.temperature == 0:
        tokens = logits.argmax(dim=-1)
    else:
        x = filter_logits(
            logits,
            temperature=config.temperature,
            top_k=config.top_k,
            top_p=config.top_p,
            min_p=config.min_p,
        )
        probs = torch.softmax(x, dim=-1)
        tokens = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    if not need_logprobs:
        return tokens, None
    lp = torch.log_softmax(logits.float(), dim=-1).gather(-1, tokens[:, None]).squeeze(-1)
    return tokens, lp


def _sample(
    logits: Tensor, config: GenerationConfig, generator: torch.Generator | None
) -> tuple[Tensor, Tensor]:
    """Reference sampler used by :func:`reference_generate`."""
    tokens, lp = sample_next(logits, config, generator)
    assert lp is not None
    return tokens, lp


# ====================================================================== reference loop


@torch.no_grad()
def reference_generate(
    model: nn.Module,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig | None = None,
    *,
    generator: torch.Generator | None = None,
    decode: Callable[[Sequence[int]], str] | None = None,
    **overrides: Any,
) -> GenerationOutput:
    """One row at a time, full forward pass per token: the obviously-correct reference."""
    config = replace(config or GenerationConfig(), **overrides)
    lm = wrap_model(model)
    eos = _eos_set(config.eos_token_id)
    sequences, reasons, logprobs = [], [], []
    device = lm.device
    with eval_mode(lm):
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
