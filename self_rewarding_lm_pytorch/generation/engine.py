"""Batched sampling from any :class:`~self_rewarding_lm_pytorch.models.CausalLM`.

How it works (details and measurements in ``docs/generation.md``):

* Rows are grouped into **micro-batches** whose padded size ``rows * (longest prompt +
  max_new_tokens)`` stays under a token budget.  Prompts are sorted by (length, content)
  first, so a micro-batch holds prompts of similar length; the output order is always
  the caller's order (``row = i * num_return_sequences + j``).
* **KV cache** wherever the model offers one.  All rows of a micro-batch are
  *left-padded* to a common length ``T``; row ``r`` starts at column ``s_r``.

  - Hugging Face causal LMs: a ``DynamicCache`` (preallocated layers), a 2-D mask and explicit
    ``position_ids`` (``column - s_r``), exactly as ``GenerationMixin.generate`` does.
  - x-transformers ``TransformerWrapper``: its own cache (``return_intermediates=True``,
    ``cache=``), ``seq_start_pos = s`` for the left padding, one new token per step
    (``input_not_include_cache=True``).
  - any other ``nn.Module``: batched full recompute with right padding and per-row read
    and write positions (a causal model's logits at position ``t`` never depend on the
    pads after it), so no mask is needed.
* **Prefix reuse** (cached paths).  Identical prompts of a micro-batch (the
  ``num_return_sequences`` candidates of a prompt, or repeated prompts) are prefilled once
  and their cache rows are copied.  When the distinct prompts share a head of at least
  :data:`MIN_SHARED_PREFIX` tokens (judge prompts built from one template), that head is
  prefilled once with batch 1.  Its keys/values are then laid into every row of the cache
  shifted right by the row's padding ``s_r``: with left padding a row's token ``j`` always
  has position ``j`` (absolute positions are counted from ``s_r``; rotary keys are stored
  pre-rotation by x-transformers and post-rotation at position ``j`` by Hugging Face), so
  the head's keys/values are the same in every row.  Only the last ``T - P`` columns of each
  row (its own tail, plus the few head tokens that the shift pushed past column ``P``) are
  then run through the model on top of that cache.
* **Preallocated KV cache.**  Both libraries' stock caches append with ``torch.cat``,
  copying the whole cache every step and layer.  The engine keeps one buffer per layer
  with room for the whole generation: a ``DynamicLayer`` subclass for Hugging Face, and
  :class:`_KVSlot` cache entries for x-transformers (:data:`PREALLOCATE_HF_CACHE`,
  :data:`PREALLOCATE_XT_CACHE`).
* **Decoding** is one batched forward per step; sampling filters are vectorised; a row
  stops at an EOS id, a stop string, or ``max_new_tokens``; the loop ends as soon as every
  row is done, and finished rows are dropped from the batch once they are at least
  :data:`COMPACT_FRACTION` of it (a cache copy costs about one step; measured in
  ``benchmarks/generation.py``).

Reproducibility: greedy output (``temperature == 0``) does not depend on micro-batch size,
prefix reuse or the cache (up to floating-point ties).  Sampled output with a given
``torch.Generator`` state is reproducible run to run for the same prompts, config and
token budget; it changes when the micro-batch layout changes.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import CausalLM, _extract_logits, wrap_model, wrap_tokenizer

__all__ = [
    "COMPACT_FRACTION",
    "MIN_SHARED_PREFIX",
    "GenerationConfig",
    "GenerationOutput",
    "filter_logits",
    "generate",
    "generate_text",
    "reference_generate",
    "response_budget",
    "sample_next",
]

#: Drop finished rows from the batch once they are at least this fraction of it.
COMPACT_FRACTION = 0.25
#: Shortest common prompt head (tokens) worth a separate batch-1 prefill.
MIN_SHARED_PREFIX = 8
#: Hugging Face path: keep the KV cache in one preallocated buffer per layer (no per-step
#: concatenation); ``False`` uses the stock ``DynamicCache`` layers.
PREALLOCATE_HF_CACHE = True
#: x-transformers path: the same, through :class:`_KVSlot` (its cache appends with torch.cat).
PREALLOCATE_XT_CACHE = True
#: Default KV-cache memory a micro-batch may use when ``token_budget`` is not given.
DEFAULT_CACHE_BYTES = 2 * 1024**3

_EOS, _STOP, _LENGTH = 0, 1, 2
_REASONS = ("eos", "stop", "length")


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


# ====================================================================== config checks

_CONFIG_FIELDS = tuple(f.name for f in dataclasses.fields(GenerationConfig))


def _resolve_config(config: GenerationConfig | None, overrides: dict[str, Any]) -> GenerationConfig:
    if config is not None and not isinstance(config, GenerationConfig):
        raise TypeError(
            f"config must be a GenerationConfig, got {type(config).__name__}; "
            "pass settings as keyword arguments or GenerationConfig(...)"
        )
    unknown = sorted(set(overrides) - set(_CONFIG_FIELDS))
    if unknown:
        raise TypeError(
            f"unknown generation setting(s) {unknown}; valid GenerationConfig fields are "
            f"{list(_CONFIG_FIELDS)}"
        )
    cfg = replace(config or GenerationConfig(), **overrides)
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


# ====================================================================== sampling


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
    with _eval_mode(lm):
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


@contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode; restore each one's previous mode afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


# ====================================================================== backends
#
# A backend runs one micro-batch.  ``prefill`` takes the distinct prompts (left-padded
# to T columns, row u starting at column start[u]) and returns the next-token logits of
# each distinct prompt plus a state; ``expand`` / ``select`` copy or keep rows of the
# state; ``step`` feeds one new token per row and returns the next logits.


def _left_pad(prompts: list[list[int]], device: torch.device) -> tuple[Tensor, Tensor]:
    T = max(len(p) for p in prompts)
    ids = torch.zeros(len(prompts), T, dtype=torch.long)
    for u, p in enumerate(prompts):
        ids[u, T - len(p) :] = torch.tensor(p, dtype=torch.long)
    start = torch.tensor([T - len(p) for p in prompts], dtype=torch.long)
    return ids.to(device), start.to(device)


def _common_prefix_len(prompts: list[list[int]]) -> int:
    first = prompts[0]
    n = min(len(p) for p in prompts)
    for p in prompts[1:]:
        k = 0
        while k < n and p[k] == first[k]:  # bounded by n
            k += 1
        n = k
        if n == 0:
            break
    return n


def _shift_index(start: Tensor, P: int) -> Tensor:
    """Index (U, P): column c of row u holds head token c - start[u] (clamped; pads masked)."""
    cols = torch.arange(P, device=start.device)
    return (cols[None, :] - start[:, None]).clamp(0, P - 1)


def _shift_kv(t: Tensor, idx: Tensor) -> Tensor:
    """Lay the batch-1 head ``t`` (1, H, P, D) into rows shifted by ``idx`` -> (U, H, P, D)."""
    per_pos = t[0].transpose(0, 1)  # (P, H, D)
    return per_pos[idx].transpose(1, 2).contiguous()


class _PlainBackend:
    """Batched full recompute, right padding, per-row positions (any causal model)."""

    name = "plain"
    shares_prefix = False
    compact_fraction = 0.0  # no cache: dropping rows costs a tiny index copy

    def __init__(self, lm: CausalLM) -> None:
        self.lm = lm

    def prefill(self, prompts: list[list[int]], max_new: int, share_prefix: bool):
        device = self.lm.device
        lens = torch.tensor([len(p) for p in prompts], dtype=torch.long)
        width = int(lens.max()) + max_new
        buf = torch.zeros(len(prompts), width, dtype=torch.long)
        for u, p in enumerate(prompts):
            buf[u, : len(p)] = torch.tensor(p, dtype=torch.long)
        buf, lens = buf.to(device), lens.to(device)
        state = {"buf": buf, "lens": lens, "max_len": int(lens.max())}
        return self._logits(state), state

    def _logits(self, state: dict) -> Tensor:
        buf, lens = state["buf"], state["lens"]
        logits = self.lm(buf[:, : state["max_len"]])
        return logits[torch.arange(buf.shape[0], device=buf.device), lens - 1]

    def select(self, state: dict, idx: Tensor) -> dict:
        lens = state["lens"][idx]
        return {"buf": state["buf"][idx], "lens": lens, "max_len": int(lens.max())}

    expand = select

    def step(self, state: dict, tokens: Tensor) -> Tensor:
        buf, lens = state["buf"], state["lens"]
        buf[torch.arange(buf.shape[0], device=buf.device), lens] = tokens
        state["lens"] = lens + 1
        state["max_len"] += 1
        return self._logits(state)


class _KVSlot(Tensor):
    """x-transformers cache entry backed by a preallocated buffer (no per-step copy).

    x-transformers appends a step's keys/values with ``torch.cat((cached, new), dim=-2)``,
    which copies the whole cache every step and layer.  A ``_KVSlot`` is the filled part
    of a buffer with room for the whole generation; that one ``cat`` becomes an in-place
    write of ``new`` after it and returns a view of the filled part.  Every other use falls
    back to ordinary tensor semantics (the slot *is* the filled view), so results never
    depend on the shortcut being taken; :class:`_XTBackend` checks that it was.
    """

    _buf: Tensor
    _len: int

    @staticmethod
    def wrap(buf: Tensor, length: int) -> _KVSlot:
        slot = buf.narrow(-2, 0, length).as_subclass(_KVSlot)
        slot._buf, slot._len = buf, length
        return slot

    @classmethod
    def __torch_function__(
        cls, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is torch.cat and len(args) >= 1 and not (set(kwargs) - {"dim"}):
            tensors = args[0]
            dim = kwargs.get("dim", args[1] if len(args) > 1 else 0)
            if isinstance(tensors, (tuple, list)) and len(tensors) == 2:
                slot, new = tensors
                if type(slot) is cls and type(new) is Tensor and slot._fits(new, dim):
                    end = slot._len + new.shape[-2]
                    slot._buf.narrow(-2, slot._len, new.shape[-2]).copy_(new)
                    return slot._buf.narrow(-2, 0, end)
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **kwargs)

    def _fits(self, new: Tensor, dim: int) -> bool:
        nd = self._buf.ndim
        return (
            new.ndim == nd
            and dim in (-2, nd - 2)
            and new.dtype == self._buf.dtype
            and new.device == self._buf.device
            and new.shape[:-2] == self._buf.shape[:-2]
            and new.shape[-1] == self._buf.shape[-1]
            and self._len + new.shape[-2] <= self._buf.shape[-2]
        )


class _XTBackend:
    """x-transformers ``TransformerWrapper`` with its KV cache and ``seq_start_pos``."""

    name = "xtransformers"
    shares_prefix = True

    @property
    def compact_fraction(self) -> float:
        return COMPACT_FRACTION

    def __init__(self, lm: CausalLM) -> None:
        self.lm = lm
        self.net = lm.module

    @staticmethod
    def supported(net: nn.Module) -> bool:
        return (
            bool(getattr(net, "can_cache_kv", False))
            and not getattr(net, "looped", False)
            and not getattr(net, "recycling", False)
            and getattr(net, "num_memory_tokens", 0) == 0
            and not getattr(net, "has_multiple_heads", False)
            and not getattr(net, "output_is_log_prob", False)
        )

    def _forward(self, x: Tensor, **kw: Any) -> tuple[Tensor, Any]:
        logits, inter = self.net(x, return_intermediates=True, **kw)
        return _extract_logits(logits), inter

    def prefill(self, prompts: list[list[int]], max_new: int, share_prefix: bool):
        ids, start = _left_pad(prompts, self.lm.device)
        T = ids.shape[1]
        P = _usable_prefix(prompts) if share_prefix else 0
        if P:
            s0 = int(start[0])
            _, head = self._forward(ids[:1, s0 : s0 + P])
            idx = _shift_index(start, P)
            attn = []
            for inter in head.attn_intermediates:
                kv = tuple(None if t is None else _shift_kv(t, idx) for t in inter.cached_kv)
                attn.append(dataclasses.replace(inter, cached_kv=kv))
            cache = dataclasses.replace(head, attn_intermediates=attn, cache_length=P)
            n = T - P
            logits, inter = self._forward(
                ids[:, P:],
                cache=cache,
                seq_start_pos=start,
                input_not_include_cache=True,
                cache_age=n,
            )
        else:
            logits, inter = self._forward(ids, seq_start_pos=start)
        state = {"cache": self._slim(inter), "start": start, "bufs": None, "length": T}
        if PREALLOCATE_XT_CACHE:
            state["bufs"] = self._buffers(state["cache"], T + max_new)
        return logits[:, -1], state

    @staticmethod
    def _buffers(cache: Any, capacity: int) -> list[tuple[Tensor | None, ...]] | None:
        """Copy each layer's cached keys/values into a buffer with room for ``capacity``."""
        bufs = []
        for a in cache.attn_intermediates:
            kv = a.cached_kv
            if not isinstance(kv, (tuple, list)) or not any(isinstance(t, Tensor) for t in kv):
                return None
            layer = []
            for t in kv:
                if t is None:
                    layer.append(None)
                    continue
                buf = t.new_empty(*t.shape[:-2], capacity, t.shape[-1])
                buf.narrow(-2, 0, t.shape[-2]).copy_(t)
                layer.append(buf)
            bufs.append(tuple(layer))
        return bufs

    @staticmethod
    def _slim(inter: Any) -> Any:
        """Keep only what the next step reads (the per-layer key/value cache)."""
        attn = [
            dataclasses.replace(
                a, qk_similarities=None, pre_softmax_attn=None, post_softmax_attn=None, values=None
            )
            for a in inter.attn_intermediates
        ]
        return dataclasses.replace(
            inter,
            attn_intermediates=attn,
            hiddens=None,
            layer_hiddens=None,
            block_hiddens=None,
            last_hidden=None,
            last_layer_hiddens=None,
            initial_embeds=None,
        )

    def select(self, state: dict, idx: Tensor) -> dict:
        cache, bufs = state["cache"], state["bufs"]
        if bufs is not None:
            bufs = [tuple(None if t is None else t[idx] for t in layer) for layer in bufs]
        else:
            for a in cache.attn_intermediates:
                a.cached_kv = tuple(None if t is None else t[idx] for t in a.cached_kv)
        return {**state, "cache": cache, "start": state["start"][idx], "bufs": bufs}

    expand = select

    def step(self, state: dict, tokens: Tensor) -> Tensor:
        cache, bufs, length = state["cache"], state["bufs"], state["length"]
        if bufs is not None:
            for a, layer in zip(cache.attn_intermediates, bufs):
                a.cached_kv = tuple(None if t is None else _KVSlot.wrap(t, length) for t in layer)
        logits, inter = self._forward(
            tokens[:, None],
            cache=cache,
            seq_start_pos=state["start"],
            input_not_include_cache=True,
        )
        state["cache"] = self._slim(inter)
        if bufs is not None:
            wrote = all(
                t is None or (type(n) is Tensor and n.data_ptr() == t.data_ptr())
                for a, layer in zip(state["cache"].attn_intermediates, bufs)
                for n, t in zip(a.cached_kv, layer)
            )
            # if x-transformers did not append through torch.cat, its own (correct) cache
            # tensors are kept and the buffers are dropped
            state["bufs"] = bufs if wrote else None
        state["length"] = length + 1
        return logits[:, -1]


class _HFBackend:
    """Hugging Face causal LM: ``DynamicCache``, 2-D attention mask, explicit positions."""

    name = "hf"

    @property
    def compact_fraction(self) -> float:
        return COMPACT_FRACTION

    def __init__(self, lm: CausalLM) -> None:
        from transformers import DynamicCache

        self.lm = lm
        self.model = lm.module  # called as is (a PEFT wrapper applies its adapters)
        self.base = _hf_base(lm.module)  # declares the forward arguments and the config
        self.DynamicCache = DynamicCache
        params = inspect.signature(self.base.forward).parameters
        self.cache_kw = "cache" if "cache" in params else "past_key_values"
        self.keep_kw = "logits_to_keep" in params
        self.preallocate = PREALLOCATE_HF_CACHE
        self.shares_prefix = False
        cache = self._new_cache()
        layers = getattr(cache, "layers", None)  # transformers >= 4.56 cache layout
        self.shares_prefix = bool(layers) and all(
            type(layer).__name__ == "DynamicLayer" for layer in layers
        )

    @staticmethod
    def supported(model: nn.Module) -> bool:
        base = _hf_base(model)
        params = inspect.signature(base.forward).parameters
        cfg = getattr(base, "config", None)
        return (
            ("cache" in params or "past_key_values" in params)
            and "position_ids" in params
            and "attention_mask" in params
            and not getattr(cfg, "is_encoder_decoder", False)
        )

    def _new_cache(self, capacity: int | None = None) -> Any:
        try:
            cache = self.DynamicCache(config=self.base.config)
        except TypeError:  # older transformers
            cache = self.DynamicCache()
        if capacity is not None and self.preallocate and self.shares_prefix:
            try:
                layer_cls = _prealloc_layer_class()
            except ImportError:  # transformers without cache layer classes
                return cache
            cache.layers = [layer_cls(capacity) for _ in cache.layers]
        return cache

    def _forward(
        self, ids: Tensor, mask: Tensor, pos: Tensor, cache: Any, last_only: bool
    ) -> Tensor:
        kw = {self.cache_kw: cache}
        if last_only and self.keep_kw:
            kw["logits_to_keep"] = 1
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **kw)
        return _extract_logits(out)[:, -1]

    def prefill(self, prompts: list[list[int]], max_new: int, share_prefix: bool):
        device = self.lm.device
        ids, start = _left_pad(prompts, device)
        U, T = ids.shape
        cols = torch.arange(T + max_new, device=device)
        mask = (cols[None, :] >= start[:, None]).long()
        pos = (cols[None, :T] - start[:, None]).clamp(min=0)
        P = _usable_prefix(prompts) if share_prefix and self.shares_prefix else 0
        cache = self._new_cache(T + max_new)
        if P:
            head = self._new_cache()
            s0 = int(start[0])
            self._forward(
                ids[:1, s0 : s0 + P],
                torch.ones(1, P, dtype=torch.long, device=device),
                torch.arange(P, device=device)[None],
                head,
                True,
            )
            idx = _shift_index(start, P)
            for i, layer in enumerate(head.layers):
                cache.layers[i].update(_shift_kv(layer.keys, idx), _shift_kv(layer.values, idx))
            logits = self._forward(ids[:, P:], mask[:, :T], pos[:, P:], cache, True)
        else:
            logits = self._forward(ids, mask[:, :T], pos, cache, True)
        lens = T - start
        return logits, {"cache": cache, "mask": mask, "lens": lens, "width": T}

    def select(self, state: dict, idx: Tensor) -> dict:
        state["cache"].batch_select_indices(idx)
        return {**state, "mask": state["mask"][idx], "lens": state["lens"][idx]}

    expand = select

    def step(self, state: dict, tokens: Tensor) -> Tensor:
        width = state["width"] + 1
        logits = self._forward(
            tokens[:, None],
            state["mask"][:, :width],
            state["lens"][:, None],
            state["cache"],
            False,
        )
        state["width"] = width
        state["lens"] = state["lens"] + 1
        return logits


def _hf_base(model: nn.Module) -> nn.Module:
    """The Hugging Face model under a PEFT wrapper (whose forward is ``*args, **kwargs``)."""
    get_base = getattr(model, "get_base_model", None)
    if callable(get_base):
        base = get_base()
        if isinstance(base, nn.Module):
            return base
    return model


_PREALLOC_LAYER: Any = None


def _prealloc_layer_class() -> Any:
    """A ``DynamicLayer`` whose keys/values live in one buffer allocated for the whole run.

    ``DynamicLayer.update`` concatenates the whole cache with the new token every step
    (a full copy of the cache per step and layer); this layer writes the new entries in
    place and hands attention a view of the filled part.
    """
    global _PREALLOC_LAYER
    if _PREALLOC_LAYER is not None:
        return _PREALLOC_LAYER
    from transformers.cache_utils import DynamicLayer

    class PreallocatedLayer(DynamicLayer):
        _layer_type = None  # never registered as a layer type of its own

        def __init__(self, capacity: int) -> None:
            super().__init__()
            self.capacity = capacity
            self.length = 0
            self.k_buf: Tensor | None = None
            self.v_buf: Tensor | None = None

        def lazy_initialization(self, key_states: Tensor, value_states: Tensor) -> None:
            self.device = key_states.device
            B, H, _, _ = key_states.shape
            cap = max(self.capacity, key_states.shape[-2])
            self.k_buf = key_states.new_empty(B, H, cap, key_states.shape[-1])
            self.v_buf = value_states.new_empty(
                B, value_states.shape[1], cap, value_states.shape[-1]
            )
            self.is_initialized = True

        def _views(self) -> None:
            self.keys = self.k_buf[:, :, : self.length]
            self.values = self.v_buf[:, :, : self.length]

        def update(self, key_states: Tensor, value_states: Tensor, *args: Any, **kwargs: Any):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            end = self.length + key_states.shape[-2]
            if end > self.k_buf.shape[2]:  # outgrew the plan: grow (rare)
                grow = max(end, 2 * self.k_buf.shape[2]) - self.k_buf.shape[2]
                self.k_buf = F.pad(self.k_buf, (0, 0, 0, grow))
                self.v_buf = F.pad(self.v_buf, (0, 0, 0, grow))
            self.k_buf[:, :, self.length : end] = key_states
            self.v_buf[:, :, self.length : end] = value_states
            self.length = end
            self._views()
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def batch_select_indices(self, indices: Tensor) -> None:
            if self.is_initialized:
                self.k_buf, self.v_buf = self.k_buf[indices], self.v_buf[indices]
                self._views()

        def reorder_cache(self, beam_idx: Tensor) -> None:
            self.batch_select_indices(beam_idx)

        def batch_repeat_interleave(self, repeats: int) -> None:
            if self.is_initialized:
                self.k_buf = self.k_buf.repeat_interleave(repeats, dim=0)
                self.v_buf = self.v_buf.repeat_interleave(repeats, dim=0)
                self._views()

        def crop(self, tokens_to_remove: int) -> None:
            if tokens_to_remove > 0:
                raise ValueError("crop expects a negative number of tokens to remove")
            self.length = max(0, self.length + tokens_to_remove)
            if self.is_initialized:
                self._views()

        def reset(self) -> None:
            self.length = 0
            if self.is_initialized:
                self._views()

    _PREALLOC_LAYER = PreallocatedLayer
    return PreallocatedLayer


def _usable_prefix(prompts: list[list[int]]) -> int:
    """Length of the shared head worth prefilling once (0 when not worth it).

    Every prompt keeps at least one token of its own after the head (its last token's
    logits are needed).  Rows whose padding exceeds the head simply hold pads there.
    """
    if len(prompts) < 2:
        return 0
    P = min(_common_prefix_len(prompts), min(len(p) for p in prompts) - 1)
    return P if P >= MIN_SHARED_PREFIX else 0


def _make_backend(lm: CausalLM, use_cache: bool) -> Any:
    if use_cache and lm.kind == "xtransformers" and _XTBackend.supported(lm.module):
        return _XTBackend(lm)
    if use_cache and lm.kind == "hf" and _HFBackend.supported(lm.module):
        return _HFBackend(lm)
    return _PlainBackend(lm)


# ====================================================================== planning


def _kv_bytes_per_token(lm: CausalLM) -> int | None:
    """Estimated bytes of KV cache per token (None when the model does not say)."""
    try:
        elem = next(lm.module.parameters()).element_size()
    except StopIteration:
        return None
    m = lm.module
    if lm.kind == "hf":
        cfg = m.config.get_text_config() if hasattr(m.config, "get_text_config") else m.config
        layers = getattr(cfg, "num_hidden_layers", None)
        heads = getattr(cfg, "num_attention_heads", None)
        hidden = getattr(cfg, "hidden_size", None)
        if not (layers and heads and hidden):
            return None
        kv_heads = getattr(cfg, "num_key_value_heads", None) or heads
        head_dim = getattr(cfg, "head_dim", None) or hidden // heads
        return 2 * layers * kv_heads * head_dim * elem
    if lm.kind == "xtransformers":
        layers = m.attn_layers
        n_attn = sum(1 for t in getattr(layers, "layer_types", ()) if t == "a")
        return 2 * max(n_attn, 1) * layers.dim * elem
    return None


def _default_budget(lm: CausalLM) -> int:
    per_token = _kv_bytes_per_token(lm)
    if per_token is None:
        return 16384
    return max(4096, DEFAULT_CACHE_BYTES // per_token)


def _plan(
    prompts: list[list[int]], n_ret: int, max_new: int | Sequence[int], budget: int
) -> list[list[int]]:
    """Group output rows into micro-batches: rows * (longest prompt + most new tokens of
    the micro-batch) <= budget; ``max_new[i]`` is prompt ``i``'s own limit on new tokens."""
    if isinstance(max_new, int):
        max_new = [max_new] * len(prompts)
    order = sorted(range(len(prompts)), key=lambda i: (len(prompts[i]), prompts[i]))
    batches: list[list[int]] = []
    current: list[int] = []
    most_new = 0
    for i in order:
        for j in range(n_ret):
            # prompts are sorted by length: prompt i is the longest so far
            need = len(prompts[i]) + max(most_new, max_new[i])
            if current and (len(current) + 1) * need > budget:
                batches.append(current)
                current, most_new = [], 0
            current.append(i * n_ret + j)
            most_new = max(most_new, max_new[i])
    if current:
        batches.append(current)
    return batches


# ====================================================================== the engine


class _StopChecker:
    """Finds stop strings in each row's decoded text, looking at a window of recent tokens.

    A stop string can only newly appear in text ending at the latest token, so decoding
    the last ``window`` tokens suffices; a hit is confirmed on the full decoded text
    (what :func:`reference_generate` checks).
    """

    def __init__(self, stops: Sequence[str], decode: Callable[[Sequence[int]], str]) -> None:
        self.stops = tuple(stops)
        self.decode = decode
        self.window = 4 * max(len(s) for s in self.stops) + 8

    def hit(self, tokens: list[int]) -> bool:
        text = self.decode(tokens[-self.window :])
        if not any(s in text for s in self.stops):
            return False
        full = self.decode(tokens) if len(tokens) > self.window else text
        return any(s in full for s in self.stops)


def _device_generator(generator: torch.Generator | None, device: torch.device):
    if generator is None or generator.device.type == device.type:
        return generator
    # one draw from the caller's generator seeds a generator on the model's device
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    g = torch.Generator(device=device)
    g.manual_seed(seed)
    return g


def _run_batch(
    backend: Any,
    prompts: list[list[int]],
    rows: list[int],
    n_ret: int,
    cfg: GenerationConfig,
    generator: torch.Generator | None,
    stop: _StopChecker | None,
    need_logprobs: bool,
    share_prefix: bool,
    row_max_new: list[int],
) -> tuple[list[list[int]], list[str], list[list[float]] | None]:
    device = backend.lm.device
    max_new = max(row_max_new)  # a row stops at its own limit (row_max_new[k] for rows[k])
    # distinct prompts: identical contents share one prefill
    distinct: dict[tuple[int, ...], int] = {}
    row_to_u = []
    for r in rows:
        key = tuple(prompts[r // n_ret])
        if not share_prefix:
            key = (*key, -1 - r)  # unique key per row: no sharing
        row_to_u.append(distinct.setdefault(key, len(distinct)))
    uniq = [list(k) if share_prefix else list(k[:-1]) for k in distinct]
    logits, state = backend.prefill(uniq, max_new, share_prefix)
    if len(uniq) != len(rows):
        idx = torch.tensor(row_to_u, device=device)
        state = backend.expand(state, idx)
        logits = logits[idx]

    B = len(rows)
    eos = sorted(_eos_set(cfg.eos_token_id))
    eos_t = torch.tensor(eos, dtype=torch.long, device=device)
    out_tok = torch.zeros(B, max_new, dtype=torch.long, device=device)
    out_lp = torch.zeros(B, max_new, dtype=torch.float32, device=device) if need_logprobs else None
    limit = torch.tensor(row_max_new, dtype=torch.long, device=device)
    ragged = min(row_max_new) < max_new
    n_tok = limit.clone()
    reason = torch.full((B,), _LENGTH, dtype=torch.long, device=device)
    active = torch.arange(B, device=device)  # micro-batch rows still in the model's batch
    alive = limit > 0  # over `active`
    host_tokens: list[list[int]] = [[] for _ in range(B)] if stop else []

    for step in range(max_new):
        tok, lp = sample_next(logits, cfg, generator, need_logprobs=need_logprobs)
        out_tok[active, step] = tok
        if out_lp is not None:
            out_lp[active, step] = lp
        ended = torch.isin(tok, eos_t) & alive if eos else torch.zeros_like(alive)
        if eos:
            n_tok[active] = torch.where(ended, step, n_tok[active])
            reason[active] = torch.where(ended, _EOS, reason[active])
        alive = alive & ~ended
        if stop is not None:
            tok_list, alive_list, act_list = tok.tolist(), alive.tolist(), active.tolist()
            for a, r in enumerate(act_list):
                if alive_list[a]:
                    host_tokens[r].append(tok_list[a])
                    if stop.hit(host_tokens[r]):
                        n_tok[r] = step + 1
                        reason[r] = _STOP
                        alive[a] = False
        if ragged:  # rows that reached their own limit stop ("length")
            alive = alive & (limit[active] > step + 1)
        if step == max_new - 1:
            break
        n_alive = int(alive.sum())
        if n_alive == 0:
            break
        n_dead = len(active) - n_alive
        # a row stopped at its own (lower) limit leaves the batch at once: left in it, its
        # positions would run past the context it was budgeted for
        early = ragged and bool((~alive & (limit[active] < max_new)).any())
        if n_dead and (early or n_dead >= backend.compact_fraction * len(active)):
            keep = alive.nonzero().squeeze(-1)
            state = backend.select(state, keep)
            active, tok, alive = active[keep], tok[keep], alive[keep]
        logits = backend.step(state, tok)

    lengths = n_tok.tolist()
    toks = out_tok.tolist()
    seqs = [toks[b][: lengths[b]] for b in range(B)]
    reasons = [_REASONS[c] for c in reason.tolist()]
    lps = None
    if out_lp is not None:
        lp_list = out_lp.tolist()
        lps = [lp_list[b][: lengths[b]] for b in range(B)]
    return seqs, reasons, lps


def generate(
    model: nn.Module | CausalLM,
    prompts: Sequence[Sequence[int]],
    config: GenerationConfig | None = None,
    *,
    generator: torch.Generator | None = None,
    decode: Callable[[Sequence[int]], str] | None = None,
    return_logprobs: bool = False,
    token_budget: int | None = None,
    use_cache: bool = True,
    progress: bool = False,
    share_prefix: bool = True,
    max_new_tokens_per_prompt: Sequence[int] | None = None,
    **overrides: Any,
) -> GenerationOutput:
    """Sample continuations of token-id ``prompts`` (ragged lengths allowed).

    Args:
        model: a raw ``nn.Module`` (token ids -> logits), an x-transformers
            ``TransformerWrapper``, a Hugging Face causal LM, or a :class:`CausalLM`.
        prompts: token-id lists (or 1-D tensors), any lengths >= 1.
        config: sampling settings; ``**overrides`` replace its fields.
        generator: source of randomness for sampling (reproducible runs).
        decode: token ids -> text; needed when ``stop_strings`` are set.
        return_logprobs: also return each new token's log-probability.
        token_budget: most padded tokens ``rows * (longest prompt + max_new_tokens)`` per
            micro-batch (bounds KV-cache memory); default from about 2 GiB of KV cache.
        use_cache: ``False`` forces the batched full-recompute path.
        progress: show a progress bar over rows.
        share_prefix: prefill identical prompts and a common prompt head once.
        max_new_tokens_per_prompt: each prompt's own limit on new tokens (one int >= 0 per
            prompt), in place of ``max_new_tokens``; ragged prompts can then each use the
            room their context leaves (see :func:`response_budget`).

    Every prompt plus its limit on new tokens must fit the model's context.

    Returns:
        :class:`GenerationOutput` with ``len(prompts) * num_return_sequences`` rows.
    """
    cfg = _resolve_config(config, overrides)
    lm = wrap_model(model)
    max_new = _per_prompt_limits(prompts, cfg, max_new_tokens_per_prompt)
    prompt_ids = _check_prompts(prompts, lm, max_new)
    if cfg.stop_strings and decode is None:
        raise ValueError(
            "stop_strings need a decode function to read the generated text; pass "
            "decode=tokenizer.decode (or use generate_text)"
        )
    if token_budget is not None and (
        not isinstance(token_budget, int) or isinstance(token_budget, bool) or token_budget < 1
    ):
        raise ValueError(f"token_budget must be a positive int, got {token_budget!r}")
    n_ret = cfg.num_return_sequences
    n_rows = len(prompt_ids) * n_ret
    sequences: list[list[int]] = [[] for _ in range(n_rows)]
    reasons = ["length"] * n_rows
    logprobs: list[list[float]] | None = [[] for _ in range(n_rows)] if return_logprobs else None
    if n_rows == 0 or max(max_new) == 0:
        return GenerationOutput(sequences, reasons, logprobs)

    budget = token_budget if token_budget is not None else _default_budget(lm)
    stop = _StopChecker(cfg.stop_strings, decode) if cfg.stop_strings else None
    gen = _device_generator(generator, lm.device) if cfg.temperature > 0 else None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n_rows, desc="generate", unit="row")
    # no_grad, not inference_mode: a module that caches a buffer lazily during generation
    # (rotary tables, ALiBi biases) must still be usable, and updatable in place, in training
    with _eval_mode(lm), torch.no_grad():
        backend = _make_backend(lm, use_cache)
        for rows in _plan(prompt_ids, n_ret, max_new, budget):
            seqs, rsn, lps = _run_batch(
                backend,
                prompt_ids,
                rows,
                n_ret,
                cfg,
                gen,
                stop,
                return_logprobs,
                share_prefix,
                [max_new[r // n_ret] for r in rows],
            )
            for k, r in enumerate(rows):
                sequences[r] = seqs[k]
                reasons[r] = rsn[k]
                if logprobs is not None and lps is not None:
                    logprobs[r] = lps[k]
            if bar is not None:
                bar.update(len(rows))
    if bar is not None:
        bar.close()
    return GenerationOutput(sequences, reasons, logprobs)


def _cut_at_stop(text: str, stops: Sequence[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]


def generate_text(
    model: nn.Module | CausalLM,
    tokenizer: Any,
    prompts: list[str],
    config: GenerationConfig | None = None,
    *,
    generator: torch.Generator | None = None,
    apply_format: bool = True,
    **kw: Any,
) -> list[list[str]]:
    """Generate text continuations: ``num_return_sequences`` texts per prompt.

    Applies ``tokenizer.format_prompt`` (chat template) when ``apply_format``, encodes,
    generates (EOS defaults to ``tokenizer.eos_id``), decodes, and cuts each text at the
    first stop string.  ``**kw`` are :class:`GenerationConfig` fields or keyword arguments
    of :func:`generate` (``token_budget``, ``use_cache``, ``progress``, ``share_prefix``,
    ``max_new_tokens_per_prompt``; ``return_logprobs`` is not accepted here).
    """
    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a list of strings; encode token ids with generate()")
    tok = wrap_tokenizer(tokenizer)
    cfg_kw = {k: v for k, v in kw.items() if k in _CONFIG_FIELDS}
    gen_kw = {k: v for k, v in kw.items() if k not in _CONFIG_FIELDS}
    allowed = {
        "token_budget",
        "use_cache",
        "progress",
        "share_prefix",
        "max_new_tokens_per_prompt",
    }
    bad = sorted(set(gen_kw) - allowed)
    if bad:
        raise TypeError(
            f"unknown argument(s) {bad}; generate_text takes GenerationConfig fields "
            f"{list(_CONFIG_FIELDS)} and {sorted(allowed)}"
        )
    cfg = _resolve_config(config, cfg_kw)
    if cfg.eos_token_id is None and tok.eos_id is not None:
        cfg = replace(cfg, eos_token_id=tok.eos_id)
    ids = [tok.encode(tok.format_prompt(p) if apply_format else p) for p in prompts]
    out = generate(model, ids, cfg, generator=generator, decode=tok.decode, **gen_kw)
    n = cfg.num_return_sequences
    texts = [_cut_at_stop(tok.decode(s), cfg.stop_strings) for s in out.sequences]
    return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]
