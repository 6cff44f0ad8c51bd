"""The pairwise judge: both orders, verdicts mapped back, aggregation, context handling.

A scripted backend (a real class implementing the backend protocol that answers each judge
prompt with chosen judgement texts) checks the ordering and the aggregation against hand
computations; a tiny x-transformers model through the torch backend checks that greedy
comparisons equal a hand-written greedy loop on the same rendered prompts.
"""

from __future__ import annotations

import json
import math
import pickle
import re

import pytest
import torch
from tiny import EOS, char_tokenizer, tiny_model

from self_rewarding_lm_pytorch import PairwiseJudge, PairwiseTemplate
from self_rewarding_lm_pytorch.config import ConfigError
from self_rewarding_lm_pytorch.generation import GenerationOutput, TorchBackend
from self_rewarding_lm_pytorch.judge import DEFAULT_PAIRWISE_TEMPLATE
from self_rewarding_lm_pytorch.models import CallableTokenizer

SHORT = PairwiseTemplate("Q={{ prompt }} A=[{{ response_a }}] B=[{{ response_b }}]")
TOK = CallableTokenizer(
    lambda s: [ord(c) for c in s], lambda ids: "".join(chr(int(i)) for i in ids), eos_id=0
)


class ScriptedBackend:
    """Answers judge prompt ``text``'s sample ``j`` with ``script(shown_a, shown_b, j)``,
    where ``shown_a`` / ``shown_b`` are the responses the prompt shows as A and B; records
    the decoded prompts and the size of each generate call."""

    def __init__(self, script, max_seq_len: int | None = None) -> None:
        self.script, self.max_seq_len = script, max_seq_len
        self.prompts: list[str] = []
        self.calls: list[int] = []
        self.configs: list = []
        self.scored: list[str] = []  # the sequences next_token_logprobs was asked about
        self.label_probs: dict[str, dict[str, float]] = {}  # shown-A response -> label -> p

    def generate(self, prompts, config, *, generator=None, decode=None, **kw):
        texts = [TOK.decode(p) for p in prompts]
        self.prompts.extend(texts)
        self.calls.append(len(prompts))
        self.configs.append(config)
        seqs = []
        for text in texts:
            shown = re.fullmatch(r"Q=.* A=\[(.*)\] B=\[(.*)\]", text, re.S)
            a, b = shown.groups() if shown else ("", "")  # a prompt cut from the left
            for j in range(config.num_return_sequences):
                seqs.append(TOK.encode(self.script(a, b, j)))
        return GenerationOutput(sequences=seqs, finish_reasons=["eos"] * len(seqs))

    def next_token_logprobs(self, sequences, token_ids):
        out = []
        for seq, ids in zip(sequences, token_ids):
            text = TOK.decode(seq)
            self.scored.append(text)
            probs = self.label_probs[re.match(r"Q=.* A=\[(.*?)\]", text)[1]]
            out.append([math.log(probs[chr(i)]) for i in ids])
        return out

    def load_weights(self, checkpoint) -> None:
        pass

    def close(self) -> None:
        pass


def judge_with(script, **kw) -> tuple[PairwiseJudge, ScriptedBackend]:
    backend = ScriptedBackend(script, max_seq_len=kw.pop("max_seq_len", None))
    kw.setdefault("num_samples", 2)
    return PairwiseJudge(backend, TOK, SHORT, **kw), backend


def prefers_good(a: str, b: str, j: int) -> str:
    return "A looks right. Verdict: A" if a == "good" else "B looks right. Verdict: B"


def test_consistent_judge_picks_the_better_response_in_both_orders():
    judge, _ = judge_with(prefers_good)
    first, second = judge.compare(["q", "q"], ["good", "bad"], ["bad", "good"])
    assert (first.preference, first.winner, first.consistent) == (1.0, "a", True)
    assert first.verdicts_ab == first.verdicts_ba == ["a", "a"]
    assert (second.preference, second.winner, second.consistent) == (0.0, "b", True)
    assert second.verdicts_ab == second.verdicts_ba == ["b", "b"]
    assert first.samples_ab == ["A looks right. Verdict: A"] * 2
    assert first.samples_ba == ["B looks right. Verdict: B"] * 2  # "good" was shown second
    assert first.failures_ab == first.failures_ba == [None, None]


def test_position_biased_judge_cancels_out_to_an_inconsistent_tie():
    judge, _ = judge_with(lambda a, b, j: "Verdict: A")
    (res,) = judge.compare(["q"], ["good"], ["bad"])
    assert res.verdicts_ab == ["a", "a"] and res.verdicts_ba == ["b", "b"]
    assert (res.preference, res.winner, res.consistent) == (0.5, "tie", False)


def test_mixed_samples_give_the_exact_mean_and_the_last_verdict_counts():
    by_order = {
        "x": ["Verdict: A", "Verdict: tie", "Verdict: A, no: **verdict:** b"],  # x shown first
        "y": ["verdict: a", "I cannot decide", "Verdict: A"],  # y shown first
    }
    judge, _ = judge_with(lambda a, b, j: by_order[a][j], num_samples=3)
    (res,) = judge.compare(["q"], ["x"], ["y"])
    assert res.verdicts_ab == ["a", "tie", "b"]
    assert res.verdicts_ba == ["b", None, "b"]  # "A" meant y, the original B
    assert res.preference == pytest.approx((1 + 0.5 + 0 + 0 + 0) / 5)
    assert res.winner == "b"
    assert res.consistent is False  # A first: a tie on average; B first: b
    assert res.failures_ab == [None, None, None]
    assert res.failures_ba[0] is None and res.failures_ba[2] is None
    assert "no verdict found" in res.failures_ba[1] and "'Verdict: tie'" in res.failures_ba[1]


def test_unparsable_judgements_give_no_preference_and_say_why():
    judge, _ = judge_with(lambda a, b, j: "Verdict: Apple" if j else "both are fine")
    (res,) = judge.compare(["q"], ["x"], ["y"])
    assert (res.preference, res.winner, res.consistent) == (None, None, None)
    assert res.verdicts_ab == res.verdicts_ba == [None, None]
    expected = "no verdict found (expected one of 'Verdict: A', 'Verdict: B', 'Verdict: tie')"
    assert res.failures_ab == res.failures_ba == [expected, expected]
    one_order = {"x": "Verdict: B", "y": "?"}
    judge, _ = judge_with(lambda a, b, j: one_order[a])
    (res,) = judge.compare(["q"], ["x"], ["y"])
    assert (res.preference, res.winner, res.consistent) == (0.0, "b", None)


def test_both_orders_are_rendered_with_the_responses_swapped_in_one_pass():
    judge, backend = judge_with(prefers_good)
    prompts, a, b = ["p0", "p1"], ["a0", "a1"], ["b0", "b1"]
    batched = judge.compare(prompts, a, b)
    assert backend.calls == [4]  # both orders of both items in one generate call
    assert backend.prompts == [
        "Q=p0 A=[a0] B=[b0]",
        "Q=p0 A=[b0] B=[a0]",
        "Q=p1 A=[a1] B=[b1]",
        "Q=p1 A=[b1] B=[a1]",
    ]
    one_by_one, backend = judge_with(prefers_good, batch_size=1)
    assert one_by_one.compare(prompts, a, b) == batched
    assert backend.calls == [1, 1, 1, 1]
    budget = 2 * (len("Q=p0 A=[a0] B=[b0]") + 8) * 2  # two rows of (prompt + new) x 2 samples
    chunked, backend = judge_with(prefers_good, max_new_tokens=8, token_budget=budget)
    assert chunked.compare(prompts, a, b) == batched
    assert backend.calls == [2, 2]


def test_too_long_items_error_or_cut_the_longer_response():
    fixed = len(SHORT.render("q", "", ""))
    short, long = "y" * 10, "x" * 40
    limit = fixed + 30  # the prompt fits 30 response tokens beside max_new_tokens
    kw = dict(max_seq_len=limit + 10, max_new_tokens=10, num_samples=1)
    strict, _ = judge_with(prefers_good, **kw)
    n = fixed + 50
    with pytest.raises(
        ValueError,
        match=rf"item 1: the pairwise judge prompt is {n} tokens long; with max_new_tokens=10 "
        rf"it needs {n + 10} positions, more than the judge model's context of {limit + 10}; "
        r".*on_too_long='truncate_response'",
    ):
        strict.compare(["q", "q"], ["ok", long], ["fine", short])
    cut, backend = judge_with(prefers_good, on_too_long="truncate_response", **kw)
    res = cut.compare(["q", "q"], ["ok", long], ["fine", short])
    assert [r.truncated for r in res] == [False, True]
    assert backend.prompts[2:] == [
        SHORT.render("q", "x" * 20, short),  # only the longer response lost its tail
        SHORT.render("q", short, "x" * 20),
    ]
    cut.compare(["q"], [long], [long])  # as long as each other: both are cut
    assert backend.prompts[-2:] == [SHORT.render("q", "x" * 15, "x" * 15)] * 2
    left, backend = judge_with(prefers_good, on_too_long="truncate_left", **kw)
    assert left.compare(["q"], [long], [short])[0].truncated
    assert backend.prompts == [
        SHORT.render("q", long, short)[-limit:],
        SHORT.render("q", short, long)[-limit:],
    ]
    tight, _ = judge_with(
        prefers_good, on_too_long="truncate_response", max_seq_len=fixed + 5, max_new_tokens=10
    )
    with pytest.raises(
        ValueError,
        match=r"item 0: even with the responses truncated .* more "
        rf"than the {fixed - 5} tokens",
    ):
        tight.compare(["q"], [long], [short])
    with pytest.raises(ValueError, match="max_new_tokens=10 leaves no room"):
        judge_with(prefers_good, max_seq_len=10, max_new_tokens=10)[0].compare(["q"], ["a"], ["b"])


def greedy_ids(model, ids: list[int], max_new_tokens: int, eos: int = EOS) -> list[int]:
    """The new tokens of a hand-written greedy loop (one full forward per token)."""
    new: list[int] = []
    with torch.no_grad():
        for _ in range(max_new_tokens):
            nxt = int(model(torch.tensor([ids + new]))[0, -1].argmax())
            if nxt == eos:
                break
            new.append(nxt)
    return new


def tiny_judge_parts() -> tuple[torch.nn.Module, CallableTokenizer, PairwiseTemplate]:
    """A tiny random model, the character tokenizer, and a template with one-character
    labels that a random model writes now and then (so some verdicts parse)."""
    template = PairwiseTemplate(
        "{{ prompt }}|{{ response_a }}|{{ response_b }}:",
        verdict_template="{{ verdict }}",
        labels=("!", "?", "~"),
    )
    return tiny_model(seed=3, max_seq_len=160).eval(), char_tokenizer(), template


def test_greedy_compare_through_the_torch_backend_equals_a_hand_greedy_loop():
    model, tok, template = tiny_judge_parts()
    prompts, a, b = ["sum 2 3", "hi"], ["5", "hello there"], ["six", "hey"]
    kw = dict(temperature=0.0, num_samples=1, max_new_tokens=24)
    judge = PairwiseJudge(model, tok, template, **kw)
    results = judge.compare(prompts, a, b)
    assert judge.compare(prompts, a, b) == results
    backend_judge = PairwiseJudge(TorchBackend(model), tok, template, batch_size=1, **kw)
    assert backend_judge.compare(prompts, a, b) == results

    def greedy(text: str) -> str:
        return tok.decode(greedy_ids(model, tok.encode(tok.format_prompt(text)), 24))

    swap = {"a": "b", "b": "a", "tie": "tie", None: None}
    for res, p, x, y in zip(results, prompts, a, b):
        ab, ba = greedy(template.render(p, x, y)), greedy(template.render(p, y, x))
        assert (res.samples_ab, res.samples_ba) == ([ab], [ba])
        assert res.verdicts_ab == [template.parse(ab)]
        assert res.verdicts_ba == [swap[template.parse(ba)]]
    assert any(v is not None for r in results for v in r.verdicts_ab + r.verdicts_ba)


def test_template_validation_names_the_problem():
    with pytest.raises(ValueError, match=r"missing the variable \{\{ response_b \}\}"):
        PairwiseTemplate("{{ prompt }} {{ response_a }}")
    with pytest.raises(ValueError, match=r"unknown variable\(s\) \['response'\]"):
        PairwiseTemplate("{{ prompt }} {{ response_a }} {{ response_b }} {{ response }}")
    with pytest.raises(ValueError, match=r"verdict_template is missing the variable"):
        PairwiseTemplate(verdict_template="Verdict:")
    with pytest.raises(ValueError, match=r"labels must differ \(ignoring case\)"):
        PairwiseTemplate(labels=("A", "a", "tie"))
    with pytest.raises(ValueError, match="labels must be three non-empty strings"):
        PairwiseTemplate(labels=("A", "B"))
    with pytest.raises(TypeError, match="template must be a PairwiseTemplate"):
        PairwiseJudge(ScriptedBackend(prefers_good), TOK, "{{ prompt }}")
    with pytest.raises(ValueError, match=r"mode='expected' needs every label .* 'tie' is 3 tokens"):
        PairwiseJudge(ScriptedBackend(prefers_good), TOK, mode="expected")
    with pytest.raises(ConfigError, match="PairwiseJudge: num_samples must be an int >= 1"):
        PairwiseJudge(ScriptedBackend(prefers_good), TOK, num_samples=0)
    with pytest.raises(TypeError, match=r"PairwiseJudge got unknown setting\(s\) \['sample'\]"):
        PairwiseJudge(ScriptedBackend(prefers_good), TOK, sample=3)


def test_custom_labels_and_default_template():
    template = PairwiseTemplate(
        SHORT.prompt_template, verdict_template="[[{{ verdict }}]]", labels=("1", "2", "0")
    )
    assert [template.parse(t) for t in ("[[1]]", "x [[ 2 ]]", "[[0]] then [[1]]", "[[12]]")] == [
        "a",
        "b",
        "a",
        None,
    ]
    assert pickle.loads(pickle.dumps(template)) == template
    rendered = DEFAULT_PAIRWISE_TEMPLATE.render("PROMPT", "FIRST", "SECOND")
    assert rendered.index("PROMPT") < rendered.index("FIRST") < rendered.index("SECOND")
    assert DEFAULT_PAIRWISE_TEMPLATE.parse("Both fine.\n**Verdict:** B") == "b"
    assert DEFAULT_PAIRWISE_TEMPLATE.parse("Verdict: AB") is None


def test_compare_checks_its_inputs_and_results_are_json_ready():
    judge, backend = judge_with(prefers_good)
    assert judge.compare([], [], []) == [] and backend.calls == []
    with pytest.raises(ValueError, match="got 2 prompts, 1 responses_a and 2 responses_b"):
        judge.compare(["p", "q"], ["a"], ["b", "c"])
    with pytest.raises(TypeError, match="responses_b must be a list of strings"):
        judge.compare(["p"], ["a"], "b")
    with pytest.raises(TypeError, match=r"compare: item 1: response_a \(int\) must be strings"):
        judge.compare(["p", "q"], ["a", 1], ["b", "c"])
    (res,) = judge.compare(["q"], ["good"], ["bad"])
    assert json.loads(json.dumps(res.to_dict())) == res.to_dict()
    assert res.to_dict()["verdicts_ba"] == ["a", "a"]


EXPECTED = PairwiseTemplate(SHORT.prompt_template, labels=("A", "B", "T"))


def test_expected_mode_weighs_the_label_probabilities_of_both_orders():
    texts = {"x": "Think. Verdict: A", "y": "Verdict: T", "u": "verdict: a", "v": "no idea"}
    backend = ScriptedBackend(lambda a, b, j: texts[a])
    backend.label_probs = {  # not normalised: the judge renormalises over the labels
        "x": {"A": 0.3, "B": 0.05, "T": 0.15},
        "y": {"A": 0.2, "B": 0.5, "T": 0.3},
    }
    judge = PairwiseJudge(backend, TOK, EXPECTED, mode="expected", num_samples=3)
    res, unweighed = judge.compare(["q", "q"], ["x", "u"], ["y", "v"])
    assert backend.configs[0].temperature == 0 and backend.configs[0].num_return_sequences == 1
    assert backend.scored == ["Q=q A=[x] B=[y]Think. Verdict: ", "Q=q A=[y] B=[x]Verdict: "]
    assert res.verdicts_ab == ["a"] and res.verdicts_ba == ["tie"]
    assert res.distribution_ab == pytest.approx({"a": 0.6, "b": 0.1, "tie": 0.3})
    assert res.distribution_ba == pytest.approx({"a": 0.5, "b": 0.2, "tie": 0.3})  # y was A
    assert res.preference == pytest.approx(((0.6 + 0.3 / 2) + (0.5 + 0.3 / 2)) / 2)
    assert (res.winner, res.consistent) == ("a", True)
    assert (unweighed.preference, unweighed.winner, unweighed.distribution_ab) == (None, None, None)
    assert "not one of the single-token labels" in unweighed.failures_ab[0]
    assert "no verdict found" in unweighed.failures_ba[0]


def test_expected_mode_on_a_tiny_model_equals_a_hand_computation():
    model, tok, template = tiny_judge_parts()
    judge = PairwiseJudge(model, tok, template, mode="expected", max_new_tokens=24)
    (res,) = judge.compare(["sum 2 3"], ["5"], ["six"])
    swap = {"a": "b", "b": "a", "tie": "tie"}
    per_order = []
    for text, (x, y), dist, flip in [
        (res.samples_ab[0], ("5", "six"), res.distribution_ab, False),
        (res.samples_ba[0], ("six", "5"), res.distribution_ba, True),
    ]:
        ids = tok.encode(template.render("sum 2 3", x, y))
        gen = greedy_ids(model, ids, 24)
        assert tok.decode(gen) == text
        n = template.find_verdict(text).start(1)  # one character per token
        with torch.no_grad():
            logits = model(torch.tensor([ids + gen[:n]]))[0, -1].double()
        probs = logits[[ord(c) for c in template.labels]].softmax(-1).tolist()
        hand = dict(zip(("a", "b", "tie"), probs))
        hand = {swap[k]: p for k, p in hand.items()} if flip else hand
        assert dist == pytest.approx(hand, abs=1e-6)
        per_order.append(hand["a"] + hand["tie"] / 2)
    assert res.preference == pytest.approx(sum(per_order) / 2, abs=1e-6)


def test_sampled_compare_is_seeded():
    judge = PairwiseJudge(
        tiny_model(seed=1), char_tokenizer(), SHORT, temperature=1.0, max_new_tokens=8
    )
    args = (["q1", "q2"], ["a", "bb"], ["ccc", "d"])
    first = judge.compare(*args, generator=0)
    assert judge.compare(*args, generator=0) == first
    texts = [t for r in first for t in r.samples_ab + r.samples_ba]
    assert len(texts) == 2 * 2 * 3 and len(set(texts)) > 1  # 3 samples per order, they vary
    other = judge.compare(*args, generator=torch.Generator().manual_seed(1))
    assert [r.samples_ab for r in other] != [r.samples_ab for r in first]
