"""Per-GPU memory of a run, from the model's shape alone (no weights loaded).

:func:`shape_from_hf` / :func:`shape_from_xtransformers` build the model on the ``meta``
device and read its shape; :func:`run_phases` turns a run config's stages into the
sequences each phase holds at once (SFT, DPO reference pass, DPO training, sampling);
:func:`plan` gives one :class:`PlanRow` per strategy (DDP, ZeRO-2, ZeRO-3), tuning (full,
LoRA), optimizer (AdamW 32-bit, 8-bit) and GPU count. The byte accounting (ZeRO paper's
mixed-precision Adam, Korthikanti et al.'s activations adapted to Llama) is written down
in ``docs/scaling.md``; every figure is in bytes per GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "FIXED_HEADROOM",
    "FRAGMENTATION",
    "GIB",
    "JUDGE_TEMPLATE_TOKENS",
    "ModelShape",
    "ModelStates",
    "Phase",
    "PlanRow",
    "Precision",
    "fits",
    "forward_activation_bytes",
    "kv_cache_bytes",
    "layer_activation_elements",
    "lora_trainable",
    "model_states",
    "plan",
    "precision_for",
    "run_phases",
    "shape_from_hf",
    "shape_from_module",
    "shape_from_xtransformers",
    "train_activation_bytes",
    "usable_bytes",
]

GIB = 1024**3
#: CUDA context, cuBLAS/NCCL workspaces: taken off every GPU before anything else
FIXED_HEADROOM = 2 * GIB
#: share of the rest lost to allocator fragmentation
FRAGMENTATION = 0.10
#: tokens of the default judge prompt (the paper's Figure 2 rubric) around prompt + response
JUDGE_TEMPLATE_TOKENS = 512
STRATEGIES = ("ddp", "zero2", "zero3")
OPTIMIZERS = ("adamw", "adamw8bit")


@dataclass(frozen=True)
class ModelShape:
    """What the arithmetic needs of a decoder: sizes, parameter count, linear layers."""

    layers: int
    hidden: int
    q_dim: int  # heads x head_dim
    kv_dim: int  # kv_heads x head_dim (GQA)
    intermediate: int
    vocab: int
    max_positions: int | None
    glu: bool  # SwiGLU MLP (gate, up, down) instead of two matrices
    num_params: int
    linears: tuple[tuple[str, int, int], ...]  # (module name, in, out), output layer excluded
    storage_dtype: str  # the checkpoint's dtype (for model.dtype: auto)

    @property
    def layer_params(self) -> int:
        """Linear weights of one decoder layer (what ZeRO-3 gathers at once)."""
        return sum(i * o for _, i, o in self.linears) // max(self.layers, 1)


def _dtype_name(dtype: Any) -> str:
    name = str(dtype).replace("torch.", "")
    return name if name in ("float32", "bfloat16", "float16") else "float32"


def shape_from_module(model: Any, config: dict[str, Any], storage_dtype: str) -> ModelShape:
    """The shape of a (meta-device) model; ``config`` holds the sizes under HF names."""
    from torch import nn

    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    out = out if out is not None else getattr(model, "to_logits", None)
    linears = tuple(
        (name, m.in_features, m.out_features)
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and m is not out
    )
    heads = int(config["num_attention_heads"])
    kv_heads = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
    return ModelShape(
        layers=int(config["num_hidden_layers"]),
        hidden=int(config["hidden_size"]),
        q_dim=heads * head_dim,
        kv_dim=kv_heads * head_dim,
        intermediate=int(config["intermediate_size"]),
        vocab=int(config["vocab_size"]),
        max_positions=config.get("max_position_embeddings"),
        glu=any(name.endswith("gate_proj") for name, _, _ in linears) or bool(config.get("glu")),
        num_params=sum(p.numel() for p in model.parameters()),
        linears=linears,
        storage_dtype=storage_dtype,
    )


def shape_from_hf(folder: str | Path) -> ModelShape:
    """Shape of the Hugging Face causal LM whose ``config.json`` is in ``folder``, built on
    the meta device (``AutoModelForCausalLM.from_config``: no weights are read)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    sizes = cfg.get_text_config().to_dict() if hasattr(cfg, "get_text_config") else cfg.to_dict()
    missing = [
        k
        for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size")
        if k not in sizes
    ]
    if missing:
        raise ValueError(
            f"model.path: {folder}/config.json has no {missing[0]!r}; srlm plan reads "
            "decoder sizes under the Llama names (hidden_size, num_hidden_layers, ...)"
        )
    dtype = getattr(cfg, "dtype", None) or getattr(cfg, "torch_dtype", None)
    return shape_from_module(model, sizes, _dtype_name(dtype))


def shape_from_xtransformers(kwargs: dict[str, Any]) -> ModelShape:
    """Shape of an x-transformers ``TransformerWrapper`` (``model.xtransformers``)."""
    import torch
    from x_transformers import Decoder, TransformerWrapper

    kw = dict(kwargs)
    attn = dict(kw.pop("attn_layers"))
    with torch.device("meta"):
        model = TransformerWrapper(attn_layers=Decoder(**attn), **kw)
    heads = int(attn.get("heads", 8))
    dim = int(attn["dim"])
    sizes = {
        "num_hidden_layers": int(attn["depth"]),
        "hidden_size": dim,
        "num_attention_heads": heads,
        "num_key_value_heads": attn.get("attn_kv_heads") or heads,
        "head_dim": int(attn.get("attn_dim_head", 64)),
        "intermediate_size": int(dim * attn.get("ff_mult", 4)),
        "vocab_size": int(kw["num_tokens"]),
        "max_position_embeddings": kw.get("max_seq_len"),
        "glu": bool(attn.get("ff_glu", False)),
    }
    return shape_from_module(model, sizes, "float32")


def lora_trainable(shape: ModelShape, r: int, target_modules: list[str] | str) -> int:
    """LoRA adapter parameters: ``r x (in + out)`` per targeted linear layer. Targets match
    as peft matches them (the name or its last dotted parts); ``all-linear`` is every
    linear layer but the output layer."""
    if target_modules == "all-linear":
        return sum(r * (i + o) for _, i, o in shape.linears)
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    return sum(
        r * (i + o)
        for name, i, o in shape.linears
        if any(name == t or name.endswith("." + t) for t in targets)
    )


@dataclass(frozen=True)
class Precision:
    """Bytes per parameter: stored weights (``param``), gradients and optimizer state of a
    trainable parameter, and the bytes of one activation (``compute``)."""

    param: int
    grad: int
    optimizer: int
    compute: int
    trainable_param: int  # stored bytes of a trainable parameter (LoRA adapters: fp32)


def precision_for(
    model_dtype: str, mixed_precision: str, optimizer: str, *, lora: bool
) -> Precision:
    """The ZeRO paper's mixed-precision Adam accounting for the config's dtypes.

    16-bit weights (``model.dtype`` bfloat16/float16): 2 (weights) + 2 (gradients) + 12
    (fp32 master copy 4 + Adam m, v 8). fp32 weights: 4 + 4 + 8 (the weights are the
    master). 8-bit Adam keeps m, v in 1 byte each (2 instead of 8). LoRA adapters are
    fp32 (peft upcasts them), the frozen base keeps ``model.dtype``.
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    param = 4 if model_dtype == "float32" else 2
    moments = 8 if optimizer == "adamw" else 2
    trainable = 4 if lora else param
    master = 4 if trainable == 2 else 0
    compute = 2 if (mixed_precision in ("bf16", "fp16") or param == 2) else 4
    return Precision(param, trainable, master + moments, compute, trainable)


@dataclass(frozen=True)
class ModelStates:
    """Bytes per GPU of the model states and the strategy's buffers."""

    params: int
    grads: int
    optimizer: int
    buffers: int  # DDP's gradient buckets, ZeRO-3's gathered layers

    @property
    def total(self) -> int:
        return self.params + self.grads + self.optimizer + self.buffers


def model_states(
    shape: ModelShape, trainable: int, prec: Precision, strategy: str, gpus: int
) -> ModelStates:
    """ZeRO's partitioning over ``gpus``: DDP replicates everything; ZeRO-2 (FSDP
    SHARD_GRAD_OP) partitions optimizer state and gradients; ZeRO-3 (FSDP FULL_SHARD)
    partitions the weights too and gathers two layers at a time (one prefetched) in the
    compute dtype. Buffers: DDP on more than one GPU copies the gradients into its
    buckets; fp32 weights under 16-bit autocast (DDP, ZeRO-2) get a 16-bit copy each,
    kept for the backward pass."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {', '.join(STRATEGIES)}, got {strategy!r}")
    frozen = shape.num_params - trainable
    params = frozen * prec.param + trainable * prec.trainable_param
    grads = trainable * prec.grad
    optim = trainable * prec.optimizer
    n = gpus
    copies = shape.num_params * prec.compute if prec.compute < prec.param else 0
    if strategy == "ddp":
        return ModelStates(params, grads, optim, copies + (grads if n > 1 else 0))
    if strategy == "zero2":
        return ModelStates(params, math.ceil(grads / n), math.ceil(optim / n), copies)
    gathered = 2 * shape.layer_params * prec.compute if n > 1 else 0
    return ModelStates(math.ceil(params / n), math.ceil(grads / n), math.ceil(optim / n), gathered)


def layer_activation_elements(shape: ModelShape) -> int:
    """Activations one decoder layer keeps per token for the backward pass (elements).

    Korthikanti et al. 2022 (Table 2) without dropout and, with flash attention, without
    the ``s^2`` softmax terms: two RMSNorm inputs (2h); attention: the q/k/v projections'
    input (h), q, k, v after RoPE (q + 2 kv, GQA), the attention output (q); MLP: its
    input (h) and, for SwiGLU, gate, silu(gate), up and their product (4i), else the
    activation's input and output (2i)."""
    h, i = shape.hidden, shape.intermediate
    return 2 * h + (h + 2 * shape.q_dim + 2 * shape.kv_dim) + h + (4 * i if shape.glu else 2 * i)


def train_activation_bytes(
    shape: ModelShape, tokens: int, compute: int, *, checkpointing: bool = False
) -> int:
    """Activations of one training micro-batch of ``tokens`` tokens: every layer's, the
    final norm's (2h), and the logits with their gradient (2 x vocab; the log-softmax is
    chunked and recomputed, so it adds no full-size copy). With gradient ``checkpointing``
    a layer keeps only its input (h per token) and one layer's full set exists at a time,
    while the backward pass recomputes it."""
    per_layer = layer_activation_elements(shape)
    layers = shape.layers * shape.hidden + per_layer if checkpointing else shape.layers * per_layer
    return tokens * compute * (layers + 2 * shape.hidden + 2 * shape.vocab)


def forward_activation_bytes(shape: ModelShape, tokens: int, compute: int) -> int:
    """Peak of a no-grad forward (the DPO reference pass): the logits plus one layer's
    working tensors (residual, normed input, q, k, v, attention output, MLP tensors)."""
    h, i = shape.hidden, shape.intermediate
    working = 2 * h + 2 * shape.q_dim + 2 * shape.kv_dim + (3 * i if shape.glu else 2 * i)
    return tokens * compute * (working + shape.vocab)


def kv_cache_bytes(shape: ModelShape, sequences: int, seq_len: int, compute: int) -> int:
    """The KV cache of ``sequences`` rows of ``seq_len`` tokens: k and v per layer."""
    return sequences * seq_len * shape.layers * 2 * shape.kv_dim * compute


@dataclass(frozen=True)
class Phase:
    """What one stage holds at once in one phase: ``train`` (activations), ``reference``
    (no-grad forward), ``sampling`` (KV cache of the torch backend). A ``train`` phase
    also carries its trainer's ``gradient_checkpointing`` and ``optimizer`` settings and
    its activations both ways (``bytes`` is the configured one)."""

    stage: str
    kind: str
    sequences: int
    seq_len: int
    bytes: int
    checkpointing: bool | None = None
    optimizer: str | None = None
    bytes_no_checkpointing: int | None = None
    bytes_checkpointing: int | None = None


def _train_phase(
    name: str, kw: dict[str, Any], defaults: Any, rows: int, seq_len: int, shape: ModelShape,
    compute: int,
) -> Phase:  # fmt: skip
    ckpt = bool(kw.get("gradient_checkpointing", defaults.gradient_checkpointing))
    both = [
        train_activation_bytes(shape, rows * seq_len, compute, checkpointing=c)
        for c in (False, True)
    ]
    optimizer = str(kw.get("optimizer", defaults.optimizer))
    return Phase(name, "train", rows, seq_len, both[ckpt], ckpt, optimizer, *both)


def _sft_len(trainer: dict[str, Any], shape: ModelShape, default: int | None) -> int:
    limits = [v for v in (trainer.get("max_seq_len", default), shape.max_positions) if v]
    return min(limits) if limits else 2048


def run_phases(cfg: Any, shape: ModelShape, prec: Precision) -> list[Phase]:
    """The phases of every stage of a :class:`~.config.RunConfig` (``stage_objects``).

    SFT: ``batch_size`` rows of ``max_seq_len`` (default: the model's context). DPO and
    SPIN: ``batch_size`` pairs, chosen + rejected (2x rows) of ``preference_max_seq_len``;
    the reference pass before step 1: ``ref_batch_size`` pairs (default 2 x batch_size).
    Preference stages sample ``chunk_size x num_candidates`` rows of prompt + response
    (at most ``preference_max_seq_len``), and the self judge ``num_samples`` judgements of
    each (judge prompt + response + the judge's ``max_new_tokens``), ``batch_size`` at once.
    Training runs in the compute dtype, sampling (no autocast) in the weights' dtype;
    the training activations follow each trainer's ``gradient_checkpointing``.
    """
    from .pipeline.stages import PreferenceStage, SFTStage, SPINStage
    from .trainers.config import DPOConfig, SFTConfig, SPINConfig

    pref_len = cfg.preference_max_seq_len
    compute, kv = prec.compute, prec.param
    out: list[Phase] = []
    for i, stage in enumerate(cfg.stage_objects):
        name = f"{i + 1}:{stage.kind}"
        kw = dict(getattr(stage, "trainer", {}))
        if isinstance(stage, SFTStage):
            b = kw.get("batch_size", SFTConfig.batch_size)
            s = _sft_len(kw, shape, None)
            out.append(_train_phase(name, kw, SFTConfig, b, s, shape, compute))
        elif isinstance(stage, (PreferenceStage, SPINStage)):
            defaults = DPOConfig if isinstance(stage, PreferenceStage) else SPINConfig
            b = kw.get("batch_size", defaults.batch_size)
            s = min(kw.get("max_seq_len") or pref_len, shape.max_positions or pref_len)
            ref = 2 * (kw.get("ref_batch_size") or 2 * b)
            out.append(_train_phase(name, kw, defaults, 2 * b, s, shape, compute))
            out.append(
                Phase(name, "reference", ref, s, forward_activation_bytes(shape, ref * s, compute))
            )
        if isinstance(stage, PreferenceStage):
            rows = stage.chunk_size * stage.num_candidates
            out.append(
                Phase(name, "sampling", rows, pref_len, kv_cache_bytes(shape, rows, pref_len, kv))
            )
            if stage.judge == "self":
                js = stage.judge_settings
                judged = (js.batch_size or rows) * js.num_samples
                jlen = pref_len + JUDGE_TEMPLATE_TOKENS + js.max_new_tokens
                out.append(
                    Phase(name, "sampling", judged, jlen, kv_cache_bytes(shape, judged, jlen, kv))
                )
    return out


def usable_bytes(gpu_memory_gib: float) -> int:
    """What a GPU of ``gpu_memory_gib`` GiB leaves for the run: minus
    :data:`FIXED_HEADROOM`, minus :data:`FRAGMENTATION` of the rest."""
    return int((gpu_memory_gib * GIB - FIXED_HEADROOM) * (1 - FRAGMENTATION))


def fits(peak: int, gpu_memory_gib: float) -> bool:
    """Whether a per-GPU ``peak`` fits a GPU of ``gpu_memory_gib`` GiB after the headroom."""
    return peak <= usable_bytes(gpu_memory_gib)


@dataclass(frozen=True)
class PlanRow:
    """One combination's per-GPU bytes: model states, the peak of each phase, the verdict."""

    strategy: str
    tuning: str
    optimizer: str
    gpus: int
    trainable: int
    params: int
    grads: int
    optimizer_state: int
    buffers: int
    train: int  # model states + the largest training activations
    reference: int  # weights (+ gathered layers) + the largest reference pass
    sampling: int  # whole weights + the largest KV cache (torch backend)
    peak: int
    fits: bool


def plan(
    shape: ModelShape,
    phases: list[Phase],
    *,
    model_dtype: str,
    mixed_precision: str,
    lora: tuple[int, list[str] | str],
    gpus: list[int],
    gpu_memory_gib: float,
    vllm_fraction: float | None = None,
) -> list[PlanRow]:
    """Every combination of strategy, tuning (full / LoRA with ``lora = (r, targets)``),
    optimizer and GPU count. The reference pass runs before step 1, when torch's AdamW
    has no state and no gradients exist yet: it holds the weights only. Sampling runs on
    whole weights on every rank (ZeRO-3 included) with no gradients or optimizer state;
    with vLLM (``vllm_fraction``, its ``gpu_memory_utilization``) the engine holds that
    share of the GPU instead of the torch KV cache, next to the trainer's weights."""
    if model_dtype == "auto":
        model_dtype = shape.storage_dtype
    rows = []
    by_kind = {k: max((p.bytes for p in phases if p.kind == k), default=0) for k in
               ("train", "reference", "sampling")}  # fmt: skip
    for tuning in ("full", "lora"):
        trainable = shape.num_params if tuning == "full" else lora_trainable(shape, *lora)
        for optimizer in OPTIMIZERS:
            prec = precision_for(model_dtype, mixed_precision, optimizer, lora=tuning == "lora")
            whole = model_states(shape, trainable, prec, "ddp", 1).params
            for strategy in STRATEGIES:
                for n in gpus:
                    st = model_states(shape, trainable, prec, strategy, n)
                    train = st.total + by_kind["train"] if by_kind["train"] else 0
                    ref = (
                        st.params + st.buffers + by_kind["reference"] if by_kind["reference"] else 0
                    )
                    sampling = 0
                    if by_kind["sampling"]:
                        engine = by_kind["sampling"]
                        if vllm_fraction is not None:
                            engine = int(vllm_fraction * gpu_memory_gib * GIB)
                        sampling = whole + engine
                    peak = max(train, ref, sampling, st.total)
                    rows.append(
                        PlanRow(
                            strategy, tuning, optimizer, n, trainable, st.params, st.grads,
                            st.optimizer, st.buffers, train, ref, sampling, peak,
                            fits(peak, gpu_memory_gib),
                        )
                    )  # fmt: skip
    return rows
