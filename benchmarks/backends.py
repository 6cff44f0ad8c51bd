"""Sampling speed of the torch engine (TorchBackend) vs vLLM in-process (VLLMBackend) vs a
local vLLM OpenAI server over HTTP (OpenAIBackend), same run.

One random Llama (hidden 256, 4 layers, head_dim 64, float32) written to a temporary
folder; the same ragged token-id prompts go to every backend, greedy and sampled
(temperature 1, top-p 0.9); each timing is the median of ``--repeats`` runs after one
warm-up (the HTTP backend runs without its request cache). The vLLM engine start
(in-process) and the server start are timed separately. Prints a Markdown table with
tokens/s and the speed ratios to torch.

    python benchmarks/backends.py                 # 16 prompts, 32 new tokens
    python benchmarks/backends.py --prompts 64 --new-tokens 128 --repeats 3

``--gpu``: the same workload on a CUDA GPU at the ~1B shape of
``examples/shapes/llama-3.2-1b/config.json`` (random weights in bfloat16, saved to a
temporary folder; the torch engine in bfloat16 on the GPU; vLLM and the server in
bfloat16 with CUDA graphs, each with ``--gpu-memory-utilization``). It refuses to start
without CUDA; ``--dry-run`` prints the plan (shape, parameters, commands) and exits.

    python benchmarks/backends.py --gpu --prompts 256 --new-tokens 256 --repeats 3
"""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from self_rewarding_lm_pytorch.generation import GenerationConfig, OpenAIBackend, TorchBackend
from self_rewarding_lm_pytorch.hf import build_tiny_model, load_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests_vllm"))
from server import VLLMServer  # noqa: E402  (the tests' server helper)

SHAPE = Path(__file__).resolve().parents[1] / "examples/shapes/llama-3.2-1b/config.json"


def _timed(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def _max_len(args: argparse.Namespace) -> int:
    return 48 + args.new_tokens + 16  # the longest prompt, its new tokens, a margin


def shape_config(max_len: int) -> Any:
    """The transformers config of :data:`SHAPE` with a context of ``max_len``."""
    from transformers import AutoConfig

    cfg = json.loads(SHAPE.read_text())
    cfg["max_position_embeddings"] = max_len
    cfg.pop("rope_scaling", None)  # llama3 scaling changes nothing at these lengths
    return AutoConfig.for_model(**cfg)


def gpu_model(folder: Path, max_len: int) -> tuple[Path, int]:
    """A random-weight bfloat16 Llama of :data:`SHAPE` (with the tiny word tokenizer, whose
    ids lie in the model's vocabulary) saved to ``folder``; returns it and its parameters."""
    from transformers import AutoModelForCausalLM

    build_tiny_model(folder / "tok")  # the tokenizer files only
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(shape_config(max_len), dtype=torch.bfloat16)
    model.generation_config.eos_token_id = None  # every row runs to its limit
    model.save_pretrained(str(folder / "model"))
    for f in (folder / "tok").iterdir():
        if f.name.startswith(("tokenizer", "special_tokens")):
            (folder / "model" / f.name).write_bytes(f.read_bytes())
    return folder / "model", sum(p.numel() for p in model.parameters())


def plan(args: argparse.Namespace) -> dict:
    """What ``--gpu`` builds and runs (printed by ``--dry-run``)."""
    from transformers import AutoModelForCausalLM

    config = shape_config(_max_len(args))
    with torch.device("meta"):
        params = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    keys = ("hidden_size", "num_hidden_layers", "num_attention_heads", "vocab_size")
    return {
        "shape": {k: getattr(config, k) for k in keys},
        "parameters": params,
        "dtype": "bfloat16",
        "prompts": args.prompts,
        "new_tokens": args.new_tokens,
        "repeats": args.repeats,
        "gpu_memory_utilization": args.gpu_memory_utilization,
        "backends": ["torch (cuda, bf16)", "vllm (in-process, bf16)", "openai (api_server, bf16)"],
    }


def check_gpu() -> None:
    """Refuse ``--gpu`` without a CUDA device or without vLLM, saying what to do."""
    if not torch.cuda.is_available():
        sys.exit(
            "backends.py --gpu: no CUDA device (torch.cuda.is_available() is False); run it "
            "on a machine with an NVIDIA GPU and CUDA torch, or drop --gpu for the CPU workload"
        )
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        sys.exit(f"backends.py --gpu: vLLM is not installed ({exc}); pip install vllm")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--gpu", action="store_true", help="the ~1B shape in bf16 on a CUDA GPU")
    ap.add_argument(
        "--gpu-memory-utilization",
        type=float,
        default=0.3,
        help="--gpu: the share of GPU memory each vLLM engine (in-process, server) takes",
    )
    ap.add_argument("--dry-run", action="store_true", help="--gpu: print the plan and exit")
    args = ap.parse_args()
    for name in ("prompts", "new_tokens", "repeats"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if not 0 < args.gpu_memory_utilization <= 0.45:
        ap.error("--gpu-memory-utilization must be in (0, 0.45]: two engines share the GPU")
    if args.dry_run:
        if not args.gpu:
            ap.error("--dry-run plans the --gpu run; add --gpu")
        print(json.dumps(plan(args), indent=1))
        return
    if args.gpu:
        check_gpu()
    from self_rewarding_lm_pytorch.generation.vllm import VLLMBackend

    max_len = _max_len(args)
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        if args.gpu:
            folder, params = gpu_model(Path(tmp), max_len)
            print(f"model: {SHAPE.parent.name} shape, {params / 1e9:.2f} B parameters, bf16")
            share = ["--gpu-memory-utilization", str(args.gpu_memory_utilization)]
            server = VLLMServer(folder, max_model_len=max_len, dtype="bfloat16", args=share)
            engine = {"dtype": "bfloat16", "max_model_len": max_len,
                      "gpu_memory_utilization": args.gpu_memory_utilization}  # fmt: skip
            policy = load_model(folder, dtype="bfloat16").to("cuda").eval()
        else:
            folder = build_tiny_model(
                Path(tmp) / "model",
                hidden_size=256,
                num_layers=4,
                num_heads=4,
                max_position_embeddings=512,
            )
            server = VLLMServer(folder, max_model_len=512)
            engine = {}
            policy = load_model(folder).eval()
        rng = random.Random(0)
        prompts = [
            [rng.randrange(7, 100) for _ in range(rng.randint(16, 48))] for _ in range(args.prompts)
        ]
        stack.callback(server.kill)  # the server process never outlives the benchmark
        server.start()
        http = OpenAIBackend(base_url=server.base_url, timeout_s=600)
        t0 = time.perf_counter()
        vllm = VLLMBackend(folder, **engine)
        start = time.perf_counter() - t0
        torch_backend = TorchBackend(policy)
        print(f"vLLM engine start: {start:.1f} s; server start: {server.start_s:.1f} s")
        print(f"torch threads: {torch.get_num_threads()}")
        print(f"{args.prompts} prompts of 16-48 tokens, {args.new_tokens} new tokens each\n")
        print(
            "| sampling | torch s | torch tok/s | vLLM s | vLLM tok/s | vLLM / torch "
            "| HTTP s | HTTP tok/s | HTTP / torch |"
        )
        print("|---|---|---|---|---|---|---|---|---|")
        settings = {
            "greedy": GenerationConfig(max_new_tokens=args.new_tokens, temperature=0.0),
            "T=1, top-p 0.9": GenerationConfig(
                max_new_tokens=args.new_tokens, temperature=1.0, top_p=0.9
            ),
        }
        for name, config in settings.items():
            t_torch, out_t = _timed(
                lambda c=config: torch_backend.generate(prompts, c, generator=0), args.repeats
            )
            t_vllm, out_v = _timed(
                lambda c=config: vllm.generate(prompts, c, generator=0), args.repeats
            )
            t_http, out_h = _timed(
                lambda c=config: http.generate(prompts, c, generator=0), args.repeats
            )
            n_t = sum(len(s) for s in out_t.sequences)
            n_v = sum(len(s) for s in out_v.sequences)
            n_h = sum(len(s) for s in out_h.sequences)
            print(
                f"| {name} | {t_torch:.2f} | {n_t / t_torch:.0f} | {t_vllm:.2f} | "
                f"{n_v / t_vllm:.0f} | {(n_v / t_vllm) / (n_t / t_torch):.2f}x | {t_http:.2f} | "
                f"{n_h / t_http:.0f} | {(n_h / t_http) / (n_t / t_torch):.2f}x |"
            )
        vllm.close()
        http.close()


if __name__ == "__main__":
    main()
