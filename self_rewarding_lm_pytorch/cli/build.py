"""``srlm run``: the tokenizer, model, judges, data and trainer of a :class:`RunConfig`,
and running (or resuming) it."""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
from pathlib import Path
from typing import Any

from ..config import (
    JudgeSpec,
    RewardConfigSpec,
    RunConfig,
    load_run_config,
    resolve_object,
    to_dict,
)
from .trackers import _flat_config, build_accelerate_kwargs

log = logging.getLogger("srlm")


def _bytes_encode(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def _bytes_decode(ids: Any) -> str:
    values = ids.tolist() if hasattr(ids, "tolist") else list(ids)
    return bytes(int(i) for i in values if 0 <= int(i) < 256).decode("utf-8", errors="replace")


def build_tokenizer(cfg: RunConfig) -> Any:
    """The run's tokenizer as a ``models.Tokenizer`` adapter."""
    from ..models import CallableTokenizer, HFTokenizer

    t = cfg.tokenizer
    if t.kind == "bytes":
        return CallableTokenizer(_bytes_encode, _bytes_decode, eos_id=t.eos_id)
    from ..hf import load_tokenizer

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
        from ..hf import ensure_pad_token, load_model

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
        from ..hf import torch_dtype

        model = model.to(torch_dtype(m.dtype))
    if m.checkpoint is not None:
        from ..trainers.checkpoint import load_checkpoint

        load_checkpoint(model, m.checkpoint)
    return model


def build_reward_config(spec: RewardConfigSpec | None) -> Any:
    """A ``judge.RewardConfig`` from its YAML spec (the paper's default when ``None``)."""
    from ..judge import (
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
        from ..io import read_text

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
    spec: JudgeSpec,
    *,
    default_reward_config: RewardConfigSpec | None = None,
    device: Any = None,
    cache_dir: str | Path | None = None,
) -> Any:
    """A judge object (``score(prompts, responses)``) from a :class:`JudgeSpec`; an llm
    judge with ``generation:`` samples through that backend (an OpenAI backend keeps its
    request cache in ``cache_dir``)."""
    if spec.kind == "python":
        assert spec.function is not None
        obj = resolve_object(spec.function)
        if isinstance(obj, type):  # a judge class: instantiated without arguments
            obj = obj()
        if hasattr(obj, "score"):
            return obj
        if not callable(obj):
            raise TypeError(f"{spec.function!r} is neither callable nor has a score() method")
        from ..judge import CallableJudge

        return CallableJudge(obj)
    from ..hf import load_tokenizer
    from ..models import HFTokenizer

    if spec.kind == "llm" and spec.generation is not None and spec.generation.backend != "torch":
        return _served_llm_judge(spec, default_reward_config, cache_dir)
    assert spec.path is not None
    tok = load_tokenizer(spec.tokenizer or spec.path)
    if spec.kind == "reward_model":
        from ..hf import load_reward_model
        from ..judge import RewardModelJudge

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
    from ..generation import TorchBackend
    from ..hf import ensure_pad_token, load_model
    from ..judge import LLMJudge

    model = load_model(spec.path, dtype=spec.dtype)
    ensure_pad_token(tok, model)
    if device is not None:
        model.to(device)
    model.requires_grad_(False)
    settings = spec.judge_config()
    # settings that configure the torch engine (token_budget, use_cache, ...) are given to
    # the engine the judge builds over the model itself
    sampler = model if settings.engine_options() else TorchBackend(model)
    return LLMJudge(
        sampler,
        HFTokenizer(tok),
        build_reward_config(spec.reward_config or default_reward_config),
        **dataclasses.asdict(settings),
    )


def _served_llm_judge(
    spec: JudgeSpec, default_reward_config: RewardConfigSpec | None, cache_dir: Any
) -> Any:
    """An llm judge sampled by vLLM (from ``path``) or an OpenAI-compatible server."""
    from ..generation.selection import build_backend
    from ..hf import load_tokenizer
    from ..judge import LLMJudge
    from ..models import HFTokenizer

    generation = spec.generation
    assert generation is not None
    folder = spec.tokenizer or spec.path
    hf_tok = load_tokenizer(folder) if folder is not None else None
    backend = build_backend(  # vllm: path is required (JudgeSpec.validate)
        generation,
        tokenizer=hf_tok,
        cache_dir=cache_dir,
        weights_dir=spec.path,
        tokenizer_dir=spec.tokenizer,
        dtype=spec.dtype,
    )
    if hf_tok is None:  # api chat: the backend's own tokenizer
        hf_tok = backend.tokenizer
    tokenizer = hf_tok if hasattr(hf_tok, "format_prompt") else HFTokenizer(hf_tok)
    return LLMJudge(
        backend,
        tokenizer,
        build_reward_config(spec.reward_config or default_reward_config),
        **dataclasses.asdict(spec.judge_config()),
    )


def close_judges(judges: dict[str, Any]) -> None:
    """Shut down the backends of the judges :func:`build_judge` served (vLLM, OpenAI)."""
    from ..generation import TorchBackend

    for judge in judges.values():
        backend = getattr(judge, "backend", None)
        if backend is not None and not isinstance(backend, TorchBackend):
            backend.close()


def _dataset_roles(cfg: RunConfig) -> dict[str, set[str]]:
    from ..pipeline import (
        EFTBuildStage,
        HeadToHeadStage,
        PreferenceStage,
        PromptGenerationStage,
        SFTStage,
        SPINStage,
    )

    roles: dict[str, set[str]] = {}
    for stage in cfg.stage_objects:
        if isinstance(stage, SFTStage):
            for n in stage.datasets:
                roles.setdefault(n, set()).add("sft")
        elif isinstance(stage, SPINStage):
            roles.setdefault(stage.dataset, set()).add("sft")
        elif isinstance(stage, PromptGenerationStage):
            roles.setdefault(stage.seed_dataset, set()).add("prompts")
        elif isinstance(stage, EFTBuildStage):
            roles.setdefault(stage.inputs, set()).add("rows")
        elif isinstance(stage, PreferenceStage):
            if stage.prompts != "generated":
                roles.setdefault(stage.prompts, set()).add("prompts")
            if stage.replay is not None:
                roles.setdefault(stage.replay, set()).add("sft")
        elif isinstance(stage, HeadToHeadStage):  # reference rows {prompt, response}: "sft"
            from ..pipeline.head_to_head_stage import baseline_dataset

            roles.setdefault(stage.prompts, set()).add("prompts")
            if baseline_dataset(stage) is not None:
                roles.setdefault(stage.baseline, set()).add("sft")
    return roles


def build_datasets(cfg: RunConfig, tokenizer: Any) -> dict[str, list]:
    """Load every dataset a stage uses: SFT items for SFT/SPIN/replay, prompt strings for
    prompt datasets (text SFT items serve both).

    Every data file of the config is read and parsed in full here (also one that no stage
    uses), so a bad file fails now, naming ``data.<name>``, the file and the line."""
    from ..io import load_prompts, load_rows, load_sft

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
            elif role == {"rows"}:  # an eft_build stage's rows, read as they are
                out[name] = load_rows(src)
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


#: the stage kinds that name an external judge (built only for them)
_JUDGED_KINDS = ("external_reward_dpo", "head_to_head")


def build_trainer(cfg: RunConfig, *, model: Any = None, tokenizer: Any = None) -> Any:
    """The :class:`~self_rewarding_lm_pytorch.pipeline.SelfRewardingTrainer` of a config
    (loads the tokenizer, model, data and judges unless given)."""
    from ..pipeline import SelfRewardingTrainer

    tokenizer = tokenizer if tokenizer is not None else build_tokenizer(cfg)
    model_path = cfg.model.path if model is None else None  # a given model: not that folder
    model = model if model is not None else build_model(cfg, tokenizer)
    datasets = build_datasets(cfg, tokenizer)
    used_judges = sorted(
        {s.judge for s in cfg.stage_objects if getattr(s, "kind", "") in _JUDGED_KINDS} - {"self"}
    )
    accelerate_kwargs = build_accelerate_kwargs(cfg.accelerate, cfg.out)
    from accelerate import PartialState

    device = PartialState(cpu=cfg.accelerate.cpu).device  # the device the Accelerator will use
    judges = {
        n: build_judge(
            cfg.judges[n],
            default_reward_config=cfg.reward_config,
            device=device,
            cache_dir=Path(cfg.out) / "http-cache" / f"judge-{n}",
        )
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
        backend=cfg.generation,
        # an unchanged Hugging Face folder is where a vLLM engine starts
        model_path=model_path,
        shard_parameters=cfg.accelerate.shard_parameters,
    )
    model.to(trainer.accelerator.device)
    return trainer


def run_from_config(cfg: RunConfig, *, overwrite: bool = False) -> dict[str, Any]:
    """Run (or resume) a validated config; returns the run summary (also printed by
    ``srlm run``): the pipeline report plus ``final_model``, the folder that
    ``AutoModelForCausalLM.from_pretrained`` (or :func:`hf.load_model` for adapters) loads."""
    import os

    import yaml

    from ..store import RunLock, atomic_write_text

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
        close_judges(trainer.judges)
        if cfg.accelerate.trackers:
            for tracker in acc.trackers:
                tracker.finish()
            acc.trackers = []
    summary = dict(report)
    summary["final_model"] = _final_model(cfg, trainer, report)
    return summary


def _final_model(cfg: RunConfig, trainer: Any, report: dict) -> str | None:
    from ..hf import export_model, is_peft_model
    from ..models import unwrap_model

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


def cmd_run(args: argparse.Namespace) -> int:
    cfg = load_run_config(args.config, overrides=args.overrides)
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
