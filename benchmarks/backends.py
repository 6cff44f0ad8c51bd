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
"""

from __future__ import annotations

import argparse
import contextlib
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from self_rewarding_lm_pytorch.generation import GenerationConfig, OpenAIBackend, TorchBackend
from self_rewarding_lm_pytorch.generation.vllm import VLLMBackend
from self_rewarding_lm_pytorch.hf import build_tiny_model, load_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests_vllm"))
from server import VLLMServer  # noqa: E402  (the tests' server helper)


def _timed(fn, repeats: int) -> tuple[float, object]:
    out = fn()  # warm-up
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    args = ap.parse_args()
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        folder = build_tiny_model(
            Path(tmp) / "model",
            hidden_size=256,
            num_layers=4,
            num_heads=4,
            max_position_embeddings=512,
        )
        rng = random.Random(0)
        prompts = [
            [rng.randrange(7, 100) for _ in range(rng.randint(16, 48))]
            for _ in range(args.prompts)
        ]
        server = VLLMServer(folder, max_model_len=512)
        stack.callback(server.kill)  # the server process never outlives the benchmark
        server.start()
        http = OpenAIBackend(base_url=server.base_url)
        t0 = time.perf_counter()
        vllm = VLLMBackend(folder)
        start = time.perf_counter() - t0
        torch_backend = TorchBackend(load_model(folder).eval())
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
