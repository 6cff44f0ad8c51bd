"""The ``srlm`` command line.

* ``srlm run CONFIG.yaml [--out DIR] [--overwrite] [--check]``: the whole staged pipeline
  from a YAML config (validated before any work; see ``run_config.py``). Running the same
  command again resumes where it stopped.
* ``srlm generate``: sample candidate responses for a file of prompts, to JSONL.
* ``srlm judge``: score a JSONL of prompt/response(s) with a judge, to JSONL.
* ``srlm eval``: agreement of judge scores with labelled scores (pairwise accuracy, exact
  match, Spearman, Kendall tau, parse rate: the paper's reward-modelling metrics).
* ``srlm demo ...``: the built-in miniature task (``self_rewarding_lm_pytorch.demo.run``).

Every command takes ``--help``. ``generate`` and ``judge`` append records as they are
made; each record carries a key of the input row and the settings that made it, so a
rerun reuses exactly the records it would make again (an interrupted command resumes)
and refuses an output file made with other settings, naming them (``--overwrite``
replaces it).
Heavy imports (torch, transformers) happen inside the commands, so ``--help`` is quick.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .config import ConfigError, to_dict
from .run_config import (
    AccelerateConfig,
    DataSource,
    JudgeSpec,
    RewardConfigSpec,
    RunConfig,
    load_run_config,
    resolve_object,
)

__all__ = [
    "JsonlTracker",
    "build_accelerate_kwargs",
    "build_datasets",
    "build_judge",
    "build_model",
    "build_reward_config",
    "build_tokenizer",
    "build_trainer",
    "main",
    "run_from_config",
]

log = logging.getLogger("srlm")

EXIT_USAGE = 2  # bad config / arguments
EXIT_FAILURE = 1  # the work itself failed
EXIT_INTERRUPTED = 130  # Ctrl-C (128 + SIGINT, what shells report)


# ====================================================================== trackers


def _tracker_base() -> type:
    from accelerate.tracking import GeneralTracker

    return GeneralTracker


def JsonlTracker(run_name: str, logging_dir: str | Path) -> Any:  # noqa: N802 (class factory)
    """An accelerate tracker that needs no extra package: appends every ``log`` call to
    ``<logging_dir>/<run_name>/metrics.jsonl`` and the run config to ``config.json``.
    (A factory, so importing this module does not import accelerate.)"""
    base = _tracker_base()

    class _JsonlTracker(base):  # type: ignore[misc, valid-type]
        name = "jsonl"
        requires_logging_directory = True
        main_process_only = True

        def __init__(self) -> None:
            super().__init__()
            self.dir = Path(logging_dir) / run_name
            self.path = self.dir / "metrics.jsonl"

        @property
        def tracker(self) -> Path:
            return self.path

        def start(self) -> None:
            self.dir.mkdir(parents=True, exist_ok=True)

        def store_init_configuration(self, values: dict) -> None:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "config.json").write_text(json.dumps(values, indent=2, default=str) + "\n")

        def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
            self.dir.mkdir(parents=True, exist_ok=True)
            record = {"step": step, **{k: _jsonable(v) for k, v in values.items()}}
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

        def finish(self) -> None:
            pass

    return _JsonlTracker()


def _jsonable(v: Any) -> Any:
    if hasattr(v, "item") and callable(v.item):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v if isinstance(v, (bool, int, float, str)) or v is None else str(v)


def _flat_config(obj: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as flat ``a.b.c`` keys with scalar values (what trackers store)."""
    out: dict[str, Any] = {}
    if isinstance(obj, dict):
        for k, v in obj.items():
            out.update(_flat_config(v, f"{prefix}{k}."))
    elif isinstance(obj, list):
        out[prefix[:-1]] = json.dumps(obj, default=str)
    else:
        out[prefix[:-1]] = (
            obj if isinstance(obj, (bool, int, float, str)) or obj is None else str(obj)
        )
    return out


def build_accelerate_kwargs(acc: AccelerateConfig, out: str | Path) -> dict[str, Any]:
    """``Accelerator`` keyword arguments from the config (``jsonl`` becomes a tracker object)."""
    kwargs: dict[str, Any] = {"mixed_precision": acc.mixed_precision, "cpu": acc.cpu}
    if acc.trackers:
        project_dir = acc.project_dir or str(Path(out) / "logs")
        trackers: list[Any] = []
        for name in acc.trackers:
            trackers.append(
                JsonlTracker(acc.project_name, project_dir) if name == "jsonl" else name
            )
        kwargs["log_with"] = trackers
        kwargs["project_dir"] = project_dir
    return kwargs


# ====================================================================== builders


def _bytes_encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def _bytes_decode(ids: Any) -> str:
    values = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    return bytes(int(i) for i in values if 0 <= int(i) < 256).decode("utf-8", errors="replace")


def build_tokenizer(cfg: RunConfig) -> Any:
    """The run's tokenizer as a ``models.Tokenizer`` adapter."""
    from .models import CallableTokenizer, HFTokenizer

    t = cfg.tokenizer
    if t.kind == "bytes":
        return CallableTokenizer(_bytes_encode, _bytes_decode, eos_id=t.eos_id)
    from .hf import load_tokenizer

    path = t.path or cfg.model.path
    assert path is not None  # checked by the config
    hf_tok = load_tokenizer(
        path, chat_template=t.chat_template, chat_template_file=t.chat_template_file
    )
    return HFTokenizer(hf_tok, use_chat_template=t.use_chat_template)


def build_model(cfg: RunConfig, tokenizer: Any = None) -> Any:
    """The policy: a Hugging Face model (with LoRA when configured) or an x-transformers
    ``TransformerWrapper``; checks the tokenizer's ids fit the model's vocabulary.

    Random initialisation (an x-transformers model without a checkpoint, new LoRA
    adapters) is seeded with ``cfg.seed``, so the same config builds the same model; the
    global RNG state is left as it was."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        return _build_model(cfg, tokenizer)


def _build_model(cfg: RunConfig, tokenizer: Any) -> Any:
    m = cfg.model
    if m.path is not None:
        from .hf import ensure_pad_token, load_model

        model = load_model(m.path, dtype=m.dtype, lora=m.lora)
        hf_tok = getattr(tokenizer, "tokenizer", None)
        if hf_tok is not None:
            ensure_pad_token(hf_tok, model)
            vocab = model.get_input_embeddings().weight.shape[0]
            if len(hf_tok) > vocab:
                raise ValueError(
                    f"the tokenizer has {len(hf_tok)} tokens but the model's embedding has "
                    f"{vocab} rows; use the model's own tokenizer or resize the embeddings"
                )
        return model
    from x_transformers import Decoder, TransformerWrapper

    kwargs = dict(m.xtransformers or {})
    attn = dict(kwargs.pop("attn_layers"))
    model = TransformerWrapper(attn_layers=Decoder(**attn), **kwargs)
    if m.dtype not in ("auto", "float32"):
        from .hf import torch_dtype

        model = model.to(torch_dtype(m.dtype))
    if m.checkpoint is not None:
        from .trainers.base import load_checkpoint

        load_checkpoint(model, m.checkpoint)
    return model


def build_reward_config(spec: RewardConfigSpec | None) -> Any:
    """A ``judge.RewardConfig`` from its YAML spec (the paper's default when ``None``)."""
    from .judge import (
        DEFAULT_JUDGE_PROMPT,
        DEFAULT_REWARD_CONFIG,
        DEFAULT_REWARD_REGEX_TEMPLATE,
        RewardConfig,
        ScoreRange,
    )

    if spec is None:
        return DEFAULT_REWARD_CONFIG
    template = spec.prompt_template
    if spec.prompt_template_file is not None:
        from .io import read_text

        template = read_text(spec.prompt_template_file)
    default_template = template is None
    kwargs: dict[str, Any] = {
        "prompt_template": DEFAULT_JUDGE_PROMPT if default_template else template,
        "reward_regex_template": spec.reward_regex_template or DEFAULT_REWARD_REGEX_TEMPLATE,
        "match": spec.match,
    }
    if spec.score_range is not None:
        kwargs["validate_reward"] = ScoreRange(*spec.score_range)
    elif default_template:
        kwargs["validate_reward"] = DEFAULT_REWARD_CONFIG.validate_reward
    if spec.score_values is not None:
        kwargs["score_values"] = tuple(spec.score_values)
    elif default_template:
        kwargs["score_values"] = DEFAULT_REWARD_CONFIG.score_values
    return RewardConfig(**kwargs)


def build_judge(
    spec: JudgeSpec, *, default_reward_config: RewardConfigSpec | None = None, device: Any = None
) -> Any:
    """A judge object (``score(prompts, responses)``) from a :class:`JudgeSpec`."""
    if spec.kind == "python":
        assert spec.function is not None
        obj = resolve_object(spec.function)
        if isinstance(obj, type):  # a judge class: instantiated without arguments
            obj = obj()
        if hasattr(obj, "score"):
            return obj
        if not callable(obj):
            raise TypeError(f"{spec.function!r} is neither callable nor has a score() method")
        from .judge import CallableJudge

        return CallableJudge(obj)
    from .hf import load_tokenizer
    from .models import HFTokenizer

    assert spec.path is not None
    tok = load_tokenizer(spec.tokenizer or spec.path)
    if spec.kind == "reward_model":
        from .hf import load_reward_model
        from .judge import RewardModelJudge

        model = load_reward_model(spec.path, dtype=spec.dtype)
        if device is not None:
            model.to(device)
        return RewardModelJudge(
            model,
            HFTokenizer(tok, use_chat_template=False),
            template=spec.template,
            head=spec.head,
            class_values=spec.class_values,
            batch_size=spec.batch_size or 16,
        )
    from .hf import ensure_pad_token, load_model
    from .judge import LLMJudge

    model = load_model(spec.path, dtype=spec.dtype)
    ensure_pad_token(tok, model)
    if device is not None:
        model.to(device)
    model.requires_grad_(False)
    return LLMJudge(
        model,
        HFTokenizer(tok),
        build_reward_config(spec.reward_config or default_reward_config),
        num_samples=spec.num_samples,
        mode=spec.mode,
        temperature=spec.temperature,
        top_p=spec.top_p,
        max_new_tokens=spec.max_new_tokens,
        batch_size=spec.batch_size,
        on_too_long=spec.on_too_long,
    )


def _dataset_roles(cfg: RunConfig) -> dict[str, set[str]]:
    from .pipeline import PreferenceStage, PromptGenerationStage, SFTStage, SPINStage

    roles: dict[str, set[str]] = {}
    for stage in cfg.stage_objects:
        if isinstance(stage, SFTStage):
            for n in stage.datasets:
                roles.setdefault(n, set()).add("sft")
        elif isinstance(stage, SPINStage):
            roles.setdefault(stage.dataset, set()).add("sft")
        elif isinstance(stage, PromptGenerationStage):
            roles.setdefault(stage.seed_dataset, set()).add("prompts")
        elif isinstance(stage, PreferenceStage):
            if stage.prompts != "generated":
                roles.setdefault(stage.prompts, set()).add("prompts")
            if stage.replay is not None:
                roles.setdefault(stage.replay, set()).add("sft")
    return roles


def build_datasets(cfg: RunConfig, tokenizer: Any) -> dict[str, list]:
    """Load every dataset a stage uses: SFT items for SFT/SPIN/replay, prompt strings for
    prompt datasets (text SFT items serve both).

    Every data file of the config is read and parsed in full here (also one that no stage
    uses), so a bad file fails now, naming ``data.<name>``, the file and the line."""
    from .io import load_prompts, load_rows, load_sft

    out: dict[str, list] = {}
    roles = _dataset_roles(cfg)
    for name, src in cfg.data.items():
        role = roles.get(name)
        try:
            if not role:
                load_rows(src)  # checked, not kept
                log.warning("data.%s is not used by any stage; read but not used", name)
                continue
            if "sft" in role:
                items = load_sft(src, tokenizer)
                if "prompts" in role and any("prompt" not in it for it in items):
                    raise ValueError(
                        "used for prompts and for SFT, but holds multi-turn chats; give the "
                        "prompts as a separate single-turn dataset"
                    )
                out[name] = items
            else:
                out[name] = load_prompts(src)
        except (ValueError, TypeError) as exc:
            raise _with_prefix(exc, f"data.{name}") from exc
    return out


def _with_prefix(exc: Exception, where: str) -> Exception:
    """``exc`` again with ``where: `` in front of its message (itself if that fails)."""
    try:
        return type(exc)(f"{where}: {exc}")
    except Exception:  # an exception class with other constructor arguments
        return exc


def build_trainer(cfg: RunConfig, *, model: Any = None, tokenizer: Any = None) -> Any:
    """The :class:`~self_rewarding_lm_pytorch.pipeline.SelfRewardingTrainer` of a config
    (loads the tokenizer, model, data and judges unless given)."""
    from .pipeline import SelfRewardingTrainer

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(cfg)
    model = model if model is not None else build_model(cfg, tokenizer)
    datasets = build_datasets(cfg, tokenizer)
    used_judges = sorted(
        {s.judge for s in cfg.stage_objects if getattr(s, "kind", "") == "external_reward_dpo"}
    )
    accelerate_kwargs = build_accelerate_kwargs(cfg.accelerate, cfg.out)
    from accelerate import PartialState

    device = PartialState(cpu=cfg.accelerate.cpu).device  # the device the Accelerator will use
    judges = {
        n: build_judge(cfg.judges[n], default_reward_config=cfg.reward_config, device=device)
        for n in used_judges
    }
    trainer = SelfRewardingTrainer(
        model,
        tokenizer=tokenizer,
        stages=cfg.stage_objects,
        datasets=datasets,
        judges=judges,
        reward_prompt_config=build_reward_config(cfg.reward_config),
        accelerate_kwargs=accelerate_kwargs,
        checkpoints_folder=cfg.out,
        seed=cfg.seed,
        preference_max_seq_len=cfg.preference_max_seq_len,
        progress=cfg.progress,
    )
    model.to(trainer.accelerator.device)
    return trainer


def run_from_config(cfg: RunConfig, *, overwrite: bool = False) -> dict[str, Any]:
    """Run (or resume) a validated config; returns the run summary (also printed by
    ``srlm run``): the pipeline report plus ``final_model``, the folder that
    ``AutoModelForCausalLM.from_pretrained`` (or :func:`hf.load_model` for adapters) loads."""
    import os

    import yaml

    from .store import RunLock, atomic_write_text

    out = Path(cfg.out)
    if int(os.environ.get("WORLD_SIZE", "1")) == 1:  # a busy run folder: refused before loading
        RunLock(out).check_free()
    trainer = build_trainer(cfg)
    acc = trainer.accelerator
    # the lock, --overwrite (of a run folder only) and the settings check, on every rank
    trainer.open_run_dir(overwrite=overwrite)
    resolved = to_dict(cfg)
    resolved.pop("stage_objects", None)  # derived from `stages`; not a config key
    if acc.is_main_process and not (out / "run_config.yaml").exists():  # once per run
        atomic_write_text(out / "run_config.yaml", yaml.safe_dump(resolved, sort_keys=False))
    if cfg.accelerate.trackers:
        acc.init_trackers(cfg.accelerate.project_name, config=_flat_config(resolved))
    try:
        report = trainer.run()
    finally:
        if cfg.accelerate.trackers:
            for tracker in acc.trackers:
                tracker.finish()
            acc.trackers = []
    summary = dict(report)
    summary["final_model"] = _final_model(cfg, trainer, report)
    return summary


def _final_model(cfg: RunConfig, trainer: Any, report: dict) -> str | None:
    from .hf import export_model, is_peft_model
    from .models import unwrap_model

    model = unwrap_model(trainer.model)
    ckpts = [r["checkpoint"] for r in report.get("stages", []) if r.get("checkpoint")]
    if cfg.model.lora is None or not is_peft_model(model):
        return str(Path(cfg.out) / ckpts[-1]) if ckpts else None
    final = Path(cfg.out) / "final"
    if trainer.accelerator.is_main_process:
        export_model(
            model,
            final,
            tokenizer=trainer.tokenizer,
            mode=cfg.model.lora.export,
            base_model_path=cfg.model.path,
        )
    trainer.accelerator.wait_for_everyone()
    return str(final)


# ====================================================================== commands


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_run_config(args.config)
    if args.out is not None:
        cfg.out = str(Path(args.out).resolve())
    if args.check:
        # the same pre-flight as a run: tokenizer, model, every data file, every prompt
        # against the context, judge templates; nothing is trained or written
        build_trainer(cfg).preflight()
        kinds = ", ".join(s.kind for s in cfg.stage_objects)
        print(f"{args.config}: OK ({len(cfg.stage_objects)} stages: {kinds}; out: {cfg.out})")
        return 0
    summary = run_from_config(cfg, overwrite=args.overwrite)
    from accelerate import PartialState

    if PartialState().is_main_process:  # one summary under `accelerate launch`
        print(json.dumps(summary, indent=2, default=str))
    return 0


def _check_input(path: str, fmt: str, flag: str) -> None:
    """Refuse a missing input file or one of an unknown format before any work."""
    from .io import detect_format

    if not Path(path).exists():
        raise ConfigError(f"{flag}: {path} does not exist")
    if fmt == "auto":
        try:
            detect_format(path)
        except ValueError as exc:
            raise ConfigError(f"{flag}: {exc}") from exc


def _source_from_args(args: argparse.Namespace, path: str) -> DataSource:
    _check_input(path, args.format, "--prompts")
    return DataSource(
        path=path,
        format=args.format,
        split=args.split,
        prompt_field=args.prompt_field,
        response_field=getattr(args, "response_field", "response"),
        messages_field=args.messages_field,
        limit=args.limit,
    )


def _device(name: str) -> Any:
    import torch

    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


# ---------------------------------------------------------------- resumable outputs


def _need(path: str | Path, flag: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"{flag}: {path} does not exist; fix the path")
    return p


def _fingerprint(path: str | Path, flag: str) -> str:
    """A short hash of a file's or a folder's files (names, sizes, modification times):
    changes when a model is saved again in the same folder."""
    p = _need(path, flag)
    files = sorted(f for f in p.iterdir() if f.is_file()) if p.is_dir() else [p]
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f.name}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:12]


def _file_hash(path: str | Path | None, flag: str) -> str | None:
    """A short hash of a file's bytes (``None`` for no file)."""
    if path is None:
        return None
    return hashlib.sha256(_need(path, flag).read_bytes()).hexdigest()[:12]


def _abspath(path: str | Path | None) -> str | None:
    return None if path is None else str(Path(path).resolve())


def _row_keys(settings: dict[str, Any], contents: list[Any]) -> list[str]:
    """One key per input row: a hash of the settings, the row's content and how many
    rows with the same content come before it (so duplicated rows keep their own rows)."""
    base = json.dumps(settings, sort_keys=True, default=str)
    seen: dict[str, int] = {}
    keys = []
    for content in contents:
        text = json.dumps(content, sort_keys=True, default=str)
        n = seen[text] = seen.get(text, -1) + 1
        keys.append(hashlib.sha256(f"{base}\0{text}\0{n}".encode()).hexdigest()[:32])
    return keys


class _KeyedOutput:
    """An output JSONL whose rows carry ``<name>_key`` (what produced the row: the input
    row's content and the settings) and ``<name>_settings``, so a rerun reuses exactly the
    rows it would make again. Rows are appended (flushed each, fsynced each chunk); a torn
    last line from a crash is dropped. Anything else in the file (rows of other settings,
    of input rows no longer given, of another tool) is refused before any work."""

    def __init__(
        self,
        path: str | Path,
        *,
        name: str,
        settings: dict[str, Any],
        keys: list[str],
        flag: str,
        input_path: str,
        overwrite: bool,
    ) -> None:
        self.path = Path(path)
        self.name = name
        self.settings = settings
        self.key_field, self.settings_field = f"{name}_key", f"{name}_settings"
        self.rows: dict[str, dict] = {}
        self.order: list[str] = []  # keys in file order
        self._cut: int | None = None  # where to truncate before the first append
        self._duplicates = False
        if Path(input_path).resolve() == self.path.resolve():
            raise ConfigError(f"{flag} {path} is the input file; write the output elsewhere")
        fix = f"use another {flag}, or add --overwrite to replace the file"
        if overwrite or not self.path.exists():
            self._cut = 0 if self.path.exists() else None
            return
        from .io import decode_utf8

        raw = self.path.read_bytes()
        complete = raw[: raw.rfind(b"\n") + 1]  # a torn last line (a crash) is dropped
        self._cut = len(complete) if len(complete) < len(raw) else None
        try:
            text = decode_utf8(complete, self.path)
        except ValueError as exc:
            raise ConfigError(f"{flag}: {exc}; or {fix}") from exc
        for n, line in enumerate(text.split("\n"), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError:
                row = None
            if not isinstance(row, dict) or self.key_field not in row:
                raise ConfigError(
                    f"{flag} {path}: line {n} is not a row written by srlm {name} (it has no "
                    f"{self.key_field!r}), so the file cannot be resumed; {fix}"
                )
            old = row.get(self.settings_field) or {}
            if old != settings:
                changed = [
                    f"{k}: {old.get(k)!r} -> {settings.get(k)!r}"
                    for k in sorted(set(old) | set(settings))
                    if old.get(k) != settings.get(k)
                ]
                raise ConfigError(
                    f"{flag} {path} holds rows made with other settings ({'; '.join(changed)}); "
                    f"its rows are reused only for the same settings: {fix}"
                )
            key = row[self.key_field]
            if key in self.rows:
                self._duplicates = True  # dropped when the file is rewritten at the end
                continue
            self.rows[key] = row
            self.order.append(key)
        wanted = set(keys)
        stale = [k for k in self.order if k not in wanted]
        if stale:
            first = self.rows[stale[0]]
            shown = f"id {first.get('id')!r}"
            if isinstance(first.get("prompt"), str):
                shown += f", prompt {first['prompt'][:60]!r}"
            raise ConfigError(
                f"{flag} {path} holds {len(stale)} rows made from input rows that {input_path} "
                f"no longer gives (the first: {shown}): the input was edited, or --limit "
                f"lowered; {fix}"
            )

    def append(self, rows: list[dict]) -> None:
        """Append ``rows`` (each already keyed), flushing each line, fsyncing at the end."""
        from .store import _explain  # the library's explanation of write errors

        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            if self._cut is not None:  # drop a torn last line (or, with --overwrite, all)
                with open(self.path, "r+b") as f:
                    f.truncate(self._cut)
                self._cut = None
            with open(self.path, "ab") as f:
                for row in rows:
                    f.write((json.dumps(row, sort_keys=True, default=str) + "\n").encode())
                    f.flush()
                os.fsync(f.fileno())
        except OSError as exc:
            raise _explain(exc, self.path) from exc
        for row in rows:
            key = row[self.key_field]
            self.rows[key] = row
            self.order.append(key)

    def keyed(self, row: dict, key: str) -> dict:
        """``row`` with this output's key and settings."""
        return {**row, self.key_field: key, self.settings_field: self.settings}

    def finish(self, keys: list[str], ids: list[str]) -> list[dict]:
        """The rows in input order (ids as given); the file is rewritten atomically in that
        order when a resumed run appended rows out of order."""
        from .store import atomic_write_text

        rows = [self.rows[k] for k in keys]
        in_order = self.order == keys and all(r.get("id") == i for r, i in zip(rows, ids))
        in_order = in_order and not self._duplicates
        rows = [{**r, "id": i} for r, i in zip(rows, ids)]
        if not in_order:
            text = "".join(json.dumps(r, sort_keys=True, default=str) + "\n" for r in rows)
            atomic_write_text(self.path, text)
        return rows


def _generate_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Everything that shapes what ``srlm generate`` writes for a prompt."""
    return {
        "prompts": _abspath(args.prompts),
        "prompt_field": args.prompt_field,
        "messages_field": args.messages_field,
        "model": _abspath(args.model),
        "model_files": _fingerprint(args.model, "--model"),
        "tokenizer": _abspath(args.tokenizer),
        "tokenizer_files": _fingerprint(args.tokenizer, "--tokenizer") if args.tokenizer else None,
        "chat_template_file": _file_hash(args.chat_template_file, "--chat-template-file"),
        "no_chat_template": args.no_chat_template,
        "dtype": args.dtype,
        "num_candidates": args.num_candidates,
        "temperature": args.temperature,
        "top_p": args.top_p,
        "top_k": args.top_k,
        "min_p": args.min_p,
        "max_new_tokens": args.max_new_tokens,
        "seed": args.seed,
    }


def cmd_generate(args: argparse.Namespace) -> int:
    from .io import load_prompts

    prompts = load_prompts(_source_from_args(args, args.prompts))
    settings = _generate_settings(args)
    keys = _row_keys(settings, prompts)
    out = _KeyedOutput(
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
    out: _KeyedOutput, args: argparse.Namespace, prompts: list[str], keys: list[str]
) -> None:
    """Sample the rows ``out`` lacks, in fixed chunks of the input (each seeded by its
    first position), so a resumed run writes what an uninterrupted one would."""
    import torch

    from .generation import GenerationConfig, generate_text
    from .hf import ensure_pad_token, load_model, load_tokenizer
    from .models import HFTokenizer

    hf_tok = load_tokenizer(
        args.tokenizer or args.model, chat_template_file=args.chat_template_file
    )
    tok = HFTokenizer(hf_tok, use_chat_template=False if args.no_chat_template else None)
    model = load_model(args.model, dtype=args.dtype)
    ensure_pad_token(hf_tok, model)
    model.to(_device(args.device))
    config = GenerationConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        min_p=args.min_p,
        num_return_sequences=args.num_candidates,
    )
    for start in range(0, len(prompts), args.chunk_size):
        idx = list(range(start, min(start + args.chunk_size, len(prompts))))
        if all(keys[i] in out.rows for i in idx):
            continue
        gen = torch.Generator(device=_device(args.device)).manual_seed(args.seed + start)
        texts = generate_text(model, tok, [prompts[i] for i in idx], config, generator=gen)
        out.append(
            [
                out.keyed({"id": str(i), "prompt": prompts[i], "responses": r}, keys[i])
                for i, r in zip(idx, texts)
                if keys[i] not in out.rows
            ]
        )


def _judge_spec_from_args(args: argparse.Namespace) -> JudgeSpec:
    chosen = [a for a in ("model", "reward_model", "function") if getattr(args, a) is not None]
    if len(chosen) != 1:
        raise ConfigError(
            "choose exactly one judge: --model PATH (LLM as a judge), --reward-model PATH or "
            "--function module:name"
        )
    kind = {"model": "llm", "reward_model": "reward_model", "function": "python"}[chosen[0]]
    kw: dict[str, Any] = {"kind": kind}
    if kind == "python":
        kw["function"] = args.function
    else:
        kw.update(path=args.model or args.reward_model, tokenizer=args.tokenizer, dtype=args.dtype)
        if args.batch_size is not None:
            kw["batch_size"] = args.batch_size
    if kind == "llm":
        rc = None
        if args.prompt_template_file or args.regex_template or args.score_range:
            rc = RewardConfigSpec(
                prompt_template_file=args.prompt_template_file,
                reward_regex_template=args.regex_template,
                score_range=list(args.score_range) if args.score_range else None,
            )
        kw.update(
            reward_config=rc,
            num_samples=args.samples,
            mode=args.mode,
            temperature=args.temperature,
            top_p=args.top_p,
            max_new_tokens=args.max_new_tokens,
            on_too_long=args.on_too_long,
        )
    elif kind == "reward_model":
        if args.template is not None:
            kw["template"] = args.template
        kw["head"] = args.head
    try:
        return JudgeSpec(**kw)
    except ValueError as exc:
        raise ConfigError(str(exc)) from exc


def _judge_settings(spec: JudgeSpec, args: argparse.Namespace) -> dict[str, Any]:
    """Everything that shapes the scores ``srlm judge`` writes for a row."""
    settings: dict[str, Any] = {
        "input": _abspath(args.input),
        "prompt_field": args.prompt_field,
        "response_field": args.response_field,
        "responses_field": args.responses_field,
        "judge": spec.kind,
        "seed": args.seed,
    }
    if spec.kind == "python":
        assert spec.function is not None
        resolve_object(spec.function)  # an import error names the fix
        source = getattr(sys.modules[spec.function.partition(":")[0]], "__file__", None)
        settings["function"] = spec.function
        settings["function_file"] = _file_hash(source, "--function") if source else None
        return settings
    flag = "--model" if spec.kind == "llm" else "--reward-model"
    settings.update(
        model=_abspath(spec.path),
        model_files=_fingerprint(spec.path, flag) if spec.path else None,
        tokenizer=_abspath(spec.tokenizer),
        tokenizer_files=_fingerprint(spec.tokenizer, "--tokenizer") if spec.tokenizer else None,
        dtype=spec.dtype,
    )
    if spec.kind == "llm":
        rc = spec.reward_config
        settings.update(
            prompt_template_file=(
                _file_hash(rc.prompt_template_file, "--prompt-template-file") if rc else None
            ),
            regex_template=rc.reward_regex_template if rc else None,
            score_range=rc.score_range if rc else None,
            samples=spec.num_samples,
            mode=spec.mode,
            temperature=spec.temperature,
            top_p=spec.top_p,
            max_new_tokens=spec.max_new_tokens,
            on_too_long=spec.on_too_long,
        )
    else:
        settings.update(template=spec.template, head=spec.head)
    return settings


def _responses(row: dict, args: argparse.Namespace, i: int) -> tuple[bool, list[str]]:
    """Whether ``row`` holds a list of responses, and its responses; checks the fields."""
    if args.prompt_field not in row:
        raise ValueError(
            f"row {i} has no {args.prompt_field!r} field (fields: {', '.join(map(str, row))}); "
            "set --prompt-field"
        )
    if args.responses_field not in row and args.response_field not in row:
        raise ValueError(
            f"row {i} has neither {args.response_field!r} nor {args.responses_field!r}; "
            "set --response-field or --responses-field"
        )
    if not isinstance(row[args.prompt_field], str):
        raise TypeError(
            f"row {i}: the prompt must be text, got {type(row[args.prompt_field]).__name__}; "
            "check --prompt-field"
        )
    resp = row.get(args.responses_field, row.get(args.response_field))
    many = isinstance(resp, list)
    for r in resp if many else [resp]:
        if not isinstance(r, str):
            raise TypeError(
                f"row {i}: responses must be text, got {type(r).__name__}; "
                "check --response-field / --responses-field"
            )
    return many, list(resp) if many else [resp]


def _score_rows(
    rows: list[dict],
    make_judge: Any,
    args: argparse.Namespace,
    out: str | None,
    *,
    spec: JudgeSpec,
    flag: str = "--out",
) -> tuple[list[dict], int]:
    """Score every row (``response`` or a ``responses`` list) in fixed chunks of the input
    (each seeded by its first position). With ``out``, scored rows are appended to that
    JSONL as they are made, and a rerun reuses the rows made with the same settings from
    the same input rows (see :class:`_KeyedOutput`). ``make_judge()`` builds the judge,
    only when some row needs scoring. Returns the rows and how many were scored now."""
    import torch

    checked = [_responses(row, args, i) for i, row in enumerate(rows)]  # all, before any work
    ids = [str(row.get("id", i)) for i, row in enumerate(rows)]
    settings = _judge_settings(spec, args)
    keys = _row_keys(settings, rows)
    store = None
    if out is not None:
        store = _KeyedOutput(
            out,
            name="judge",
            settings=settings,
            keys=keys,
            flag=flag,
            input_path=args.input,
            overwrite=args.overwrite,
        )
    done: dict[str, dict] = store.rows if store is not None else {}
    todo = [k for k in keys if k not in done]
    made: dict[str, dict] = {}
    judge = make_judge() if todo else None
    for start in range(0, len(rows), args.chunk_size):
        idx = list(range(start, min(start + args.chunk_size, len(rows))))
        if all(keys[i] in done for i in idx):
            continue
        prompts, responses, owners = [], [], []
        for i in idx:
            for r in checked[i][1]:
                prompts.append(rows[i][args.prompt_field])
                responses.append(r)
                owners.append(i)
        gen = torch.Generator().manual_seed(args.seed + start)
        scored = judge.score(prompts, responses, generator=gen)
        new = []
        for i in idx:
            if keys[i] in done:
                continue
            mine = [sc for sc, o in zip(scored, owners) if o == i]
            row = {**rows[i], "id": ids[i]}
            if checked[i][0]:
                row["scores"] = [sc.score for sc in mine]
                row["judgements"] = [sc.to_dict() for sc in mine]
            else:
                row["score"] = mine[0].score
                row["judgement"] = mine[0].to_dict()
            new.append(store.keyed(row, keys[i]) if store is not None else row)
            made[keys[i]] = new[-1]
        if store is not None:
            store.append(new)
    if store is not None:
        return store.finish(keys, ids), len(todo)
    return [made[k] for k in keys], len(todo)


def _read_input(args: argparse.Namespace) -> list[dict]:
    from .io import read_rows

    _check_input(args.input, args.format, "--input")
    return read_rows(args.input, format=args.format, split=args.split, limit=args.limit)


def _judge_maker(spec: JudgeSpec, args: argparse.Namespace) -> Any:
    return lambda: build_judge(spec, device=_device(args.device) if spec.kind != "python" else None)


def cmd_judge(args: argparse.Namespace) -> int:
    spec = _judge_spec_from_args(args)
    rows = _read_input(args)
    scored, judged = _score_rows(rows, _judge_maker(spec, args), args, args.out, spec=spec)
    flat = [s for r in scored for s in (r["scores"] if "scores" in r else [r["score"]])]
    parsed = sum(s is not None for s in flat)
    print(
        json.dumps(
            {
                "out": str(args.out),
                "rows": len(scored),
                "scores": len(flat),
                "parsed": parsed,
                "judged": judged,
                "reused": len(scored) - judged,
            }
        )
    )
    return 0


def _as_float(value: Any, where: str) -> float | None:
    if value is None or value == "":
        return None
    try:
        return float(value)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{where}: {value!r} is not a number") from exc


def cmd_eval(args: argparse.Namespace) -> int:
    from .metrics import reward_metrics

    rows = _read_input(args)
    if args.pred_field is None:
        spec = _judge_spec_from_args(args)
        maker = _judge_maker(spec, args)
        rows, _ = _score_rows(rows, maker, args, args.scored_out, spec=spec, flag="--scored-out")
        pred_field, preds_field = "score", "scores"
    else:
        if any(getattr(args, a) is not None for a in ("model", "reward_model", "function")):
            raise ConfigError(
                "give either --pred-field (scores already in the file) or a judge, not both"
            )
        pred_field = preds_field = args.pred_field
    pred: list[float | None] = []
    gold: list[float] = []
    groups: list[Any] = []
    for i, row in enumerate(rows):
        if args.gold_field not in row:
            raise ValueError(
                f"row {i} has no gold score field {args.gold_field!r} (fields: "
                f"{', '.join(map(str, row))}); set --gold-field"
            )
        g = row[args.gold_field]
        p = row.get(preds_field) if isinstance(g, list) else row.get(pred_field)
        if isinstance(g, list):  # one row per prompt, a list of candidates
            if not isinstance(p, list) or len(p) != len(g):
                raise ValueError(
                    f"row {i}: {args.gold_field!r} is a list of {len(g)} but the predictions "
                    f"are {p!r}; give one prediction per gold score"
                )
            for k, (pp, gg) in enumerate(zip(p, g)):
                pred.append(_as_float(pp, f"row {i} prediction {k}"))
                gold.append(_gold(gg, i))
                groups.append(i)
        else:
            pred.append(_as_float(p, f"row {i} prediction"))
            gold.append(_gold(g, i))
            groups.append(row.get(args.group_field, i) if args.group_field else 0)
    metrics = reward_metrics(pred, gold, groups=groups)
    metrics = {
        k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()
    }
    text = json.dumps(metrics, indent=2)
    if args.out is not None:
        from .store import atomic_write_text

        atomic_write_text(args.out, text + "\n")
    print(text)
    return 0


def _gold(value: Any, i: int) -> float:
    g = _as_float(value, f"row {i} gold score")
    if g is None:
        raise ValueError(f"row {i}: the gold score is empty; every row needs a gold score")
    return g


def cmd_demo(argv: list[str]) -> int:
    try:
        from .demo.run import main as demo_main
    except ModuleNotFoundError as exc:
        if exc.name not in ("self_rewarding_lm_pytorch.demo.run",):
            raise
        print(
            "srlm demo: the demo runner (self_rewarding_lm_pytorch/demo/run.py) is not "
            "installed in this version",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    return int(demo_main(argv) or 0)


# ====================================================================== parser


def _add_input_args(p: argparse.ArgumentParser, *, response: bool) -> None:
    g = p.add_argument_group("input data")
    g.add_argument(
        "--format",
        default="auto",
        choices=["auto", "jsonl", "json", "csv", "tsv", "parquet", "datasets"],
        help="input format (default: from the suffix; a folder is a datasets folder)",
    )
    g.add_argument("--split", default=None, help="split of a datasets DatasetDict folder")
    g.add_argument("--limit", type=int, default=None, help="use only the first N rows")
    g.add_argument("--prompt-field", default="prompt", help="column with the prompt text")
    if response:
        g.add_argument("--response-field", default="response", help="column with one response")
        g.add_argument(
            "--responses-field",
            default="responses",
            help="column with a list of responses (the output of srlm generate)",
        )
    else:
        g.add_argument("--messages-field", default=None, help="column with chat messages")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tokenizer", default=None, help="tokenizer folder (default: the model's)")
    p.add_argument("--dtype", default="float32", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (default: auto)")


def _add_judge_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("judge (choose one)")
    g.add_argument("--model", default=None, help="local causal LM folder used as an LLM judge")
    g.add_argument(
        "--reward-model", default=None, help="local sequence-classification reward model"
    )
    g.add_argument(
        "--function",
        default=None,
        help="importable 'module:name' callable (prompt, response) -> score (trusted code only)",
    )
    o = p.add_argument_group("judge options")
    _add_model_args(o)  # type: ignore[arg-type]
    o.add_argument("--prompt-template-file", default=None, help="Jinja2 judge prompt template")
    o.add_argument(
        "--regex-template", default=None, help="score pattern, e.g. 'Score: {{ reward }}'"
    )
    o.add_argument("--score-range", type=float, nargs=2, metavar=("LOW", "HIGH"), default=None)
    o.add_argument("--samples", type=int, default=3, help="judgements per response (paper: 3)")
    o.add_argument("--mode", default="mean", choices=["mean", "expected"])
    o.add_argument("--temperature", type=float, default=0.7)
    o.add_argument("--top-p", type=float, default=0.9)
    o.add_argument("--max-new-tokens", type=int, default=256)
    o.add_argument("--batch-size", type=int, default=None)
    o.add_argument(
        "--on-too-long", default="error", choices=["error", "truncate_response", "truncate_left"]
    )
    o.add_argument("--template", default=None, help="reward-model input template (Jinja2)")
    o.add_argument("--head", default="scalar", choices=["scalar", "classes"])
    o.add_argument("--chunk-size", type=int, default=32, help="rows scored (and saved) together")
    o.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="srlm",
        description="Self-Rewarding Language Models (Yuan et al., 2024): training pipeline, "
        "generation, judging and judge evaluation.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    parser.add_argument("-q", "--quiet", action="store_true", help="log warnings only")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser(
        "run",
        help="run (or resume) the staged pipeline from a YAML config",
        description="Run the stages of CONFIG.yaml in order (SFT, SPIN, prompt generation, "
        "self-/external-reward DPO). The config is validated before any work starts. "
        "Running the same command again resumes where it stopped.",
    )
    p.add_argument("config", help="YAML run config (see examples/*.yaml and docs/cli.md)")
    p.add_argument("--out", default=None, help="run folder (overrides out: in the config)")
    p.add_argument("--overwrite", action="store_true", help="clear a run folder made by srlm")
    p.add_argument("--check", action="store_true", help="validate the config and exit")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser(
        "generate",
        help="sample candidate responses for prompts, to JSONL",
        description="Sample --num-candidates responses per prompt with a local Hugging Face "
        "model. Writes one JSON line per prompt: {id, prompt, responses}. Resumes: a rerun "
        "reuses the rows of --out made from the same prompts with the same settings, and "
        "refuses an --out made with other settings (naming them).",
    )
    p.add_argument("--model", required=True, help="local causal LM folder")
    p.add_argument(
        "--prompts", required=True, help="prompt file (jsonl/json/csv/tsv/parquet/datasets folder)"
    )
    p.add_argument("--out", required=True, help="output JSONL")
    p.add_argument("--overwrite", action="store_true", help="replace --out instead of resuming it")
    _add_model_args(p)
    p.add_argument(
        "--chat-template-file", default=None, help="replace the tokenizer's chat template"
    )
    p.add_argument("--no-chat-template", action="store_true", help="feed prompts as plain text")
    p.add_argument("--num-candidates", type=int, default=4, help="responses per prompt (paper: 4)")
    p.add_argument("--temperature", type=float, default=0.7, help="paper: 0.7")
    p.add_argument("--top-p", type=float, default=0.9, help="paper: 0.9")
    p.add_argument("--top-k", type=int, default=0)
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument(
        "--chunk-size", type=int, default=16, help="prompts generated (and saved) together"
    )
    p.add_argument("--seed", type=int, default=0)
    _add_input_args(p, response=False)
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser(
        "judge",
        help="score a JSONL of prompt/response pairs with a judge",
        description="Score each row's response (or list of responses, as written by srlm "
        "generate) with an LLM judge, a reward model or a Python function. Writes the rows "
        "with score/judgement (or scores/judgements) added. Resumes: a rerun reuses the "
        "rows of --out judged from the same input rows with the same settings, and refuses "
        "an --out made with other settings (naming them).",
    )
    p.add_argument("--input", required=True, help="rows with prompt and response(s)")
    p.add_argument("--out", required=True, help="output JSONL")
    p.add_argument("--overwrite", action="store_true", help="replace --out instead of resuming it")
    _add_judge_args(p)
    _add_input_args(p, response=True)
    p.set_defaults(func=cmd_judge)

    p = sub.add_parser(
        "eval",
        help="judge agreement with labelled scores (pairwise accuracy, Spearman, ...)",
        description="Compare judge scores with gold scores: pairwise accuracy (within "
        "--group-field, default the prompt), exact match, Spearman, Kendall tau and parse "
        "rate (Yuan et al. 2024, Table 3). Scores come from --pred-field, or from a judge "
        "run now (--model / --reward-model / --function).",
    )
    p.add_argument("--input", required=True, help="rows with prompt, response and a gold score")
    p.add_argument("--gold-field", default="gold_score", help="column with the gold score")
    p.add_argument("--pred-field", default=None, help="column with existing predicted scores")
    p.add_argument(
        "--group-field",
        default="prompt",
        help="pairwise accuracy compares rows sharing this field ('' for all pairs)",
    )
    p.add_argument("--out", default=None, help="write the metrics JSON here too")
    p.add_argument(
        "--scored-out",
        default=None,
        help="with a judge: write the scored rows (JSONL; a rerun resumes it like srlm judge)",
    )
    p.add_argument(
        "--overwrite", action="store_true", help="replace --scored-out instead of resuming it"
    )
    _add_judge_args(p)
    _add_input_args(p, response=True)
    p.set_defaults(func=cmd_eval)

    sub.add_parser(
        "demo",
        help="the built-in miniature task (srlm demo --help for its options)",
        add_help=False,
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``srlm``; returns the exit status (0 success, 1 failure, 2 bad input,
    130 interrupted by Ctrl-C)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    # `srlm demo ...` hands every later argument (including --help) to the demo's parser
    globals_ = [a for a in argv[: argv.index("demo")]] if "demo" in argv else []
    if "demo" in argv and all(a.startswith("-") for a in globals_):
        try:
            return cmd_demo(argv[argv.index("demo") + 1 :])
        except KeyboardInterrupt:
            if "--debug" in globals_:
                raise
            print("srlm demo: interrupted", file=sys.stderr)
            return EXIT_INTERRUPTED
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if args.debug:
        return int(args.func(args) or 0)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        resumes = args.command in ("run", "generate", "judge") or getattr(args, "scored_out", None)
        hint = "; rerun the same command to resume" if resumes else ""
        if resumes and getattr(args, "overwrite", False):  # rerun as is: it would start over
            hint = "; rerun the same command without --overwrite to resume"
        print(f"srlm {args.command}: interrupted{hint}", file=sys.stderr)
        return EXIT_INTERRUPTED
    except ConfigError as exc:
        print(f"srlm {args.command}: config error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except (ValueError, TypeError, FileNotFoundError, RuntimeError, OSError) as exc:
        print(
            f"srlm {args.command}: error: {type(exc).__name__}: {exc}\n(run with --debug for the traceback)",
            file=sys.stderr,
        )
        return EXIT_FAILURE


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
