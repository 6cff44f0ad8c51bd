"""The shared helpers: eval mode, seeds and generators, chunking."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_model

from self_rewarding_lm_pytorch.utils import chunks, derive_seed, eval_mode, make_generator


def test_eval_mode_restores_each_submodule_mode_even_on_error() -> None:
    model = tiny_model()
    model.train()
    inner = next(m for m in model.modules() if m is not model)
    inner.eval()
    modes = [m.training for m in model.modules()]
    with pytest.raises(RuntimeError), eval_mode(model):
        assert not any(m.training for m in model.modules())
        raise RuntimeError("inside")
    assert [m.training for m in model.modules()] == modes


def test_derive_seed_is_stable_distinct_and_bounded() -> None:
    a = derive_seed(7, 2, "prompts")
    assert a == derive_seed(7, 2, "prompts") == derive_seed("7", "2", "prompts")
    others = {
        derive_seed(7, 2, "judge"),
        derive_seed(2, 7, "prompts"),
        derive_seed(8, 2, "prompts"),
    }
    assert a not in others and len(others) == 3
    assert all(0 <= s < 2**60 for s in others | {a})


def test_make_generator_uses_a_generator_as_is_and_seeds_from_an_int() -> None:
    g = torch.Generator()
    assert make_generator(g) is g and make_generator(None) is None
    by_int = make_generator(5)
    want = torch.rand(4, generator=torch.Generator().manual_seed(5))
    assert torch.equal(torch.rand(4, generator=by_int), want)
    with pytest.raises(TypeError, match="an int seed or None, got True"):
        make_generator(True)  # type: ignore[arg-type]


def test_chunks_respect_the_item_and_token_limits() -> None:
    costs = [5, 5, 5, 20, 1, 1]
    assert [list(r) for r in chunks(costs, None, 10)] == [[0, 1], [2], [3], [4, 5]]
    assert [list(r) for r in chunks(costs, 4, None)] == [[0, 1, 2, 3], [4, 5]]
    assert [list(r) for r in chunks(costs, None, None)] == [list(range(6))]
    assert chunks([], 2, 10) == []
