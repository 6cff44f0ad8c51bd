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

from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

import torch
from torch import nn

from ..models import CausalLM, wrap_model, wrap_tokenizer
from ..utils import eval_mode
from .config import (
    _CONFIG_FIELDS,
    GenerationConfig,
    GenerationOutput,
    _eos_set,
    _resolve_config,
    prepare_request,
)
from .kv_cache import _make_backend
from .sampling import sample_next

__all__ = ["DEFAULT_CACHE_BYTES", "generate", "generate_text"]

#: Default KV-cache memory a micro-batch may use when ``token_budget`` is not given.
DEFAULT_CACHE_BYTES = 2 * 1024**3

_EOS, _STOP, _LENGTH = 0, 1, 2
_REASONS = ("eos", "stop", "length")

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
    lm = wrap_model(model)
    cfg, prompt_ids, max_new = prepare_request(
        prompts, config, overrides, max_new_tokens_per_prompt, lm, decode
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
    with eval_mode(lm), torch.no_grad():
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
    model_or_backend: Any,
    tokenizer: Any,
    prompts: list[str],
    config: GenerationConfig | None = None,
    *,
    generator: torch.Generator | int | None = None,
    apply_format: bool = True,
    **kw: Any,
) -> list[list[str]]:
    """Generate text continuations: ``num_return_sequences`` texts per prompt.

    ``model_or_backend`` is a model (sampled with the torch engine) or a
    :class:`~.backend.GenerationBackend`. Applies ``tokenizer.format_prompt`` (chat
    template) when ``apply_format``, encodes, generates (EOS defaults to
    ``tokenizer.eos_id``), decodes, and cuts each text at the first stop string.  ``**kw``
    are :class:`GenerationConfig` fields, the backend options ``progress`` and
    ``max_new_tokens_per_prompt``, and (with a model only) the torch-engine options
    ``token_budget``, ``use_cache`` and ``share_prefix``; ``return_logprobs`` is not
    accepted here.
    """
    from .backend import as_backend, is_backend

    if isinstance(prompts, str) or not isinstance(prompts, Sequence):
        raise TypeError(f"prompts must be a list of strings, got {type(prompts).__name__}")
    if not all(isinstance(p, str) for p in prompts):
        raise TypeError("prompts must be a list of strings; encode token ids with generate()")
    tok = wrap_tokenizer(tokenizer)
    cfg_kw = {k: v for k, v in kw.items() if k in _CONFIG_FIELDS}
    gen_kw = {k: v for k, v in kw.items() if k not in _CONFIG_FIELDS}
    backend_options = {"progress", "max_new_tokens_per_prompt"}
    engine_options = {"token_budget", "use_cache", "share_prefix"}
    bad = sorted(set(gen_kw) - backend_options - engine_options)
    if bad:
        raise TypeError(
            f"unknown argument(s) {bad}; generate_text takes GenerationConfig fields "
            f"{list(_CONFIG_FIELDS)} and {sorted(backend_options | engine_options)}"
        )
    engine_kw = {k: v for k, v in gen_kw.items() if k in engine_options}
    if engine_kw and is_backend(model_or_backend):
        raise TypeError(
            f"generate_text: {sorted(engine_kw)} are options of the torch engine, but it was "
            "given a generation backend; set them on the backend instead (e.g. "
            "TorchBackend(model, use_cache=...)) or pass the model"
        )
    backend = as_backend(model_or_backend, **engine_kw)
    cfg = _resolve_config(config, cfg_kw)
    if cfg.eos_token_id is None and tok.eos_id is not None:
        cfg = replace(cfg, eos_token_id=tok.eos_id)
    ids = [tok.encode(tok.format_prompt(p) if apply_format else p) for p in prompts]
    out = backend.generate(
        ids,
        cfg,
        generator=generator,
        decode=tok.decode,
        **{k: v for k, v in gen_kw.items() if k in backend_options},
    )
    n = cfg.num_return_sequences
    texts = [_cut_at_stop(tok.decode(s), cfg.stop_strings) for s in out.sequences]
    return [texts[i * n : (i + 1) * n] for i in range(len(prompts))]
