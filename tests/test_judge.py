"""Tests for judge.py: RewardConfig templates/parsing, LLMJudge (mean and expected modes),
CallableJudge and RewardModelJudge.

The LLM judge is exercised with a tiny hand-built causal LM over characters: after ``>``
it writes ``#`` (or ``?`` when the context holds a ``z``), after ``#`` a digit whose
logits are ``-(d - mu)^2 / 2`` with ``mu = #a - 0.5 #b`` counted over the context, and
after a digit or ``?`` it ends. Its score distribution is known in closed form, so the
judge's arithmetic can be checked exactly.
"""

from __future__ import annotations

import json
import math
import pickle

import pytest
import torch
from jinja2.sandbox import SecurityError
from tiny import DelegatingBackend
from torch import nn

from self_rewarding_lm_pytorch.generation import TorchBackend
from self_rewarding_lm_pytorch.judge import (
    DEFAULT_REWARD_CONFIG,
    CallableJudge,
    Judge,
    JudgeConfig,
    JudgeResult,
    LLMJudge,
    RewardConfig,
    RewardModelJudge,
    ScoreRange,
    TemplateSecurityError,
)
from self_rewarding_lm_pytorch.models import CallableTokenizer, wrap_model
from self_rewarding_lm_pytorch.pairs import select_pairs

EOS = 0


class ScriptedJudgeLM(nn.Module):
    """A causal LM (tokens -> logits, every position) that behaves like a tiny judge."""

    def __init__(self, vocab: int = 128, digit_ids: list[int] | None = None, max_seq_len=None):
        super().__init__()
        self.digit_ids = digit_ids if digit_ids is not None else [ord("0") + d for d in range(10)]
        table = torch.zeros(vocab, vocab)
        table[ord(">"), ord("#")] = 20.0
        table[ord("#"), :] = -40.0  # only digits follow '#'
        table[ord("?"), EOS] = 20.0
        for t in self.digit_ids:
            table[t, EOS] = 20.0
        self.table = nn.Parameter(table, requires_grad=False)
        self.max_seq_len = max_seq_len
        self.num_tokens = vocab

    def mu(self, x: torch.Tensor) -> torch.Tensor:
        return (x == ord("a")).cumsum(-1).float() - 0.5 * (x == ord("b")).cumsum(-1).float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.table[x].clone()
        d = torch.arange(len(self.digit_ids), dtype=torch.float)
        digit_logits = -((d - self.mu(x)[..., None]) ** 2) / 2
        is_hash = (x == ord("#"))[..., None]
        cols = torch.tensor(self.digit_ids)
        logits[..., cols] = torch.where(is_hash, digit_logits, logits[..., cols])
        has_z = ((x == ord("z")).cumsum(-1) > 0) & (x == ord(">"))
        logits[..., ord("#")] -= 30.0 * has_z
        logits[..., ord("?")] += 40.0 * has_z
        return logits


def char_tokenizer(**kw) -> CallableTokenizer:
    return CallableTokenizer(
        lambda s: [ord(c) for c in s],
        lambda ids: "".join(chr(int(i)) for i in ids),
        eos_id=EOS,
        **kw,
    )


TINY_CONFIG = RewardConfig(
    prompt_template="Q:{{ prompt }} A:{{ response }}>",
    reward_regex_template="#{{ reward }}",
    validate_reward=ScoreRange(0, 5),
    score_values=range(6),
)


def exact_expected(mu: float, values=range(6)) -> tuple[float, dict[int, float]]:
    w = {v: math.exp(-((v - mu) ** 2) / 2) for v in values}
    z = sum(w.values())
    dist = {v: w[v] / z for v in values}
    return sum(v * p for v, p in dist.items()), dist


# ------------------------------------------------------------------ RewardConfig


SEED_PROMPT = """
        Pretty please rate the following user prompt and response
        User: {{ prompt }}
        Response: {{ response }}

        Format your score as follows:
        Rating: <rating as integer from 0 - 10>
        """


def test_seed_reward_config_example_parses_rating_in_free_text():
    cfg = RewardConfig(
        prompt_template=SEED_PROMPT,
        reward_regex_template="""
        Rating: {{ reward }}
        """,
    )
    assert cfg.init() is cfg  # seed-compatible init()
    text = cfg.render("what is 2+2?", "4")
    assert text.startswith("Pretty please rate")
    assert "User: what is 2+2?\nResponse: 4\n" in text
    assert cfg.parse("I think it is decent.\nRating: 7\nThanks!") == 7.0
    assert cfg.parse("Rating:7.5 overall") == 7.5
    assert cfg.parse("Rating:\n  3") == 3.0
    assert cfg.parse("Rating: <rating as integer from 0 - 10>") is None
    assert cfg.parse_with_reason("no number here") == (None, "no score found")


def test_init_exposes_parse_reward_and_template_fn_like_the_seed():
    """The seed's ``RewardConfig.init()`` leaves ``template_fn`` and ``parse_reward`` as
    callables that code written for the seed calls directly."""
    cfg = RewardConfig(prompt_template=SEED_PROMPT, reward_regex_template="Rating: {{ reward }}")
    cfg = cfg.init()
    assert callable(cfg.template_fn) and callable(cfg.parse_reward)
    text = cfg.template_fn(prompt="what is 2+2?", response="4")
    assert text == cfg.render("what is 2+2?", "4") and "User: what is 2+2?" in text
    assert cfg.parse_reward("so.\nRating: 7\n") == 7.0 and cfg.parse_reward("none") is None
    # the exposed callables follow later changes of the templates when init() runs again
    cfg.prompt_template, cfg.reward_regex_template = "{{ prompt }}={{ response }}", "R{{ reward }}"
    cfg.init()
    assert cfg.template_fn(prompt="a", response="b") == "a=b" and cfg.parse_reward("R 3") == 3.0
    # a user's own callables are kept; the copies pickle and compare like the config
    own = RewardConfig(prompt_template="x", template_fn=str.format, parse_reward=float).init()
    assert own.template_fn is str.format and own.parse_reward is float
    clone = pickle.loads(pickle.dumps(cfg))
    assert clone == cfg and clone.parse_reward("R 4") == 4.0
    assert clone.template_fn(prompt="p", response="r") == "p=r"


@pytest.mark.parametrize(
    "text",
    ["Score: 4", "score: 4", "SCORE:4", "Score : 4", "**Score:** 4", "**Score**: 4", "Score: **4**",
     "__score__ :  4", "The total.\nscore:\n 4"],
)  # fmt: skip
def test_default_score_regex_is_tolerant_of_case_spacing_and_markdown(text):
    assert DEFAULT_REWARD_CONFIG.parse(text) == 4.0
    assert DEFAULT_REWARD_CONFIG.init().parse_reward(text) == 4.0


def test_tolerant_score_regex_still_needs_the_template_text():
    cfg = DEFAULT_REWARD_CONFIG
    for text in ("4", "Scores 4", "Sc ore: 4", "Score 4", "points: 4"):
        assert cfg.parse(text) is None, text
    seed = RewardConfig(prompt_template=SEED_PROMPT, reward_regex_template="Rating: {{ reward }}")
    assert seed.parse("rating: 7") == 7.0 and seed.parse("**Rating:** 7/10") == 7.0
    assert seed.parse("Score: 7") is None


def test_user_text_is_inserted_verbatim_not_rendered():
    cfg = RewardConfig(
        prompt_template="{{ prompt }}|{{ response }}", reward_regex_template="S{{ reward }}"
    )
    evil = "{{ 7 * 7 }} {% for x in range(3) %}x{% endfor %} {{ prompt.__class__ }}"
    assert cfg.render(evil, "r") == evil + "|r"


def test_match_first_or_last_and_regex_escaping():
    last = RewardConfig(
        prompt_template="{{prompt}}{{response}}", reward_regex_template="[s]* = {{ reward }}"
    )
    first = RewardConfig(
        prompt_template="{{prompt}}{{response}}",
        reward_regex_template="[s]* = {{ reward }}",
        match="first",
    )
    text = "[s]* = 1 then [s]* =   2.25 and ss = 9"
    assert last.parse(text) == 2.25
    assert first.parse(text) == 1.0
    # regex metacharacters in the template are literal
    assert last.parse("s = 3") is None and last.parse("[s]*=4") == 4.0


def test_default_config_is_the_paper_rubric_and_validates_0_to_5():
    text = DEFAULT_REWARD_CONFIG.render("Name a prime.", "7")
    assert text.startswith(
        "Review the user's question and the corresponding response using the additive 5-point"
    )
    for needle in (
        "Add 1 point",
        "third point",
        "fourth point",
        "fifth point",
        '"Score: <total points>"',
    ):
        assert needle in text
    assert "User: Name a prime.\n\n<response>7</response>" in text
    assert text.rstrip().endswith("attribute points based on the outlined criteria.")
    # the instructions themselves contain no parsable score
    assert DEFAULT_REWARD_CONFIG.parse(text) is None
    assert DEFAULT_REWARD_CONFIG.parse("Good answer.\nScore: 4") == 4.0
    assert DEFAULT_REWARD_CONFIG.parse("Score: 2\n...on reflection... Score: 3") == 3.0
    assert DEFAULT_REWARD_CONFIG.parse_with_reason("Score: 7") == (
        None,
        "score 7 outside the valid range [0, 5]",
    )
    assert DEFAULT_REWARD_CONFIG.parse("Score: -1") is None
    assert DEFAULT_REWARD_CONFIG.parse("Score: 5") == 5.0


def test_construction_errors_name_the_problem():
    with pytest.raises(
        ValueError, match=r"missing the variable \{\{ response \}\}.*Response: \{\{ response \}\}"
    ):
        RewardConfig(prompt_template="User: {{ prompt }}", reward_regex_template="S: {{ reward }}")
    with pytest.raises(ValueError, match=r"\{\{ prompt \}\}"):
        RewardConfig(prompt_template="{{ response }}", reward_regex_template="S: {{ reward }}")
    with pytest.raises(
        ValueError, match=r"reward_regex_template is missing the variable \{\{ reward \}\}"
    ):
        RewardConfig(prompt_template="{{ prompt }}{{ response }}", reward_regex_template="Score: N")
    with pytest.raises(ValueError, match="reward_regex_template.*or parse_reward"):
        RewardConfig(prompt_template="{{ prompt }}{{ response }}")
    with pytest.raises(ValueError, match="unknown variable"):
        RewardConfig(
            prompt_template="{{ prompt }}{{ response }}{{ extra }}",
            reward_regex_template="{{ reward }}",
        )
    with pytest.raises(ValueError, match="exactly once"):
        RewardConfig(
            prompt_template="{{ prompt }}{{ response }}",
            reward_regex_template="{{ reward }}/{{ reward }}",
        )
    with pytest.raises(ValueError, match="not a valid Jinja2"):
        RewardConfig(
            prompt_template="{{ prompt }}{{ response", reward_regex_template="{{ reward }}"
        )
    with pytest.raises(ValueError, match="match"):
        RewardConfig(
            prompt_template="{{ prompt }}{{ response }}",
            reward_regex_template="{{ reward }}",
            match="middle",
        )


def test_sandbox_blocks_python_internals():
    with pytest.raises(TemplateSecurityError, match="sandbox forbids") as info:
        RewardConfig(
            prompt_template="{{ prompt.__class__.__mro__ }}{{ response }}",
            reward_regex_template="{{ reward }}",
        )
    assert isinstance(info.value, SecurityError)
    # an unsafe access hidden behind a branch is still caught when it is reached
    cfg = RewardConfig(
        prompt_template="{% if response == 'x!' %}{{ response.__init__.__globals__ }}{% endif %}{{ prompt }}",
        reward_regex_template="{{ reward }}",
    )
    assert cfg.render("p", "fine") == "p"
    with pytest.raises(SecurityError):
        cfg.render("p", "x!")


def test_parse_reward_callable_validation_and_robustness():
    def parser(text):
        if text == "boom":
            raise RuntimeError("bad parser")
        if text == "nan":
            return float("nan")
        if text == "word":
            return "seven"
        return len(text) if text else None

    cfg = RewardConfig(
        prompt_template="{{ prompt }}{{ response }}",
        parse_reward=parser,
        validate_reward=lambda s: s < 4,
    )
    assert cfg.parse("abc") == 3.0
    assert cfg.parse_with_reason("abcd") == (None, "score 4 rejected by validate_reward")
    assert cfg.parse_with_reason("")[1] == "no score found"
    assert "RuntimeError" in cfg.parse_with_reason("boom")[1]
    assert "not finite" in cfg.parse_with_reason("nan")[1]
    assert "non-number" in cfg.parse_with_reason("word")[1]
    with pytest.raises(TypeError):
        cfg.parse(None)  # type: ignore[arg-type]


def test_template_fn_and_pickling():
    cfg = RewardConfig(
        prompt_template="unused",
        template_fn=lambda prompt, response: f"<{prompt}|{response}>",
        reward_regex_template="S{{ reward }}",
    )
    assert cfg.render("a", "b") == "<a|b>"
    clone = pickle.loads(pickle.dumps(DEFAULT_REWARD_CONFIG))
    assert clone.render("p", "r") == DEFAULT_REWARD_CONFIG.render("p", "r")
    assert clone.parse("Score: 3") == 3.0


# ------------------------------------------------------------------ LLMJudge


def make_judge(**kw) -> LLMJudge:
    model = kw.pop("model", None) or ScriptedJudgeLM()
    return LLMJudge(
        model, kw.pop("tokenizer", None) or char_tokenizer(), kw.pop("config", TINY_CONFIG), **kw
    )


def test_expected_score_matches_hand_computation_from_the_same_logits():
    torch.manual_seed(0)
    judge = make_judge(mode="expected")
    prompts = ["q", "q", "q", "q"]
    responses = ["aa", "aaab", "", "aaaaa"]
    results = judge.score(prompts, responses)
    lm = wrap_model(judge.lm)
    tok = judge.tokenizer
    for resp, res in zip(responses, results):
        assert res.samples[0].startswith("#") and res.failures == [None]
        # hand computation: one forward over judge prompt + "#", softmax over '0'..'5'
        ids = tok.encode(TINY_CONFIG.render("q", resp)) + [ord("#")]
        logits = lm(torch.tensor([ids]))[0, -1]
        p = torch.softmax(logits, -1)[[ord(str(v)) for v in range(6)]]
        hand = float((p * torch.arange(6)).sum() / p.sum())
        assert res.score == pytest.approx(hand, abs=1e-6)
        # and the closed form of this model
        mu = resp.count("a") - 0.5 * resp.count("b")
        exact, dist = exact_expected(mu)
        assert res.score == pytest.approx(exact, abs=1e-5)
        assert res.score_distribution == pytest.approx(dist, abs=1e-5)
        assert sum(res.score_distribution.values()) == pytest.approx(1.0)
        assert 0 < res.score_mass <= 1
        # the greedy sample's own score is the mode of the distribution (0..9 here)
        assert res.sample_scores[0] == float(math.ceil(mu - 0.5))  # argmax, first on ties


def test_expected_mode_unparsable_and_invalid_greedy_judgements_give_none():
    judge = make_judge(mode="expected")
    res = judge.score(["q", "q", "q"], ["zzz", "aaaaaaa", "aa"])
    assert (
        res[0].score is None and res[0].failures[0] == "no score found" and res[0].samples == ["?"]
    )
    assert res[1].score is None and "outside the valid range" in res[1].failures[0]
    assert res[1].score_distribution is None
    assert res[2].score == pytest.approx(exact_expected(2)[0], abs=1e-5)


def test_expected_mode_counts_a_score_it_cannot_weigh_as_unparsed():
    """A greedy score outside ``score_values`` (7 of 0..5, no validator) gives the candidate
    no expected score, and the judgement is reported as not parsed: ``sample_scores[i]`` is
    ``None`` exactly when ``failures[i]`` says why (what the parse-rate stop counts)."""
    cfg = RewardConfig(
        prompt_template="Q:{{ prompt }} A:{{ response }}>",
        reward_regex_template="#{{ reward }}",
        score_values=range(6),
    )
    judge = make_judge(mode="expected", config=cfg)
    bad, good = judge.score(["q", "q"], ["aaaaaaa", "aa"])
    assert bad.samples == ["#7"] and bad.score is None
    assert bad.sample_scores == [None] and "score_values" in bad.failures[0]
    assert good.score is not None and good.sample_scores == [2.0] and good.failures == [None]


def test_every_judge_reports_one_score_and_failure_per_output():
    """Callable judges, reward models and bare results report their outputs in the same
    shape as the LLM judge: ``sample_scores`` and ``failures`` with one entry per output."""
    results = [
        *CallableJudge(lambda p, r: None if r == "?" else len(r)).score(["a", "b"], ["xy", "?"]),
        *RewardModelJudge(SumReward(per_position=False), char_tokenizer()).score(["a"], ["b"]),
        JudgeResult(score=None),
        JudgeResult(score=2.5),
    ]
    for res in results:
        assert len(res.sample_scores) == len(res.failures) == 1 and res.samples == []
        assert (res.sample_scores[0] is None) == (res.failures[0] is not None)
        assert res.sample_scores[0] == res.score
    assert results[1].failures == ["the judge returned None"]
    assert results[3].failures == ["no score"] and results[4].failures == [None]
    with pytest.raises(ValueError, match="one entry per judge output"):
        JudgeResult(score=1.0, samples=["a", "b"], sample_scores=[1.0], failures=[None])


def test_expected_mode_is_independent_of_batching_and_padding():
    responses = ["a", "aaab" * 3, "", "ba", "aaaa", "abababab"]
    prompts = ["long prompt text"] * 3 + ["x"] * 3
    full = make_judge(mode="expected").score(prompts, responses)
    for kw in (dict(batch_size=1), dict(batch_size=4), dict(token_budget=60)):
        other = make_judge(mode="expected", **kw).score(prompts, responses)
        assert [r.score for r in other] == pytest.approx([r.score for r in full], abs=1e-6)


def test_expected_mode_with_merged_space_digit_tokens():
    """A BPE-like tokenizer where ' 3' is one token: the score position falls inside a token."""
    merged = {f" {d}": 128 + d for d in range(6)}
    inverse = {v: k for k, v in merged.items()}

    def encode(s):
        out, i = [], 0
        while i < len(s):
            if s[i : i + 2] in merged:
                out.append(merged[s[i : i + 2]])
                i += 2
            else:
                out.append(ord(s[i]))
                i += 1
        return out

    def decode(ids):
        return "".join(inverse.get(int(i), chr(int(i))) for i in ids)

    tok = CallableTokenizer(encode, decode, eos_id=EOS)
    model = ScriptedJudgeLM(vocab=134, digit_ids=[128 + d for d in range(6)])
    cfg = RewardConfig(
        prompt_template="{{ prompt }}:{{ response }}>",
        reward_regex_template="# {{ reward }}",
        validate_reward=ScoreRange(0, 5),
        score_values=range(6),
    )
    judge = LLMJudge(model, tok, cfg, mode="expected")
    res = judge.score(["q", "q"], ["aaa", "ab"])
    assert res[0].samples == ["# 3"]
    assert res[0].score == pytest.approx(exact_expected(3)[0], abs=1e-5)
    assert res[1].score == pytest.approx(exact_expected(0.5)[0], abs=1e-5)


def test_expected_mode_rejects_multi_token_score_values_and_regexless_configs():
    cfg = RewardConfig(
        prompt_template="{{ prompt }}{{ response }}>",
        reward_regex_template="#{{ reward }}",
        score_values=range(11),
    )
    with pytest.raises(ValueError, match="score value 10 encodes to 2 tokens.*mode='mean'"):
        LLMJudge(ScriptedJudgeLM(), char_tokenizer(), cfg, mode="expected")
    no_values = RewardConfig(
        prompt_template="{{ prompt }}{{ response }}", reward_regex_template="#{{ reward }}"
    )
    with pytest.raises(ValueError, match="score_values"):
        LLMJudge(ScriptedJudgeLM(), char_tokenizer(), no_values, mode="expected")
    parser_only = RewardConfig(
        prompt_template="{{ prompt }}{{ response }}", parse_reward=float, score_values=range(6)
    )
    with pytest.raises(ValueError, match="reward_regex_template"):
        LLMJudge(ScriptedJudgeLM(), char_tokenizer(), parser_only, mode="expected")


def test_mean_mode_scores_are_the_mean_of_parsable_samples():
    judge = make_judge(num_samples=5, temperature=1.0, top_p=1.0)
    res = judge.score(["q"] * 4, ["aa", "zz", "a" * 10, "aaab"], generator=0)
    for r in res:
        assert len(r.samples) == len(r.sample_scores) == len(r.failures) == 5
        ok = [s for s in r.sample_scores if s is not None]
        assert r.score == (pytest.approx(sum(ok) / len(ok)) if ok else None)
        for text, s, why in zip(r.samples, r.sample_scores, r.failures):
            assert (s is None) == (why is not None)
            assert s == TINY_CONFIG.parse(text)
    assert res[1].score is None and set(res[1].failures) == {"no score found"}
    # mu = 10: the samples say 7..9, all outside 0..5
    assert res[2].score is None and all("outside the valid range" in f for f in res[2].failures)
    assert res[0].score_distribution is None


def test_mean_mode_is_seeded_and_sampling_varies():
    judge = make_judge(num_samples=4, temperature=1.0, top_p=1.0)
    responses = ["aab", "aaab", "ab", "aaaab"]
    a = judge.score(["q"] * 4, responses, generator=123)
    b = judge.score(["q"] * 4, responses, generator=123)
    assert [r.samples for r in a] == [r.samples for r in b]
    all_samples = [s for r in a for s in r.samples]
    assert len(set(all_samples)) > 1  # k samples are sampled, not copies


def test_judge_prompt_goes_through_the_chat_format():
    cfg = RewardConfig(
        prompt_template="{{ prompt }}/{{ response }}", reward_regex_template="#{{ reward }}"
    )
    # the model only judges after '>', which only the chat format appends
    formatted = make_judge(
        config=cfg, mode="mean", tokenizer=char_tokenizer(prompt_format="[{prompt}]>")
    )
    plain = make_judge(config=cfg, mode="mean", max_new_tokens=1)
    assert formatted.score(["q"], ["aa"], generator=0)[0].score is not None
    assert plain.score(["q"], ["aa"], generator=0)[0].score is None


def test_too_long_judge_prompts_error_or_truncate():
    model = ScriptedJudgeLM(max_seq_len=40)
    long_response = "aa" + "x" * 60 + "bbbb"  # mu = 0 in full, 2 for its head, -2 for its tail
    prompts, responses = ["q", "q"], ["aaa", long_response]
    n = len(TINY_CONFIG.render("q", long_response))
    strict = make_judge(model=model, mode="expected", max_new_tokens=4)
    with pytest.raises(
        ValueError, match=rf"candidate 1: the judge prompt is {n} tokens .* context of 40"
    ):
        strict.score(prompts, responses)
    cut = make_judge(
        model=model, mode="expected", max_new_tokens=4, on_too_long="truncate_response"
    )
    res = cut.score(prompts, responses)
    assert [r.truncated for r in res] == [False, True]
    assert res[0].score == pytest.approx(exact_expected(3)[0], abs=1e-5)
    assert res[1].score == pytest.approx(exact_expected(2)[0], abs=1e-5)
    left = make_judge(model=model, mode="expected", max_new_tokens=4, on_too_long="truncate_left")
    res = left.score(prompts, responses)
    assert res[1].truncated and res[1].score == pytest.approx(exact_expected(-2)[0], abs=1e-5)
    with pytest.raises(ValueError, match="leaves no room"):
        make_judge(model=model, max_new_tokens=40).score(["q"], ["a"])


def test_judge_restores_training_mode_and_validates_inputs():
    model = ScriptedJudgeLM()
    model.train()
    judge = make_judge(model=model, mode="expected")
    judge.score(["q"], ["a"])
    assert model.training
    assert judge.score([], []) == []
    with pytest.raises(ValueError, match="2 prompts but 1 responses"):
        judge.score(["q", "q"], ["a"])
    with pytest.raises(TypeError):
        judge.score("q", "a")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="mode"):
        make_judge(mode="median")
    with pytest.raises(ValueError, match=r"generation_kwargs \['nucleus'\]"):
        make_judge(generation_kwargs={"nucleus": 0.5})
    # GenerationConfig fields pass through: top_k=1 makes sampling greedy
    greedy = make_judge(num_samples=3, generation_kwargs={"top_k": 1}).score(
        ["q"], ["aa"], generator=0
    )
    assert greedy[0].samples == ["#2"] * 3
    assert isinstance(judge, Judge)


def test_judge_result_to_dict_is_json_ready():
    res = make_judge(mode="expected").score(["q"], ["aa"])[0]
    d = json.loads(json.dumps(res.to_dict()))
    assert d["score"] == pytest.approx(res.score)
    assert set(d["score_distribution"]) == {str(v) for v in range(6)}
    assert d["samples"] == res.samples and d["failures"] == [None]


def test_mean_and_expected_modes_tie_rate_and_agreement():
    """Both modes on the same candidates: expected scores break ties the mean of k=3 integer
    samples cannot, and the two rankings agree."""
    prompts, responses = [], []
    for p in range(16):
        for c in range(4):  # four candidates per prompt, mu from 0.5 to 4 in steps of 0.5
            mu2 = (p + c) % 8 + 1
            prompts.append(f"q{p}")
            responses.append("a" * ((mu2 + 1) // 2) + "b" * (mu2 % 2))
    mean = make_judge(num_samples=3).score(prompts, responses, generator=0)
    expected = make_judge(mode="expected").score(prompts, responses)
    ms = [r.score for r in mean]
    es = [r.score for r in expected]
    assert all(s is not None for s in ms + es)

    def tie_stats(scores):
        ties = pairs = no_pair = 0
        for p in range(16):
            block = scores[4 * p : 4 * p + 4]
            no_pair += not select_pairs(responses[4 * p : 4 * p + 4], block)
            for i in range(4):
                for j in range(i + 1, 4):
                    pairs += 1
                    ties += block[i] == block[j]
        return ties / pairs, no_pair

    mean_ties, _ = tie_stats(ms)
    exp_ties, exp_no_pair = tie_stats(es)
    assert exp_ties == 0 and exp_no_pair == 0
    assert mean_ties > exp_ties

    concordant = discordant = 0
    for i in range(len(ms)):
        for j in range(i + 1, len(ms)):
            a, b = ms[i] - ms[j], es[i] - es[j]
            concordant += a * b > 0
            discordant += a * b < 0
    tau = (concordant - discordant) / (len(ms) * (len(ms) - 1) / 2)
    assert tau > 0.5
    print(
        f"\n| mode | pair tie rate | Kendall tau vs other |\n|---|---|---|\n"
        f"| mean (k=3) | {mean_ties:.3f} | {tau:.3f} |\n| expected | {exp_ties:.3f} | {tau:.3f} |"
    )


# ------------------------------------------------------------------ external judges


def test_callable_judge():
    judge = CallableJudge(lambda p, r: None if r == "?" else (float("nan") if r == "n" else len(r)))
    res = judge.score(["a", "b", "c"], ["xyz", "?", "n"])
    assert [r.score for r in res] == [3.0, None, None]
    assert res[1].failures == ["the judge returned None"] and "non-finite" in res[2].failures[0]
    assert isinstance(judge, Judge)
    with pytest.raises(TypeError):
        CallableJudge(3)  # type: ignore[arg-type]


class SumReward(nn.Module):
    """Reward model: a learned per-token value, cumulative mean over positions."""

    def __init__(self, per_position: bool, classes: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.value = nn.Parameter(torch.randn(128, max(1, classes), generator=g))
        self.per_position, self.classes = per_position, classes

    def forward(self, x):
        v = self.value[x]  # (B, T, C)
        cum = v.cumsum(1) / torch.arange(1, x.shape[1] + 1)[None, :, None]
        if self.per_position:
            return cum
        return cum[:, -1]


def test_reward_model_judge_scalar_heads_use_the_last_token():
    tok = char_tokenizer()
    prompts, responses = ["p", "p", "pp", "p"], ["abc", "xyz", "a", "hello world"]
    for per_position in (True, False):
        model = SumReward(per_position)
        judge = RewardModelJudge(model, tok, batch_size=2)
        res = judge.score(prompts, responses)
        for p, r, out in zip(prompts, responses, res):
            ids = tok.encode(f"{p}\n{r}")
            assert out.score == pytest.approx(float(model.value[ids].detach().mean()), abs=1e-5)


def test_reward_model_judge_classes_head():
    tok = char_tokenizer()
    model = SumReward(per_position=False, classes=3)
    judge = RewardModelJudge(
        model, tok, head="classes", class_values=[-1.0, 0.0, 2.0], template="{{ response }}"
    )
    res = judge.score(["ignored", "x"], ["good", "bad!"])
    for r, out in zip(["good", "bad!"], res):
        logits = model.value[tok.encode(r)].detach().mean(0)
        p = torch.softmax(logits, -1)
        assert out.score == pytest.approx(float(p @ torch.tensor([-1.0, 0.0, 2.0])), abs=1e-5)
        assert out.score_distribution == pytest.approx(
            {-1.0: float(p[0]), 0.0: float(p[1]), 2.0: float(p[2])}
        )
    with pytest.raises(ValueError, match="3 classes but class_values has 2"):
        RewardModelJudge(model, tok, head="classes", class_values=[0, 1]).score(["p"], ["r"])
    with pytest.raises(ValueError, match="head='scalar'"):  # (B, 3) logits, T = 6
        RewardModelJudge(model, tok).score(["p"], ["rrrr"])


# ------------------------------------------------------------------ backends and settings


JUDGED = (["q", "q", "q", "q"], ["aa", "aaab", "", "aaaaa"])


@pytest.mark.parametrize("mode", ["mean", "expected"])
def test_judge_given_a_backend_equals_the_judge_given_the_model(mode):
    model = ScriptedJudgeLM()
    kw = dict(mode=mode, num_samples=4, temperature=1.0, top_p=1.0, max_new_tokens=4)
    by_model = LLMJudge(model, char_tokenizer(), TINY_CONFIG, **kw).score(*JUDGED, generator=5)
    torch_backend = TorchBackend(model)
    by_torch = LLMJudge(torch_backend, char_tokenizer(), TINY_CONFIG, **kw)
    assert by_torch.backend is torch_backend
    other = DelegatingBackend(model)
    by_other = LLMJudge(other, char_tokenizer(), TINY_CONFIG, **kw)
    want = [r.to_dict() for r in by_model]
    assert [r.to_dict() for r in by_torch.score(*JUDGED, generator=5)] == want
    assert [r.to_dict() for r in by_other.score(*JUDGED, generator=5)] == want
    assert set(other.calls) == (
        {"generate"} if mode == "mean" else {"generate", "next_token_logprobs"}
    )
    if mode == "mean":  # sampled: another seed gives other judgements
        again = LLMJudge(model, char_tokenizer(), TINY_CONFIG, **kw).score(*JUDGED, generator=6)
        assert [r.samples for r in again] != [r["samples"] for r in want]
    else:  # the expected score read through next_token_logprobs is the closed form
        for res, resp in zip(by_model, JUDGED[1]):
            mu = resp.count("a") - 0.5 * resp.count("b")
            assert res.score == pytest.approx(exact_expected(mu)[0], abs=1e-6)


def test_judge_config_equals_the_same_settings_as_keywords():
    model = ScriptedJudgeLM()
    tok = char_tokenizer()
    by_config = LLMJudge(model, tok, TINY_CONFIG, config=JudgeConfig(num_samples=2))
    by_keyword = LLMJudge(model, tok, TINY_CONFIG, num_samples=2)
    assert by_config.settings == by_keyword.settings
    assert by_config.reward_config is by_config.config is TINY_CONFIG
    got = by_config.score(*JUDGED, generator=3)
    assert [r.to_dict() for r in got] == [
        r.to_dict() for r in by_keyword.score(*JUDGED, generator=3)
    ]
    assert all(len(r.samples) == 2 for r in got)
    # keywords override the given config's fields; the config itself is left as it was
    base = JudgeConfig(num_samples=2, temperature=0.5)
    mixed = LLMJudge(model, tok, TINY_CONFIG, config=base, mode="expected")
    assert (mixed.settings.mode, mixed.settings.num_samples, mixed.settings.temperature) == (
        "expected",
        2,
        0.5,
    )
    assert base.mode == "mean"


def test_judge_unknown_setting_or_config_type_raises_type_error():
    with pytest.raises(TypeError, match=r"unknown setting\(s\) \['num_sample'\].*num_samples"):
        LLMJudge(ScriptedJudgeLM(), char_tokenizer(), TINY_CONFIG, num_sample=2)
    with pytest.raises(TypeError, match="config must be a JudgeConfig, got dict"):
        LLMJudge(ScriptedJudgeLM(), char_tokenizer(), TINY_CONFIG, config={"num_samples": 2})


def test_engine_options_with_a_backend_are_refused_and_name_the_backend():
    backend = TorchBackend(ScriptedJudgeLM())
    with pytest.raises(ValueError, match=r"generation_kwargs \['use_cache'\].*TorchBackend"):
        LLMJudge(backend, char_tokenizer(), TINY_CONFIG, generation_kwargs={"use_cache": False})
    # with the model, the judge builds the torch engine with them
    judge = LLMJudge(
        ScriptedJudgeLM(), char_tokenizer(), TINY_CONFIG, generation_kwargs={"use_cache": False}
    )
    assert judge.backend.engine_kwargs == {"use_cache": False}
