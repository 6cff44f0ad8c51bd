"""Tests for prompts.py: few-shot prompt, parsing, Self-Instruct filters (ROUGE-L), and
bounded batched prompt generation with a tiny word-level bigram LM."""

from __future__ import annotations

import json
import random
import re
import time

import pytest
import torch
from torch import nn

from self_rewarding_lm_pytorch.prompts import (
    BEGIN,
    END,
    PromptFilter,
    build_fewshot_prompt,
    filter_prompts,
    generate_prompts,
    lcs_length,
    parse_generated_prompt,
    rouge_l,
    rouge_tokens,
)


def dp_lcs(a, b) -> int:
    t = [[0] * (len(b) + 1) for _ in range(len(a) + 1)]
    for i, x in enumerate(a):
        for j, y in enumerate(b):
            t[i + 1][j + 1] = t[i][j] + 1 if x == y else max(t[i][j + 1], t[i + 1][j])
    return t[-1][-1]


# ------------------------------------------------------------------ few-shot format


def test_fewshot_prompt_enumerates_wrapped_examples_and_asks_for_one_more():
    text = build_fewshot_prompt(["Say hi.", "  Add two numbers. "])
    assert text.splitlines() == [
        "Below are sample tasks from user.",
        "1. <begin>Say hi.</end>",
        "2. <begin>Add two numbers.</end>",
        "Come up with one new task, wrapped with <begin> and </end>",
    ]
    custom = build_fewshot_prompt(["a"], instruction="More please.", header="")
    assert custom == "1. <begin>a</end>\nMore please."
    with pytest.raises(ValueError, match="example 1 contains the marker"):
        build_fewshot_prompt(["ok", "bad </end> here"])
    with pytest.raises(ValueError, match="at least one"):
        build_fewshot_prompt([])
    with pytest.raises(TypeError):
        build_fewshot_prompt("one string")  # type: ignore[arg-type]


def test_parse_generated_prompt():
    assert (
        parse_generated_prompt("Sure!\n9. <begin> Name three rivers. </end> more")
        == "Name three rivers."
    )
    assert parse_generated_prompt("Name a river.</end>") == "Name a river."  # primed with <begin>
    assert parse_generated_prompt("<begin>first</end><begin>second</end>") == "first"
    assert parse_generated_prompt("<begin>never closed") is None
    assert parse_generated_prompt("<begin>   </end>") is None
    assert parse_generated_prompt("no markers at all") is None
    assert parse_generated_prompt("") is None


# ------------------------------------------------------------------ ROUGE-L


def test_lcs_and_rouge_l_values():
    assert lcs_length("ABCBDAB", "BDCABA") == dp_lcs("ABCBDAB", "BDCABA") == 4
    assert lcs_length([], [1, 2]) == 0
    assert rouge_tokens("The cat, the HAT!") == ["the", "cat", "the", "hat"]
    # LCS("the cat sat on the mat", "the cat on the mat") = 5; F = 2*5/(6+5)
    assert rouge_l("the cat sat on the mat", "The cat on the mat.") == pytest.approx(10 / 11)
    assert rouge_l("", "anything") == 0.0
    assert rouge_l("same words here", "same words here") == 1.0


def test_lcs_matches_dynamic_programming_on_random_sequences():
    rng = random.Random(0)
    for _ in range(300):
        a = [rng.randrange(4) for _ in range(rng.randrange(0, 70))]
        b = [rng.randrange(4) for _ in range(rng.randrange(0, 70))]
        assert lcs_length(a, b) == dp_lcs(a, b)


# ------------------------------------------------------------------ filters


def test_filter_reasons_are_counted():
    existing = ["Explain how photosynthesis works in plants."]
    candidates = [
        "Explain how photosynthesis works in green plants.",  # too similar to existing
        "Hi there",  # too short
        " ".join(["word"] * 200),  # too long
        "Draw a picture of a cat for me.",  # banned: draw, picture
        "Describe a drawer full of socks.",  # 'drawer' is not the word 'draw'
        "- List three fruits please.",  # leading punctuation
        "List three fruits please.",
        "list   three fruits PLEASE.",  # duplicate of the previous accepted one
        "   ",
    ]
    out = filter_prompts(candidates, existing)
    assert list(out) == ["Describe a drawer full of socks.", "List three fruits please."]
    assert out.reasons == {
        "too_similar": 1,
        "too_short": 1,
        "too_long": 1,
        "banned_keyword": 1,
        "starts_with_punctuation": 1,
        "duplicate": 1,
        "empty": 1,
    }
    assert filter_prompts(["Draw a picture of a cat."], banned_keywords=()) == [
        "Draw a picture of a cat."
    ]
    with pytest.raises(ValueError, match="max_words"):
        filter_prompts(["a b c"], min_words=5, max_words=4)
    with pytest.raises(TypeError):
        filter_prompts("a b c d")  # type: ignore[arg-type]


def test_self_instruct_length_program_and_first_character_filters():
    """Self-Instruct drops tasks of three words or fewer, tasks that start "Write a
    program" and tasks whose first character is not ASCII."""
    candidates = [
        "List three fruits.",  # 3 words
        "List three sweet fruits.",
        "Write a program that sorts a list of numbers.",
        "write  a PROGRAM to add two numbers together.",
        "Explain how to write a program step by step.",  # only the start counts
        "¿Cómo se dice hola en inglés hoy?",
        "Écris une courte histoire sur un chat.",
    ]
    out = filter_prompts(candidates)
    assert list(out) == [candidates[1], candidates[4]]
    assert out.reasons == {"too_short": 1, "banned_prefix": 2, "starts_with_non_ascii": 2}
    keep = filter_prompts(candidates, banned_prefixes=(), ascii_start=False, min_words=3)
    assert list(keep) == [c for c in candidates if c != candidates[1]]
    assert keep.reasons == {"too_similar": 1}  # ROUGE-L 6/7 with "List three fruits."


def test_filter_dedups_among_candidates_by_rouge():
    cands = [
        "Write a short poem about the sea at night.",
        "Write a short poem about the sea at dawn.",  # ROUGE-L 8/9 with the first
        "Summarise the story of a famous novel.",
    ]
    out = filter_prompts(cands, [])
    assert list(out) == [cands[0], cands[2]] and out.reasons == {"too_similar": 1}
    # the threshold is strict: ROUGE-L exactly at the threshold passes
    score = rouge_l(cands[0], cands[1])
    assert list(filter_prompts(cands[:2], [], max_rouge_l=score)) == cands[:2]


def _random_prompts(rng: random.Random, n: int, near_dup_of: list[str] | None = None) -> list[str]:
    words = [f"w{i}" for i in range(300)] + ["the", "a", "of", "to", "what", "how"] * 30
    out = []
    for i in range(n):
        if near_dup_of and i % 3 == 0:
            base = rng.choice(near_dup_of).split()
            j = rng.randrange(len(base))
            base[j] = rng.choice([w for w in words[:300] if w != base[j]])
            out.append(" ".join(base))
        else:
            out.append(" ".join(rng.choice(words) for _ in range(rng.randint(5, 20))))
    return out


def brute_force_filter(candidates, existing, threshold):
    pool, kept = [rouge_tokens(e) for e in existing], []
    for c in candidates:
        t = rouge_tokens(c)
        if all(2 * dp_lcs(t, p) / (len(t) + len(p)) <= threshold for p in pool):
            kept.append(c)
            pool.append(t)
    return kept


def test_prefiltered_rouge_equals_brute_force():
    rng = random.Random(1)
    existing = _random_prompts(rng, 60)
    cands = _random_prompts(rng, 60, near_dup_of=existing)
    for threshold in (0.3, 0.5, 0.7):
        fast = filter_prompts(
            cands, existing, min_words=0, max_rouge_l=threshold, banned_keywords=()
        )
        # no exact duplicates in this data, so only ROUGE-L decides
        assert "duplicate" not in fast.reasons
        assert list(fast) == brute_force_filter(cands, existing, threshold)


def test_filtering_1000_against_1000_is_fast():
    rng = random.Random(2)
    existing = _random_prompts(rng, 1000)
    cands = _random_prompts(rng, 1000, near_dup_of=existing)
    t = time.perf_counter()
    out = filter_prompts(cands, existing)
    elapsed = time.perf_counter() - t
    assert out.reasons.get("too_similar", 0) >= 300  # every near-duplicate is caught
    assert elapsed < 10.0, f"filtering took {elapsed:.1f}s"  # measured ~0.2 s on 2 CPU cores


def test_prompt_filter_is_incremental():
    f = PromptFilter(["Tell me a joke about cats."])
    assert f.reject_reason("Tell me a joke about cats!") == "duplicate"
    assert f("Tell me a story about dragons.")
    assert not f("Tell me a story about dragons!!")
    assert f.reasons == {"duplicate": 1}


# ------------------------------------------------------------------ generation

WORDS = [f"t{i}" for i in range(40)]
SPECIAL = ["<eos>", "<sep>", "<unk>", BEGIN, END]
VOCAB = SPECIAL + WORDS
TOK_ID = {t: i for i, t in enumerate(VOCAB)}


class WordTokenizer:
    """Word-level tokenizer; the chat format appends a separator token."""

    eos_id, pad_id = 0, 0

    def encode(self, text: str) -> list[int]:
        pieces = re.findall(r"<begin>|</end>|<sep>|[^\s<]+|<", text)
        return [TOK_ID.get(p, TOK_ID["<unk>"]) for p in pieces]

    def decode(self, ids) -> str:
        text = " ".join(VOCAB[int(i)] for i in ids if int(i) != 0)
        return text.replace(BEGIN + " ", BEGIN).replace(" " + END, END)

    def format_prompt(self, prompt: str) -> str:
        return prompt + " <sep>"


class TaskBigramLM(nn.Module):
    """After <sep>: <begin>, then uniformly random words; each word ends the task with
    probability ``p_end`` (</end>), after which EOS follows. Records the prompts it sees."""

    def __init__(self, p_end: float = 0.15, max_seq_len: int | None = None):
        super().__init__()
        v = len(VOCAB)
        table = torch.full((v, v), -30.0)
        table[:, 0] = 0.0  # by default: stop
        table[TOK_ID["<sep>"], :] = -30.0
        table[TOK_ID["<sep>"], TOK_ID[BEGIN]] = 0.0
        words = torch.tensor([TOK_ID[w] for w in WORDS])
        for row in [TOK_ID[BEGIN]] + words.tolist():
            table[row, :] = -30.0
            table[row, words] = 0.0
        log_end = torch.log(torch.tensor(p_end * len(WORDS) / (1 - p_end)))
        table[words, TOK_ID[END]] = log_end
        table[TOK_ID[END], :] = -30.0
        table[TOK_ID[END], 0] = 0.0
        self.table = nn.Parameter(table, requires_grad=False)
        self.max_seq_len = max_seq_len
        self.seen: list[list[int]] = []

    def forward(self, x):
        for row in x.tolist():
            if row and row[-1] == TOK_ID["<sep>"]:
                self.seen.append(row)
        return self.table[x]


def test_generate_prompts_returns_filtered_new_prompts_with_exact_accounting():
    seeds = [" ".join(random.Random(i).choices(WORDS, k=6)) for i in range(10)]
    model = TaskBigramLM()
    res = generate_prompts(
        model, WordTokenizer(), seeds, 12, max_new_tokens=8, batch_size=8, generator=0
    )  # up to 6 words: tasks of 3 words or fewer are dropped
    assert len(res.prompts) == 12
    assert all(p.split() and set(p.split()) <= set(WORDS) for p in res.prompts)
    # everything returned passes the filters against the seeds and each other
    assert list(filter_prompts(res.prompts, seeds)) == res.prompts
    assert res.parse_failures > 0 and res.filtered.get("too_short", 0) > 0
    assert (
        res.attempts
        == res.parse_failures + len(res.prompts) + sum(res.filtered.values()) + res.surplus
    )
    assert res.attempts % 8 == 0  # whole batches
    # the paper's shot mix: later few-shot prompts show 6 seeds + 2 generated prompts
    last = WordTokenizer().decode(model.seen[-1])
    shots = [
        s for s in re.findall(r"<begin>(.*?)</end>", last) if s != "<unk>"
    ]  # not the instruction
    assert len(shots) == 8
    assert sum(s in seeds for s in shots) == 6 and sum(s in res.prompts for s in shots) == 2
    # seeded: the same run again gives the same prompts
    again = generate_prompts(
        TaskBigramLM(), WordTokenizer(), seeds, 12, max_new_tokens=8, batch_size=8, generator=0
    )
    assert again.prompts == res.prompts


class ChainLM(nn.Module):
    """After <sep> it always writes ``<begin> t1 t2 t3 t4 t5 </end>``; records its inputs."""

    CHAIN = ["<sep>", BEGIN, "t1", "t2", "t3", "t4", "t5", END, "<eos>"]

    def __init__(self):
        super().__init__()
        v = len(VOCAB)
        table = torch.full((v, v), -30.0)
        table[:, 0] = 0.0
        for a, b in zip(self.CHAIN, self.CHAIN[1:]):
            table[TOK_ID[a], :] = -30.0
            table[TOK_ID[a], TOK_ID[b]] = 0.0
        self.table = nn.Parameter(table, requires_grad=False)
        self.seen: list[str] = []

    def forward(self, x):
        for row in x.tolist():
            if row and row[-1] == TOK_ID["<sep>"]:
                self.seen.append(WordTokenizer().decode(row))
        return self.table[x]


def test_earlier_prompt_generation_stages_are_shots_and_in_the_similarity_pool(tmp_path):
    """A second prompt-generation stage shows the first stage's prompts as the generated
    shots and rejects a prompt the first stage already made."""
    from self_rewarding_lm_pytorch.pipeline import PromptGenerationStage, SelfRewardingTrainer
    from self_rewarding_lm_pytorch.store import read_jsonl

    seeds = [" ".join(WORDS[i : i + 5]) for i in range(10, 35, 5)]
    model = ChainLM()
    stage = dict(num_prompts=1, num_shots=4, num_seed_shots=2, max_new_tokens=8, max_attempts=3)
    trainer = SelfRewardingTrainer(
        model,
        tokenizer=WordTokenizer(),
        prompt_dataset=seeds,
        stages=[PromptGenerationStage(**stage), PromptGenerationStage(**stage)],
        checkpoints_folder=str(tmp_path),
        accelerate_kwargs=dict(cpu=True),
        progress=False,
    )
    with pytest.warns(UserWarning, match="made 0 of 1 prompts"):
        trainer.run()
    prompts = [
        [r["prompt"] for r in read_jsonl(tmp_path / f"0{i}-prompt-generation" / "prompts.jsonl")]
        for i in (1, 2)
    ]
    assert prompts == [["t1 t2 t3 t4 t5"], []]  # the second made it again: a duplicate
    stats = json.loads((tmp_path / "02-prompt-generation" / "stats.json").read_text())
    assert stats["filtered"] == {"duplicate": 3}
    # stage 1: one batch of 3 attempts, before any prompt existed; stage 2: the same
    shown = ["<begin>t1 t2 t3 t4 t5</end>" in text for text in model.seen]
    assert shown == [False] * 3 + [True] * 3


def test_generate_prompts_is_bounded_and_warns():
    seeds = ["t1 t2 t3 t4", "t5 t6 t7 t8"]
    # one new token can never complete "<begin> ... </end>": every attempt fails to parse
    with pytest.warns(UserWarning, match="made 0 of 5 prompts in 7 attempts"):
        res = generate_prompts(
            TaskBigramLM(),
            WordTokenizer(),
            seeds,
            5,
            max_new_tokens=1,
            max_attempts=7,
            batch_size=3,
        )
    assert res.prompts == [] and res.attempts == 7 and res.parse_failures == 7
    assert generate_prompts(TaskBigramLM(), WordTokenizer(), seeds, 0).attempts == 0


def test_generate_prompts_drops_shots_to_fit_the_context():
    seeds = [" ".join(["t1"] * 3 + [f"t{i}"] * 3) for i in range(2, 12)]
    model = TaskBigramLM(p_end=0.3, max_seq_len=60)
    res = generate_prompts(
        model,
        WordTokenizer(),
        seeds,
        2,
        max_new_tokens=8,
        batch_size=4,
        generator=1,
        max_attempts=40,
        temperature=1.0,
    )
    assert res.shots_dropped > 0
    assert all(len(row) <= 60 - 8 for row in model.seen)
    with pytest.raises(ValueError, match="one-shot prompt"):
        generate_prompts(TaskBigramLM(max_seq_len=20), WordTokenizer(), seeds, 1, max_new_tokens=8)
    with pytest.raises(ValueError, match="seed prompt"):
        generate_prompts(model, WordTokenizer(), ["", "  "], 1)
