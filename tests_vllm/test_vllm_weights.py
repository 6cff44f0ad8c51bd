"""VLLMBackend serving new weights: full checkpoints, the prefix cache, LoRA adapters."""

from __future__ import annotations

import pytest
import torch
from conftest import assert_same_as_torch, hf_model, ragged_prompts

from self_rewarding_lm_pytorch.generation import GenerationConfig
from self_rewarding_lm_pytorch.generation.vllm import VLLMBackend
from self_rewarding_lm_pytorch.hf import apply_lora
from self_rewarding_lm_pytorch.losses import sequence_logprobs
from self_rewarding_lm_pytorch.trainers.base import save_checkpoint

PROMPTS = ragged_prompts(8, seed=1)
GREEDY = GenerationConfig(max_new_tokens=12, temperature=0.0)
LORA_MODULES = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


@pytest.fixture(scope="module")
def backend(tiny):
    b = VLLMBackend(tiny, enable_lora=True, max_lora_rank=8)
    yield b
    b.close()


@pytest.fixture()
def served(backend, tiny):
    """The backend, serving the tiny model's own weights (tests that load other weights
    do not restore them)."""
    backend.load_weights(tiny)
    return backend


def sgd_step(model: torch.nn.Module, lr: float = 0.3) -> torch.nn.Module:
    """One SGD step that raises the log-likelihood of a fixed sequence (a training step)."""
    x = torch.tensor([PROMPTS[0] + PROMPTS[1]])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr)
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[:, 0] = False
    loss = -sequence_logprobs(model(x).logits, x, mask).sum()
    loss.backward()
    opt.step()
    return model.eval()


def test_load_weights_serves_a_trained_checkpoint(backend, tiny, tmp_path):
    before = backend.generate(PROMPTS, GREEDY).sequences
    trained = sgd_step(hf_model(tiny).train())
    save_checkpoint(trained, tmp_path / "ckpt")
    backend.load_weights(tmp_path / "ckpt")
    assert_same_as_torch(backend, trained, PROMPTS, GREEDY)
    assert backend.generate(PROMPTS, GREEDY).sequences != before


def test_cached_prompt_prefixes_do_not_outlive_the_weights(backend, tiny, tmp_path):
    # 70 shared tokens fill two KV blocks of 32 that vLLM's prefix cache keeps
    head = [7 + (5 * i) % 112 for i in range(70)]
    prompts = [(head + p)[:100] for p in PROMPTS]
    backend.generate(prompts, GREEDY)  # caches the head under the old weights
    trained = sgd_step(hf_model(tiny).train(), lr=0.2)
    save_checkpoint(trained, tmp_path / "ckpt")
    backend.load_weights(tmp_path / "ckpt")
    assert_same_as_torch(backend, trained, prompts, GREEDY)


def lora_model(tiny, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    peft = apply_lora(
        hf_model(tiny),
        {"r": 8, "alpha": 16.0, "target_modules": LORA_MODULES},
        init_lora_weights=False,  # random A and B: the adapter changes the outputs
    )
    return peft.eval()


def test_lora_adapters_match_peft_and_a_new_adapter_replaces_the_old(served, tiny, tmp_path):
    base = served.generate(PROMPTS, GREEDY).sequences
    for seed in (1, 2):
        peft = lora_model(tiny, seed)
        save_checkpoint(peft, tmp_path / f"adapter-{seed}")
        served.load_weights(tmp_path / f"adapter-{seed}")  # an adapter folder -> LoRA
        assert_same_as_torch(served, peft, PROMPTS, GREEDY)
        assert served.generate(PROMPTS, GREEDY).sequences != base
    served.load_weights(tiny)  # a full model folder drops the adapter
    assert served.generate(PROMPTS, GREEDY).sequences == base


def test_an_adapter_above_the_rank_and_a_folder_without_weights_are_refused(
    backend, tiny, tmp_path
):
    torch.manual_seed(0)
    big = apply_lora(hf_model(tiny), {"r": 16, "target_modules": LORA_MODULES})
    save_checkpoint(big, tmp_path / "big")
    with pytest.raises(ValueError, match="max_lora_rank=16"):
        backend.load_adapter(tmp_path / "big")
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors"):
        backend.load_weights(tmp_path / "missing")
