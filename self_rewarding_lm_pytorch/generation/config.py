"""Generation settings and output, their checks, and the one context rule (:func:`response_budget`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..models import CausalLM
from ..utils import with_overrides

__all__ = ["GenerationConfig", "GenerationOutput", "response_budget"]


@dataclass
class GenerationConfig:
    """Sampling settings. ``temperature == 0`` means greedy decoding.

    Filters apply in the order temperature, top-k, top-p, min-p (each on the distribution
    left by the previous one); ``top_k == 0``, ``top_p == 1`` and ``min_p == 0`` disable them.
    """

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
    """New tokens per returned row, grouped by prompt: row ``i * num_return_sequences + j``
    is the ``j``-th sample of prompt ``i``.

    The EOS token is excluded.  A row stopped by a stop string ends with the token that
    completed it (token boundaries need not match the string's; :func:`generate_text`
    cuts the decoded text at the stop string).  ``logprobs[r][t]`` is the model's
    log-probability of token ``t`` (temperature 1, before filters).
    """

    sequences: list[list[int]]
    finish_reasons: list[str]  # "eos", "stop" or "length"
    logprobs: list[list[float]] | None = None


def _eos_set(eos: int | Sequence[int] | None) -> set[int]:
    if eos is None:
        return set()
    if isinstance(eos, int):
        return {eos}
    return {int(e) for e in eos}


_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(GenerationConfig))


def _resolve_config(config: GenerationConfig | None, overrides: dict[str, Any]) -> GenerationConfig:
    cfg = with_overrides(GenerationConfig, config, overrides, owner="generate")
    if cfg.stop_strings is None:
        cfg.stop_strings = ()
    elif isinstance(cfg.stop_strings, str):
        cfg.stop_strings = (cfg.stop_strings,)
    _check_config(cfg)
    return cfg


def _check_config(cfg: GenerationConfig) -> None:
    def is_int(v: Any) -> bool:
        return isinstance(v, int) and not isinstance(v, bool)

    if not is_int(cfg.max_new_tokens) or cfg.max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {cfg.max_new_tokens!r}")
    if not is_int(cfg.num_return_sequences) or cfg.num_return_sequences < 1:
        raise ValueError(
            f"num_return_sequences must be an int >= 1, got {cfg.num_return_sequences!r}"
        )
    t = cfg.temperature
    if not isinstance(t, (int, float)) or not math.isfinite(t) or t < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}")
    if not isinstance(cfg.top_p, (int, float)) or not 0 < cfg.top_p <= 1:
        raise ValueError(f"top_p must lie in (0, 1] (1 disables it), got {cfg.top_p!r}")
    if not is_int(cfg.top_k) or cfg.top_k < 0:
        raise ValueError(f"top_k must be an int >= 0 (0 disables it), got {cfg.top_k!r}")
    if not isinstance(cfg.min_p, (int, float)) or not 0 <= cfg.min_p < 1:
        raise ValueError(f"min_p must lie in [0, 1) (0 disables it), got {cfg.min_p!r}")
    eos = cfg.eos_token_id
    ids = [eos] if isinstance(eos, int) else ([] if eos is None else list(eos))
    if any(not is_int(e) or e < 0 for e in ids):
        raise ValueError(f"eos_token_id must be None, an int >= 0 or a list of them, got {eos!r}")
    if any(not isinstance(s, str) or not s for s in cfg.stop_strings):
        raise ValueError(f"stop_strings must be non-empty strings, got {list(cfg.stop_strings)!r}")


def response_budget(
    prompt_len: int,
    max_new_tokens: int,
    context: int | None,
    *,
    cap: bool = False,
    where: str = "the prompt",
    context_name: str = "the model's context (max_seq_len)",
    fix: str = "shorten the prompt or lower max_new_tokens",
) -> int:
    """The number of new tokens a row may generate: the one context rule of the library.

    A row of ``prompt_len`` tokens and its response must fit ``context`` positions:
    ``prompt_len + budget <= context`` (no limit when ``context`` is None). With
    ``cap=False`` the budget is ``max_new_tokens`` and a row that does not fit raises; with
    ``cap=True`` the budget is lowered to what fits, and only a prompt that leaves no room
    for a single token raises. Errors start with ``where`` (name the row by its index in
    its dataset, e.g. ``"stage 02-self-reward-dpo, dataset 'prompts': prompt 9"``) and end
    with ``fix``.
    """
    if context is None:
        return max_new_tokens
    room = context - prompt_len
    if cap:
        if room < 1:
            raise ValueError(
                f"{where} is {prompt_len} tokens long, which leaves no room for a response "
                f"within {context_name} of {context} tokens; {fix}"
            )
        return min(max_new_tokens, room)
    if max_new_tokens > room:
        raise ValueError(
            f"{where} is {prompt_len} tokens long; with max_new_tokens={max_new_tokens} it "
            f"needs {prompt_len + max_new_tokens} positions, more than {context_name} of "
            f"{context}; {fix}"
        )
    return max_new_tokens


def _per_prompt_limits(
    prompts: Any, cfg: GenerationConfig, per_prompt: Sequence[int] | None
) -> list[int]:
    n = len(prompts) if hasattr(prompts, "__len__") else 0
    if per_prompt is None:
        return [cfg.max_new_tokens] * n
    limits = list(per_prompt)
    if len(limits) != n or any(
        not isinstance(m, int) or isinstance(m, bool) or m < 0 for m in limits
    ):
        raise ValueError(
            f"max_new_tokens_per_prompt must hold one int >= 0 per prompt ({n} prompts), "
            f"got {per_prompt!r}"
        )
    return limits


def _check_prompts(
    prompts: Sequence[Sequence[int]], lm: CausalLM, max_new: Sequence[int]
) -> list[list[int]]:
    if isinstance(prompts, Tensor):
        if prompts.ndim != 2:
            raise ValueError(
                f"a tensor of prompts must be 2-D (batch, seq), got shape {tuple(prompts.shape)}; "
                "pass ragged prompts as a list of lists of token ids"
            )
        prompts = list(prompts)
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence):
        raise TypeError(
            "prompts must be a list of token-id lists (use generate_text for strings), "
            f"got {type(prompts).__name__}"
        )
    out: list[list[int]] = []
    vocab, ctx = lm.vocab_size, lm.max_seq_len
    for i, p in enumerate(prompts):
        if isinstance(p, Tensor):
            if p.ndim != 1 or p.is_floating_point() and not torch.equal(p, p.round()):
                raise ValueError(f"prompt {i} must be a 1-D tensor of integer token ids")
            ids = p.long().tolist()
        elif isinstance(p, (str, bytes)) or not isinstance(p, Sequence):
            raise TypeError(
                f"prompt {i} must be a list of int token ids, got {type(p).__name__}; "
                "encode text first or use generate_text"
            )
        else:
            ids = list(p)
            if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
                raise TypeError(f"prompt {i} must contain only int token ids")
        if not ids:
            raise ValueError(
                f"prompt {i} is empty; a causal LM needs at least one token to condition on "
                "(e.g. a BOS id)"
            )
        if min(ids) < 0 or (vocab is not None and max(ids) >= vocab):
            raise ValueError(
                f"prompt {i} has token ids outside [0, {vocab}) (min {min(ids)}, max {max(ids)}); "
                "a tokenizer/model vocabulary mismatch or a negative pad id"
            )
        response_budget(len(ids), max_new[i], ctx, where=f"prompt {i}")
        out.append(ids)
    return out
