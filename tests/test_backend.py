"""The generation backend protocol and the torch backend behind it."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model

from self_rewarding_lm_pytorch.generation import (
    GenerationBackend,
    GenerationConfig,
    TorchBackend,
    as_backend,
    reference_generate,
)
from self_rewarding_lm_pytorch.losses import token_logprobs
from self_rewarding_lm_pytorch.trainers.checkpoint import save_checkpoint

PROMPTS = [[5, 9, 12], [7, 3], [40, 41, 42, 43, 44], [7, 3]]


def test_torch_backend_greedy_matches_the_reference_decoder_token_for_token() -> None:
    model = tiny_model()
    backend = TorchBackend(model)
    assert isinstance(backend, GenerationBackend)
    config = GenerationConfig(max_new_tokens=12, temperature=0.0, eos_token_id=2)
    out = backend.generate(PROMPTS, config)
    ref = reference_generate(model, PROMPTS, config)
    assert out.sequences == ref.sequences
    assert out.finish_reasons == ref.finish_reasons


def test_an_int_seed_reproduces_the_generator_it_stands_for() -> None:
    model = tiny_model()
    backend = TorchBackend(model)
    config = GenerationConfig(max_new_tokens=10, temperature=1.0, num_return_sequences=3)
    by_seed = backend.generate(PROMPTS, config, generator=123)
    by_generator = backend.generate(PROMPTS, config, generator=torch.Generator().manual_seed(123))
    other = backend.generate(PROMPTS, config, generator=124)
    assert by_seed.sequences == by_generator.sequences
    assert by_seed.sequences != other.sequences


def test_next_token_logprobs_match_a_full_forward_pass() -> None:
    model = tiny_model()
    backend = TorchBackend(model)
    candidates = [[1, 2, 3], [10], [4, 4], [0, 50]]
    got = backend.next_token_logprobs(PROMPTS, candidates)
    model.eval()
    for seq, ids, row in zip(PROMPTS, candidates, got):
        for tok, lp in zip(ids, row):
            x = torch.tensor([seq + [tok]])
            with torch.no_grad():
                want = token_logprobs(model(x), x)[0, -1].item()
            assert abs(lp - want) < 1e-5


def test_load_weights_serves_the_checkpoint(tmp_path) -> None:
    trained, other = tiny_model(seed=0), tiny_model(seed=1)
    save_checkpoint(other, tmp_path / "ckpt")
    backend = TorchBackend(trained)
    config = GenerationConfig(max_new_tokens=8, temperature=0.0)
    before = backend.generate(PROMPTS, config).sequences
    backend.load_weights(tmp_path / "ckpt")
    after = backend.generate(PROMPTS, config).sequences
    assert after == reference_generate(other, PROMPTS, config).sequences
    assert after != before


def test_as_backend_wraps_a_model_and_keeps_a_backend() -> None:
    model = tiny_model()
    backend = TorchBackend(model)
    assert as_backend(backend) is backend
    assert isinstance(as_backend(model), TorchBackend)


def test_next_token_logprobs_restores_every_submodule_mode() -> None:
    model = tiny_model()
    model.train()
    frozen = next(m for m in model.modules() if m is not model)
    frozen.eval()  # e.g. a frozen embedding kept in eval mode while the rest trains
    modes = [m.training for m in model.modules()]
    TorchBackend(model).next_token_logprobs(PROMPTS[:1], [[1, 2]])
    assert [m.training for m in model.modules()] == modes


def test_prompt_generation_through_a_backend_equals_through_the_model() -> None:
    from tiny import char_tokenizer

    from self_rewarding_lm_pytorch.prompts import generate_prompts

    seeds = ["name three birds", "say hello twice", "count to four slowly"]
    kw = dict(num_shots=2, num_seed_shots=2, max_new_tokens=12, max_attempts=6, batch_size=3)
    model = tiny_model(max_seq_len=256)
    fresh = torch.Generator().manual_seed(11).get_state()
    g_model, g_backend = torch.Generator().manual_seed(11), torch.Generator().manual_seed(11)
    backend = TorchBackend(model)
    with pytest.warns(UserWarning, match="made 0 of 2 prompts"):  # an untrained model
        by_model = generate_prompts(model, char_tokenizer(), seeds, 2, generator=g_model, **kw)
        by_backend = generate_prompts(
            backend, char_tokenizer(), seeds, 2, generator=g_backend, **kw
        )
    assert by_backend.to_dict() == by_model.to_dict()
    assert by_model.attempts == 6
    # the caller's generator is used as is: both advanced by the same draws
    assert torch.equal(g_model.get_state(), g_backend.get_state())
    assert not torch.equal(g_model.get_state(), fresh)
