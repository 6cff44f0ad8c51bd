"""Data in: prompts, SFT (IFT) and EFT examples from files, as text or chat messages.

Readers (:func:`read_rows`): JSONL, JSON (a list of objects, or ``{"data": [...]}``),
CSV / TSV, Parquet (pyarrow) and local ``datasets`` folders written by
``save_to_disk`` (a ``DatasetDict`` needs ``split``). Rows are plain dicts.

Each row is then read as one of

* **text**: ``prompt_field`` (+ ``response_field`` for SFT/EFT);
* **chat**: ``messages_field``, a list of ``{"role", "content"}`` (a JSON string in
  CSV cells is decoded). The last turn, when it is the assistant's, is the response;
  everything before it is the prompt. A single user turn becomes text; longer
  conversations (system prompts, several turns) are tokenized with the tokenizer's
  chat template (SFT only: generation prompts are single user turns).

:func:`load_prompts` gives ``list[str]``; :func:`load_sft` gives items the pipeline
takes: ``{"prompt", "response"}`` text dicts or ``{"prompt_ids", "response_ids"}`` for
multi-turn chats.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from io import StringIO
from pathlib import Path
from typing import Any

from .config import DataSource
from .store import decode_utf8

__all__ = [
    "decode_utf8",
    "detect_format",
    "load_prompts",
    "load_rows",
    "load_sft",
    "read_rows",
    "read_text",
    "row_to_example",
    "write_jsonl",
]

_SUFFIXES = {
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "tsv",
    ".parquet": "parquet",
    ".pq": "parquet",
}


def detect_format(path: str | Path) -> str:
    """The file format from the path: a folder is a ``datasets`` folder, else the suffix."""
    p = Path(path)
    if p.is_dir():
        return "datasets"
    fmt = _SUFFIXES.get(p.suffix.lower())
    if fmt is None:
        raise ValueError(
            f"cannot tell the format of {p} from its suffix {p.suffix!r}; supported: .jsonl, "
            ".json, .csv, .tsv or .parquet files and datasets folders (for one prompt per "
            "line, write a .csv with the header line 'prompt'); rename the file or set its "
            "format explicitly (format: in a config, --format on the command line)"
        )
    return fmt


def read_text(path: str | Path) -> str:
    """The text of a UTF-8 file (data, templates, configs); see :func:`decode_utf8`."""
    return decode_utf8(Path(path).read_bytes(), path)


def _read_jsonl(path: Path) -> list[dict]:
    rows = []
    for n, line in enumerate(read_text(path).split("\n"), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise ValueError(
                f"{path}:{n}: not valid JSON ({exc.msg}); one object per line"
            ) from exc
    return rows


def _read_json(path: Path) -> list[dict]:
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise ValueError(
            f"{path} is not valid JSON ({exc}); for one object per line name it .jsonl"
        ) from exc
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list):
        raise ValueError(f"{path}: expected a JSON list of objects (or {{'data': [...]}})")
    return data


def _read_csv(path: Path, delimiter: str) -> list[dict]:
    text = StringIO(read_text(path), newline="")
    return [dict(r) for r in csv.DictReader(text, delimiter=delimiter)]


def _read_parquet(path: Path) -> list[dict]:
    import pyarrow.parquet as pq

    return pq.read_table(str(path)).to_pylist()


def _read_datasets(path: Path, split: str | None) -> list[dict]:
    from datasets import DatasetDict, load_from_disk

    ds = load_from_disk(str(path))
    if isinstance(ds, DatasetDict):
        if split is None:
            if len(ds) == 1:
                split = next(iter(ds))
            else:
                raise ValueError(
                    f"{path} holds several splits ({', '.join(ds)}); choose one with split:"
                )
        if split not in ds:
            raise ValueError(f"{path} has no split {split!r} (splits: {', '.join(ds)})")
        ds = ds[split]
    elif split is not None:
        raise ValueError(f"{path} holds a single dataset; drop split: {split!r}")
    return ds.to_list()


def read_rows(
    path: str | Path, *, format: str = "auto", split: str | None = None, limit: int | None = None
) -> list[dict]:
    """Every row of a data file as a dict (first ``limit`` rows when given)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"data file {p} does not exist")
    fmt = detect_format(p) if format == "auto" else format
    if split is not None and fmt != "datasets":
        raise ValueError(f"split: applies to datasets folders only, not {fmt} files ({p})")
    if fmt == "jsonl":
        rows = _read_jsonl(p)
    elif fmt == "json":
        rows = _read_json(p)
    elif fmt in ("csv", "tsv"):
        rows = _read_csv(p, "," if fmt == "csv" else "\t")
    elif fmt == "parquet":
        rows = _read_parquet(p)
    elif fmt == "datasets":
        rows = _read_datasets(p, split)
    else:
        raise ValueError(
            f"unknown format {fmt!r}; use auto, jsonl, json, csv, tsv, parquet or datasets"
        )
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            raise ValueError(f"{p} row {i} is {type(row).__name__}; each row must be an object")
    if not rows:
        raise ValueError(f"{p} holds no rows")
    return rows[:limit] if limit is not None else rows


def load_rows(source: DataSource) -> list[dict]:
    """The rows of a :class:`DataSource` (its file, or its inline ``rows``)."""
    if source.rows is not None:
        for i, row in enumerate(source.rows):
            if not isinstance(row, dict):
                raise ValueError(
                    f"inline row {i} is {type(row).__name__}; each row must be a mapping"
                )
        return [dict(r) for r in source.rows[: source.limit]]
    assert source.path is not None
    return read_rows(source.path, format=source.format, split=source.split, limit=source.limit)


# ====================================================================== rows -> examples


def _messages(value: Any, where: str) -> list[dict]:
    if isinstance(value, str):  # a JSON-encoded list (CSV cells)
        try:
            value = json.loads(value)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{where}: messages is a string but not JSON ({exc.msg})") from exc
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: messages must be a non-empty list of {{role, content}} objects")
    out = []
    for j, m in enumerate(value):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise ValueError(
                f"{where}: message {j} must be an object with string 'role' and 'content', got {m!r}"
            )
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _field(row: dict, name: str, where: str, fix: str) -> str:
    if name not in row:
        raise ValueError(
            f"{where} has no field {name!r} (fields: {', '.join(map(str, row))}); {fix}"
        )
    value = row[name]
    if not isinstance(value, str):
        raise TypeError(
            f"{where}: field {name!r} must be text, got {type(value).__name__} {value!r}"
        )
    return value


def row_to_example(
    row: dict,
    source: DataSource,
    *,
    need_response: bool,
    where: str = "row",
) -> dict[str, Any]:
    """One row as ``{"prompt", "response"?}`` (text) or ``{"messages"}`` (multi-turn chat).

    With ``need_response`` a response is required (SFT / EFT data); otherwise it is kept
    when present. Chat rows with one user turn (and an optional final assistant turn)
    become text; anything longer is returned as ``{"messages": [...]}``.
    """
    messages_field = source.messages_field
    if messages_field is None and source.prompt_field not in row and "messages" in row:
        messages_field = "messages"
    if messages_field is not None:
        if messages_field not in row:
            raise ValueError(
                f"{where} has no field {messages_field!r} (fields: {', '.join(map(str, row))}); "
                "set messages_field: to the column holding the chat"
            )
        msgs = _messages(row[messages_field], where)
        has_answer = msgs[-1]["role"] == "assistant"
        if need_response and not has_answer:
            raise ValueError(
                f"{where}: the last message is from {msgs[-1]['role']!r}; SFT data needs the "
                "assistant's answer as the last message"
            )
        context = msgs[:-1] if has_answer else msgs
        if not context:
            raise ValueError(f"{where}: the chat has an answer but no prompt before it")
        if len(context) == 1 and context[0]["role"] == "user":
            out: dict[str, Any] = {"prompt": context[0]["content"]}
            if has_answer:
                out["response"] = msgs[-1]["content"]
            return out
        return {"messages": msgs}
    fix = "set prompt_field: (or messages_field: for chat data)"
    out = {"prompt": _field(row, source.prompt_field, where, fix)}
    if need_response or source.response_field in row:
        out["response"] = _field(
            row, source.response_field, where, "set response_field: to the column with the answers"
        )
    return out


def load_prompts(source: DataSource) -> list[str]:
    """Prompts (single user turns) for generation."""
    prompts = []
    for i, row in enumerate(load_rows(source)):
        where = f"{source.path or 'inline data'} row {i}"
        ex = row_to_example(row, source, need_response=False, where=where)
        if "messages" in ex:
            raise ValueError(
                f"{where}: a prompt must be a single user turn, but this chat has "
                f"{len(ex['messages'])} messages (system prompts / history are not supported "
                "for generation prompts)"
            )
        prompts.append(ex["prompt"])
    return prompts


def _chat_ids(tok: Any, messages: list[dict], **kw: Any) -> list[int]:
    out = tok.apply_chat_template(messages, tokenize=True, **kw)
    if isinstance(out, dict) or hasattr(out, "keys"):  # BatchEncoding in newer transformers
        out = out["input_ids"]
    return list(out)


def _tokenize_chat(messages: list[dict], tokenizer: Any, where: str) -> dict[str, list[int]]:
    """A multi-turn chat as prompt ids (everything up to the last assistant turn, with the
    generation prompt) and response ids (the rest of the templated conversation)."""
    from .models import HFTokenizer, wrap_tokenizer

    tok = wrap_tokenizer(tokenizer)
    hf = tok.tokenizer if isinstance(tok, HFTokenizer) else None
    if hf is None or not getattr(hf, "chat_template", None):
        raise ValueError(
            f"{where}: a chat with {len(messages)} messages (system prompt or several turns) "
            "needs a tokenizer with a chat template; set tokenizer.chat_template or give "
            "single-turn prompt/response data"
        )
    prompt_ids = _chat_ids(hf, messages[:-1], add_generation_prompt=True)
    full = _chat_ids(hf, messages)
    if full[: len(prompt_ids)] == prompt_ids and len(full) > len(prompt_ids):
        response_ids = full[len(prompt_ids) :]
    else:  # a template that renders the history differently once answered
        response_ids = list(hf.encode(messages[-1]["content"], add_special_tokens=False))
        if tok.eos_id is not None:
            response_ids.append(tok.eos_id)
    if not response_ids:
        raise ValueError(f"{where}: the assistant's answer encodes to no tokens")
    return {"prompt_ids": prompt_ids, "response_ids": response_ids}


def load_sft(source: DataSource, tokenizer: Any = None) -> list[dict[str, Any]]:
    """SFT / EFT examples: text dicts, or token dicts for multi-turn chats (which need
    ``tokenizer`` with a chat template)."""
    items = []
    for i, row in enumerate(load_rows(source)):
        where = f"{source.path or 'inline data'} row {i}"
        ex = row_to_example(row, source, need_response=True, where=where)
        if "messages" in ex:
            if tokenizer is None:
                raise ValueError(f"{where}: multi-turn chat data needs a tokenizer")
            ex = _tokenize_chat(ex["messages"], tokenizer, where)
        items.append(ex)
    return items


def write_jsonl(path: str | Path, records: Sequence[dict]) -> Path:
    """Write ``records`` as JSONL atomically (a temp file renamed into place)."""
    from .store import atomic_write_text

    text = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
    atomic_write_text(path, text)
    return Path(path)
