"""Benchmark the batched generation engine against the original approach and HF ``generate``.

Prints one table; every column is measured in the same run on the same machine:

* (a) the original approach: one prompt at a time, a full forward pass per new token, no
  KV cache, no EOS stop (timed on ``--orig-prompts`` prompts: it never batches, so its
  tokens/s does not depend on the batch size);
* (b) ``self_rewarding_lm_pytorch.generation.generate`` on the whole batch;
* (c) Hugging Face ``model.generate`` on the same left-padded batch (HF models only);
* our time per decode step, ``(t(N new tokens) - t(1 new token)) / (N - 1)``, against its
  roofline: per step the larger of FLOPs / measured matmul FLOP/s and bytes read
  (weights + the real rows' KV cache) / measured memory bandwidth, averaged over the
  decode steps.  Both ceilings are measured by this script, at the same thread count;
* the "torch matmul floor": every ``nn.Linear`` of the model applied once to the batch,
  weights streaming from memory (what PyTorch's GEMMs alone need per step).

Then a second table measures the reuse features at half the largest token count:
shared-prefix prefill (judge-like prompts with a long common head; N candidates per
prompt), dropping finished rows, and the preallocated KV cache against the stock one.

Times are process CPU time by default (``--clock cpu``): on a machine shared with other
jobs, one thread's CPU time is far steadier than wall time.

All runs sample with the paper's settings (temperature 0.7, top-p 0.9) and no EOS, so
every row produces exactly N tokens.  Usage::

    python benchmarks/generation.py            # ~6 CPU-minutes on 1 thread (most of it (a))
    python benchmarks/generation.py --quick    # 32 / 128 new tokens, ~1.5 CPU-minutes
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from self_rewarding_lm_pytorch.generation import generate, reference_generate
from self_rewarding_lm_pytorch.generation import kv_cache as G

SAMPLING = dict(temperature=0.7, top_p=0.9)


# ---------------------------------------------------------------------- ceilings


CLOCK: Callable[[], float] = time.process_time


def best_of(fn: Callable[[], Any], repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        t = CLOCK()
        fn()
        best = min(best, CLOCK() - t)
    return best


def measure_matmul_flops(repeats: int = 5) -> float:
    """Best FLOP/s of fp32 square matmuls (the machine's compute ceiling)."""
    best = 0.0
    for n in (512, 1024, 2048):
        a, b = torch.randn(n, n), torch.randn(n, n)
        a @ b
        best = max(best, 2 * n**3 / best_of(lambda a=a, b=b: a @ b, repeats))
    return best


def measure_bandwidth(repeats: int = 5) -> float:
    """Best read bandwidth (bytes/s): summing a 256 MiB fp32 tensor."""
    x = torch.randn(64 * 1024 * 1024)
    x.sum()
    return x.numel() * x.element_size() / best_of(lambda: x.sum(), repeats)


def matmul_floor(model: nn.Module, batch: int, repeats: int = 5) -> float:
    """Time of every ``nn.Linear`` of ``model`` applied once to ``batch`` rows.

    The weights are far larger than the CPU caches, so this is what PyTorch's own GEMM
    kernels need per decode step just to stream the weights: a practical floor for any
    engine built on them (the roofline above assumes peak FLOP/s and bandwidth).
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    xs = [torch.randn(batch, m.in_features) for m in linears]

    def run() -> None:
        with torch.no_grad():
            for m, x in zip(linears, xs):
                F.linear(x, m.weight, m.bias)

    run()
    return best_of(run, repeats)


# ---------------------------------------------------------------------- models


def xt_model() -> nn.Module:
    from x_transformers import Decoder, TransformerWrapper

    # the seed README's shape
    return TransformerWrapper(
        num_tokens=256, max_seq_len=1024, attn_layers=Decoder(dim=512, depth=6, heads=8)
    )


def llama_model() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(
        vocab_size=256,
        hidden_size=512,
        intermediate_size=1376,
        num_hidden_layers=6,
        num_attention_heads=8,
        num_key_value_heads=8,
        max_position_embeddings=1024,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=None,
    )
    model = LlamaForCausalLM(cfg)
    model.generation_config.eos_token_id = None
    model.generation_config.pad_token_id = 0
    return model


def model_costs(name: str, model: nn.Module) -> dict[str, float]:
    """Matmul parameters, bytes of weights read per step, KV bytes per token, attention width."""
    elem = next(model.parameters()).element_size()
    if name == "x-transformers":
        skip = {id(model.token_emb.emb.weight), id(model.pos_emb.emb.weight)}
        layers = sum(1 for t in model.attn_layers.layer_types if t == "a")
        attn_dim = model.attn_layers.dim
    else:
        skip = {id(model.model.embed_tokens.weight)}
        cfg = model.config
        layers = cfg.num_hidden_layers
        attn_dim = cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads)
    weights = [p for p in model.parameters() if id(p) not in skip]
    matmul_params = sum(p.numel() for p in weights if p.ndim == 2)
    return {
        "matmul_params": matmul_params,
        "weight_bytes": sum(p.numel() for p in weights) * elem,
        "kv_bytes_per_token": 2 * layers * attn_dim * elem,
        "attn_flops_per_key": 4 * layers * attn_dim,  # QK^T and AV, per query per key
    }


def roofline_step(costs: dict, ctx: list[int], flops: float, bw: float) -> float:
    """Lower bound on one decode step's time for rows with real context lengths ``ctx``."""
    keys = sum(ctx)
    step_flops = 2 * len(ctx) * costs["matmul_params"] + costs["attn_flops_per_key"] * keys
    step_bytes = costs["weight_bytes"] + costs["kv_bytes_per_token"] * keys
    return max(step_flops / flops, step_bytes / bw)


def hf_generate(model: nn.Module, prompts: list[list[int]], new: int, seed: int) -> None:
    T = max(len(p) for p in prompts)
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    torch.manual_seed(seed)
    with torch.inference_mode():
        out = model.generate(
            input_ids=ids,
            attention_mask=mask,
            max_new_tokens=new,
            min_new_tokens=new,
            do_sample=True,
            top_k=0,
            **SAMPLING,
        )
    assert out.shape[1] == T + new


def ours(model: nn.Module, prompts: list[list[int]], new: int, seed: int, **kw: Any) -> Any:
    g = torch.Generator().manual_seed(seed)
    return generate(model, prompts, max_new_tokens=new, generator=g, **SAMPLING, **kw)


def timed(fn: Callable[[], Any], repeats: int = 1) -> tuple[float, Any]:
    """Best time over ``repeats`` runs (the clock chosen by ``--clock``) and the last output."""
    best, out = float("inf"), None
    for _ in range(repeats):
        t = CLOCK()
        out = fn()
        best = min(best, CLOCK() - t)
    return best, out


# ---------------------------------------------------------------------- sections


def throughput_rows(
    name: str,
    model: nn.Module,
    prompts: list[list[int]],
    new_tokens: tuple[int, ...],
    args: argparse.Namespace,
    flops: float,
    bw: float,
) -> list[str]:
    """One table row per new-token count: (a), (b), (c), decode step vs roofline."""
    costs = model_costs("x-transformers" if name == "x-transformers" else "hf", model)
    lens = [len(p) for p in prompts]
    batch = len(prompts)
    is_hf = not name.startswith("x-")
    ours(model, prompts[:2], 4, 0)  # warm up
    floor = matmul_floor(model, batch)
    rows = []
    for new in new_tokens:

        def run_a(new: int = new) -> Any:
            g = torch.Generator().manual_seed(0)
            return reference_generate(
                model, prompts[: args.orig_prompts], max_new_tokens=new, generator=g, **SAMPLING
            )

        t_a, _ = timed(run_a)
        tps_a = args.orig_prompts * new / t_a
        t_b, out = timed(lambda new=new: ours(model, prompts, new, 0), args.repeats)
        assert all(len(s) == new for s in out.sequences)
        tps_b = batch * new / t_b
        t_1, _ = timed(lambda: ours(model, prompts, 1, 0), args.repeats)
        step = (t_b - t_1) / (new - 1)
        roof = sum(
            roofline_step(costs, [n + k for n in lens], flops, bw) for k in range(1, new)
        ) / (new - 1)
        if is_hf:
            t_c, _ = timed(lambda new=new: hf_generate(model, prompts, new, 0), args.repeats)
            tps_c = batch * new / t_c
            c_cols = f"{tps_c:.0f} | {tps_b / tps_a:.0f}x | {tps_b / tps_c:.2f}x"
        else:
            c_cols = f"n/a | {tps_b / tps_a:.0f}x | n/a"
        rows.append(
            f"| {name} | {new} | {tps_a:.1f} | {tps_b:.0f} | {c_cols} | {step * 1e3:.1f} "
            f"| {roof * 1e3:.1f} | {step / roof:.2f}x | {floor * 1e3:.1f} |"
        )
        print(rows[-1], flush=True)
    return rows


def reuse_rows(
    name: str,
    model: nn.Module,
    prompts: list[list[int]],
    new: int,
    g: torch.Generator,
    args: argparse.Namespace,
) -> list[str]:
    """Prefix reuse on/off, dropping finished rows on/off, HF cache layout."""
    lens = [len(p) for p in prompts]
    head = torch.randint(3, 256, (384,), generator=g).tolist()
    judge = [head + torch.randint(3, 256, (n,), generator=g).tolist() for n in lens]
    cands = [torch.randint(3, 256, (256,), generator=g).tolist() for _ in range(4)]
    ours(model, prompts[:2], 4, 0)
    rows = []
    cases = (
        (f"judge-like: {len(judge)} prompts = 384-token shared head + 16-64 own, 8 new", judge, 1),
        ("4 prompts (256 tokens) x 4 candidates each, 8 new", cands, 4),
    )
    for label, ps, n_ret in cases:
        kw = {"num_return_sequences": n_ret}
        t_off, _ = timed(lambda ps=ps, kw=kw: ours(model, ps, 8, 0, share_prefix=False, **kw))
        t_on, _ = timed(lambda ps=ps, kw=kw: ours(model, ps, 8, 0, share_prefix=True, **kw))
        rows.append(
            f"| prefix reuse off -> on | {name} | {label} | {t_off:.2f} -> {t_on:.2f} "
            f"| {t_off / t_on:.2f}x |"
        )
        print(rows[-1], flush=True)

    eos = [3, 4, 5, 6]  # every row stops at a random step (about 1/64 chance per step)

    def run_eos() -> tuple[float, int]:
        t, out = timed(lambda: ours(model, prompts, new, 0, eos_token_id=eos))
        return t, sum(map(len, out.sequences))

    saved = G.COMPACT_FRACTION
    try:
        G.COMPACT_FRACTION = float("inf")
        t_keep, n_keep = run_eos()
    finally:
        G.COMPACT_FRACTION = saved
    t_drop, n_drop = run_eos()
    rows.append(
        f"| drop finished rows: never -> at {saved:.0%} | {name} | EOS ids {{3,4,5,6}}, up to "
        f"{new} new; {n_keep} / {n_drop} tokens made | {n_keep / t_keep:.0f} -> "
        f"{n_drop / t_drop:.0f} tok/s | {(n_drop / t_drop) / (n_keep / t_keep):.2f}x |"
    )
    print(rows[-1], flush=True)

    flag = "PREALLOCATE_XT_CACHE" if name.startswith("x-") else "PREALLOCATE_HF_CACHE"
    stock = "torch.cat per step (x-transformers)" if name.startswith("x-") else "DynamicCache"
    saved_pre = getattr(G, flag)
    try:
        setattr(G, flag, False)
        t_dyn, _ = timed(lambda: ours(model, prompts, new, 0), args.repeats)
    finally:
        setattr(G, flag, saved_pre)
    t_pre, _ = timed(lambda: ours(model, prompts, new, 0), args.repeats)
    rows.append(
        f"| KV cache: {stock} -> preallocated | {name} | batch {len(prompts)}, "
        f"{new} new | {t_dyn:.2f} -> {t_pre:.2f} | {t_dyn / t_pre:.2f}x |"
    )
    print(rows[-1], flush=True)
    return rows


# ---------------------------------------------------------------------- main


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="32 and 128 new tokens")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--orig-prompts", type=int, default=1, help="prompts timed for (a)")
    ap.add_argument("--repeats", type=int, default=1, help="best-of repeats for (b), (c)")
    ap.add_argument(
        "--clock",
        choices=("cpu", "wall"),
        default="cpu",
        help="cpu: process CPU time (default; robust on a shared machine with 1 thread), "
        "wall: perf_counter",
    )
    args = ap.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter
    if args.clock == "cpu" and args.threads != 1:
        print("# note: with several threads CPU time adds up the threads; prefer --clock wall")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    new_tokens = (32, 128) if args.quick else (128, 512)
    wall0 = time.perf_counter()

    load = os.getloadavg()
    print(
        f"# machine: {platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}, "
        f"{args.threads} thread(s), clock: {args.clock}; load average at start "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"
    )
    flops, bw = measure_matmul_flops(), measure_bandwidth()
    print(
        f"# measured ceilings: matmul {flops / 1e9:.1f} GFLOP/s, read bandwidth {bw / 1e9:.1f} GB/s"
    )
    g = torch.Generator().manual_seed(1)
    lens = torch.randint(16, 65, (args.batch,), generator=g).tolist()
    prompts = [torch.randint(3, 256, (n,), generator=g).tolist() for n in lens]
    print(
        f"# batch {args.batch}, prompt lengths {min(lens)}-{max(lens)} (ragged), fp32, "
        f"{SAMPLING}, no EOS; (a) timed on {args.orig_prompts} prompt(s)"
    )
    header = (
        "| model | new tokens | (a) original tok/s | (b) ours tok/s | (c) HF generate tok/s "
        "| (b)/(a) | (b)/(c) | ours ms/step | roofline ms/step | step / roofline "
        "| torch matmul floor ms/step |"
    )
    rows = [header, "|" + "---|" * 11]
    for name, build in (("x-transformers", xt_model), ("llama (HF)", llama_model)):
        rows += throughput_rows(name, build().eval(), prompts, new_tokens, args, flops, bw)
    print()
    print("\n".join(rows))

    print()
    extra = [
        "| measurement | model | setting | time (s) or rate | speed-up |",
        "|---|---|---|---|---|",
    ]
    for name, build in (("x-transformers", xt_model), ("llama (HF)", llama_model)):
        extra += reuse_rows(name, build().eval(), prompts, new_tokens[-1] // 2, g, args)
    print()
    print("\n".join(extra))
    load = os.getloadavg()
    print(
        f"\n# load average at end {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
        f"wall time {time.perf_counter() - wall0:.0f} s"
    )


if __name__ == "__main__":
    main()
