"""Head-to-head evaluation: the statistics against hand computations, the length-controlled
fit against a brute-force search, both judge kinds, prompt matching, and ``srlm eval
--head-to-head`` end to end (a Python-function judge and a tiny pairwise LLM judge)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from test_pairwise_judge import SHORT, TOK, ScriptedBackend

from self_rewarding_lm_pytorch import PairwiseJudge
from self_rewarding_lm_pytorch.cli import main
from self_rewarding_lm_pytorch.cli.head_to_head import match_prompts
from self_rewarding_lm_pytorch.head_to_head import (
    LC_RIDGE,
    Z95,
    head_to_head,
    length_controlled_fit,
    summarize,
)
from self_rewarding_lm_pytorch.judge import CallableJudge, JudgeResult

# ------------------------------------------------------------------ statistics


def test_win_rate_ties_standard_error_and_interval_by_hand():
    prefs = [1.0, 1.0, 0.0, 0.5, 1.0, None]  # the last item was not judged
    out = summarize(prefs, [1, 2, 3, 4, 5, 6], [6, 5, 4, 3, 2, 1])
    assert (out.items_total, out.judged, out.unjudged) == (6, 5, 1)
    assert (out.wins, out.losses, out.ties) == (3, 1, 1)
    assert out.win_rate == pytest.approx(3.5 / 5)
    assert out.tie_rate == pytest.approx(1 / 5)
    # deviations from 0.7: .3 .3 -.7 -.2 .3 -> squares sum to 0.8; var 0.8 / 4; se = sd / sqrt 5
    assert out.standard_error == pytest.approx(math.sqrt(0.2) / math.sqrt(5))
    assert out.standard_error == pytest.approx(0.2)
    assert out.ci95 == pytest.approx([0.7 - 1.959964 * 0.2, 1.0])  # clipped at 1
    assert Z95 == pytest.approx(1.959964, abs=1e-6)
    assert out.mean_chars_a == out.mean_chars_b == pytest.approx(3.5)  # all six responses
    assert out.position_consistency is None and out.bootstrap_ci95 is None


def test_no_judged_item_and_a_single_item():
    none = summarize([None, None], [1, 2], [3, 4])
    assert (none.judged, none.win_rate, none.lc_win_rate, none.ci95) == (0, None, None, None)
    one = summarize([0.0], [1], [3])
    assert (one.win_rate, one.standard_error, one.ci95) == (0.0, None, None)


def test_bootstrap_is_seeded_and_agrees_with_the_normal_interval_on_many_items():
    prefs = [1.0, 0.0, 0.5, 1.0, 1.0, 0.0, 1.0, 0.5] * 25  # 200 items
    la = [10 + (7 * i) % 50 for i in range(200)]
    lb = [30] * 200
    one = summarize(prefs, la, lb, bootstrap=300, bootstrap_seed=1)
    again = summarize(prefs, la, lb, bootstrap=300, bootstrap_seed=1)
    other = summarize(prefs, la, lb, bootstrap=300, bootstrap_seed=2)
    assert one.bootstrap_ci95 == again.bootstrap_ci95
    assert one.lc_bootstrap_ci95 == again.lc_bootstrap_ci95
    assert one.bootstrap_ci95 != other.bootstrap_ci95
    lo, hi = one.bootstrap_ci95
    assert lo < one.win_rate < hi
    assert one.bootstrap_standard_error == pytest.approx(one.standard_error, rel=0.2)
    assert lo == pytest.approx(one.ci95[0], abs=0.02) and hi == pytest.approx(one.ci95[1], abs=0.02)
    lc_lo, lc_hi = one.lc_bootstrap_ci95
    assert lc_lo < one.lc_win_rate < lc_hi
    flat = summarize([1.0] * 10, list(range(10)), [5] * 10, bootstrap=50)
    assert flat.bootstrap_ci95 == [1.0, 1.0] and flat.bootstrap_standard_error == 0.0


def _penalised_loglik(theta, phi, prefs, xs, ridge=LC_RIDGE):
    total = -0.5 * ridge * phi * phi
    for p, x in zip(prefs, xs):
        s = 1 / (1 + math.exp(-(theta + phi * x)))
        total += p * math.log(s) + (1 - p) * math.log(1 - s)
    return total


def _grid_search(prefs, xs):
    """Brute force: the best point of an 81 x 81 grid over [-10, 10]^2, then of ever finer
    grids around it (the objective is concave)."""
    theta, phi, span = 0.0, 0.0, 10.0
    for _ in range(5):
        step = span / 40
        cands = [(theta + i * step, phi + j * step) for i in range(-40, 41) for j in range(-40, 41)]
        theta, phi = max(cands, key=lambda c: _penalised_loglik(*c, prefs, xs))
        span = 2 * step
    return theta, phi


def _features(la, lb):
    d = [a - b for a, b in zip(la, lb)]
    mean = sum(d) / len(d)
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (len(d) - 1))
    return [math.tanh(x / sd) for x in d]


# B is longer on the first eight items and wins six of them; A is longer on the last two
LENGTH_PREFS = [0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0, 0.0, 1.0, 0.5]
LEN_A = [50, 40, 60, 30, 45, 55, 35, 50, 120, 90]
LEN_B = [90, 120, 80, 70, 100, 85, 60, 130, 60, 50]


def test_length_controlled_fit_matches_a_brute_force_search():
    fit = length_controlled_fit(LENGTH_PREFS, LEN_A, LEN_B)
    theta, phi = _grid_search(LENGTH_PREFS, _features(LEN_A, LEN_B))
    assert fit["theta"] == pytest.approx(theta, abs=1e-3)
    assert fit["phi"] == pytest.approx(phi, abs=1e-3)
    assert fit["lc_win_rate"] == pytest.approx(1 / (1 + math.exp(-fit["theta"])))
    assert fit["phi"] > 1  # the judge favours the longer response


def test_length_control_moves_a_length_driven_result_toward_half():
    out = summarize(LENGTH_PREFS, LEN_A, LEN_B)
    assert out.win_rate == pytest.approx(3.5 / 10)  # the raw rate is not corrected
    assert abs(out.lc_win_rate - 0.5) < abs(out.win_rate - 0.5) / 2
    # with equal lengths the length term vanishes: LC equals the raw win rate
    same = summarize(LENGTH_PREFS, LEN_A, LEN_A)
    assert same.lc_phi == 0.0 and same.lc_win_rate == pytest.approx(same.win_rate, abs=1e-12)


def test_length_controlled_fit_stays_finite_when_length_separates_the_preferences():
    fit = length_controlled_fit([1.0, 1.0, 0.0, 0.0], [5, 6, 1, 1], [1, 1, 5, 6])
    assert math.isfinite(fit["phi"]) and fit["phi"] > 1
    assert fit["lc_win_rate"] == pytest.approx(0.5, abs=1e-6)  # symmetric data


# ------------------------------------------------------------------ judges


def _pairwise(script):
    backend = ScriptedBackend(script)
    return PairwiseJudge(backend, TOK, SHORT, num_samples=2), backend


def test_a_position_biased_pairwise_judge_gives_half_and_no_consistency():
    judge, backend = _pairwise(lambda a, b, j: "Verdict: A")
    out = head_to_head(["p", "q", "r"], ["x", "yy", "z"], ["u", "v", "www"], judge)
    assert out.judge == "pairwise"
    assert out.win_rate == 0.5 and out.ties == 3 and out.tie_rate == 1.0
    assert (out.position_consistency, out.position_checked) == (0.0, 3)
    assert len(backend.prompts) == 6  # both orders of every item
    assert [r["verdicts_ab"] for r in out.items] == [["a", "a"]] * 3
    assert [r["verdicts_ba"] for r in out.items] == [["b", "b"]] * 3


def test_a_consistent_pairwise_judge_gives_the_exact_rate():
    def prefers_good(a, b, j):
        if ("good" in a) == ("good" in b):
            return "Verdict: tie"
        return "Verdict: A" if "good" in a else "Verdict: B"

    judge, _ = _pairwise(prefers_good)
    a, b = ["good x", "bad", "good y", "bad z"], ["bad", "good", "bad", "bad w"]
    out = head_to_head(["p0", "p1", "p2", "p3"], a, b, judge, name_a="M2", name_b="M1")
    assert [r["preference"] for r in out.items] == [1.0, 0.0, 1.0, 0.5]
    assert out.win_rate == pytest.approx(2.5 / 4)
    assert (out.wins, out.losses, out.ties) == (2, 1, 1)
    assert out.position_consistency == 1.0
    assert (out.name_a, out.name_b) == ("M2", "M1")
    assert out.items[0]["response_a"] == "good x" and out.items[0]["prompt"] == "p0"


class WordCountJudge:
    """A pointwise judge: the score is the number of words (None for an empty response);
    counts its ``score`` calls."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def score(self, prompts, responses, *, generator=None):
        self.calls.append(len(responses))
        return [JudgeResult(score=float(len(r.split())) if r else None) for r in responses]


def test_pointwise_judge_scores_every_output_once_and_the_higher_score_wins():
    judge = WordCountJudge()
    a, b = ["one two three", "one", "a b", ""], ["one", "one two", "c d", "x"]
    out = head_to_head(["p0", "p1", "p2", "p3"], a, b, judge)
    assert judge.calls == [8]  # A's and B's outputs in one call
    assert [r["preference"] for r in out.items] == [1.0, 0.0, 0.5, None]
    assert [r["winner"] for r in out.items] == ["a", "b", "tie", None]
    assert (out.judged, out.unjudged, out.win_rate) == (3, 1, pytest.approx(0.5))
    assert out.items[0]["score_a"] == 3.0 and out.items[0]["score_b"] == 1.0
    assert out.judge == "pointwise" and out.position_consistency is None
    # a CallableJudge (a plain rule) works the same way
    rule = CallableJudge(lambda prompt, response: len(response))
    assert head_to_head(["p"], ["longer"], ["short"], rule).win_rate == 1.0


def test_token_lengths_with_a_tokenizer():
    out = head_to_head(["p", "q"], ["abc", "de"], ["a", "b"], WordCountJudge(), tokenizer=TOK)
    assert (out.mean_tokens_a, out.mean_tokens_b) == (2.5, 1.0)  # one token per character
    assert (out.mean_chars_a, out.mean_chars_b) == (2.5, 1.0)


def test_a_judge_without_score_or_compare_is_refused():
    with pytest.raises(TypeError, match="judge must have score"):
        head_to_head(["p"], ["a"], ["b"], object())
    with pytest.raises(ValueError, match="got 1 prompts, 2 responses_a, 1 responses_b; give one"):
        head_to_head(["p"], ["a", "b"], ["c"], WordCountJudge())


# ------------------------------------------------------------------ matching


def test_prompts_are_matched_by_text_and_repeats_by_occurrence():
    assert match_prompts(["x", "y", "x", "z"], ["z", "x", "y", "x"]) == [1, 2, 3, 0]
    assert match_prompts(["y"], ["x", "y"], subset=True) == [1]
    with pytest.raises(ValueError) as e:
        match_prompts(["x", "x", "w", "v"], ["x", "y", "v"])
    msg = str(e.value)
    assert "2 prompts of --a are not in --b ('x' (occurrence 2), 'w')" in msg
    assert "1 prompt of --b is not in --a ('y')" in msg
    assert "matched by their exact text (a repeated prompt by occurrence)" in msg


# ------------------------------------------------------------------ the command

JUDGES = "def words(prompt, response):\n    return float(len(response.split()))\n"


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _recomputed(rows: list[dict]) -> dict:
    """The statistics recomputed by hand from judgements.jsonl."""
    prefs = [r["preference"] for r in rows if r["preference"] is not None]
    n = len(prefs)
    rate = sum(prefs) / n
    se = math.sqrt(sum((p - rate) ** 2 for p in prefs) / (n - 1) / n) if n > 1 else None
    return {
        "judged": n,
        "win_rate": rate,
        "standard_error": se,
        "wins": sum(p > 0.5 for p in prefs),
        "losses": sum(p < 0.5 for p in prefs),
        "ties": sum(p == 0.5 for p in prefs),
        "mean_chars_a": sum(len(r["response_a"]) for r in rows) / len(rows),
        "mean_chars_b": sum(len(r["response_b"]) for r in rows) / len(rows),
    }


def _check_outputs(out: Path) -> tuple[dict, list[dict]]:
    stats = json.loads((out / "head_to_head.json").read_text())
    rows = [json.loads(x) for x in (out / "judgements.jsonl").open()]
    for key, value in _recomputed(rows).items():
        assert stats[key] == pytest.approx(value), key
    assert stats["items_total"] == len(rows)
    return stats, rows


def test_eval_head_to_head_with_a_function_judge(tmp_path, monkeypatch, capsys):
    (tmp_path / "srlm_h2h_judges.py").write_text(JUDGES)
    monkeypatch.syspath_prepend(str(tmp_path))
    gen = [  # srlm generate output: the second response is compared
        {"prompt": "p0", "responses": ["x", "one two three"]},
        {"prompt": "p1", "responses": ["x", "one"]},
        {"prompt": "p0", "responses": ["x", "a b"]},
    ]
    a = _jsonl(tmp_path / "a.jsonl", gen)
    b = _jsonl(tmp_path / "b.jsonl", [  # other order; the repeated prompt by occurrence
        {"prompt": "p1", "response": "one two"},
        {"prompt": "p0", "response": "one"},
        {"prompt": "p0", "response": "c d"},
    ])  # fmt: skip
    out = tmp_path / "h2h"
    args = ["-q", "eval", "--head-to-head", "--a", str(a), "--b", str(b), "--response-index",
            "1", "--function", "srlm_h2h_judges:words", "--out", str(out), "--name-a", "M2",
            "--bootstrap", "20"]  # fmt: skip
    assert main(args) == 0
    printed = json.loads(capsys.readouterr().out)
    stats, rows = _check_outputs(out)
    assert printed == stats
    assert [r["preference"] for r in rows] == [1.0, 0.0, 0.5]
    assert [(r["response_a"], r["response_b"]) for r in rows] == [
        ("one two three", "one"), ("one", "one two"), ("a b", "c d")
    ]  # fmt: skip
    assert (stats["name_a"], stats["name_b"], stats["judge"]) == ("M2", "b", "pointwise")
    assert stats["judged_by"] == "function srlm_h2h_judges:words"
    assert len(stats["bootstrap_ci95"]) == 2
    report = (out / "report.md").read_text()
    assert "# Head-to-head: M2 (A) vs b (B)" in report
    assert (
        "| win rate of M2 | 50.0% (SE" in report
        and "| wins / losses / ties | 1 / 1 / 1 |" in report
    )
    # the alpaca_eval files round-trip: compared again from them, the result is the same
    model = json.loads((out / "alpaca_eval" / "model_outputs.json").read_text())
    ref = json.loads((out / "alpaca_eval" / "reference_outputs.json").read_text())
    assert model[0] == {"instruction": "p0", "output": "one two three", "generator": "M2"}
    assert {r["generator"] for r in ref} == {"b"} and len(ref) == 3
    again = tmp_path / "again"
    args = ["-q", "eval", "--head-to-head", "--a", str(out / "alpaca_eval" / "model_outputs.json"),
            "--b", str(out / "alpaca_eval" / "reference_outputs.json"),
            "--function", "srlm_h2h_judges:words", "--out", str(again)]  # fmt: skip
    assert main(args) == 0
    capsys.readouterr()
    redone = json.loads((again / "head_to_head.json").read_text())
    assert (redone["name_a"], redone["name_b"]) == ("M2", "b")  # the files' generators
    for key in ("win_rate", "wins", "losses", "ties", "mean_chars_a", "mean_chars_b"):
        assert redone[key] == stats[key], key
    # a finished --out is not replaced without --overwrite
    assert main(args) == 2
    assert "already holds a head-to-head result" in capsys.readouterr().err
    assert main([*args, "--overwrite"]) == 0
    capsys.readouterr()
    # --limit compares the first rows of --a; --b may then hold more prompts
    limited = ["-q", "eval", "--head-to-head", "--a", str(b), "--b", str(a), "--limit", "1",
               "--response-index", "1", "--function", "srlm_h2h_judges:words"]  # fmt: skip
    assert main(limited) == 0
    one = json.loads(capsys.readouterr().out)
    assert (one["items_total"], one["win_rate"]) == (1, 1.0)  # "one two" against "one"


def test_eval_head_to_head_refuses_bad_input(tmp_path, capsys):
    a = _jsonl(tmp_path / "a.jsonl", [{"prompt": "p", "response": "x"}])
    b = _jsonl(tmp_path / "b.jsonl", [{"prompt": "q", "response": "y"}])
    base = ["eval", "--head-to-head", "--a", str(a), "--b", str(b)]
    assert main([*base, "--function", "builtins:len"]) == 1
    err = capsys.readouterr().err
    assert "1 prompt of --a is not in --b ('p'); 1 prompt of --b is not in --a ('q')" in err
    assert main([*base, "--pairwise", "--function", "builtins:len"]) == 2
    assert "--pairwise judges with a language model: give --model PATH" in capsys.readouterr().err
    assert main(["eval", "--a", str(a), "--b", str(b), "--function", "builtins:len"]) == 2
    assert "add --head-to-head" in capsys.readouterr().err
    assert main([*base, "--input", str(a), "--function", "builtins:len"]) == 2
    assert "--input does not apply to --head-to-head" in capsys.readouterr().err
    assert main(["eval", "--function", "builtins:len"]) == 2
    assert "--input is required" in capsys.readouterr().err
    c = _jsonl(tmp_path / "c.jsonl", [{"prompt": "p", "responses": ["x"]}])
    assert main(["eval", "--head-to-head", "--a", str(c), "--b", str(a), "--response-index",
                 "2", "--function", "builtins:len"]) == 1  # fmt: skip
    assert "holds 1 responses, so it has no response 2; set --response-index" in (
        capsys.readouterr().err
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    from self_rewarding_lm_pytorch.hf import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def test_eval_head_to_head_with_a_tiny_pairwise_llm_judge(tiny, tmp_path, capsys):
    prompts = ["name a fish", "write a poem", "say hi"]
    a = _jsonl(tmp_path / "a.jsonl", [{"prompt": q, "response": "the cat"} for q in prompts])
    ref = [{"instruction": q, "output": "a dog ran", "generator": "M1"} for q in prompts]
    b = tmp_path / "ref.json"
    b.write_text(json.dumps(ref))
    template = tmp_path / "pairwise.j2"
    template.write_text("{{ prompt }} A: {{ response_a }} B: {{ response_b }} Verdict:")
    out = tmp_path / "h2h"
    assert main(["-q", "eval", "--head-to-head", "--a", str(a), "--b", str(b), "--pairwise",
                 "--model", str(tiny), "--pairwise-template-file", str(template),
                 "--temperature", "0", "--num-samples", "1", "--max-new-tokens", "4",
                 "--device", "cpu", "--length-tokenizer", str(tiny),
                 "--out", str(out)]) == 0  # fmt: skip
    capsys.readouterr()
    stats = json.loads((out / "head_to_head.json").read_text())
    rows = [json.loads(x) for x in (out / "judgements.jsonl").open()]
    assert (stats["judge"], stats["name_b"], stats["items_total"]) == ("pairwise", "M1", 3)
    assert all(len(r["verdicts_ab"]) == len(r["verdicts_ba"]) == 1 for r in rows)
    assert all(r["response_b"] == "a dog ran" for r in rows)
    assert (stats["mean_tokens_a"], stats["mean_tokens_b"]) == (2.0, 3.0)  # word tokens
    judged = [r for r in rows if r["preference"] is not None]
    assert stats["judged"] == len(judged) and stats["unjudged"] == 3 - len(judged)
    if judged:  # a random tiny model may give no parsable verdict
        _check_outputs(out)
    else:
        assert stats["win_rate"] is None and stats["lc_win_rate"] is None
    for r in rows:  # an unparsed verdict says why
        for verdict, why in zip(
            r["verdicts_ab"] + r["verdicts_ba"], r["failures_ab"] + r["failures_ba"]
        ):
            assert (verdict is None) == (why is not None)
    checked = [r["consistent"] for r in rows if r["consistent"] is not None]
    assert stats["position_checked"] == len(checked)
    if checked:
        assert stats["position_consistency"] == pytest.approx(sum(checked) / len(checked))
