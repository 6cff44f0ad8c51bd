"""Tokenised training examples, their collators, and small datasets.

* :class:`SFTExample`: one sequence ``input_ids`` whose first ``prompt_len`` tokens are
  the prompt and the rest the response (the only tokens the SFT loss sees).
* :class:`PreferenceExample`: a prompt with a chosen and a rejected response (DPO, SPIN).
* :func:`collate_sft` / :func:`collate_preference`: right-padded batches with an
  ``attention_mask`` and a ``response_mask`` (``response_mask[b, t]`` is true when
  ``input_ids[b, t]`` is a response token, see ``docs/architecture.md``). Padding is
  described by the masks, never by a pad id: padded positions hold the valid id ``0``.
* :func:`to_sft_example` / :func:`to_preference_example` accept the seed's formats:
  ``(seq, prompt_len)`` tuples (tensors of any integer-valued dtype, right-padded with a
  ``pad_id`` such as ``-1``), the seed's DPO triple ``(preferred_seq, unpreferred_seq,
  prompt_len)``, dicts and the dataclasses themselves.
* :func:`tokenize_sft_item` / :func:`preference_example` tokenize text items (the prompt
  through the chat format, EOS after the response); :func:`as_prompt_list` reads a prompt
  dataset as strings.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from .models import Tokenizer, encode_response

__all__ = [
    "ListDataset",
    "PreferenceExample",
    "SFTExample",
    "as_prompt_list",
    "collate_preference",
    "collate_sft",
    "create_mock_dataset",
    "materialize",
    "preference_example",
    "to_preference_example",
    "to_sft_example",
    "tokenize_sft_item",
]


# ====================================================================== examples


@dataclass
class SFTExample:
    """A prompt followed by its response: ``input_ids[:prompt_len]`` is the prompt."""

    input_ids: list[int]
    prompt_len: int

    def __post_init__(self) -> None:
        if not isinstance(self.prompt_len, int) or isinstance(self.prompt_len, bool):
            raise TypeError(f"prompt_len must be an int, got {type(self.prompt_len).__name__}")
        n = len(self.input_ids)
        if self.prompt_len < 1 or self.prompt_len >= n:
            raise ValueError(
                f"prompt_len={self.prompt_len} is out of range for a sequence of {n} tokens: "
                "it must be at least 1 (the first response token is predicted from the prompt) "
                f"and below {n} (at least one response token); fix the prompt length or the data"
            )

    @property
    def prompt_ids(self) -> list[int]:
        return self.input_ids[: self.prompt_len]

    @property
    def response_ids(self) -> list[int]:
        return self.input_ids[self.prompt_len :]


@dataclass
class PreferenceExample:
    """A prompt with a preferred (``chosen``) and a dispreferred (``rejected``) response."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]

    def __post_init__(self) -> None:
        for name in ("prompt_ids", "chosen_ids", "rejected_ids"):
            if len(getattr(self, name)) == 0:
                raise ValueError(
                    f"{name} is empty; a preference example needs at least one prompt token "
                    "and a non-empty chosen and rejected response"
                )


# ====================================================================== conversion


def _as_id_list(value: Any, what: str) -> list[int]:
    """Token ids from a tensor / array / sequence of integer values (any numeric dtype)."""
    if isinstance(value, Tensor):
        if sum(d != 1 for d in value.shape) > 1:
            raise ValueError(
                f"{what} has shape {tuple(value.shape)}; expected one sequence of token ids "
                "(1-D), not a batch: give one item per sequence"
            )
        t = value.detach().reshape(-1).cpu()
        if t.dtype == torch.bool:
            raise TypeError(f"{what} is a bool tensor; expected integer token ids")
        if t.is_floating_point() or t.is_complex():
            if not bool(torch.all(t == t.round())):
                raise ValueError(f"{what} holds non-integer values; expected integer token ids")
            t = t.round()
        return [int(v) for v in t.long().tolist()]
    if hasattr(value, "tolist") and not isinstance(value, (list, tuple)):  # numpy arrays
        return _as_id_list(torch.as_tensor(value), what)
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(
            f"{what} must be a sequence of token ids (list of ints or integer tensor), "
            f"got {type(value).__name__}; tokenize text before building training examples"
        )
    out = []
    for i, v in enumerate(value):
        if isinstance(v, bool):
            raise TypeError(f"{what}[{i}] is a bool; expected an integer token id")
        if isinstance(v, float):
            if v != int(v):
                raise ValueError(f"{what}[{i}] = {v} is not an integer token id")
            v = int(v)
        elif isinstance(v, Tensor) and v.numel() == 1:
            v = _as_id_list(v, f"{what}[{i}]")[0]
        elif not isinstance(v, int):
            try:
                v = int(v.__index__())  # numpy integers
            except (AttributeError, TypeError):
                raise TypeError(
                    f"{what}[{i}] has type {type(v).__name__}; expected an integer token id"
                ) from None
        out.append(int(v))
    return out


def _as_int(value: Any, what: str) -> int:
    if isinstance(value, bool):
        raise TypeError(f"{what} must be an integer, got a bool")
    if isinstance(value, Tensor) or hasattr(value, "tolist"):
        ids = _as_id_list(value, what)
        if len(ids) != 1:
            raise ValueError(f"{what} must be a single integer, got {len(ids)} values")
        return ids[0]
    if isinstance(value, float) and value == int(value):
        return int(value)
    if not isinstance(value, int):
        raise TypeError(f"{what} must be an integer, got {type(value).__name__}")
    return value


def _strip_pad(ids: list[int], pad_id: int | None, what: str) -> list[int]:
    """Remove the trailing run of ``pad_id``; a pad id inside the sequence is an error."""
    if pad_id is None:
        end = len(ids)
    else:
        end = len(ids)
        while end > 0 and ids[end - 1] == pad_id:
            end -= 1
        for pos in range(end):
            if ids[pos] == pad_id:
                raise ValueError(
                    f"pad id {pad_id} collides with a real token of {what} at position {pos} "
                    f"(the sequence continues to position {end - 1}); choose a pad id that is "
                    "not a vocabulary id (the seed uses -1), or pass pad_id=None if the data "
                    "is not padded"
                )
    out = ids[:end]
    for pos, v in enumerate(out):
        if v < 0:
            raise ValueError(
                f"{what} has a negative token id {v} at position {pos}; if it is padding, "
                f"pass pad_id={v} so that trailing pads are stripped"
            )
    return out


def to_sft_example(item: Any, *, pad_id: int | None = None) -> SFTExample:
    """Convert one dataset item to an :class:`SFTExample`.

    Accepted forms: :class:`SFTExample`; the seed's ``(seq, prompt_len)`` tuple, where
    ``prompt_len`` may be an int, a 0-d/1-element tensor, or a boolean prompt mask over
    ``seq``; dicts ``{"input_ids", "prompt_len"}`` or ``{"prompt_ids", "response_ids"}``.
    Trailing ``pad_id`` tokens are stripped (after the prompt/response split is known).
    """
    if isinstance(item, SFTExample):
        seq, prompt_len = list(item.input_ids), item.prompt_len
    elif isinstance(item, Mapping):
        if "input_ids" in item and "prompt_len" in item:
            seq = _as_id_list(item["input_ids"], "input_ids")
            prompt_len = _as_int(item["prompt_len"], "prompt_len")
        elif "prompt_ids" in item and "response_ids" in item:
            prompt = _strip_pad(_as_id_list(item["prompt_ids"], "prompt_ids"), pad_id, "prompt_ids")
            response = _as_id_list(item["response_ids"], "response_ids")
            seq, prompt_len = prompt + response, len(prompt)
        else:
            raise ValueError(
                f"an SFT dict needs keys 'input_ids' and 'prompt_len', or 'prompt_ids' and "
                f"'response_ids'; got keys {sorted(map(str, item))}"
            )
    elif isinstance(item, (tuple, list)) and len(item) == 2:
        seq = _as_id_list(item[0], "seq")
        second = item[1]
        if isinstance(second, Tensor) and second.dtype == torch.bool and second.numel() > 1:
            mask = second.reshape(-1).tolist()
            prompt_len = sum(mask)
            if mask[:prompt_len] != [True] * prompt_len:
                raise ValueError(
                    "the prompt mask must mark a prefix of the sequence (True then False); "
                    "pass the prompt length instead"
                )
        else:
            prompt_len = _as_int(second, "prompt_len")
    else:
        raise TypeError(
            f"cannot make an SFT example from {type(item).__name__}; pass (seq, prompt_len), "
            "{'input_ids', 'prompt_len'}, {'prompt_ids', 'response_ids'} or an SFTExample"
        )
    seq = _strip_pad(seq, pad_id, "the sequence")
    if prompt_len < 1 or prompt_len >= len(seq):
        raise ValueError(
            f"prompt_len={prompt_len} does not fit a sequence of {len(seq)} tokens"
            + (f" (after stripping trailing pad id {pad_id})" if pad_id is not None else "")
            + ": it must be >= 1 and < the sequence length so that at least one response "
            "token follows the prompt; fix the prompt length or drop the example"
        )
    return SFTExample(seq, prompt_len)


def to_preference_example(item: Any, *, pad_id: int | None = None) -> PreferenceExample:
    """Convert one dataset item to a :class:`PreferenceExample`.

    Accepted forms: :class:`PreferenceExample`; a dict with ``prompt_ids``, ``chosen_ids``
    and ``rejected_ids``; a 3-tuple ``(prompt_ids, chosen_ids, rejected_ids)``; or the
    seed's DPO triple ``(preferred_seq, unpreferred_seq, prompt_len)`` where both
    sequences start with the same prompt of ``prompt_len`` tokens and are right-padded
    with ``pad_id``.
    """
    if isinstance(item, PreferenceExample):
        parts = (item.prompt_ids, item.chosen_ids, item.rejected_ids)
        return PreferenceExample(*(_strip_pad(list(p), pad_id, "the example") for p in parts))
    if isinstance(item, Mapping):
        missing = [k for k in ("prompt_ids", "chosen_ids", "rejected_ids") if k not in item]
        if missing:
            raise ValueError(
                f"a preference dict needs keys prompt_ids, chosen_ids, rejected_ids; missing "
                f"{missing} (got {sorted(map(str, item))}); tokenize text columns first"
            )
        prompt, chosen, rejected = (item["prompt_ids"], item["chosen_ids"], item["rejected_ids"])
    elif isinstance(item, (tuple, list)) and len(item) == 3:
        prompt, chosen, rejected = item
        # a scalar third element (int, 0-d tensor / array) marks the seed's format
        third_is_len = isinstance(rejected, int) or getattr(rejected, "ndim", None) == 0
        if third_is_len:  # seed format: (preferred_seq, unpreferred_seq, prompt_len)
            pl = _as_int(rejected, "prompt_len")
            pref = _strip_pad(_as_id_list(prompt, "preferred_seq"), pad_id, "preferred_seq")
            unpref = _strip_pad(_as_id_list(chosen, "unpreferred_seq"), pad_id, "unpreferred_seq")
            if pl < 1 or pl >= len(pref) or pl >= len(unpref):
                raise ValueError(
                    f"prompt_len={pl} must be >= 1 and shorter than both sequences "
                    f"({len(pref)} and {len(unpref)} tokens after stripping padding)"
                )
            if pref[:pl] != unpref[:pl]:
                raise ValueError(
                    "the preferred and unpreferred sequences must share the same prompt "
                    f"(their first prompt_len={pl} tokens differ)"
                )
            return PreferenceExample(pref[:pl], pref[pl:], unpref[pl:])
    else:
        raise TypeError(
            f"cannot make a preference example from {type(item).__name__}; pass "
            "(prompt_ids, chosen_ids, rejected_ids), a dict with those keys, "
            "(preferred_seq, unpreferred_seq, prompt_len) or a PreferenceExample"
        )
    return PreferenceExample(
        _strip_pad(_as_id_list(prompt, "prompt_ids"), pad_id, "prompt_ids"),
        _strip_pad(_as_id_list(chosen, "chosen_ids"), pad_id, "chosen_ids"),
        _strip_pad(_as_id_list(rejected, "rejected_ids"), pad_id, "rejected_ids"),
    )


def materialize(dataset: Any, convert: Callable[[Any], Any], *, name: str = "dataset") -> list:
    """Read every item of ``dataset`` once through ``convert`` (a ``to_*_example``).

    Items are read exactly once, so datasets that build items on the fly (the seed's
    mock datasets return fresh random tensors on every access) stay fixed for training.
    Errors name the offending index.
    """
    if dataset is None:
        raise ValueError(f"{name} is None; pass a dataset of examples")
    try:
        n = len(dataset)
    except TypeError:
        raise TypeError(
            f"{name} must support len() and indexing (a torch Dataset, a list, or a "
            f"datasets.Dataset), got {type(dataset).__name__}"
        ) from None
    if n == 0:
        raise ValueError(f"{name} is empty; it needs at least one example")
    out = []
    for i in range(n):
        try:
            out.append(convert(dataset[i]))
        except (ValueError, TypeError) as exc:
            raise type(exc)(f"{name}[{i}]: {exc}") from exc
    return out


# ====================================================================== text items


def as_prompt_list(dataset: Any, name: str) -> list[str]:
    """A prompt dataset as strings (items are strings or dicts with a ``prompt`` key);
    blank or missing prompts are refused, naming the item."""
    prompts = []
    for i in range(len(dataset)):
        item = dataset[i]
        if isinstance(item, dict):
            item = item.get("prompt", item.get("instruction"))
        if not isinstance(item, str):
            raise TypeError(
                f"prompt dataset {name!r} item {i} is {type(item).__name__}; prompts must be "
                "strings (or dicts with a 'prompt' key)"
            )
        if not item.strip():
            raise ValueError(
                f"prompt dataset {name!r} item {i} is {'empty' if not item else 'blank'} "
                f"({item!r}); every prompt needs text to respond to: remove the item or fill "
                "it in"
            )
        prompts.append(item)
    if not prompts:
        raise ValueError(f"prompt dataset {name!r} is empty; give at least one prompt")
    return prompts


def tokenize_sft_item(item: Any, tokenizer: Tokenizer) -> SFTExample:
    """An SFT item as token ids: text dicts ``{"prompt", "response"}`` are tokenized
    (prompt through the chat format, EOS appended to the response); token items go
    through :func:`to_sft_example`."""
    if isinstance(item, dict) and isinstance(item.get("prompt"), str):
        if not isinstance(item.get("response"), str):
            raise TypeError("a text SFT item needs string 'prompt' and 'response' fields")
        prompt_ids = tokenizer.encode(tokenizer.format_prompt(item["prompt"]))
        response_ids = encode_response(tokenizer, item["response"])
        if tokenizer.eos_id is not None:
            response_ids = response_ids + [tokenizer.eos_id]
        return SFTExample(prompt_ids + response_ids, len(prompt_ids))
    return to_sft_example(item, pad_id=getattr(tokenizer, "pad_id", None))


def preference_example(
    prompt: str, chosen: str, rejected: str, tokenizer: Tokenizer
) -> PreferenceExample:
    """Tokenize one (prompt, chosen, rejected) text triple; EOS ends both responses."""
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    return PreferenceExample(
        prompt_ids=tokenizer.encode(tokenizer.format_prompt(prompt)),
        chosen_ids=encode_response(tokenizer, chosen) + eos,
        rejected_ids=encode_response(tokenizer, rejected) + eos,
    )


# ====================================================================== collation


def _collate_rows(
    rows: list[tuple[list[int], int]],
    labels: list[str],
    max_seq_len: int | None,
) -> dict[str, Tensor]:
    if max_seq_len is not None and max_seq_len < 2:
        raise ValueError(f"max_seq_len={max_seq_len} is too small; it must be at least 2")
    kept: list[tuple[list[int], int]] = []
    for (ids, prompt_len), label in zip(rows, labels):
        if max_seq_len is not None and len(ids) > max_seq_len:
            if prompt_len >= max_seq_len:
                raise ValueError(
                    f"{label}: its prompt of {prompt_len} tokens alone fills max_seq_len="
                    f"{max_seq_len}, leaving no room for the response; raise max_seq_len or "
                    "shorten / drop the prompt"
                )
            ids = ids[:max_seq_len]  # truncate the response from the end
        kept.append((ids, prompt_len))
    T = max(len(ids) for ids, _ in kept)
    B = len(kept)
    input_ids = torch.zeros(B, T, dtype=torch.long)
    attention_mask = torch.zeros(B, T, dtype=torch.bool)
    response_mask = torch.zeros(B, T, dtype=torch.bool)
    for b, (ids, prompt_len) in enumerate(kept):
        n = len(ids)
        input_ids[b, :n] = torch.tensor(ids, dtype=torch.long)
        attention_mask[b, :n] = True
        response_mask[b, prompt_len:n] = True
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "response_mask": response_mask,
    }


def collate_sft(
    examples: Sequence[SFTExample], *, max_seq_len: int | None = None
) -> dict[str, Tensor]:
    """Right-pad ``examples`` into ``input_ids`` (B, T) long (pads are ``0``),
    ``attention_mask`` (B, T) bool and ``response_mask`` (B, T) bool.

    Rows longer than ``max_seq_len`` lose the end of their response.
    """
    if len(examples) == 0:
        raise ValueError("collate_sft: the list of examples is empty; pass at least one")
    for i, ex in enumerate(examples):
        if not isinstance(ex, SFTExample):
            raise TypeError(
                f"collate_sft: examples[{i}] is {type(ex).__name__}; convert items with "
                "to_sft_example first"
            )
    rows = [(list(ex.input_ids), ex.prompt_len) for ex in examples]
    return _collate_rows(rows, [f"row {i}" for i in range(len(rows))], max_seq_len)


def collate_preference(
    examples: Sequence[PreferenceExample], *, max_seq_len: int | None = None
) -> dict[str, Tensor]:
    """Chosen rows ``0..B-1`` then rejected rows ``B..2B-1``, right-padded together.

    One forward pass then scores both responses (as the DPO paper's reference code does).
    Returns ``input_ids`` (2B, T), ``attention_mask`` and ``response_mask`` (2B, T).
    """
    if len(examples) == 0:
        raise ValueError("collate_preference: the list of examples is empty; pass at least one")
    for i, ex in enumerate(examples):
        if not isinstance(ex, PreferenceExample):
            raise TypeError(
                f"collate_preference: examples[{i}] is {type(ex).__name__}; convert items "
                "with to_preference_example first"
            )
    rows = [(ex.prompt_ids + ex.chosen_ids, len(ex.prompt_ids)) for ex in examples]
    rows += [(ex.prompt_ids + ex.rejected_ids, len(ex.prompt_ids)) for ex in examples]
    labels = [f"example {i} (chosen)" for i in range(len(examples))]
    labels += [f"example {i} (rejected)" for i in range(len(examples))]
    return _collate_rows(rows, labels, max_seq_len)


# ====================================================================== datasets


class ListDataset(Dataset):
    """A map-style dataset over a Python list."""

    def __init__(self, items: Sequence[Any]) -> None:
        items = list(items)
        if len(items) == 0:
            raise ValueError("ListDataset: the list of items is empty; pass at least one item")
        self.items = items

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int) -> Any:
        return self.items[idx]


class _MockDataset(Dataset):
    def __init__(self, length: int, output: Callable[[], Any] | Any) -> None:
        self.length = length
        self.output = output

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, idx: int) -> Any:
        if not -self.length <= idx < self.length:
            raise IndexError(f"index {idx} out of range for a mock dataset of {self.length}")
        return self.output() if callable(self.output) else self.output


def create_mock_dataset(length: int, output: Callable[[], Any] | Any) -> Dataset:
    """The seed's helper: a dataset of ``length`` items, each ``output()`` (if callable,
    called afresh on every access) or ``output`` itself."""
    if isinstance(length, bool) or not isinstance(length, int):
        raise TypeError(f"length must be an int, got {type(length).__name__}")
    if length < 1:
        raise ValueError(f"the mock dataset is empty (length={length}); pass length >= 1")
    return _MockDataset(length, output)
