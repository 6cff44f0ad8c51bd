"""The demo task: oracle, data generators, judge format, tokenizer and tiny model."""

from __future__ import annotations

import math
import random
import re
from collections import Counter

import pytest
import torch
from jinja2.sandbox import SandboxedEnvironment

from self_rewarding_lm_pytorch.demo import (
    DEMO_MAX_SEQ_LEN,
    DemoModelConfig,
    DemoTokenizer,
    build_demo_model,
    count_parameters,
)
from self_rewarding_lm_pytorch.demo import task as T
from self_rewarding_lm_pytorch.demo.config import DemoConfig
from self_rewarding_lm_pytorch.models import Tokenizer, wrap_model

# ---------------------------------------------------------------------- oracle


@pytest.mark.parametrize(
    ("prompt", "response", "verdicts", "score"),
    [
        ("len6 start:b novow upper>", "BXTRKL", "yyyy", 5),
        ("len6 start:b novow upper>", "BXTRKl", "yyyn", 4),  # 3/4 -> 3.75 -> 4
        ("len6 start:b novow upper>", "bxtrkl", "yyyn", 4),
        ("len6 start:b novow upper>", "BATRKL", "yyny", 4),
        ("len6 start:b novow upper>", "XBTRKL", "ynyy", 4),
        ("len6 start:b novow upper>", "BXTRKLL", "nyyy", 4),
        ("len6 start:b novow upper>", "AXTRKe", "ynnn", 1),  # 1/4 -> 1.25 -> 1
        ("len6 start:b novow upper>", "BAtrkL", "yynn", 3),  # 2/4 -> 2.5 -> 3 (halves up)
        ("len3 end:c>", "abc", "yy", 5),
        ("len3 end:c>", "abcc", "ny", 3),  # 1/2 -> 2.5 -> 3
        ("len3 end:c>", "ab", "nn", 0),
        ("len4 has:q upper>", "AQBC", "yyy", 5),
        ("len4 has:q upper>", "ABCD", "yny", 3),  # 2/3 -> 3.33 -> 3
        ("len4 has:q upper>", "abcd", "ynn", 2),  # 1/3 -> 1.67 -> 2
        ("len4 has:q upper>", "", "nnn", 0),
        ("upper len2>", "AB", "yy", 5),  # verdicts follow the prompt's own order
        ("upper len2>", "ABC", "yn", 3),
    ],
)
def test_oracle_hand_checked(prompt: str, response: str, verdicts: str, score: int) -> None:
    assert T.verdicts(prompt, response) == verdicts
    assert T.score(prompt, response) == score
    assert T.fully_correct(prompt, response) == (score == 5)
    assert T.format_judgement(prompt, response) == f"{verdicts} Score: {score}"


def _half_up_formula(satisfied: int, total: int) -> int:
    return math.floor(5 * satisfied / total + 0.5)


def test_solved_response_scores_five_and_breaking_one_criterion_follows_formula() -> None:
    rng = random.Random(0)
    seen = Counter()
    for _ in range(300):
        spec = T.sample_spec(rng)
        prompt = spec.to_prompt()
        assert T.parse_prompt(prompt) == spec
        good = T.solve(prompt, rng)
        assert T.score(prompt, good) == 5 and T.fully_correct(prompt, good)
        k = len(spec.criteria)
        for i, name in enumerate(spec.criteria):
            bad = T.break_criteria(prompt, good, [name], rng)
            assert bad is not None, (prompt, good, name)
            expected = "".join("n" if j == i else "y" for j in range(k))
            assert T.verdicts(prompt, bad) == expected
            assert T.score(prompt, bad) == _half_up_formula(k - 1, k) < 5
            assert not T.fully_correct(prompt, bad)
            seen[name] += 1
    assert set(seen) == set(T.CRITERIA)


def test_breaking_several_criteria_breaks_exactly_those() -> None:
    rng = random.Random(1)
    for _ in range(100):
        spec = T.sample_spec(rng)
        good = T.solve(spec, rng)
        names = rng.sample(spec.criteria, rng.randint(1, len(spec.criteria)))
        bad = T.break_criteria(spec, good, names, rng)
        assert bad is not None
        assert {c for c, ok in T.check(spec, bad).items() if not ok} == set(names)
        assert T.score(spec, bad) == _half_up_formula(
            len(spec.criteria) - len(names), len(spec.criteria)
        )


def test_break_returns_none_when_impossible() -> None:
    # has:b cannot fail alone when the response must start with b
    assert T.break_criteria("len3 start:b has:b>", "bxy", ["has"], random.Random(0)) is None


@pytest.mark.parametrize(
    ("bad", "match"),
    [
        ("len6 start:B>", "cannot parse"),
        ("start:b>", "no len"),
        ("len3 upper upper>", "twice"),
        ("len0 upper>", "length"),
    ],
)
def test_prompt_parse_errors(bad: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        T.parse_prompt(bad)


def test_bad_configs_raise() -> None:
    with pytest.raises(ValueError, match="min_len"):
        T.TaskConfig(min_len=2)
    with pytest.raises(ValueError, match="fraction"):
        T.IFTNoise(upper_lowercase=1.5)
    with pytest.raises(ValueError, match="sum to"):
        T.EFTMix(correct=0.8, garbage=0.3)
    with pytest.raises(TypeError, match="seed"):
        T.ift_data(3, seed="0")  # type: ignore[arg-type]


# ---------------------------------------------------------------------- IFT noise


def _within(observed: int, n: int, p: float, sds: float = 4.5) -> bool:
    return abs(observed / n - p) <= sds * math.sqrt(p * (1 - p) / n)


def _stuttered(prompt: str, response: str) -> bool:
    spec = T.parse_prompt(prompt)
    return (
        len(response) == spec.length + 1
        and response[-2:].lower() == spec.end * 2
        and T.check(prompt, response)["end"]
    )


def test_ift_systematic_noise_fractions_hold_on_2000_samples() -> None:
    data = T.ift_data(
        2000, seed=0, noise=T.IFTNoise(upper_lowercase=0.6, end_stutter=0.6, random=0)
    )
    upper = [e for e in data if T.parse_prompt(e.prompt).upper]
    end = [e for e in data if T.parse_prompt(e.prompt).end]
    plain = [e for e in data if e not in upper and e not in end]
    assert len(upper) > 500 and len(end) > 500 and len(plain) > 500
    lowered = sum(e.response.islower() for e in upper)
    assert _within(lowered, len(upper), 0.6)
    assert _within(sum(_stuttered(e.prompt, e.response) for e in end), len(end), 0.6)
    # the noise breaks exactly what it says: lower case fails upper only, a stutter len only
    for e in upper + end:
        failed = {c for c, ok in T.check(e.prompt, e.response).items() if not ok}
        expected = set()
        if "lowercase" in e.noise:
            expected.add("upper")
        if "stutter" in e.noise:
            expected.add("len")
        assert failed == expected, e
    assert all(T.fully_correct(e.prompt, e.response) for e in plain)


def test_ift_random_noise_fraction_holds_on_2000_samples() -> None:
    data = T.ift_data(2000, seed=1, noise=T.IFTNoise(upper_lowercase=0, end_stutter=0, random=0.1))
    wrong = [e for e in data if not T.fully_correct(e.prompt, e.response)]
    assert _within(len(wrong), len(data), 0.1)
    for e in wrong:  # exactly one criterion broken, the one named in the tag
        (tag,) = e.noise
        failed = [c for c, ok in T.check(e.prompt, e.response).items() if not ok]
        assert failed == [tag.removeprefix("break:")]


def test_ift_default_noise_tags_are_truthful() -> None:
    data = T.ift_data(2000, seed=2)
    counts = Counter(tag.split(":")[0] for e in data for tag in e.noise)
    n_upper = sum(T.parse_prompt(e.prompt).upper for e in data)
    n_end = sum(T.parse_prompt(e.prompt).end is not None for e in data)
    assert _within(counts["lowercase"], n_upper, 0.6)
    assert _within(counts["stutter"], n_end, 0.6)
    assert _within(counts["break"], len(data), 0.1)
    for e in data:
        if not e.noise:
            assert T.fully_correct(e.prompt, e.response)
        if "lowercase" in e.noise and not any(t == "break:upper" for t in e.noise):
            assert e.response.islower()


# ---------------------------------------------------------------------- EFT and held-out sets


def test_eft_judgements_equal_the_oracle_and_cover_every_criterion() -> None:
    data = T.eft_data(600, seed=0)
    fails = Counter()
    for e in data:
        assert e.prompt == T.render_judge_prompt(e.task_prompt, e.task_response)
        assert e.score == T.score(e.task_prompt, e.task_response)
        assert e.verdicts == T.verdicts(e.task_prompt, e.task_response)
        assert e.response == f"{e.verdicts} Score: {e.score}"
        parsed = T.parse_judgement(e.response, len(T.parse_prompt(e.task_prompt).criteria))
        assert parsed == (e.verdicts, e.score)
        fails.update(c for c, ok in T.check(e.task_prompt, e.task_response).items() if not ok)
    assert {e.score for e in data} == set(range(6))
    broken = sum(not T.fully_correct(e.task_prompt, e.task_response) for e in data)
    assert broken > 0.6 * len(data)
    # each criterion fails in at least ~1/6 of the broken examples (len more: always asked)
    for name in T.CRITERIA:
        assert fails[name] >= 0.8 * broken / len(T.CRITERIA), (name, fails)


def test_generators_are_deterministic_under_a_seed() -> None:
    assert T.ift_data(50, 3) == T.ift_data(50, 3)
    assert T.eft_data(50, 3) == T.eft_data(50, 3)
    assert T.fresh_prompts(50, 3, 1) == T.fresh_prompts(50, 3, 1)
    assert T.eval_prompts(50, 3) == T.eval_prompts(50, 3)
    assert T.judge_eval_set(10, 3) == T.judge_eval_set(10, 3)
    assert T.ift_data(50, 3) != T.ift_data(50, 4)
    assert T.eft_data(50, 3) != T.eft_data(50, 4)
    assert T.fresh_prompts(50, 3, 1) != T.fresh_prompts(50, 3, 2)
    assert T.eval_prompts(50, 3) != T.eval_prompts(50, 4)


def test_held_out_sets_never_meet_training_prompts() -> None:
    train = {e.prompt for e in T.ift_data(500, 0)}
    train |= {e.task_prompt for e in T.eft_data(500, 0)}
    train |= set(T.fresh_prompts(500, 0, 1))
    held = T.eval_prompts(300, 0)
    judge = T.judge_eval_set(100, 0, responses_per_prompt=4)
    assert len(set(held)) == 300 and not train & set(held)
    assert not train & {e.prompt for e in judge}
    assert all(T.prompt_split(p) == "eval" for p in held)
    assert all(T.prompt_split(p) == "train" for p in train)
    assert len(judge) == 400 and Counter(e.group for e in judge) == Counter(
        dict.fromkeys(range(100), 4)
    )
    for e in judge:
        assert e.score == T.score(e.prompt, e.response)
        assert e.verdicts == T.verdicts(e.prompt, e.response)
    # within-prompt pairwise comparisons are possible: groups hold different scores
    assert sum(len({e.score for e in judge if e.group == g}) > 1 for g in range(100)) > 70


def test_judge_templates_work_as_reward_config_expects() -> None:
    env = SandboxedEnvironment()
    prompt, response = "len6 start:b novow upper>", "BXTRKl"
    rendered = env.from_string(T.JUDGE_PROMPT_TEMPLATE).render(prompt=prompt, response=response)
    assert (
        rendered
        == T.render_judge_prompt(prompt, response)
        == "rate len6 start:b novow upper>BXTRKl|"
    )
    regex = T.JUDGE_REWARD_REGEX_TEMPLATE.replace("{{ reward }}", r"([0-9]+(?:\.[0-9]+)?)")
    judgement = T.format_judgement(prompt, response)
    assert re.search(regex, judgement).group(1) == str(T.score(prompt, response))
    assert T.reward_config_kwargs() == {
        "prompt_template": T.JUDGE_PROMPT_TEMPLATE,
        "reward_regex_template": T.JUDGE_REWARD_REGEX_TEMPLATE,
    }


def test_parse_judgement_rejects_malformed_text() -> None:
    assert T.parse_judgement("yyny Score: 4") == ("yyny", 4)
    assert T.parse_judgement("yyny Score: 4", num_criteria=3) == (None, 4)
    assert T.parse_judgement("yxny Score: 4") == (None, 4)
    assert T.parse_judgement("yyny Score 4") == (None, None)
    assert T.parse_judgement("yy Score: 9") == (None, None)


def test_instruction_metrics() -> None:
    prompts = ["len3 end:c>", "len3 end:c>", "len2 upper>"]
    responses = ["abc", "abcc", "ab"]
    out = T.instruction_metrics(prompts, responses)
    assert out["n"] == 3
    assert out["mean_score"] == pytest.approx((5 + 3 + 3) / 3)
    assert out["pct_fully_correct"] == pytest.approx(100 / 3)
    assert out["mean_response_length"] == pytest.approx(3)
    assert out["pct_satisfied"] == {"len": pytest.approx(200 / 3), "end": 100.0, "upper": 0.0}
    with pytest.raises(ValueError, match="one each"):
        T.instruction_metrics(prompts, responses[:2])


# ---------------------------------------------------------------------- tokenizer and model


def test_tokenizer_round_trips_all_task_text() -> None:
    tok = DemoTokenizer()
    assert isinstance(tok, Tokenizer)
    assert tok.pad_id == 0 and tok.eos_id == 1 and tok.vocab_size == len(set(tok.chars)) + 2
    texts = [e.prompt + e.response for e in T.eft_data(60, 0)]
    texts += [e.prompt + e.response for e in T.ift_data(60, 0)]
    for text in texts:
        ids = tok.encode(text)
        assert len(ids) == len(text) and min(ids) >= 2 and max(ids) < tok.vocab_size
        assert tok.decode(ids) == text
        assert tok.format_prompt(text) == text
    assert tok.decode([tok.encode("a")[0], tok.eos_id, tok.pad_id, tok.encode("B")[0]]) == "aB"
    assert tok.decode(torch.tensor(tok.encode("xyz"))) == "xyz"
    with pytest.raises(ValueError, match="not in the demo vocabulary"):
        tok.encode("abé")
    with pytest.raises(ValueError, match="outside"):
        tok.decode([tok.vocab_size])


def test_demo_model_size_seeding_and_context() -> None:
    state = torch.random.get_rng_state()
    a, b, c = build_demo_model(0), build_demo_model(0), build_demo_model(1)
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG untouched
    assert 700_000 < count_parameters(a) < 900_000  # the round-2 ~0.8M model
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)
    assert any(not torch.equal(pa, pc) for pa, pc in zip(a.parameters(), c.parameters()))
    lm = wrap_model(a)
    tok = DemoTokenizer()
    assert lm.kind == "xtransformers" and lm.vocab_size == tok.vocab_size
    assert lm.max_seq_len == DEMO_MAX_SEQ_LEN >= T.max_sequence_length()
    longest = max(T.eft_data(300, 0), key=lambda e: len(e.prompt) + len(e.response))
    assert len(longest.prompt) + len(longest.response) + 1 <= T.max_sequence_length()
    ids = torch.tensor([tok.encode(longest.prompt + longest.response) + [tok.eos_id]])
    logits = lm(ids)
    assert logits.shape == (1, ids.shape[1], tok.vocab_size) and torch.isfinite(logits).all()
    with pytest.raises(ValueError, match="positive int"):
        DemoModelConfig(dim=0)


def test_max_prompt_length_is_attained() -> None:
    rng = random.Random(0)
    longest = max(len(T.sample_spec(rng).to_prompt()) for _ in range(3000))
    assert longest == T.max_prompt_length()


# ---------------------------------------------------------------------- meta-judge data


def test_meta_examples_pair_the_oracle_judgement_with_one_wrong_verdict() -> None:
    examples = T.meta_eft_data(1500, 0)
    labels = Counter(e.response for e in examples)
    assert set(labels) == {"A", "B"} and 0.45 < labels["A"] / len(examples) < 0.55
    directions: dict[bool, list[bool]] = {True: [], False: []}
    missed_flips: Counter = Counter()
    for e in examples:
        spec = T.parse_prompt(e.task_prompt)
        assert e.right == T.format_judgement(spec, e.task_response, letters=True)
        right_v = T.parse_judgement(e.right, len(spec.criteria)).verdicts
        wrong = T.parse_judgement(e.wrong, len(spec.criteria))
        diff = [c for c, a, b in zip(spec.criteria, right_v, wrong.verdicts) if a != b]
        assert diff == [e.flipped]  # exactly one verdict differs: the flipped criterion's
        assert (
            wrong.score == T.score_from_verdicts(wrong.verdicts) != T.score(spec, e.task_response)
        )
        # the letters restated are the prompt's in both judgements (only a verdict differs)
        assert [c for c in e.wrong if c.isupper()] == [c for c in e.right if c.isupper()]
        a, b = (e.right, e.wrong) if e.response == "A" else (e.wrong, e.right)
        assert e.prompt == T.render_meta_prompt(e.task_prompt, e.task_response, a, b)
        lenient = wrong.verdicts.count("y") > right_v.count("y")  # a missed failure
        both = "n" in right_v and "y" in right_v  # either direction was possible
        directions[both] += [lenient]
        if lenient:
            missed_flips[e.flipped] += 1
    # the wrong judgement is a missed failure or a false failure, equally often where the
    # response allows both, so "the harsher (or milder) judgement is right" is no shortcut
    mixed = directions[True]
    assert len(mixed) > 500 and 0.45 < sum(mixed) / len(mixed) < 0.55
    overall = directions[True] + directions[False]
    assert 0.35 < sum(overall) / len(overall) < 0.65
    # among missed failures, the letter criteria (the judge's blind spots) dominate
    assert missed_flips["end"] + missed_flips["has"] + missed_flips["start"] > (
        3 * missed_flips["upper"]
    )


def test_meta_template_renders_the_prompt_and_fits_the_context() -> None:
    kw = T.meta_template_kwargs()
    assert kw["labels"] == ("A", "B", "=") and kw["verdict_template"] == "{{ verdict }}"
    env = SandboxedEnvironment()
    e = T.meta_eft_data(1, 3)[0]
    a, b = (e.right, e.wrong) if e.response == "A" else (e.wrong, e.right)
    rendered = env.from_string(kw["prompt_template"]).render(
        prompt=e.task_prompt, response=e.task_response, judgement_a=a, judgement_b=b
    )
    assert rendered == e.prompt and rendered.startswith("meta ") and rendered.endswith(">")
    # the worst case fits the model: every example, with its label and EOS, is within it
    bound = T.max_meta_sequence_length()
    assert bound <= DEMO_MAX_SEQ_LEN
    longest = max(T.meta_eft_data(3000, 1), key=lambda x: len(x.prompt))
    assert len(longest.prompt) + len(longest.response) + 1 <= bound
    assert T.parse_meta_verdict(" B") == "B" and T.parse_meta_verdict("x") is None


def test_meta_sets_are_seeded_and_held_out() -> None:
    assert T.meta_eft_data(50, 2) == T.meta_eft_data(50, 2) != T.meta_eft_data(50, 3)
    held = T.meta_eval_set(150, 2)
    assert len({e.task_prompt for e in held}) == 150
    assert all(T.prompt_split(e.task_prompt) == "eval" for e in held)
    assert all(T.prompt_split(e.task_prompt) == "train" for e in T.meta_eft_data(300, 2))
    with pytest.raises(ValueError, match="non-negative int"):
        T.meta_eft_data(-1, 0)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match=r"n_meta_eft must be an int >= 0 \(0 = off\)"):
            DemoConfig(n_meta_eft=bad)  # type: ignore[arg-type]
