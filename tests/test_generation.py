"""Tests for the batched generation engine (``self_rewarding_lm_pytorch.generation``).

Tiny random models only (x-transformers dim 32, a 2-layer Llama with hidden 32, a GRU
language model as the "plain" module), so the file runs in a few seconds.
"""

from __future__ import annotations

import math

import pytest
import torch
from tiny import DelegatingBackend
from torch import nn

from self_rewarding_lm_pytorch.generation import (
    GenerationConfig,
    TorchBackend,
    filter_logits,
    generate,
    generate_text,
    reference_generate,
    sample_next,
)
from self_rewarding_lm_pytorch.generation import engine as G
from self_rewarding_lm_pytorch.generation import kv_cache as KV
from self_rewarding_lm_pytorch.models import CallableTokenizer, wrap_model

VOCAB = 64


# ---------------------------------------------------------------------- tiny models


class GRULM(nn.Module):
    """A causal LM that is neither x-transformers nor Hugging Face (the plain path)."""

    def __init__(self, vocab: int = VOCAB, dim: int = 32, dropout: float = 0.0) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.rnn = nn.GRU(dim, dim, batch_first=True)
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(dim, vocab)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h, _ = self.rnn(self.drop(self.emb(ids)))
        return self.out(self.drop(h))


def make_xt(max_seq_len: int = 128, **attn_kw) -> nn.Module:
    from x_transformers import Decoder, TransformerWrapper

    torch.manual_seed(0)
    return TransformerWrapper(
        num_tokens=VOCAB,
        max_seq_len=max_seq_len,
        attn_layers=Decoder(dim=32, depth=2, heads=2, **attn_kw),
    )


def make_llama(**kw) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        initializer_range=0.2,  # sharp attention: positions and every cached key matter
        **kw,
    )
    return LlamaForCausalLM(cfg)


def make_plain() -> nn.Module:
    torch.manual_seed(0)
    return GRULM()


MODELS = {"plain": make_plain, "xtransformers": make_xt, "hf": make_llama}


@pytest.fixture(scope="module", params=list(MODELS))
def model(request):
    m = MODELS[request.param]()
    assert wrap_model(m).kind == request.param
    return m


def rand_prompts(lengths, seed=1, head=()):
    g = torch.Generator().manual_seed(seed)
    return [list(head) + torch.randint(3, VOCAB, (n,), generator=g).tolist() for n in lengths]


RAGGED = (3, 9, 1, 14, 6)


def first_new_token(seq: list[int], min_index: int = 2) -> tuple[int, int]:
    """A token of ``seq`` whose first occurrence is at index >= min_index, and that index."""
    for i, t in enumerate(seq):
        if i >= min_index and t not in seq[:i]:
            return t, i
    raise AssertionError(f"no token first appears at index >= {min_index} in {seq}")


# ---------------------------------------------------------------------- greedy == reference


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"use_cache": False},
        {"share_prefix": False},
        {"token_budget": 20},  # micro-batches of one or two rows
    ],
    ids=["default", "no-cache", "no-share", "tiny-budget"],
)
def test_greedy_matches_reference_on_ragged_batch(model, kw):
    prompts = rand_prompts(RAGGED)
    ref = reference_generate(model, prompts, max_new_tokens=10, temperature=0)
    out = generate(model, prompts, max_new_tokens=10, temperature=0, **kw)
    assert out.sequences == ref.sequences
    assert out.finish_reasons == ["length"] * len(prompts)
    assert all(len(s) == 10 for s in out.sequences)


def test_greedy_stops_per_row_at_eos_like_reference(model):
    prompts = rand_prompts(RAGGED, seed=2)
    free = reference_generate(model, prompts, max_new_tokens=12, temperature=0)
    eos, at = first_new_token(free.sequences[0])  # row 0 stops there; others where eos appears
    ref = reference_generate(model, prompts, max_new_tokens=12, temperature=0, eos_token_id=eos)
    assert ref.finish_reasons[0] == "eos" and len(ref.sequences[0]) == at
    for budget in (None, 15):
        out = generate(
            model,
            prompts,
            max_new_tokens=12,
            temperature=0,
            eos_token_id=[eos],
            token_budget=budget,
        )
        assert out.sequences == ref.sequences
        assert out.finish_reasons == ref.finish_reasons
        assert all(eos not in s for s in out.sequences)


@pytest.mark.parametrize("fraction", [0.0, math.inf])
def test_dropping_finished_rows_does_not_change_output(model, monkeypatch, fraction):
    prompts = rand_prompts((4, 7, 2, 9, 5, 3), seed=3)
    free = reference_generate(model, prompts, max_new_tokens=10, temperature=0)
    eos = sorted({first_new_token(s, 1 + i)[0] for i, s in enumerate(free.sequences[:3])})
    ref = reference_generate(model, prompts, max_new_tokens=10, temperature=0, eos_token_id=eos)
    assert ref.finish_reasons.count("eos") >= 2  # rows stop early, at different steps
    monkeypatch.setattr(KV, "COMPACT_FRACTION", fraction)
    out = generate(model, prompts, max_new_tokens=10, temperature=0, eos_token_id=eos)
    assert out.sequences == ref.sequences
    assert out.finish_reasons == ref.finish_reasons


def test_num_return_sequences_rows_grouped_by_prompt(model):
    prompts = rand_prompts((5, 2, 8))
    ref = reference_generate(model, prompts, max_new_tokens=6, temperature=0)
    out = generate(model, prompts, max_new_tokens=6, temperature=0, num_return_sequences=3)
    assert out.sequences == [s for s in ref.sequences for _ in range(3)]
    # sampled candidates of one prompt are different draws
    g = torch.Generator().manual_seed(0)
    sampled = generate(model, prompts, max_new_tokens=6, num_return_sequences=3, generator=g)
    assert len(sampled.sequences) == 9
    assert len({tuple(s) for s in sampled.sequences[:3]}) > 1


# ---------------------------------------------------------------------- prefix reuse


@pytest.mark.parametrize("kind", ["xtransformers", "hf"])
@pytest.mark.parametrize(
    "tails",
    [(1, 5, 9, 3), (1, 30, 2, 17)],  # the second: some rows' padding exceeds the shared head
    ids=["short-tails", "pads-exceed-head"],
)
def test_shared_head_matches_reference(kind, tails):
    model = MODELS[kind]()
    head = rand_prompts((12,), seed=7)[0]
    prompts = rand_prompts(tails, seed=8, head=head)
    ref = reference_generate(model, prompts, max_new_tokens=8, temperature=0)
    out = generate(model, prompts, max_new_tokens=8, temperature=0)
    assert out.sequences == ref.sequences
    out_n = generate(model, prompts, max_new_tokens=8, temperature=0, num_return_sequences=2)
    assert out_n.sequences == [s for s in ref.sequences for _ in range(2)]


@pytest.mark.parametrize(
    "attn_kw",
    [
        {"rotary_pos_emb": True},
        {"alibi_pos_bias": True},
        {"attn_flash": True},
        {"attn_kv_heads": 1},
    ],
    ids=["rotary", "alibi", "flash", "multi-query"],
)
def test_xtransformers_variants_with_shared_head_match_reference(attn_kw):
    model = make_xt(**attn_kw)
    head = rand_prompts((12,), seed=7)[0]
    prompts = rand_prompts((1, 30, 2, 17), seed=8, head=head)
    ref = reference_generate(model, prompts, max_new_tokens=6, temperature=0)
    out = generate(model, prompts, max_new_tokens=6, temperature=0, num_return_sequences=2)
    assert out.sequences == [s for s in ref.sequences for _ in range(2)]


def _count_embedded_tokens(model: nn.Module, fn) -> int:
    emb = model.token_emb if hasattr(model, "token_emb") else model.get_input_embeddings()
    seen = []
    handle = emb.register_forward_hook(lambda m, inp, out: seen.append(inp[0].numel()))
    try:
        fn()
    finally:
        handle.remove()
    return sum(seen)


@pytest.mark.parametrize("kind", ["xtransformers", "hf"])
def test_shared_head_and_candidates_are_prefilled_once(kind):
    model = MODELS[kind]()
    head = rand_prompts((20,), seed=7)[0]
    prompts = rand_prompts((2, 4, 3), seed=8, head=head)  # lengths 22, 24, 23

    def run(share: bool) -> int:
        return _count_embedded_tokens(
            model,
            lambda: generate(
                model,
                prompts,
                max_new_tokens=1,
                temperature=0,
                num_return_sequences=4,
                share_prefix=share,
            ),
        )

    # without reuse: 12 rows x 24 padded columns; with: the 20-token head once, then the
    # 4 last columns of the 3 distinct prompts
    assert run(False) == 12 * 24
    assert run(True) == 20 + 3 * 4


def test_hf_preallocated_cache_matches_dynamic_cache(monkeypatch):
    model = make_llama()
    prompts = rand_prompts(RAGGED, seed=4)
    free = reference_generate(model, prompts, max_new_tokens=10, temperature=0)
    eos = first_new_token(free.sequences[1])[0]
    outs = []
    for pre in (True, False):
        monkeypatch.setattr(KV, "PREALLOCATE_HF_CACHE", pre)
        outs.append(
            generate(model, prompts, max_new_tokens=10, temperature=0, eos_token_id=eos).sequences
        )
    assert outs[0] == outs[1]


@pytest.mark.parametrize("fraction", [0.0, math.inf])
def test_xt_preallocated_cache_matches_its_own_cache(monkeypatch, fraction):
    model = make_xt(rotary_pos_emb=True)
    prompts = rand_prompts(RAGGED, seed=4)
    free = reference_generate(model, prompts, max_new_tokens=10, temperature=0)
    eos = first_new_token(free.sequences[1])[0]
    monkeypatch.setattr(KV, "COMPACT_FRACTION", fraction)
    outs = []
    for pre in (True, False):
        monkeypatch.setattr(KV, "PREALLOCATE_XT_CACHE", pre)
        out = generate(model, prompts, max_new_tokens=10, temperature=0, eos_token_id=eos)
        outs.append(out.sequences)
    assert outs[0] == outs[1]


def test_kv_slot_turns_the_cache_append_into_an_in_place_write():
    buf = torch.zeros(2, 3, 10, 4)
    buf[:, :, :5] = torch.randn(2, 3, 5, 4)
    slot = KV._KVSlot.wrap(buf, 5)
    new = torch.randn(2, 3, 1, 4)
    out = torch.cat((slot, new), dim=-2)
    assert type(out) is torch.Tensor and out.data_ptr() == buf.data_ptr()
    assert out.shape == (2, 3, 6, 4) and torch.equal(buf[:, :, 5:6], new)
    # anything else is ordinary tensor arithmetic on the filled part, returning plain tensors
    y = slot * 2
    assert type(y) is torch.Tensor and torch.equal(y, buf[:, :, :5] * 2)
    other = torch.cat((slot, torch.randn(2, 3, 5, 4)), dim=-1)  # not an append: real cat
    assert other.data_ptr() != buf.data_ptr() and torch.equal(other[..., :4], buf[:, :, :5])
    full = KV._KVSlot.wrap(buf, 10)
    grown = torch.cat((full, new), dim=-2)  # no room left: real cat
    assert grown.shape == (2, 3, 11, 4) and grown.data_ptr() != buf.data_ptr()


@pytest.mark.parametrize("task_type", [None, "CAUSAL_LM"])
def test_peft_lora_model_uses_the_cache_and_its_adapters(task_type):
    from peft import LoraConfig, get_peft_model

    base_out = generate(make_llama(), rand_prompts(RAGGED), max_new_tokens=8, temperature=0)
    model = get_peft_model(
        make_llama(),
        LoraConfig(
            r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False, task_type=task_type
        ),
    )
    assert isinstance(KV._make_backend(wrap_model(model), True), KV._HFBackend)
    head = rand_prompts((12,), seed=7)[0]
    for prompts in (rand_prompts(RAGGED), rand_prompts((1, 30, 2), seed=8, head=head)):
        ref = reference_generate(model, prompts, max_new_tokens=8, temperature=0)
        out = generate(model, prompts, max_new_tokens=8, temperature=0, num_return_sequences=2)
        assert out.sequences == [s for s in ref.sequences for _ in range(2)]
    lora = generate(model, rand_prompts(RAGGED), max_new_tokens=8, temperature=0)
    assert lora.sequences != base_out.sequences  # the adapters are applied


# ---------------------------------------------------------------------- Hugging Face generate


def test_greedy_identical_to_hf_generate():
    model = make_llama().eval()
    prompts = rand_prompts((4, 11, 7, 1, 9), seed=5)
    T = max(map(len, prompts))
    ids = torch.tensor([[0] * (T - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (T - len(p)) + [1] * len(p) for p in prompts])
    free = generate(model, prompts, max_new_tokens=12, temperature=0)
    eos = first_new_token(free.sequences[2])[0]
    hf = model.generate(
        input_ids=ids,
        attention_mask=mask,
        max_new_tokens=12,
        do_sample=False,
        eos_token_id=eos,
        pad_token_id=0,
    )
    ours = generate(model, prompts, max_new_tokens=12, temperature=0, eos_token_id=eos)
    for row, seq, reason in zip(hf[:, T:].tolist(), ours.sequences, ours.finish_reasons):
        expected = row[: row.index(eos)] if eos in row else row
        assert seq == expected
        assert reason == ("eos" if eos in row else "length")
    assert ours.finish_reasons[2] == "eos"


# ---------------------------------------------------------------------- sampling


def test_sampling_is_reproducible_with_a_generator(model):
    prompts = rand_prompts(RAGGED)

    def run(seed: int, **kw):
        g = torch.Generator().manual_seed(seed)
        return generate(
            model,
            prompts,
            max_new_tokens=8,
            temperature=0.9,
            top_p=0.95,
            top_k=40,
            min_p=0.01,
            generator=g,
            return_logprobs=True,
            **kw,
        )

    a, b, c = run(0), run(0), run(1)
    assert a.sequences == b.sequences and a.logprobs == b.logprobs
    assert a.sequences != c.sequences
    # the stream also reproduces across micro-batch layouts of the same run settings
    assert run(3, token_budget=30).sequences == run(3, token_budget=30).sequences


def test_top_k_one_sampling_equals_greedy(model):
    prompts = rand_prompts(RAGGED)
    greedy = generate(model, prompts, max_new_tokens=6, temperature=0)
    g = torch.Generator().manual_seed(0)
    sampled = generate(model, prompts, max_new_tokens=6, temperature=1.3, top_k=1, generator=g)
    assert sampled.sequences == greedy.sequences


def test_logprobs_are_the_models_log_probabilities(model):
    prompts = rand_prompts((3, 8), seed=6)
    g = torch.Generator().manual_seed(0)
    out = generate(model, prompts, max_new_tokens=5, generator=g, return_logprobs=True)
    lm = wrap_model(model).eval()
    for p, seq, lps in zip(prompts, out.sequences, out.logprobs):
        with torch.no_grad():
            logits = lm(torch.tensor([p + seq]))[0].float()
        expected = torch.log_softmax(logits, -1)[len(p) - 1 : -1].gather(
            -1, torch.tensor(seq)[:, None]
        )
        assert torch.allclose(torch.tensor(lps), expected.squeeze(-1), atol=1e-4)


def test_generate_without_logprobs_returns_none():
    out = generate(make_xt(), rand_prompts((3,)), max_new_tokens=2, temperature=0)
    assert out.logprobs is None


# ---------------------------------------------------------------------- filters on hand-made distributions


def logits_of(probs):
    return torch.log(torch.tensor([probs], dtype=torch.float32))


def kept(x: torch.Tensor) -> list[int]:
    return torch.isfinite(x[0]).nonzero().squeeze(-1).tolist()


def test_top_k_filter():
    x = logits_of([0.1, 0.4, 0.05, 0.3, 0.15])
    assert kept(filter_logits(x, top_k=2)) == [1, 3]
    assert kept(filter_logits(x, top_k=1)) == [1]
    assert kept(filter_logits(x, top_k=0)) == [0, 1, 2, 3, 4]
    assert kept(filter_logits(x, top_k=99)) == [0, 1, 2, 3, 4]


def test_top_p_filter_keeps_smallest_set_reaching_p():
    x = logits_of([0.1, 0.4, 0.05, 0.3, 0.15])  # sorted: 0.4, 0.3, 0.15, 0.1, 0.05
    assert kept(filter_logits(x, top_p=0.5)) == [1, 3]  # 0.4 < 0.5 <= 0.7
    assert kept(filter_logits(x, top_p=0.72)) == [1, 3, 4]  # 0.7 < 0.72 <= 0.85
    assert kept(filter_logits(x, top_p=0.2)) == [1]  # the top token is always kept
    assert kept(filter_logits(x, top_p=1.0)) == [0, 1, 2, 3, 4]


def test_min_p_filter_is_relative_to_the_top_token():
    x = logits_of([0.1, 0.4, 0.05, 0.3, 0.15])
    assert kept(filter_logits(x, min_p=0.3)) == [1, 3, 4]  # threshold 0.12
    assert kept(filter_logits(x, min_p=0.8)) == [1]  # threshold 0.32


def test_temperature_then_filters_and_rows_are_independent():
    x = torch.cat([logits_of([0.1, 0.4, 0.05, 0.3, 0.15]), logits_of([0.6, 0.1, 0.1, 0.1, 0.1])])
    out = filter_logits(x, temperature=0.5, top_p=0.55)
    # temperature 0.5 squares and renormalises: row 0's top token then has 0.16 / 0.285 =
    # 0.561 >= 0.55 of the mass (at temperature 1 it has 0.4 < 0.55, so two are kept)
    assert kept(out[:1]) == [1]
    assert kept(filter_logits(x[:1], top_p=0.55)) == [1, 3]
    assert torch.isfinite(out[1]).tolist() == [True, False, False, False, False]
    assert torch.allclose(out[0, 1], x[0, 1] / 0.5)


def test_sampling_frequencies_follow_the_filtered_distribution():
    from scipy.stats import chisquare

    probs = [0.1, 0.4, 0.05, 0.3, 0.15]
    x = logits_of(probs).repeat(20000, 1)
    cfg = GenerationConfig(temperature=1.0, top_p=0.8)  # keeps 0.4, 0.3, 0.15
    g = torch.Generator().manual_seed(0)
    tokens, lp = sample_next(x, cfg, g)
    counts = torch.bincount(tokens, minlength=5).tolist()
    assert counts[0] == counts[2] == 0
    expected = [n * 20000 / 0.85 for n in (0.4, 0.3, 0.15)]
    assert chisquare([counts[1], counts[3], counts[4]], expected).pvalue > 1e-3
    # log-probs are those of the unfiltered distribution
    assert torch.allclose(lp[tokens == 1], torch.tensor(math.log(0.4)), atol=1e-5)


# ---------------------------------------------------------------------- stop strings and text


def char_tokenizer(eos_id=None, prompt_format=None) -> CallableTokenizer:
    return CallableTokenizer(
        lambda s: [ord(c) % VOCAB for c in s],
        lambda ids: "".join(chr(65 + int(i) % 26) for i in ids),
        eos_id=eos_id,
        prompt_format=prompt_format,
    )


def test_stop_strings_match_reference(model):
    tok = char_tokenizer()
    prompts = rand_prompts(RAGGED, seed=9)
    free = reference_generate(model, prompts, max_new_tokens=12, temperature=0)
    stop = tok.decode(free.sequences[1][3:5])  # a two-character stop string
    ref = reference_generate(
        model, prompts, max_new_tokens=12, temperature=0, stop_strings=[stop], decode=tok.decode
    )
    assert ref.finish_reasons[1] == "stop"
    out = generate(
        model, prompts, max_new_tokens=12, temperature=0, stop_strings=stop, decode=tok.decode
    )
    assert out.sequences == ref.sequences
    assert out.finish_reasons == ref.finish_reasons


def test_stop_string_needs_decode():
    with pytest.raises(ValueError, match="decode"):
        generate(make_xt(), [[3, 4]], max_new_tokens=2, stop_strings=["x"])


def test_generate_text_formats_encodes_and_cuts_at_stop():
    model = make_xt()
    tok = char_tokenizer(prompt_format="Q: {prompt}\nA:")
    ids = tok.encode(tok.format_prompt("hello"))
    free = reference_generate(model, [ids], max_new_tokens=10, temperature=0)
    full = tok.decode(free.sequences[0])
    stop = full[4:6]
    texts = generate_text(
        model,
        tok,
        ["hello", "hi"],
        max_new_tokens=10,
        temperature=0,
        stop_strings=[stop],
        num_return_sequences=2,
    )
    assert len(texts) == 2 and all(len(t) == 2 for t in texts)
    assert texts[0][0] == texts[0][1] == full[: full.find(stop)]
    raw = generate_text(model, tok, ["hello"], max_new_tokens=10, temperature=0, apply_format=False)
    unformatted = reference_generate(model, [tok.encode("hello")], max_new_tokens=10, temperature=0)
    assert raw == [[tok.decode(unformatted.sequences[0])]]


def test_generate_text_uses_the_tokenizers_eos():
    model = make_xt()
    probe = char_tokenizer()
    ids = probe.encode("hello")
    free = reference_generate(model, [ids], max_new_tokens=10, temperature=0).sequences[0]
    eos, at = first_new_token(free)
    tok = char_tokenizer(eos_id=eos)
    texts = generate_text(model, tok, ["hello"], max_new_tokens=10, temperature=0)
    assert texts == [[tok.decode(free[:at])]]


def test_generate_text_with_a_backend_equals_generate_text_with_the_model():
    model = make_xt()
    tok = char_tokenizer(prompt_format="Q: {prompt}\nA:")
    prompts = ["hello", "hi there", "x"]
    kw = dict(max_new_tokens=8, temperature=1.0, num_return_sequences=2)
    limits = dict(max_new_tokens_per_prompt=[8, 3, 5])

    def run(sampler, **extra):
        g = torch.Generator().manual_seed(11)
        return generate_text(sampler, tok, prompts, generator=g, **kw, **limits, **extra)

    want = run(model)
    recorder = DelegatingBackend(model)
    assert run(TorchBackend(model)) == run(recorder) == want
    assert recorder.calls == ["generate"]
    assert recorder.requests[0]["prompts"] == [tok.encode(tok.format_prompt(p)) for p in prompts]
    # each prompt's own limit reached the backend (no EOS: every text runs to it)
    assert [len(t) for texts in want for t in texts] == [8, 8, 3, 3, 5, 5]
    # engine options belong to the TorchBackend, not to a call on a backend
    for option in (dict(token_budget=64), dict(use_cache=False), dict(share_prefix=False)):
        with pytest.raises(TypeError, match=r"options of the torch engine.*TorchBackend\("):
            run(TorchBackend(model), **option)
    engine_backend = TorchBackend(model, use_cache=False)
    assert run(engine_backend) == run(model, use_cache=False)


# ---------------------------------------------------------------------- modes, errors, edges


def test_eval_mode_during_generation_and_previous_modes_restored():
    torch.manual_seed(0)
    model = GRULM(dropout=0.5)
    prompts = rand_prompts((4, 6))
    expected = generate(model.eval(), prompts, max_new_tokens=8, temperature=0).sequences
    model.train()
    model.rnn.eval()  # a submodule the user froze in eval mode stays that way
    for _ in range(3):  # dropout would make these differ if it were active
        assert generate(model, prompts, max_new_tokens=8, temperature=0).sequences == expected
    assert model.training and model.drop.training and not model.rnn.training


def test_model_trains_after_generation_with_lazily_cached_buffers():
    class LazyBuffer(nn.Module):  # caches a tensor on first use and updates it in place
        def __init__(self) -> None:
            super().__init__()
            self.inner = make_plain()
            self.register_buffer("calls", None, persistent=False)

        def forward(self, ids: torch.Tensor) -> torch.Tensor:
            if self.calls is None:
                self.calls = torch.zeros(())
            self.calls += 1
            return self.inner(ids)

    model = LazyBuffer()
    generate(model, [[3, 4, 5]], max_new_tokens=3, temperature=0)
    model.train()
    model(torch.tensor([[3, 4, 5]])).sum().backward()
    assert model.calls.item() == 4 and model.inner.out.weight.grad is not None


def test_too_long_prompt_error_names_index_length_and_context():
    model = make_xt(max_seq_len=32)
    prompts = [[3] * 5, [4] * 30]
    with pytest.raises(ValueError) as err:
        generate(model, prompts, max_new_tokens=4)
    msg = str(err.value)
    assert "prompt 1" in msg and "30 tokens" in msg and "max_new_tokens=4" in msg and "32" in msg
    generate(model, [[3] * 28], max_new_tokens=4, temperature=0)  # exactly fits


def test_plain_model_without_declared_context_is_not_length_checked():
    out = generate(make_plain(), [[3] * 300], max_new_tokens=2, temperature=0)
    assert len(out.sequences[0]) == 2


@pytest.mark.parametrize(
    ("prompts", "kw", "exc", "match"),
    [
        ([[]], {}, ValueError, "prompt 0 is empty"),
        ([[3], [VOCAB + 5]], {}, ValueError, "prompt 1 has token ids outside"),
        ([[3], [-1]], {}, ValueError, "prompt 1"),
        (["abc"], {}, TypeError, "prompt 0"),
        ("abc", {}, TypeError, "generate_text"),
        ([[3]], {"temprature": 0.5}, TypeError, "temprature"),
        ([[3]], {"temperature": -1.0}, ValueError, "temperature"),
        ([[3]], {"top_p": 0.0}, ValueError, "top_p"),
        ([[3]], {"top_k": -2}, ValueError, "top_k"),
        ([[3]], {"min_p": 1.0}, ValueError, "min_p"),
        ([[3]], {"num_return_sequences": 0}, ValueError, "num_return_sequences"),
        ([[3]], {"max_new_tokens": -1}, ValueError, "max_new_tokens"),
        ([[3]], {"token_budget": 0}, ValueError, "token_budget"),
    ],
)
def test_bad_input_raises_clear_errors(prompts, kw, exc, match):
    with pytest.raises(exc, match=match):
        generate(make_xt(), prompts, **{"max_new_tokens": 4, **kw})


def test_zero_new_tokens_and_no_prompts():
    out = generate(make_xt(), [[3, 4], [5]], max_new_tokens=0, return_logprobs=True)
    assert out.sequences == [[], []] and out.finish_reasons == ["length", "length"]
    assert out.logprobs == [[], []]
    assert generate(make_xt(), [], max_new_tokens=3).sequences == []


def test_accepts_causal_lm_tensor_prompts_and_progress():
    model = make_xt()
    prompts = rand_prompts((3, 5))
    ref = reference_generate(model, prompts, max_new_tokens=4, temperature=0)
    out = generate(
        wrap_model(model),
        [torch.tensor(p) for p in prompts],
        GenerationConfig(max_new_tokens=4, temperature=0),
        progress=True,
    )
    assert out.sequences == ref.sequences


def test_plan_respects_token_budget_and_covers_every_row():
    prompts = rand_prompts((3, 9, 1, 14, 6, 6, 2))
    batches = G._plan(prompts, 3, 5, budget=40)
    rows = sorted(r for b in batches for r in b)
    assert rows == list(range(len(prompts) * 3))
    for b in batches:
        longest = max(len(prompts[r // 3]) for r in b)
        assert len(b) == 1 or len(b) * (longest + 5) <= 40
