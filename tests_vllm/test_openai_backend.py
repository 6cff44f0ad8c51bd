"""OpenAIBackend against a real vLLM OpenAI server process (one for the module) and the
torch engine: the same tokens, log-probs, judge scores; the request cache; a server that
is killed mid-way and restarted."""

from __future__ import annotations

import threading
import time
from collections import Counter

import pytest
import torch
from conftest import EOS, assert_same_as_torch, hf_model, ragged_prompts
from server import VLLMServer

from self_rewarding_lm_pytorch.generation import GenerationConfig, OpenAIBackend, TorchBackend
from self_rewarding_lm_pytorch.hf import load_tokenizer
from self_rewarding_lm_pytorch.judge import LLMJudge, RewardConfig
from self_rewarding_lm_pytorch.losses import token_logprobs
from self_rewarding_lm_pytorch.models import HFTokenizer

PROMPTS = ragged_prompts(10)
REWARD = RewardConfig(
    prompt_template="Q: {{ prompt }} A: {{ response }} Score:",
    reward_regex_template="{{ reward }}",
    score_values=tuple(range(10)),
)


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    srv = VLLMServer(tiny, log=tmp_path_factory.mktemp("server") / "server.log").start()
    print(f"vLLM server start: {srv.start_s:.1f} s")
    yield srv
    srv.kill()


@pytest.fixture(scope="module")
def backend(server):
    b = OpenAIBackend(base_url=server.base_url, max_retries=2, backoff_s=0.2, timeout_s=60)
    yield b
    b.close()


@pytest.fixture(scope="module")
def torch_backend(tiny):
    return TorchBackend(hf_model(tiny))


@pytest.fixture(scope="module")
def tok(tiny):
    return HFTokenizer(load_tokenizer(tiny))


def judge_inputs(tok, count: int) -> tuple[list[str], list[str]]:
    words = tok.decode(list(range(7, 120)))
    prompts = [words[3 * i : 3 * i + 20 + 2 * (i % 7)] for i in range(count)]
    responses = [words[-(8 + 3 * (i % 11)) - i :] for i in range(count)]
    return prompts, responses


def test_greedy_equals_the_torch_backend_with_context_from_the_server(backend, torch_backend):
    model = torch_backend.lm.module
    assert backend.model == "tiny" and backend.max_seq_len == 128  # from GET /models
    assert_same_as_torch(
        backend, model, PROMPTS, GenerationConfig(max_new_tokens=14, temperature=0.0)
    )
    limits = [i % 4 for i in range(len(PROMPTS))]
    config = GenerationConfig(max_new_tokens=9, temperature=0.0, num_return_sequences=2)
    out = backend.generate(PROMPTS, config, max_new_tokens_per_prompt=limits)
    ref = torch_backend.generate(PROMPTS, config, max_new_tokens_per_prompt=limits)
    assert out == ref and [len(s) for s in out.sequences[::2]] == limits


def test_eos_and_stop_strings_end_rows_as_the_torch_engine_does(backend, torch_backend, decode):
    free = backend.generate(PROMPTS, GenerationConfig(max_new_tokens=16, temperature=0.0))
    common = Counter(t for s in free.sequences for t in s[1:]).most_common(1)[0][0]
    config = GenerationConfig(max_new_tokens=16, temperature=0.0, eos_token_id=[EOS, common])
    out = backend.generate(PROMPTS, config, return_logprobs=True)
    ref = torch_backend.generate(PROMPTS, config, return_logprobs=True)
    assert out.sequences == ref.sequences and out.finish_reasons == ref.finish_reasons
    assert {"eos", "length"} <= set(out.finish_reasons)
    assert all(common not in s and len(s) == len(lp) for s, lp in zip(out.sequences, out.logprobs))
    word = decode([common])
    config = GenerationConfig(max_new_tokens=16, temperature=0.0, stop_strings=(word,))
    out = backend.generate(PROMPTS, config, decode=decode)
    ref = torch_backend.generate(PROMPTS, config, decode=decode)
    assert out.sequences == ref.sequences and out.finish_reasons == ref.finish_reasons
    assert "stop" in out.finish_reasons


def test_samples_are_grouped_by_prompt_and_seeded(backend, torch_backend):
    model = torch_backend.lm.module
    config = GenerationConfig(max_new_tokens=8, temperature=1.0, num_return_sequences=3)
    out = backend.generate(PROMPTS, config, generator=11, return_logprobs=True)
    assert len(out.sequences) == 3 * len(PROMPTS)
    for r, (seq, lps) in enumerate(zip(out.sequences, out.logprobs)):
        x = torch.tensor([PROMPTS[r // 3] + seq])  # row r continues prompt r // 3
        with torch.no_grad():
            want = token_logprobs(model(x).logits, x)[0, len(PROMPTS[r // 3]) :].tolist()
        assert max(abs(a - b) for a, b in zip(lps, want)) < 1e-5
    assert all(len({tuple(s) for s in out.sequences[3 * i : 3 * i + 3]}) > 1 for i in range(4))
    again = backend.generate(PROMPTS, config, generator=torch.Generator().manual_seed(11))
    other = backend.generate(PROMPTS, config, generator=12)
    assert again.sequences == out.sequences and other.sequences != out.sequences


def test_next_token_logprobs_equal_the_torch_backend(backend, torch_backend):
    ids = [list(range(119)), [2, 3], [50], [7, 7, 8]]
    got = backend.next_token_logprobs(PROMPTS[:4], ids)
    want = torch_backend.next_token_logprobs(PROMPTS[:4], ids)
    assert [len(g) for g in got] == [len(w) for w in want]
    assert max(abs(a - b) for g, w in zip(got, want) for a, b in zip(g, w)) < 1e-5


@pytest.mark.parametrize("mode", ["mean", "expected"])
def test_llm_judge_scores_equal_the_torch_backend(backend, torch_backend, tok, mode):
    prompts, responses = judge_inputs(tok, 16)
    settings = dict(num_samples=1, temperature=0.0, max_new_tokens=12, mode=mode)
    via_http = LLMJudge(backend, tok, REWARD, **settings).score(prompts, responses)
    via_torch = LLMJudge(torch_backend, tok, REWARD, **settings).score(prompts, responses)
    assert [r.samples for r in via_http] == [r.samples for r in via_torch]
    scored = [(a.score, b.score) for a, b in zip(via_http, via_torch) if b.score is not None]
    assert len(scored) >= 2 and all(a is not None and abs(a - b) < 1e-5 for a, b in scored)
    assert [a.score is None for a in via_http] == [b.score is None for b in via_torch]


def test_a_second_backend_on_the_cache_sends_nothing(server, tmp_path):
    config = GenerationConfig(max_new_tokens=6, temperature=1.0, num_return_sequences=2)
    first = OpenAIBackend(base_url=server.base_url, cache_dir=tmp_path, prompts_per_request=4)
    ref = first.generate(PROMPTS, config, generator=3, return_logprobs=True)
    greedy = first.next_token_logprobs(PROMPTS[:3], [[5, 6]] * 3)
    sent = first.usage["requests"]
    assert sent == len(PROMPTS) + 2 and first.usage["completion_tokens"] > 0
    second = OpenAIBackend(
        base_url=server.base_url, model="tiny", max_model_len=128, cache_dir=tmp_path,
        prompts_per_request=4,
    )  # fmt: skip
    assert second.generate(PROMPTS, config, generator=3, return_logprobs=True) == ref
    assert second.next_token_logprobs(PROMPTS[:3], [[5, 6]] * 3) == greedy
    assert second.usage["requests"] == 0 and second.usage["cached"] == sent


def test_a_killed_server_fails_bounded_and_the_rerun_resends_only_the_rest(
    server, torch_backend, tok, tmp_path
):
    """Judge 40 candidates with 2 requests in flight; the server is killed after some
    answers are cached: the judge raises within a bound. With the server back (a new port),
    the same cache gives the uninterrupted scores and only the missing requests are sent."""
    prompts, responses = judge_inputs(tok, 40)
    settings = dict(num_samples=1, temperature=0.0, max_new_tokens=24, batch_size=40)
    reference = LLMJudge(torch_backend, tok, REWARD, **settings).score(prompts, responses)
    cache = tmp_path / "requests.jsonl"
    knobs = dict(max_concurrency=2, prompts_per_request=1, max_retries=2, backoff_s=0.2)
    doomed = OpenAIBackend(base_url=server.base_url, cache_dir=tmp_path, timeout_s=10, **knobs)

    def kill_after_some_answers() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if cache.exists() and len(cache.read_bytes().splitlines()) >= 6:
                break
            time.sleep(0.005)
        server.kill()

    killer = threading.Thread(target=kill_after_some_answers)
    killer.start()
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match="failed 3 attempts"):
        LLMJudge(doomed, tok, REWARD, **settings).score(prompts, responses)
    failed_after = time.monotonic() - t0
    assert failed_after < 90  # bounded: retries x (timeout + backoff), not a hang
    killer.join(timeout=60)
    doomed.close()
    time.sleep(1.0)  # requests still retrying in the closed pool give up
    done = len(cache.read_bytes().splitlines())
    assert 6 <= done < 40
    server.start()  # a new process on a new port
    print(f"judge failed {failed_after:.1f} s after the start, {done}/40 answers cached; "
          f"server restart: {server.start_s:.1f} s")  # fmt: skip
    resumed = OpenAIBackend(base_url=server.base_url, cache_dir=tmp_path, timeout_s=60, **knobs)
    results = LLMJudge(resumed, tok, REWARD, **settings).score(prompts, responses)
    assert [r.samples for r in results] == [r.samples for r in reference]
    assert [r.score for r in results] == [r.score for r in reference]
    assert resumed.usage["cached"] == done and resumed.usage["requests"] == 40 - done
    resumed.close()
