"""``srlm plan CONFIG``: the per-GPU memory of a run config for DDP, ZeRO-2 and ZeRO-3,
full fine-tuning or LoRA, AdamW 32-bit or 8-bit, on each ``--gpus`` count, as a Markdown
table (``--json`` for machines). The model is built on the meta device from the
``config.json`` in ``model.path``: no weights are read, data files need not exist."""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..config import ConfigError, LoRAConfig, RunConfig
from ..config.load import load_yaml, parse_run_config
from ..config.overrides import apply_overrides
from ..memory_plan import (
    FIXED_HEADROOM,
    FRAGMENTATION,
    GIB,
    ModelShape,
    Phase,
    PlanRow,
    lora_trainable,
    plan,
    precision_for,
    run_phases,
    shape_from_hf,
    shape_from_xtransformers,
    usable_bytes,
)

STRATEGY_NAMES = {"ddp": "DDP", "zero2": "ZeRO-2", "zero3": "ZeRO-3"}
NOTES = (
    "ZeRO-2 = DeepSpeed stage 2 / FSDP SHARD_GRAD_OP; ZeRO-3 = stage 3 / FSDP FULL_SHARD. "
    "With the torch backend srlm run samples with whole weights on every rank: ZeRO-3 rows "
    "(accelerate.shard_parameters) count them gathered for sampling; with vLLM the engine "
    "holds its own copy (docs/cli.md, DeepSpeed and FSDP).",
    "adamw8bit rows: a stage's trainer: {optimizer: adamw8bit} (bitsandbytes' AdamW8bit, "
    "pip install 'self-rewarding-lm-pytorch[bnb]'); adamw rows: torch.optim.AdamW. Every "
    "row assumes all stages use its optimizer.",
    "The train column counts each stage's activations as its trainer's "
    "gradient_checkpointing says (phases table: both ways).",
    "Accounting and formulas: docs/scaling.md.",
)


def load_plan_config(path: str | Path, overrides: Sequence[str] = ()) -> RunConfig:
    """The run config at ``path`` (``KEY=VALUE`` ``overrides`` applied, as ``srlm run``
    does) checked without this machine's files (data may be missing)."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    data = load_yaml(path)
    if not isinstance(data, dict):
        raise ConfigError(f"{path} is not a mapping of keys; see examples/*.yaml")
    data = apply_overrides(data, overrides)
    return parse_run_config(data, base_dir=path.resolve().parent, check_files=False)


def model_shape(cfg: RunConfig) -> ModelShape:
    """The policy's shape, built on the meta device from ``model.path``'s config.json."""
    m = cfg.model
    if m.xtransformers is not None:
        return shape_from_xtransformers(m.xtransformers)
    if not (Path(str(m.path)) / "config.json").is_file():
        raise ConfigError(
            f"model.path: {m.path} has no config.json; srlm plan reads the model's shape from "
            "it (no weights needed): point it at a folder with the model's config.json, e.g. "
            "srlm plan CONFIG model.path=examples/shapes/llama-3.1-8b (relative to CONFIG's "
            "folder)"
        )
    return shape_from_hf(str(m.path))


def vllm_fraction(cfg: RunConfig) -> float | None:
    """vLLM's ``gpu_memory_utilization`` when the run's ``generation:`` chooses vLLM."""
    if cfg.generation.backend != "vllm":
        return None
    return float(cfg.generation.vllm.gpu_memory_utilization)


def build_plan(args: argparse.Namespace) -> dict[str, Any]:
    """Everything ``srlm plan`` prints, as plain data."""
    cfg = load_plan_config(args.config, args.overrides)
    shape = model_shape(cfg)
    lora = cfg.model.lora or LoRAConfig()
    dtype = shape.storage_dtype if cfg.model.dtype == "auto" else cfg.model.dtype
    mixed = cfg.accelerate.mixed_precision
    prec = precision_for(dtype, mixed, "adamw", lora=False)
    phases = run_phases(cfg, shape, prec)
    fraction = vllm_fraction(cfg)
    rows = plan(
        shape,
        phases,
        model_dtype=dtype,
        mixed_precision=mixed,
        lora=(lora.r, lora.target_modules),
        gpus=list(args.gpus),
        gpu_memory_gib=args.gpu_memory,
        vllm_fraction=fraction,
    )
    return {
        "config": str(args.config),
        "model": cfg.model.path or "model.xtransformers",
        "num_params": shape.num_params,
        "lora": {
            "r": lora.r,
            "target_modules": lora.target_modules,
            "from_config": cfg.model.lora is not None,
            "trainable": lora_trainable(shape, lora.r, lora.target_modules),
        },
        "model_dtype": dtype,
        "mixed_precision": mixed,
        "bytes_per_param": dataclasses.asdict(prec),
        "gpu_memory_gib": args.gpu_memory,
        "usable_bytes": usable_bytes(args.gpu_memory),
        "vllm_gpu_memory_utilization": fraction,
        "phases": [dataclasses.asdict(p) for p in phases],
        "rows": [dataclasses.asdict(r) for r in rows],
    }


def gib(n: int) -> str:
    """Bytes as GiB with one decimal (the table's unit)."""
    return f"{n / GIB:.1f}"


def _phase_table(phases: list[Phase]) -> list[str]:
    lines = [
        "| stage | phase | rows at once | tokens per row | optimizer | gradient checkpointing "
        "| GiB | GiB without / with checkpointing |",
        "|---|---|---:|---:|---|---|---:|---:|",
    ]
    for p in phases:
        both, ckpt = "-", "-"
        if p.checkpointing is not None:
            both = f"{gib(p.bytes_no_checkpointing or 0)} / {gib(p.bytes_checkpointing or 0)}"
            ckpt = "yes" if p.checkpointing else "no"
        lines.append(
            f"| {p.stage} | {p.kind} | {p.sequences} | {p.seq_len} | {p.optimizer or '-'} | "
            f"{ckpt} | {gib(p.bytes)} | {both} |"
        )
    return lines


def _row_table(rows: list[PlanRow]) -> list[str]:
    head = (
        "| strategy | tuning | optimizer | GPUs | weights | grads | optimizer state | buffers "
        "| train | reference pass | sampling | peak | fits |"
    )
    lines = [head, "|---|---|---|---:|" + "---:|" * 8 + "---|"]
    for r in rows:
        cells = [r.params, r.grads, r.optimizer_state, r.buffers, r.train, r.reference]
        cells += [r.sampling, r.peak]
        lines.append(
            f"| {STRATEGY_NAMES[r.strategy]} | {r.tuning} | {r.optimizer} | {r.gpus} | "
            + " | ".join(gib(c) for c in cells)
            + f" | {'yes' if r.fits else 'no'} |"
        )
    return lines


def render_markdown(result: dict[str, Any]) -> str:
    """The plan as Markdown: the settings, the phases, one table row per combination."""
    lo, b = result["lora"], result["bytes_per_param"]
    source = "model.lora" if lo["from_config"] else "LoRAConfig defaults (no model.lora)"
    if result["vllm_gpu_memory_utilization"] is None:
        engine = "torch backend (KV cache of the policy)"
    else:
        f = result["vllm_gpu_memory_utilization"]
        engine = f"vLLM, gpu_memory_utilization {f} = {f * result['gpu_memory_gib']:.1f} GiB"
    lines = [
        f"# srlm plan: {result['config']}",
        "",
        f"* model: {result['model']}: {result['num_params']:,} parameters",
        f"* LoRA rows: r={lo['r']}, target_modules {lo['target_modules']} ({source}): "
        f"{lo['trainable']:,} trainable parameters",
        f"* precision: model.dtype {result['model_dtype']}, mixed_precision "
        f"{result['mixed_precision']}: full fine-tuning keeps {b['param']} + {b['grad']} + "
        f"{b['optimizer']} bytes per parameter (weights + gradients + AdamW 32-bit); "
        f"activations {b['compute']} bytes",
        f"* GPU: {result['gpu_memory_gib']:g} GiB, {gib(result['usable_bytes'])} GiB usable "
        f"({FIXED_HEADROOM // GIB} GiB CUDA context, then {FRAGMENTATION:.0%} fragmentation)",
        f"* sampling engine: {engine}",
        "",
        "## Phases (per GPU, the same for every strategy)",
        "",
        *_phase_table([Phase(**p) for p in result["phases"]]),
        "",
        "## Per-GPU memory (GiB)",
        "",
        *_row_table([PlanRow(**r) for r in result["rows"]]),
        "",
        *[f"* {n}" for n in NOTES],
    ]
    return "\n".join(lines)


def cmd_plan(args: argparse.Namespace) -> int:
    """``srlm plan``: print the plan (Markdown, or JSON with ``--json``)."""
    if any(n < 1 for n in args.gpus):
        raise ConfigError(f"--gpus: counts must be >= 1, got {args.gpus}; e.g. --gpus 1 8 64")
    if args.gpu_memory <= FIXED_HEADROOM / GIB:
        raise ConfigError(
            f"--gpu-memory: {args.gpu_memory:g} GiB leaves nothing after the "
            f"{FIXED_HEADROOM // GIB} GiB CUDA context; give the GPU's memory, e.g. 80"
        )
    result = build_plan(args)
    print(json.dumps(result, indent=2) if args.json else render_markdown(result))
    return 0


def add_plan_parser(sub: Any) -> None:
    """Register ``srlm plan`` on the ``srlm`` subparsers."""
    p = sub.add_parser(
        "plan",
        help="per-GPU memory of a run config (DDP / ZeRO-2 / ZeRO-3, full / LoRA) without weights",
        description="Estimate per-GPU memory of CONFIG.yaml for DDP, ZeRO-2 (FSDP "
        "SHARD_GRAD_OP) and ZeRO-3 (FSDP FULL_SHARD), full fine-tuning or LoRA, AdamW 32-bit "
        "or 8-bit, on each GPU count, and whether each fits. The model is built on the meta "
        "device from model.path's config.json (no weights read; data files need not exist). "
        "See docs/scaling.md for the accounting.",
    )
    p.set_defaults(func=cmd_plan)
    p.add_argument("config", help="YAML run config (see examples/recipe_*.yaml)")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="KEY=VALUE",
        help="override a key of the config file, as in srlm run (before the flags)",
    )
    p.add_argument("--gpus", type=int, nargs="+", default=[1, 8], help="GPU counts (default: 1 8)")
    p.add_argument("--gpu-memory", type=float, default=80.0, help="GiB per GPU (default: 80)")
    p.add_argument("--json", action="store_true", help="print JSON instead of Markdown")
