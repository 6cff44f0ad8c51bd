"""Adapters that give every causal LM and tokenizer one small interface.

A researcher may bring

* a plain ``nn.Module`` mapping token ids ``(batch, seq)`` to logits ``(batch, seq, vocab)``,
* an x-transformers ``TransformerWrapper`` (it has its own KV cache),
* a Hugging Face causal LM (``PreTrainedModel``; KV cache through ``past_key_values``).

:class:`CausalLM` wraps any of them.  Its ``forward`` always returns a float logits
tensor of shape ``(batch, seq, vocab)`` and checks shapes and dtypes with errors that
name the problem.  Generation (``generation.py``) looks at :attr:`CausalLM.kind` to
decide which KV-cache path to use.

Tokenizers are wrapped the same way: the seed's ``tokenizer_encode`` /
``tokenizer_decode`` callables, or a Hugging Face tokenizer (with its chat template).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor, nn

ModelKind = Literal["plain", "xtransformers", "hf"]

__all__ = [
    "CausalLM",
    "CallableTokenizer",
    "HFTokenizer",
    "Tokenizer",
    "detect_kind",
    "encode_response",
    "is_peft_model",
    "unwrap_model",
    "wrap_model",
    "wrap_tokenizer",
]


def is_peft_model(module: nn.Module) -> bool:
    """True for a PEFT (LoRA, ...) wrapper around a model."""
    return any(
        c.__name__ == "PeftModel" and (c.__module__ or "").startswith("peft")
        for c in type(module).__mro__
    )


def detect_kind(module: nn.Module) -> ModelKind:
    """Return which family ``module`` belongs to: ``hf``, ``xtransformers`` or ``plain``.

    A PEFT wrapper counts as its base model's family (it forwards the same arguments).
    """
    if is_peft_model(module):
        return detect_kind(module.get_base_model())
    for cls in type(module).__mro__:
        mod = cls.__module__ or ""
        if cls.__name__ == "PreTrainedModel" and mod.startswith("transformers"):
            return "hf"
        if cls.__name__ == "TransformerWrapper" and mod.startswith("x_transformers"):
            return "xtransformers"
    return "plain"


def unwrap_model(model: nn.Module) -> nn.Module:
    """Strip DDP / ``torch.compile`` / :class:`CausalLM` wrappers down to the user's module."""
    seen = 0
    while seen < 16:  # bounded: wrappers never nest deeper than a few levels
        seen += 1
        if isinstance(model, CausalLM):
            model = model.module
        elif (
            hasattr(model, "module")
            and isinstance(model.module, nn.Module)
            and type(model).__name__
            in ("DistributedDataParallel", "DataParallel", "FullyShardedDataParallel")
        ):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model
    return model


class CausalLM(nn.Module):
    """A causal language model with a uniform ``forward(input_ids, attention_mask) -> logits``.

    Args:
        module: the user's model.
        max_seq_len: context length; read from the model when it declares one
            (``max_seq_len`` attribute, or ``config.max_position_embeddings``).
        vocab_size: vocabulary size; read from the model when it declares one.
    """

    def __init__(
        self,
        module: nn.Module,
        *,
        max_seq_len: int | None = None,
        vocab_size: int | None = None,
    ) -> None:
        super().__init__()
        if isinstance(module, CausalLM):
            raise TypeError("module is already a CausalLM; pass it directly or use wrap_model()")
        if not isinstance(module, nn.Module):
            raise TypeError(
                f"expected a torch.nn.Module mapping token ids to logits, got {type(module).__name__}"
            )
        self.module = module
        self.kind: ModelKind = detect_kind(module)
        self.max_seq_len = max_seq_len if max_seq_len is not None else self._read_max_seq_len()
        self.vocab_size = vocab_size if vocab_size is not None else self._read_vocab_size()

    # ------------------------------------------------------------------ introspection
    def _read_max_seq_len(self) -> int | None:
        m = self.module
        if self.kind == "hf":
            cfg = m.config
            for name in ("max_position_embeddings", "n_positions", "max_seq_len"):
                value = getattr(cfg, name, None)
                if isinstance(value, int):
                    return value
            return None
        value = getattr(m, "max_seq_len", None)
        return int(value) if isinstance(value, int) else None

    def _read_vocab_size(self) -> int | None:
        m = self.module
        if self.kind == "hf":
            return int(m.config.vocab_size)
        for name in ("num_tokens", "vocab_size"):
            value = getattr(m, name, None)
            if isinstance(value, int):
                return value
        return None

    @property
    def device(self) -> torch.device:
        for p in self.module.parameters():
            return p.device
        return torch.device("cpu")

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None = None,
    ) -> Tensor:
        """Logits ``(batch, seq, vocab)`` for right-padded ``input_ids`` ``(batch, seq)``.

        ``attention_mask`` (``1`` = real token) is optional: with right padding a causal
        model's logits at real positions never depend on the pads that follow them, so
        models that take no mask (plain modules) are still correct.
        """
        check_token_ids(input_ids, self.vocab_size, self.max_seq_len)
        if self.kind == "hf":
            out = self.module(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
            logits = out.logits
        elif self.kind == "xtransformers":
            mask = attention_mask.bool() if attention_mask is not None else None
            logits = self.module(input_ids, mask=mask)
        else:
            logits = self.module(input_ids)
        logits = _extract_logits(logits)
        check_logits(logits, input_ids)
        if self.vocab_size is None:
            self.vocab_size = logits.shape[-1]
        return logits


def _extract_logits(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(
        f"the model returned {type(out).__name__}; expected a logits tensor (batch, seq, vocab), "
        "an object with .logits, or a tuple whose first element is the logits"
    )


def check_token_ids(input_ids: Tensor, vocab_size: int | None, max_seq_len: int | None) -> None:
    """Raise a clear error for token ids of the wrong shape, dtype, range or length."""
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if input_ids.ndim != 2:
        raise ValueError(
            f"input_ids must have shape (batch, seq), got {tuple(input_ids.shape)}; "
            "add a batch dimension with input_ids[None] for a single sequence"
        )
    if input_ids.dtype not in (torch.long, torch.int32, torch.int64):
        raise TypeError(
            f"input_ids must be integer token ids (torch.long), got {input_ids.dtype}; "
            "convert with .long() (a tokenizer that returns floats is a common cause)"
        )
    if max_seq_len is not None and input_ids.shape[1] > max_seq_len:
        raise ValueError(
            f"sequence length {input_ids.shape[1]} exceeds the model's context of {max_seq_len} "
            "tokens; shorten the prompt/response or lower max_seq_len / max_new_tokens"
        )
    if input_ids.numel() and vocab_size is not None:
        lo, hi = int(input_ids.min()), int(input_ids.max())
        if lo < 0 or hi >= vocab_size:
            raise ValueError(
                f"token ids must lie in [0, {vocab_size}), found min {lo} max {hi}; "
                "a negative pad id fed to the model or a tokenizer/model vocabulary mismatch"
            )


def check_logits(logits: Tensor, input_ids: Tensor) -> None:
    """Raise a clear error when a model's output is not ``(batch, seq, vocab)`` floats."""
    if logits.ndim != 3 or logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"the model must map token ids {tuple(input_ids.shape)} to logits "
            f"(batch, seq, vocab), but returned shape {tuple(logits.shape)}"
        )
    if not logits.is_floating_point():
        raise TypeError(f"the model returned logits of dtype {logits.dtype}; expected floats")


def wrap_model(
    model: nn.Module, *, max_seq_len: int | None = None, vocab_size: int | None = None
) -> CausalLM:
    """Return ``model`` as a :class:`CausalLM` (unchanged if it already is one)."""
    if isinstance(model, CausalLM):
        if max_seq_len is not None:
            model.max_seq_len = max_seq_len
        return model
    return CausalLM(model, max_seq_len=max_seq_len, vocab_size=vocab_size)


# ====================================================================== tokenizers


@runtime_checkable
class Tokenizer(Protocol):
    """What the library needs of a tokenizer.

    ``encode`` encodes a (formatted) prompt, with whatever special tokens the tokenizer
    puts in front of a text (BOS). A tokenizer may also define ``encode_response(text)``
    for text that continues a prompt (no BOS); see :func:`encode_response`.
    """

    eos_id: int | None
    pad_id: int | None

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...

    def format_prompt(self, prompt: str) -> str: ...


def _to_id_list(ids: Any, where: str) -> list[int]:
    if isinstance(ids, Tensor):
        if ids.is_floating_point():
            if not torch.all(ids == ids.round()):
                raise ValueError(f"{where} returned non-integer token ids")
        ids = ids.reshape(-1).long().tolist()
    out = []
    for i in ids:
        if isinstance(i, float):
            if i != int(i):
                raise ValueError(f"{where} returned a non-integer token id {i}")
            i = int(i)
        if not isinstance(i, int):
            raise TypeError(f"{where} must return integer token ids, got {type(i).__name__}")
        out.append(int(i))
    return out


class CallableTokenizer:
    """The seed's ``tokenizer_encode(str) -> Tensor`` / ``tokenizer_decode(Tensor) -> str`` pair.

    ``encode`` may return a tensor of any dtype holding integers (the seed's example
    returns floats), a list of ints, or a tuple; the ids are converted to ``list[int]``.
    """

    def __init__(
        self,
        encode: Callable[[str], Any],
        decode: Callable[[Any], str],
        *,
        eos_id: int | None = None,
        pad_id: int | None = None,
        prompt_format: str | None = None,
    ) -> None:
        if not callable(encode) or not callable(decode):
            raise TypeError("tokenizer_encode and tokenizer_decode must both be callables")
        self._encode, self._decode = encode, decode
        self.eos_id, self.pad_id = eos_id, pad_id
        if prompt_format is not None and "{prompt}" not in prompt_format:
            raise ValueError("prompt_format must contain '{prompt}'")
        self.prompt_format = prompt_format

    def encode(self, text: str) -> list[int]:
        return _to_id_list(self._encode(text), "tokenizer_encode")

    def encode_response(self, text: str) -> list[int]:
        """The callables know no special tokens: the same ids as :meth:`encode`."""
        return self.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return self._decode(torch.tensor(list(ids), dtype=torch.long))

    def format_prompt(self, prompt: str) -> str:
        return self.prompt_format.format(prompt=prompt) if self.prompt_format else prompt


class HFTokenizer:
    """A Hugging Face tokenizer; prompts go through its chat template when it has one.

    Tokenizers without a pad token use EOS for padding (padding is always explicit via
    masks, so this never hides a real EOS).
    """

    def __init__(self, tokenizer: Any, *, use_chat_template: bool | None = None) -> None:
        self.tokenizer = tokenizer
        has_template = bool(getattr(tokenizer, "chat_template", None))
        if use_chat_template and not has_template:
            raise ValueError(
                "use_chat_template=True but the tokenizer has no chat_template; set one "
                "(tokenizer.chat_template = ...) or pass use_chat_template=False"
            )
        self.use_chat_template = has_template if use_chat_template is None else use_chat_template
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id

    def encode(self, text: str) -> list[int]:
        """A prompt's ids: chat-formatted text already carries its special tokens (BOS
        included when the template writes it); plain text gets the tokenizer's own."""
        return list(self.tokenizer.encode(text, add_special_tokens=not self.use_chat_template))

    def encode_response(self, text: str) -> list[int]:
        """A response's ids: never any special tokens (it continues a prompt)."""
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def format_prompt(self, prompt: str) -> str:
        if not self.use_chat_template:
            return prompt
        return self.tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )


def encode_response(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` that follows a prompt (a response, a continuation): no BOS or
    other special tokens. Uses ``tokenizer.encode_response`` when the tokenizer defines it,
    else ``tokenizer.encode``."""
    method = getattr(tokenizer, "encode_response", None)
    return list(method(text)) if callable(method) else list(tokenizer.encode(text))


def wrap_tokenizer(
    tokenizer: Any = None,
    *,
    encode: Callable[[str], Any] | None = None,
    decode: Callable[[Any], str] | None = None,
    eos_id: int | None = None,
    pad_id: int | None = None,
) -> Tokenizer:
    """Build a :class:`Tokenizer` from a HF tokenizer, a ready adapter, or encode/decode callables."""
    if tokenizer is not None:
        if isinstance(tokenizer, (CallableTokenizer, HFTokenizer)):
            return tokenizer
        if hasattr(tokenizer, "apply_chat_template") or hasattr(tokenizer, "eos_token_id"):
            return HFTokenizer(tokenizer)
        if isinstance(tokenizer, Tokenizer):
            return tokenizer
        raise TypeError(f"cannot use {type(tokenizer).__name__} as a tokenizer")
    if encode is None or decode is None:
        raise ValueError(
            "a tokenizer is needed to turn prompts into tokens: pass tokenizer_encode and "
            "tokenizer_decode callables (or a Hugging Face tokenizer)"
        )
    return CallableTokenizer(encode, decode, eos_id=eos_id, pad_id=pad_id)
