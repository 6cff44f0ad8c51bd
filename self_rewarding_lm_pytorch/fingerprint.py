"""Stable fingerprints of what shapes a stage's output (settings, data, model, judge).

``state.json`` keeps, per stage, flat ``{key: value}`` maps built with these helpers; a
rerun compares them key by key (:func:`changed_keys`) to refuse changed settings by name.
Every value is plain JSON and the same in every process for the same inputs: no object
ids, no absolute paths, no dict-order dependence, floats as Python writes them.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import inspect
import json
import math
import re
from typing import Any

__all__ = [
    "changed_keys",
    "dataset_digest",
    "flatten",
    "identity",
    "model_identity",
    "tokenizer_identity",
]

_PROBE = "Fingerprint probe: The quick brown fox, 0123456789 ?! \u00e9\u00df\u4e2d"


def _digest(obj: Any) -> str:
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True)
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def _name(obj: Any) -> str:
    target = obj if inspect.isclass(obj) or inspect.isroutine(obj) else type(obj)
    return f"{getattr(target, '__module__', '?')}.{getattr(target, '__qualname__', '?')}"


def _tensor_sample(t: Any, n: int = 64) -> dict:
    """Shape, dtype and ``n`` evenly spaced values (integer positions, so the same on
    every device); a tensor whose values cannot be read (e.g. on the meta device) gives
    its shape and dtype only."""
    import torch

    out: dict[str, Any] = {"shape": list(t.shape), "dtype": str(t.dtype)}
    try:
        flat = t.detach().reshape(-1)
        size = flat.numel()
        if size > n:
            positions = [i * (size - 1) // (n - 1) for i in range(n)]
            flat = flat.index_select(0, torch.tensor(positions, device=flat.device))
        out["sample"] = [_plain_float(v) for v in flat.to("cpu", torch.float64).tolist()]
    except (RuntimeError, NotImplementedError, TypeError):
        pass
    return out


def _plain_float(v: float) -> Any:
    return v if math.isfinite(v) else str(v)


def model_identity(model: Any) -> str:
    """A digest of a model's parameter and buffer names, shapes, dtypes and a strided
    sample of each tensor's values (cheap for large models, stable across processes)."""
    state = model.state_dict()
    return _digest({k: _tensor_sample(v) for k, v in sorted(state.items())})


def tokenizer_identity(tokenizer: Any) -> str:
    """A digest of what a tokenizer does to a fixed probe (chat format, ids, EOS, pad)."""
    try:
        formatted = tokenizer.format_prompt(_PROBE)
        ids = [int(i) for i in tokenizer.encode(formatted)]
    except Exception as exc:  # a tokenizer that cannot encode the probe: use its type
        ids = [f"unencodable: {type(exc).__name__}"]
    return _digest(
        {
            "type": _name(tokenizer),
            "ids": ids,
            "eos": getattr(tokenizer, "eos_id", None),
            "pad": getattr(tokenizer, "pad_id", None),
        }
    )


def _item(obj: Any) -> Any:
    """A data item as plain JSON (tensors and arrays as nested lists)."""
    if hasattr(obj, "tolist") and not isinstance(obj, (str, bytes)):
        return _item(obj.tolist())
    if isinstance(obj, dict):
        return {str(k): _item(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_item(v) for v in obj]
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: _item(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, float):
        return _plain_float(obj)
    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    return identity(obj)


def dataset_digest(dataset: Any) -> str:
    """A content digest of a dataset (every item, in order), with its length."""
    h = hashlib.sha256()
    n = len(dataset)
    for i in range(n):
        text = json.dumps(_item(dataset[i]), sort_keys=True, separators=(",", ":"))
        h.update(text.encode())
        h.update(b"\n")
    return f"{n} items, sha256:{h.hexdigest()[:16]}"


def identity(obj: Any, depth: int = 0) -> Any:
    """A stable, JSON-plain description of a setting's value: functions and classes by
    qualified name, models and tokenizers by :func:`model_identity` /
    :func:`tokenizer_identity`, objects with a ``fingerprint()`` method by what it returns
    (what of them changes results), dataclasses and other objects by their public fields."""
    from torch import Tensor, nn

    if obj is None or isinstance(obj, (bool, int, str)):
        return obj
    if isinstance(obj, float):
        return _plain_float(obj)
    if isinstance(obj, (list, tuple)):
        return [identity(v, depth) for v in obj]
    if isinstance(obj, dict):
        return {
            str(k): identity(v, depth) for k, v in sorted(obj.items(), key=lambda kv: str(kv[0]))
        }
    if isinstance(obj, re.Pattern):
        return obj.pattern
    if isinstance(obj, nn.Module):
        return model_identity(obj)
    if isinstance(obj, Tensor):
        return _digest(_tensor_sample(obj))
    if hasattr(obj, "encode") and hasattr(obj, "format_prompt"):
        return tokenizer_identity(obj)
    if inspect.isclass(obj) or inspect.isroutine(obj):
        return _name(obj)
    if callable(getattr(obj, "fingerprint", None)):
        return {"type": _name(obj), **identity(obj.fingerprint(), depth + 1)}
    if isinstance(obj, functools.partial):
        return {
            "type": _name(obj),
            "func": identity(obj.func, depth + 1),
            "args": identity(list(obj.args), depth + 1),
            "keywords": identity(dict(obj.keywords), depth + 1),
        }
    if dataclasses.is_dataclass(obj):
        fields = {
            f.name: identity(getattr(obj, f.name), depth + 1)
            for f in dataclasses.fields(obj)
            if not f.name.startswith("_")
        }
        return {"type": _name(obj), **fields}
    if depth < 2 and hasattr(obj, "__dict__"):
        public = {k: v for k, v in vars(obj).items() if not k.startswith("_")}
        return {
            "type": _name(obj),
            **{k: identity(v, depth + 1) for k, v in sorted(public.items())},
        }
    return _name(obj)


def flatten(mapping: dict, prefix: str = "") -> dict[str, Any]:
    """``{"trainer": {"beta": 0.1}}`` as ``{"trainer.beta": 0.1}`` (values JSON-plain)."""
    out: dict[str, Any] = {}
    for key in sorted(mapping, key=str):
        value = mapping[key]
        name = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            out.update(flatten(value, name + "."))
        else:
            out[name] = json.loads(json.dumps(value, sort_keys=True))
    return out


def _show(value: Any, width: int = 80) -> str:
    """A value as JSON; a long list or mapping is shortened, a string or number never (a
    path or a name must be readable to its end: that is where two of them differ)."""
    text = "<unset>" if value is _UNSET else json.dumps(value, sort_keys=True)
    if len(text) <= width or not isinstance(value, (list, tuple, dict)):
        return text
    return text[: width - 3] + "..."


_UNSET = object()


def changed_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """``["key: old -> new", ...]`` for every key whose value differs."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key, _UNSET), new.get(key, _UNSET)
        if a != b:
            out.append(f"{key}: {_show(a)} -> {_show(b)}")
    return out
