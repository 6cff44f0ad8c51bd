"""``srlm prepare oasst`` and :mod:`self_rewarding_lm_pytorch.oasst`: the paper's IFT / EFT
seed data from Open Assistant message trees (Yuan et al. 2024, section 3.1).

The fixture ``fixtures/oasst_sample.jsonl`` is a hand-written export in the oasst1 / oasst2
messages schema, one tree per case:

t01 three ranked replies + a multi-turn continuation (2 deeper messages), and one of its
    rows repeated; t02 its rank-1 reply deleted; t03 Spanish; t04 replies unranked;
    t05 t01's prompt again (other whitespace); t06 its rank-0 reply failed review;
    t07 one ranked reply with text + an empty one; t08 deleted prompt; t09 prompt failed
    review; t10 two replies tied at rank 0 (listed against message_id order);
    t11 a reply not reviewed yet (review_result null); t12 four replies listed out of rank order; t13 prompt without text;
    t14 German.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest
from tiny import char_tokenizer

from self_rewarding_lm_pytorch.cli import main
from self_rewarding_lm_pytorch.config import ConfigError, DataSource
from self_rewarding_lm_pytorch.data import tokenize_sft_item
from self_rewarding_lm_pytorch.io import load_sft
from self_rewarding_lm_pytorch.oasst import OasstConfig, prepare_oasst

FIXTURE = Path(__file__).parent / "fixtures" / "oasst_sample.jsonl"
FILES = ("ift.jsonl", "ift_heldout.jsonl", "eft_inputs.jsonl", "eft_inputs_heldout.jsonl")


def fixture_rows() -> list[dict]:
    return [json.loads(line) for line in FIXTURE.read_text(encoding="utf-8").splitlines()]


def expected(rows: list[dict], langs=("en",), reviewed=True) -> tuple[dict, dict]:
    """IFT and EFT rows by tree, computed with a plain loop over the fixture (not the
    module's helpers): the section 3.1 rules as the docs state them."""
    first = {}
    for r in rows:
        first.setdefault(r["message_id"], r)
    msgs = list(first.values())

    def ok(m):
        return (
            not m["deleted"] and (m["review_result"] is True or not reviewed) and m["text"].strip()
        )

    ift, eft, seen = {}, {}, set()
    for root in sorted((m for m in msgs if m["parent_id"] is None), key=lambda m: m["message_id"]):
        text = " ".join(root["text"].split())
        if root["lang"] not in langs or not ok(root) or text in seen:
            continue
        seen.add(text)
        tree = root["message_tree_id"]
        good = [
            m
            for m in msgs
            if m["parent_id"] == root["message_id"]
            and m["role"] == "assistant"
            and ok(m)
            and m["rank"] is not None
        ]
        good.sort(key=lambda m: (m["rank"], m["message_id"]))
        if good and good[0]["rank"] == 0:
            ift[tree] = {
                "messages": [
                    {"role": "user", "content": root["text"]},
                    {"role": "assistant", "content": good[0]["text"]},
                ],
                "tree_id": tree,
            }
        if len(good) >= 2:
            eft[tree] = {
                "prompt": root["text"],
                "responses": [m["text"] for m in good],
                "human_ranks": [m["rank"] for m in good],
                "human_scores": [-m["rank"] for m in good],
                "tree_id": tree,
            }
    return ift, eft


def by_tree(rows: list[dict]) -> dict:
    return {r["tree_id"]: r for r in rows}


def test_ift_and_eft_equal_an_independent_computation():
    data = prepare_oasst(fixture_rows(), OasstConfig(heldout_fraction=0.0))
    ift, eft = expected(fixture_rows())
    assert data.ift == [ift[t] for t in sorted(ift)] and data.ift_heldout == []
    assert data.eft == [eft[t] for t in sorted(eft)] and data.eft_heldout == []
    # read off the fixture by hand
    assert sorted(ift) == ["t01", "t02", "t07", "t10", "t11", "t12"]
    assert sorted(eft) == ["t01", "t02", "t06", "t10", "t11", "t12"]
    assert by_tree(data.ift)["t10"]["messages"][1]["content"] == "11 is prime."  # tie: t10-a
    assert by_tree(data.ift)["t12"]["messages"][1]["content"] == "Salem, after the witch's cat."
    assert by_tree(data.eft)["t12"]["human_ranks"] == [0, 1, 2, 3]
    assert by_tree(data.eft)["t02"]["human_ranks"] == [0, 2]  # the deleted rank 1 is gone
    assert by_tree(data.eft)["t06"]["human_ranks"] == [1, 2]  # the rank 0 failed review


def test_languages_and_an_export_without_reviews():
    rows = fixture_rows()
    data = prepare_oasst(rows, OasstConfig(langs=["en", "de"], heldout_fraction=0.0))
    ift, eft = expected(rows, langs=("en", "de"))
    assert by_tree(data.ift) == ift and by_tree(data.eft) == eft and "t14" in ift
    assert data.summary["prompts"]["dropped"]["wrong language"] == 1  # only t03 now

    for r in rows:
        r["review_result"] = None
    data = prepare_oasst(rows, OasstConfig(heldout_fraction=0.0))
    ift, eft = expected(rows, reviewed=False)
    assert by_tree(data.ift) == ift and by_tree(data.eft) == eft
    assert "not checked" in data.summary["review"]
    assert by_tree(data.ift)["t06"]["messages"][1]["content"].startswith("Buy cheap")
    assert data.summary["prompts"]["dropped"]["failed review"] == 0


def test_summary_counts_each_drop_reason():
    s = prepare_oasst(fixture_rows(), OasstConfig(heldout_fraction=0.0, ift_count=4)).summary
    assert s["input_rows"] == 47
    assert s["messages_dropped"] == {"duplicate message": 1, "not first turn": 2}
    assert s["prompts"]["candidates"] == 14 and s["prompts"]["kept"] == 8
    assert s["prompts"]["dropped"] == {
        "wrong language": 2,  # t03, t14
        "deleted": 1,  # t08
        "failed review": 1,  # t09
        "empty text": 1,  # t13
        "duplicate prompt": 1,  # t05
    }
    # the replies of the 8 prompts kept: 3 + 3 + 2 + 3 + 2 + 2 + 3 + 4
    assert s["replies"]["candidates"] == 22 and s["replies"]["kept"] == 16
    assert s["replies"]["dropped"] == {
        "deleted": 1,  # t02-a2
        "failed review": 2,  # t06-a1, t11-a3 (not reviewed, in an export with reviews)
        "empty text": 1,  # t07-a2
        "unranked": 2,  # t04-a1, t04-a2
    }
    assert s["ift"] == {
        "train": 4,
        "heldout": 0,
        "dropped": {"no valid rank-0 reply": 2, "over count cap": 2},  # t04, t06; 6 - 4
    }
    assert s["eft"] == {
        "train": 6,
        "heldout": 0,
        "dropped": {"too few ranked replies": 2, "over count cap": 0},  # t04, t07
    }


def test_heldout_split_is_by_tree_and_reproducible_from_the_seed():
    rows = fixture_rows()
    ift, eft = expected(rows)
    splits = set()
    for seed in range(6):
        config = OasstConfig(heldout_fraction=0.25, seed=seed)
        data = prepare_oasst(rows, config)
        train = {r["tree_id"] for r in data.ift + data.eft}
        held = {r["tree_id"] for r in data.ift_heldout + data.eft_heldout}
        assert not train & held, seed
        assert by_tree(data.ift + data.ift_heldout) == ift  # nothing lost, nothing added
        assert by_tree(data.eft + data.eft_heldout) == eft
        assert data.summary["trees"] == {"kept": 8, "heldout": 2}  # round(0.25 * 8)
        fifth = prepare_oasst(rows, OasstConfig(heldout_fraction=0.2, seed=seed)).summary
        assert fifth["trees"]["heldout"] == 2  # round(1.6)
        shuffled = rows[:]
        random.Random(seed).shuffle(shuffled)
        assert prepare_oasst(shuffled, config) == data  # the input order does not matter
        splits.add(frozenset(held))
    assert len(splits) > 1  # the seed chooses the held-out trees


def test_count_caps_keep_a_seeded_subset_of_the_training_rows():
    rows = fixture_rows()
    full = prepare_oasst(rows, OasstConfig(heldout_fraction=0.25, seed=1))
    capped = prepare_oasst(
        rows, OasstConfig(heldout_fraction=0.25, seed=1, ift_count=1, eft_count=2)
    )
    assert len(capped.ift) == 1 and len(capped.eft) == 2
    assert all(r in full.ift for r in capped.ift) and all(r in full.eft for r in capped.eft)
    assert capped.ift_heldout == full.ift_heldout and capped.eft_heldout == full.eft_heldout
    assert capped.summary["ift"]["dropped"]["over count cap"] == len(full.ift) - 1
    assert capped.summary["eft"]["dropped"]["over count cap"] == len(full.eft) - 2
    # the documented rule: the trees kept (8 here) in random.Random(seed) order, the first
    # round(fraction * 8) held out, and the cap keeps the first training rows of that order
    order = ["t01", "t02", "t04", "t06", "t07", "t10", "t11", "t12"]  # the prompts kept
    random.Random(1).shuffle(order)
    assert {r["tree_id"] for r in full.ift_heldout + full.eft_heldout} <= set(order[:2])
    first = [t for t in order[2:] if t in by_tree(full.ift)][:1]
    assert [r["tree_id"] for r in capped.ift] == first
    again = prepare_oasst(
        rows, OasstConfig(heldout_fraction=0.25, seed=1, ift_count=1, eft_count=2)
    )
    assert again == capped


def test_the_trees_export_gives_the_same_rows():
    rows = fixture_rows()
    nodes = {}
    for r in rows:
        nodes.setdefault(r["message_id"], {**r, "replies": []})
    for node in nodes.values():
        if node["parent_id"] is not None:
            nodes[node["parent_id"]]["replies"].append(node)
    trees = []
    for node in nodes.values():
        if node["parent_id"] is None:
            trees.append({"message_tree_id": node["message_tree_id"], "prompt": node})
    for node in nodes.values():  # the trees export nests; it need not repeat these keys
        del node["parent_id"], node["message_tree_id"]
    config = OasstConfig(heldout_fraction=0.25)
    flat, nested = prepare_oasst(rows, config), prepare_oasst(trees, config)
    assert (nested.ift, nested.eft, nested.ift_heldout) == (flat.ift, flat.eft, flat.ift_heldout)
    assert nested.summary["prompts"] == flat.summary["prompts"]


def _prepare(tmp_path: Path, source: str | Path, name: str, *extra: str) -> Path:
    out = tmp_path / name
    args = ["-q", "prepare", "oasst", "--input", str(source), "--out", str(out), *extra]
    assert main(args) == 0
    return out


def test_cli_end_to_end_and_ift_loads_as_a_data_source(tmp_path, capsys):
    out = _prepare(tmp_path, FIXTURE, "out", "--heldout-fraction", "0.25", "--seed", "3")
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    data = prepare_oasst(fixture_rows(), OasstConfig(heldout_fraction=0.25, seed=3))
    for name, rows in zip(FILES, (data.ift, data.ift_heldout, data.eft, data.eft_heldout)):
        lines = (out / name).read_text(encoding="utf-8").splitlines()
        assert [json.loads(x) for x in lines] == rows, name
    summary = json.loads((out / "summary.json").read_text())
    assert summary == {"input": str(FIXTURE), **data.summary}
    assert printed["ift"] == len(data.ift) and printed["eft_inputs"] == len(data.eft)
    md = (out / "summary.md").read_text()
    assert "| prompts | root prompt | | duplicate prompt | 1 |" in md
    assert "| replies | first-turn reply | | unranked | 2 |" in md

    ift, _ = expected(fixture_rows())
    tok = char_tokenizer()
    items = load_sft(DataSource(path=str(out / "ift.jsonl"), messages_field="messages"), tok)
    want = [ift[r["tree_id"]]["messages"] for r in data.ift]
    assert items == [{"prompt": m[0]["content"], "response": m[1]["content"]} for m in want]
    for item, chat in zip(items, want):  # the answer is what the SFT loss is taken on
        example = tokenize_sft_item(item, tok)
        answer = list(example.input_ids[example.prompt_len :])
        assert answer == tok.encode(chat[1]["content"]) + [tok.eos_id]


def test_a_parquet_copy_gives_the_same_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = tmp_path / "oasst.parquet"
    pq.write_table(pa.Table.from_pylist(fixture_rows()), path)
    a = _prepare(tmp_path, FIXTURE, "from_jsonl", "--heldout-fraction", "0.25")
    b = _prepare(tmp_path, path, "from_parquet", "--heldout-fraction", "0.25")
    for name in (*FILES, "summary.md"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_bad_inputs_name_the_problem_and_the_fix(tmp_path, capsys, monkeypatch):
    with pytest.raises(ConfigError, match=r"min_responses must be >= 2"):
        OasstConfig(min_responses=1)
    out = str(tmp_path / "o")
    assert (
        main(["prepare", "oasst", "--input", str(FIXTURE), "--out", out, "--ift-count", "0"]) == 2
    )
    assert "config error: --ift-count must be >= 1" in capsys.readouterr().err
    assert main(["prepare", "oasst", "--input", "missing.jsonl", "--out", out]) == 2
    assert "--input: missing.jsonl does not exist" in capsys.readouterr().err

    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"message_id": "a", "text": "hi"}) + "\n")
    assert main(["prepare", "oasst", "--input", str(bad), "--out", out]) == 1
    err = capsys.readouterr().err
    assert "oasst row 0 has no field 'parent_id'" in err and "messages export" in err

    monkeypatch.setitem(sys.modules, "datasets", None)  # as if it were not installed
    assert main(["prepare", "oasst", "--input", "OpenAssistant/oasst1", "--out", out]) == 1
    assert "needs the datasets package: pip install datasets" in capsys.readouterr().err
    assert not Path(out).exists()


def test_a_hub_name_offline_is_a_clear_error(tmp_path, capsys, monkeypatch):
    datasets = pytest.importorskip("datasets")  # the error without it is tested above
    import huggingface_hub.constants

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # no connection here
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    args = ["prepare", "oasst", "--input", "OpenAssistant/oasst1", "--out", str(tmp_path)]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "could not load the hub dataset 'OpenAssistant/oasst1' (split train)" in err
    assert "pass its .jsonl / .parquet file" in err


def test_heldout_eft_inputs_are_gold_for_srlm_eval(tmp_path, capsys):
    out = _prepare(tmp_path, FIXTURE, "out", "--heldout-fraction", "0.5", "--seed", "2")
    rows = [json.loads(x) for x in (out / "eft_inputs_heldout.jsonl").read_text().splitlines()]
    assert rows, "the split holds out at least one EFT prompt"
    for row in rows:  # a judge that agrees with the humans, tied where they tie
        row["pred"] = [10.0 - r for r in row["human_ranks"]]
    scored = tmp_path / "scored.jsonl"
    scored.write_text("".join(json.dumps(r) + "\n" for r in rows))
    capsys.readouterr()
    args = ["eval", "--input", str(scored), "--pred-field", "pred", "--gold-field", "human_scores"]
    assert main(["-q", *args, "--out", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["pairwise_accuracy"] == 1.0


def test_the_docs_agreement_filter_keeps_prompts_scored_in_human_order(tmp_path, monkeypatch):
    import re

    from self_rewarding_lm_pytorch.judge.templates import DEFAULT_REWARD_CONFIG

    docs = (Path(__file__).parents[1] / "docs" / "data.md").read_text(encoding="utf-8")
    snippet = re.findall(r"```python\n(.*?)```", docs, re.S)[-1]
    _prepare(tmp_path, FIXTURE, "data/oasst", "--heldout-fraction", "0")
    monkeypatch.chdir(tmp_path)
    rows = [json.loads(x) for x in Path("data/oasst/eft_inputs.jsonl").read_text().splitlines()]
    # one pair scored backwards except in t01 and t12; t10's two answers tie for the
    # humans, so either order agrees with them
    agree = {"t01", "t10", "t12"}
    for row in rows:
        n = len(row["responses"])
        row["scores"] = [float(n - k) for k in range(n)]
        if row["tree_id"] not in {"t01", "t12"}:
            row["scores"][0], row["scores"][-1] = row["scores"][-1], row["scores"][0]
        row["judgements"] = [{"samples": [f"fine. Score: {s:g}"]} for s in row["scores"]]
    Path("data/oasst/eft_judged.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    exec(compile(snippet, "docs/data.md", "exec"), {})
    eft = load_sft(DataSource(path="data/oasst/eft.jsonl"))
    kept = [r for r in rows if r["tree_id"] in agree]
    want = [
        {"prompt": DEFAULT_REWARD_CONFIG.render(r["prompt"], resp), "response": j["samples"][0]}
        for r in kept
        for resp, j in zip(r["responses"], r["judgements"])
    ]
    assert eft == want and len(eft) == 3 + 2 + 4


def test_help_names_every_option(capsys):
    with pytest.raises(SystemExit) as e:
        main(["prepare", "oasst", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: srlm prepare oasst")
    for flag in ("--input", "--out", "--lang", "--ift-count", "--eft-count", "--seed"):
        assert flag in out
    assert "--heldout-fraction" in out and "--min-responses" in out
