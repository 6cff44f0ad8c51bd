"""KV-cache paths of the engine: one micro-batch's prefill, row selection and decoding step.

A cache path runs one micro-batch.  ``prefill`` takes the distinct prompts (left-padded
to T columns, row u starting at column start[u]) and returns the next-token logits of
each distinct prompt plus a state; ``expand`` / ``select`` copy or keep rows of the
state; ``step`` feeds one new token per row and returns the next logits.  Paths: plain
full recompute (any causal model), x-transformers' cache and Hugging Face's
``DynamicCache``, both with preallocated buffers (see ``docs/generation.md``).
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models import CausalLM, _extract_logits

__all__ = ["COMPACT_FRACTION", "MIN_SHARED_PREFIX", "PREALLOCATE_HF_CACHE", "PREALLOCATE_XT_CACHE"]

#: Drop finished rows from the batch once they are at least this fraction of it.
COMPACT_FRACTION = 0.25
#: Shortest common prompt head (tokens) worth a separate batch-1 prefill.
MIN_SHARED_PREFIX = 8
#: Hugging Face path: keep the KV cache in one preallocated buffer per layer (no per-step
#: concatenation); ``False`` uses the stock ``DynamicCache`` layers.
PREALLOCATE_HF_CACHE = True
#: x-transformers path: the same, through :class:`_KVSlot` (its cache appends with torch.cat).
PREALLOCATE_XT_CACHE = True


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
