"""Sampling speed of the torch engine (TorchBackend) vs vLLM (VLLMBackend), same run.

One random Llama (hidden 256, 4 layers, head_dim 64, float32) written to a temporary
folder; the same ragged token-id prompts go to both backends, greedy and sampled
(temperature 1, top-p 0.9); each timing is the median of ``--repeats`` runs after one
warm-up. The vLLM engine start (in-process) is timed separately. Prints a Markdown table
with tokens/s and the vLLM/torch speed ratio.

    python benchmarks/backends.py                 # 16 prompts, 32 new tokens
    python benchmarks/backends.py --prompts 64 --new-tokens 128 --repeats 3
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from self_rewarding_lm_pytorch.generation import GenerationConfig, TorchBackend
from self_rewarding_lm_pytorch.generation.vllm import VLLMBackend
from self_rewarding_lm_pytorch.hf import build_tiny_model, load_model


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
    with tempfile.TemporaryDirectory() as tmp:
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
        t0 = time.perf_counter()
        vllm = VLLMBackend(folder)
        start = time.perf_counter() - t0
        torch_backend = TorchBackend(load_model(folder).eval())
        print(f"vLLM engine start: {start:.1f} s; torch threads: {torch.get_num_threads()}")
        print(f"{args.prompts} prompts of 16-48 tokens, {args.new_tokens} new tokens each\n")
        print("| sampling | torch s | torch tok/s | vLLM s | vLLM tok/s | vLLM / torch |")
        print("|---|---|---|---|---|---|")
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
            n_t = sum(len(s) for s in out_t.sequences)
            n_v = sum(len(s) for s in out_v.sequences)
            print(
                f"| {name} | {t_torch:.2f} | {n_t / t_torch:.0f} | {t_vllm:.2f} | "
                f"{n_v / t_vllm:.0f} | {(n_v / t_vllm) / (n_t / t_torch):.2f}x |"
            )
        vllm.close()


if __name__ == "__main__":
    main()
