"""``srlm generate``: sample candidate responses for a file of prompts, to a resumable JSONL."""

from __future__ import annotations

import argparse
import json
from typing import Any

from ..config import ConfigError
from .flags import dataclass_from_args
from .inputs import _abspath, _device, _file_hash, _fingerprint, _row_keys, _source_from_args
from .outputs import KeyedJsonlStore


def backend_from_args(args: argparse.Namespace) -> Any:
    """The :class:`BackendConfig` of ``--backend``, ``--vllm.*`` and ``--openai.*``."""
    from ..generation import BackendConfig

    try:
        return dataclass_from_args(BackendConfig, args)
    except ConfigError as exc:
        raise ConfigError(
            f"--backend / --vllm.* / --openai.*: {exc} (flags: --backend vllm, "
            "--openai.base-url URL, ...)"
        ) from exc


def _generate_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Everything that shapes what ``srlm generate`` writes for a prompt."""
    from ..generation.selection import backend_fingerprint

    generation = backend_fingerprint(backend_from_args(args))
    if args.model is None and not generation.get("backend") == "openai":
        raise ConfigError("--model is required (a local causal LM folder) unless --backend openai")
    settings = {
        "prompts": _abspath(args.prompts),
        "prompt_field": args.prompt_field,
        "messages_field": args.messages_field,
        "model": _abspath(args.model),
        "model_files": _fingerprint(args.model, "--model") if args.model else None,
        "tokenizer": _abspath(args.tokenizer),
        "tokenizer_files": _fingerprint(args.tokenizer, "--tokenizer") if args.tokenizer else None,
        "chat_template_file": _file_hash(args.chat_template_file, "--chat-template-file"),
        "no_chat_template": args.no_chat_template,
        "dtype": args.dtype,
        "num_candidates": args.num_return_sequences,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "min_p": args.min_p,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
    }
    if generation:  # the torch engine's rows keep the keys they had before backends
        settings["generation"] = generation
    return settings


def cmd_generate(args: argparse.Namespace) -> int:
    from ..io import load_prompts

    prompts = load_prompts(_source_from_args(args, args.prompts))
    settings = _generate_settings(args)
    keys = _row_keys(settings, prompts)
    out = KeyedJsonlStore(
        args.out,
        name="generate",
        settings=settings,
        keys=keys,
        flag="--out",
        input_path=args.prompts,
        overwrite=args.overwrite,
    )
    todo = [i for i, k in enumerate(keys) if k not in out.rows]
    if todo:
        _generate_into(out, args, prompts, keys)
    out.finish(keys, [str(i) for i in range(len(prompts))])
    print(
        json.dumps(
            {
                "out": str(args.out),
                "prompts": len(prompts),
                "generated": len(todo),
                "reused": len(prompts) - len(todo),
            }
        )
    )
    return 0


def _generate_into(
    out: KeyedJsonlStore, args: argparse.Namespace, prompts: list[str], keys: list[str]
) -> None:
    """Sample the rows ``out`` lacks, in fixed chunks of the input (each seeded by its
    first position), so a resumed run writes what an uninterrupted one would."""
    from ..generation.selection import build_backend
    from ..hf import ensure_pad_token, load_model, load_tokenizer
    from ..models import HFTokenizer

    generation = backend_from_args(args)
    folder = args.tokenizer or args.model
    hf_tok = load_tokenizer(folder, chat_template_file=args.chat_template_file) if folder else None
    if generation.backend == "torch":
        model = load_model(args.model, dtype=args.dtype)
        ensure_pad_token(hf_tok, model)
        model.to(_device(args.device))
        backend = build_backend(generation, model=model)
    else:
        backend = build_backend(
            generation,
            tokenizer=hf_tok,
            weights_dir=args.model,
            tokenizer_dir=args.tokenizer,
            dtype=args.dtype,
        )
    if hf_tok is not None:
        tok = HFTokenizer(hf_tok, use_chat_template=False if args.no_chat_template else None)
    else:  # a server's chat api without --model / --tokenizer: the backend's own codec
        tok = backend.tokenizer
    try:
        _sample_chunks(out, args, prompts, keys, backend, tok)
    finally:
        backend.close()


def _sample_chunks(
    out: KeyedJsonlStore,
    args: argparse.Namespace,
    prompts: list[str],
    keys: list[str],
    backend: Any,
    tok: Any,
) -> None:
    from ..generation import GenerationConfig, generate_text
    from ..utils import make_generator
    from .parser import GENERATE_EXCLUDED

    config = dataclass_from_args(GenerationConfig, args, exclude=GENERATE_EXCLUDED)
    for start in range(0, len(prompts), args.chunk_size):
        idx = list(range(start, min(start + args.chunk_size, len(prompts))))
        if all(keys[i] in out.rows for i in idx):
            continue
        gen = make_generator(args.seed + start, _device(args.device))
        texts = generate_text(backend, tok, [prompts[i] for i in idx], config, generator=gen)
        out.extend(
            [
                out.keyed({"id": str(i), "prompt": prompts[i], "responses": r}, keys[i])
                for i, r in zip(idx, texts)
                if keys[i] not in out.rows
            ]
        )
