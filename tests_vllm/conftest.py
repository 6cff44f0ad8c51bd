"""Shared fixtures of the vLLM backend tests (their own pytest process: vLLM's CPU worker
pins OpenMP threads for the whole process).

The tiny Llama has head_dim 32 (vLLM's CPU attention has no kernel for smaller heads).
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

from self_rewarding_lm_pytorch.hf import build_tiny_model, load_model, load_tokenizer
from self_rewarding_lm_pytorch.models import HFTokenizer

EOS = 2  # "</s>" of build_tiny_model's tokenizer


def tiny_folder(out: Path, seed: int = 0, words: list[str] | None = None) -> Path:
    """A tiny Llama whose greedy outputs vary (at the default init scale a random model
    with tied embeddings mostly repeats the last prompt token); ``words``: its vocabulary."""
    build_tiny_model(
        out, words=words, hidden_size=64, num_heads=2, max_position_embeddings=128, seed=seed
    )
    model = load_model(out)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 2 and "embed" not in name:
                p.mul_(8.0)
    model.save_pretrained(str(out))
    return out


@pytest.fixture(scope="session")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_folder(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="session")
def decode(tiny: Path):
    return HFTokenizer(load_tokenizer(tiny)).decode


def hf_model(folder: Path) -> torch.nn.Module:
    return load_model(folder).eval()


def assert_same_as_torch(backend, model: torch.nn.Module, prompts, config) -> None:
    """Greedy tokens identical to TorchBackend(model)'s, log-probs within 1e-5."""
    from self_rewarding_lm_pytorch.generation import TorchBackend

    out = backend.generate(prompts, config, return_logprobs=True)
    ref = TorchBackend(model).generate(prompts, config, return_logprobs=True)
    assert out.sequences == ref.sequences
    assert out.finish_reasons == ref.finish_reasons
    for a, b in zip(out.logprobs, ref.logprobs):
        assert len(a) == len(b)
        assert max((abs(x - y) for x, y in zip(a, b)), default=0.0) < 1e-5


def ragged_prompts(count: int, seed: int = 0, vocab: int = 119) -> list[list[int]]:
    """Prompts of 1..40 random non-special token ids, some repeated."""
    rng = random.Random(seed)
    prompts = [[rng.randrange(7, vocab) for _ in range(rng.randint(1, 40))] for _ in range(count)]
    return prompts + [prompts[0], prompts[-1]]
