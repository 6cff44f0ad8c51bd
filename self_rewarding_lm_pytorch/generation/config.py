"""Generation settings and output, their checks, and the one context rule (:func:`response_budget`)."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from ..config import ConfigError
from ..models import CausalLM
from ..utils import with_overrides

__all__ = ["GenerationConfig", "GenerationOutput", "response_budget"]


@dataclass
class GenerationConfig:
    """Sampling settings. ``temperature == 0`` means greedy decoding.

    Filters apply in the order temperature, top-k, top-p, min-p (each on the distribution
    left by the previous one); ``top_k == 0``, ``top_p == 1`` and ``min_p == 0`` disable them.
    """

    max_new_tokens: int = field(default=128, metadata={"help": "new tokens per row at most"})
    temperature: float = field(default=1.0, metadata={"help": "sampling temperature (0: greedy)"})
    top_p: float = field(default=1.0, metadata={"help": "nucleus top-p (1 disables it)"})
    top_k: int = field(default=0, metadata={"help": "keep the k most likely tokens (0: all)"})
    min_p: float = field(
        default=0.0, metadata={"help": "keep tokens with p >= min_p * max p (0 disables it)"}
    )
    eos_token_id: int | Sequence[int] | None = field(
        default=None, metadata={"help": "token id(s) that end a row (excluded from the output)"}
    )
    stop_strings: Sequence[str] = field(
        default_factory=tuple, metadata={"help": "strings that end a row (kept in the output)"}
    )
    num_return_sequences: int = field(default=1, metadata={"help": "samples per prompt"})

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the setting, the problem and the allowed values."""

        def is_int(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        n, k = self.max_new_tokens, self.num_return_sequences
        need(is_int(n) and n >= 0, f"max_new_tokens must be an int >= 0, got {n!r}")
        need(is_int(k) and k >= 1, f"num_return_sequences must be an int >= 1, got {k!r}")
        t = self.temperature
        need(
            isinstance(t, (int, float)) and math.isfinite(t) and t >= 0,
            f"temperature must be a finite number >= 0 (0 = greedy), got {t!r}",
        )
        need(
            isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1,
            f"top_p must lie in (0, 1] (1 disables it), got {self.top_p!r}",
        )
        need(
            is_int(self.top_k) and self.top_k >= 0,
            f"top_k must be an int >= 0 (0 disables it), got {self.top_k!r}",
        )
        need(
            isinstance(self.min_p, (int, float)) and 0 <= self.min_p < 1,
            f"min_p must lie in [0, 1) (0 disables it), got {self.min_p!r}",
        )
        eos = self.eos_token_id
        ids = [eos] if isinstance(eos, int) else ([] if eos is None else list(eos))
        need(
            all(is_int(e) and e >= 0 for e in ids),
            f"eos_token_id must be None, an int >= 0 or a list of them, got {eos!r}",
        )
        need(
            all(isinstance(s, str) and s for s in self.stop_strings),
            f"stop_strings must be non-empty strings, got {list(self.stop_strings)!r}",
        )


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
    cfg.validate()
    return cfg


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


def prepare_request(
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig | None,
    overrides: dict[str, Any],
    max_new_tokens_per_prompt: Sequence[int] | None,
    model: Any,
    decode: Callable[[Sequence[int]], str] | None,
) -> tuple[GenerationConfig, list[list[int]], list[int]]:
    """What every backend checks before it samples, settings first: the settings
    (``config`` with ``overrides``) and a ``decode`` for stop strings, then each prompt's
    limit on new tokens and the prompts against ``model``'s vocabulary and context
    (``vocab_size``, ``max_seq_len``). Returns ``(settings, prompt token ids, limits)``."""
    cfg = _resolve_config(config, overrides)
    if cfg.stop_strings and decode is None:
        raise ValueError(
            "stop_strings need a decode function to read the generated text; pass "
            "decode=tokenizer.decode (or use generate_text)"
        )
    max_new = _per_prompt_limits(prompts, cfg, max_new_tokens_per_prompt)
    return cfg, _check_prompts(prompts, model, max_new), max_new
