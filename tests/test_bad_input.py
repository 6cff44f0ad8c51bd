"""The bad-input catalogue (``docs/bad-input.md``): one test per row.

Each test feeds one kind of bad input and checks the error's type, that its message names
the problem and the fix, and (where work was already done) that nothing finished is lost.
Tests marked ``xfail(strict=True)`` describe a library change that is still needed; the
reason says which. The last test checks that the table and this file name the same tests.
"""

from __future__ import annotations

import errno
import json
import math
import os
import re
import warnings
from pathlib import Path

import pytest
import torch
from tiny import (
    PROMPTS,
    SFT_DATA,
    char_tokenizer,
    make_trainer,
    quick_preference,
    scripted_score,
    tiny_model,
)
from torch import nn

from self_rewarding_lm_pytorch import store
from self_rewarding_lm_pytorch.config import ConfigError
from self_rewarding_lm_pytorch.judge import JudgeConfig, LLMJudge, RewardConfig, ScoreRange
from self_rewarding_lm_pytorch.models import CallableTokenizer
from self_rewarding_lm_pytorch.pipeline import (
    JudgeParseError,
    NotEnoughPairsError,
    SelfRewardingTrainer,
    SFTStage,
)
from self_rewarding_lm_pytorch.store import StoreError, read_jsonl
from self_rewarding_lm_pytorch.trainers.checkpoint import load_checkpoint, save_checkpoint

REPO = Path(__file__).resolve().parents[1]
DPO = "01-external-reward-dpo"
CPU = dict(accelerate_kwargs=dict(cpu=True), progress=False)


def needs_fix(change: str):
    """Mark a test whose row still needs the library change ``change`` (see the report)."""
    return pytest.mark.xfail(strict=True, reason=f"needs a library change: {change}")


def committed(run_dir: Path) -> list[str]:
    return [r["stage"] for r in json.loads((run_dir / "state.json").read_text())["finished"]]


preference = quick_preference


def trainer(run_dir: Path, stages, *, model=None, datasets=None, judges=None, **kw):
    return SelfRewardingTrainer(
        model if model is not None else tiny_model(),
        tokenizer=kw.pop("tokenizer", char_tokenizer()),
        datasets=datasets if datasets is not None else {"sft": SFT_DATA, "prompts": PROMPTS},
        judges=judges if judges is not None else {"scripted": scripted_score},
        stages=stages,
        checkpoints_folder=str(run_dir),
        **CPU,
        **kw,
    )


def run_config(**overrides) -> dict:
    """A valid ``srlm run`` config mapping (files are not checked)."""
    cfg = {
        "model": {
            "xtransformers": {
                "num_tokens": 256,
                "max_seq_len": 64,
                "attn_layers": {"dim": 16, "depth": 1, "heads": 2},
            }
        },
        "tokenizer": {"kind": "bytes", "eos_id": 10},
        "data": {"sft": {"path": "sft.jsonl"}, "prompts": {"path": "prompts.jsonl"}},
        "stages": [{"kind": "sft"}, {"kind": "self_reward_dpo", "num_preference_pairs": 4}],
    }
    cfg.update(overrides)
    return cfg


def parse(cfg: dict):
    from self_rewarding_lm_pytorch.config import parse_run_config

    return parse_run_config(cfg, check_files=False)


class ConstantLM(nn.Module):
    """A plain LM that always predicts token ``token`` (its judge writes ``9999...``)."""

    def __init__(self, token: int = ord("9"), vocab: int = 128) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.zeros(vocab))
        self.token, self.vocab = token, vocab

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = torch.full((*ids.shape, self.vocab), -10.0) + self.bias
        logits[..., self.token] = 10.0
        return logits


POISON = 127  # "\x7f" in the char tokenizer


class PoisonableLM(nn.Module):
    """A tiny plain LM whose logits become ``value`` (NaN / inf) on rows holding POISON."""

    def __init__(self, value: float) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.emb = nn.Embedding(128, 16)
        self.head = nn.Linear(16, 128)
        self.value = value

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.head(self.emb(ids))
        bad = (ids == POISON).any(dim=1)[:, None, None]
        # a multiplier, not torch.where(bad, logits * value, logits): the unused branch
        # would still send NaN gradients to the clean rows
        return logits * torch.where(bad, self.value, 1.0)


# ====================================================================== prompts and data


def test_prompt_longer_than_context(tmp_path):
    long_prompt = "x" * 200  # the tiny model's context is 96 tokens
    run = trainer(
        tmp_path,
        [SFTStage(trainer=dict(batch_size=4, num_train_steps=2)), preference()],
        datasets={"sft": SFT_DATA, "prompts": PROMPTS[:3] + [long_prompt]},
    )
    with pytest.raises(ValueError, match=r"prompt 3 is 200 tokens long") as info:
        run.run()
    assert "context (max_seq_len) of 96; shorten or remove the prompt" in str(info.value)
    # refused by the pre-flight, before the SFT stage trained: nothing was written
    assert not (tmp_path / "state.json").exists() and not (tmp_path / "01-sft").exists()


def test_judge_prompt_longer_than_context():
    judge = LLMJudge(
        tiny_model(max_seq_len=96),
        char_tokenizer(),
        RewardConfig(
            prompt_template="Rate {{ prompt }} / {{ response }}",
            reward_regex_template="Score: {{ reward }}",
        ),
        max_new_tokens=8,
    )
    with pytest.raises(ValueError, match=r"candidate 1: the judge prompt is \d+ tokens") as info:
        judge.score(["p", "p"], ["short", "y" * 120])
    assert "on_too_long='truncate_response'" in str(info.value)


def test_empty_prompt_set(tmp_path):
    with pytest.raises(ValueError, match=r"dataset 'prompts' .* is empty"):
        trainer(tmp_path, [preference()], datasets={"prompts": []})
    assert not (tmp_path / "state.json").exists()  # rejected before any work


def test_empty_prompt_file(tmp_path):
    from self_rewarding_lm_pytorch.config import DataSource
    from self_rewarding_lm_pytorch.io import load_prompts

    (tmp_path / "prompts.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"prompts.jsonl holds no rows"):
        load_prompts(DataSource(path=str(tmp_path / "prompts.jsonl")))


def test_prompt_item_of_wrong_type(tmp_path):
    run = trainer(tmp_path, [preference()], datasets={"prompts": ["fine", 3]})
    with pytest.raises(TypeError, match=r"'prompts' item 1 is int; prompts must be strings"):
        run.run()


def test_sft_item_of_wrong_type(tmp_path):
    run = trainer(tmp_path, [SFTStage()], datasets={"sft": [SFT_DATA[0], 42]})
    with pytest.raises(TypeError, match=r"sft\[1\]: cannot make an SFT example from int") as info:
        run.run()
    assert "pass (seq, prompt_len)" in str(info.value)


def test_sft_item_of_wrong_shape(tmp_path):
    batch = torch.randint(0, 128, (2, 8))  # two sequences where one is expected
    run = trainer(
        tmp_path, [SFTStage(trainer=dict(num_train_steps=1))], datasets={"sft": [(batch, 3)]}
    )
    with pytest.raises(ValueError, match=r"shape \(2, 8\)"):
        run.run()


def test_data_file_row_of_wrong_shape(tmp_path):
    from self_rewarding_lm_pytorch.config import DataSource
    from self_rewarding_lm_pytorch.io import load_prompts, load_sft

    path = tmp_path / "rows.jsonl"
    path.write_text('{"prompt": "a"}\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"row 1 is list; each row must be an object"):
        load_prompts(DataSource(path=str(path)))
    path.write_text('{"prompt": "a"}\n{"text": "b"}\n')
    with pytest.raises(ValueError, match=r"row 1 has no field 'prompt' .* set prompt_field"):
        load_prompts(DataSource(path=str(path)))
    path.write_text('{"prompt": "a", "response": 3}\n')
    with pytest.raises(TypeError, match=r"row 0: field 'response' must be text, got int"):
        load_sft(DataSource(path=str(path)))
    path.write_text('{"prompt": "a"}\n{"prompt": "b"\n')
    with pytest.raises(ValueError, match=r"rows.jsonl:2: not valid JSON"):
        load_prompts(DataSource(path=str(path)))


# ====================================================================== judge templates and scores


@pytest.mark.parametrize("missing", ["prompt", "response"])
def test_prompt_template_missing_variable(missing):
    template = "User: {{ prompt }} Response: {{ response }}".replace("{{ " + missing + " }}", "")
    with pytest.raises(ValueError, match=r"missing the variable \{\{ " + missing) as info:
        RewardConfig(prompt_template=template, reward_regex_template="Score: {{ reward }}")
    assert "add it where the text should go" in str(info.value)
    # the same template from a YAML config is refused before any work, naming the key
    with pytest.raises(ConfigError, match=r"reward_config: prompt_template is missing"):
        parse(run_config(reward_config={"prompt_template": template}))


def test_regex_template_without_reward():
    with pytest.raises(ValueError, match=r"reward_regex_template is missing .*\{\{ reward \}\}"):
        RewardConfig(prompt_template="{{ prompt }} {{ response }}", reward_regex_template="Score:")
    with pytest.raises(ValueError, match=r"exactly once"):
        RewardConfig(
            prompt_template="{{ prompt }} {{ response }}",
            reward_regex_template="{{ reward }} of {{ reward }}",
        )


def test_judge_never_parses(tmp_path):
    run = trainer(
        tmp_path,
        [
            preference(
                kind="self_reward_dpo",
                judge="self",
                judge_settings=JudgeConfig(max_new_tokens=6, num_samples=1),
            )
        ],
        reward_prompt_config=RewardConfig(
            prompt_template="Rate {{ prompt }} / {{ response }}:",
            reward_regex_template="Score: {{ reward }}",
        ),
    )
    with pytest.raises(JudgeParseError) as info:
        run.run()
    msg = str(info.value)
    assert "parsable score for only 0.0%" in msg
    assert "EFT" in msg and "RewardConfig" in msg and "external judge" in msg
    # what was generated and judged before the stop is kept for the next attempt
    kept = read_jsonl(tmp_path / "01-self-reward-dpo" / "candidates.jsonl")
    assert len(kept) == 4 and all(s is None for r in kept for s in r["scores"])


def _out_of_range_run(tmp_path):
    return trainer(
        tmp_path,
        [
            preference(
                kind="self_reward_dpo",
                judge="self",
                num_candidates=2,
                judge_settings=JudgeConfig(num_samples=1, max_new_tokens=3),
            )
        ],
        model=ConstantLM(),
        reward_prompt_config=RewardConfig(
            prompt_template="Rate {{ prompt }} / {{ response }}:",
            reward_regex_template="{{ reward }}",
            validate_reward=ScoreRange(0, 5),
        ),
    )


def test_scores_out_of_range(tmp_path):
    config = RewardConfig(
        prompt_template="{{ prompt }} {{ response }}",
        reward_regex_template="Score: {{ reward }}",
        validate_reward=ScoreRange(0, 5),
    )
    assert config.parse_with_reason("Score: 7") == (None, "score 7 outside the valid range [0, 5]")
    assert config.parse_with_reason("Score: 4") == (4.0, None)
    # a self-judge that only ever answers 999: every score is refused, the stage stops
    with pytest.raises(JudgeParseError, match=r"only 0.0%"):
        _out_of_range_run(tmp_path).run()
    kept = read_jsonl(tmp_path / "01-self-reward-dpo" / "candidates.jsonl")
    reasons = {f for r in kept for j in r["judgements"] for f in j["failures"]}
    assert reasons == {"score 999 outside the valid range [0, 5]"}
    # an inverted range in a config file is refused before any work
    with pytest.raises(ConfigError, match=r"reward_config"):
        parse(run_config(reward_config={"score_range": [5, 0]}))


def test_error_inside_an_optional_config_section():
    with pytest.raises(ConfigError, match=r"score_range must be \[low, high\] with low <= high"):
        parse(run_config(reward_config={"score_range": [5, 0]}))
    with pytest.raises(ConfigError, match=r"did you mean 'prompt_template'"):
        parse(run_config(reward_config={"prompt_templte": "{{ prompt }} {{ response }}"}))


def test_judge_parse_error_names_the_reason(tmp_path):
    with pytest.raises(JudgeParseError, match=r"outside the valid range \[0, 5\]"):
        _out_of_range_run(tmp_path).run()


def test_external_judge_returns_nan_or_text():
    from self_rewarding_lm_pytorch.judge import CallableJudge

    answers = iter([math.nan, "great", math.inf, 3])
    results = CallableJudge(lambda p, r: next(answers)).score(["p"] * 4, ["a", "b", "c", "d"])
    assert [r.score for r in results] == [None, None, None, 3.0]
    assert [r.failures[0] for r in results] == [
        "the judge returned a non-finite score nan",
        "the judge returned a non-number 'great'",
        "the judge returned a non-finite score inf",
        None,
    ]


def test_all_candidates_tied(tmp_path):
    run = trainer(
        tmp_path,
        [preference(num_preference_pairs=2)],
        datasets={"prompts": PROMPTS[:6]},
        judges={"scripted": lambda prompt, response: 3.0},
    )
    with pytest.raises(NotEnoughPairsError) as info:
        run.run()
    msg = str(info.value)
    assert "built 0 of 2 preference pairs after trying 6 prompts" in msg
    assert "tie rate 100.0%" in msg and "sample more candidates per prompt" in msg
    # the judged candidates are kept: a rerun with more prompts continues from them
    assert len(read_jsonl(tmp_path / DPO / "candidates.jsonl")) == 6


# ====================================================================== training


@pytest.mark.parametrize("value", [math.nan, math.inf])
def test_nan_or_inf_loss(tmp_path, value):
    poisoned = [{"prompt": "say x", "response": "x\x7f"}] * 4
    run = trainer(
        tmp_path,
        [
            SFTStage(datasets=["sft"], trainer=dict(batch_size=4, num_train_steps=2)),
            SFTStage(datasets=["poisoned"], trainer=dict(batch_size=4, num_train_steps=2)),
        ],
        model=PoisonableLM(value),
        datasets={"sft": SFT_DATA[:8], "poisoned": poisoned},
    )
    with pytest.raises(
        FloatingPointError, match=r"non-finite loss \((nan|inf)\) at step 1"
    ) as info:
        run.run()
    assert "Lower the learning rate" in str(info.value)
    # the first stage is committed and its checkpoint loads; the failed one saved nothing
    assert committed(tmp_path) == ["01-sft"]
    load_checkpoint(PoisonableLM(value), tmp_path / "01-sft" / "checkpoint")
    assert not (tmp_path / "02-sft" / "checkpoint").exists()


# ====================================================================== configuration


def test_config_key_typo():
    with pytest.raises(ConfigError, match=r"unknown key 'stagse'; did you mean 'stages'"):
        cfg = run_config()
        cfg["stagse"] = cfg.pop("stages")
        parse(cfg)
    stage = {"kind": "self_reward_dpo", "num_preference_pair": 4}
    with pytest.raises(ConfigError, match=r"did you mean 'num_preference_pairs'"):
        parse(run_config(stages=[stage]))
    stage = {"kind": "self_reward_dpo", "trainer": {"bta": 0.1}}
    with pytest.raises(
        ConfigError, match=r"unknown DPOTrainer argument 'bta'; did you mean 'beta'"
    ):
        parse(run_config(stages=[stage]))
    with pytest.raises(ConfigError, match=r"'self_reward_dp' is not a stage kind; did you mean"):
        parse(run_config(stages=[{"kind": "self_reward_dp"}]))


def test_config_wrong_type():
    with pytest.raises(ConfigError, match=r"seed: expected an integer, got str 'zero'"):
        parse(run_config(seed="zero"))
    stage = {"kind": "self_reward_dpo", "num_preference_pairs": "8"}
    with pytest.raises(ConfigError, match=r"num_preference_pairs: expected an integer, got str"):
        parse(run_config(stages=[stage]))
    with pytest.raises(ConfigError, match=r"expected a list"):
        parse(run_config(stages=[{"kind": "sft", "datasets": "sft"}]))


def test_config_error_from_the_cli_exits_2_without_traceback(tmp_path, capsys):
    from self_rewarding_lm_pytorch.cli import main

    config = tmp_path / "bad.yaml"
    config.write_text("stagse: []\nmodel: {xtransformers: {num_tokens: 256}}\n")
    assert main(["run", str(config)]) == 2
    err = capsys.readouterr().err
    assert "config error: unknown key 'stagse'; did you mean 'stages'" in err
    assert "Traceback" not in err


def test_stage_names_unknown_dataset_or_judge(tmp_path):
    with pytest.raises(
        ValueError, match=r"prompts: dataset 'prompts' is not given in datasets=.*datasets=\{"
    ):
        trainer(tmp_path, [preference()], datasets={"sft": SFT_DATA})
    with pytest.raises(
        ValueError, match=r"judge: judge 'gpt' is not given in judges=.*judges=\{'gpt'"
    ):
        trainer(tmp_path, [preference(judge="gpt")])
    with pytest.raises(ValueError, match=r"num_candidates must be at least 2"):
        trainer(tmp_path, [preference(num_candidates=1)])
    assert not (tmp_path / "state.json").exists()


def test_vocabulary_mismatch_in_config():
    from self_rewarding_lm_pytorch.config import parse_run_config

    model = run_config()["model"]
    model["xtransformers"]["num_tokens"] = 128
    with pytest.raises(ConfigError, match=r"'bytes' needs model.xtransformers.num_tokens >= 256"):
        parse_run_config(run_config(model=model), check_files=True)


def test_missing_data_file(tmp_path):
    from self_rewarding_lm_pytorch.config import parse_run_config

    with pytest.raises(
        ConfigError, match=r"data.sft.path: .*sft.jsonl does not exist; fix the path"
    ):
        parse_run_config(run_config(), base_dir=tmp_path)


# ====================================================================== tokenizers


def _hf_tokenizer_without_special_tokens():
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    vocab = {w: i for i, w in enumerate(["[UNK]", "a", "b", "c"])}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok)


def test_tokenizer_without_eos_or_pad(tmp_path):
    from self_rewarding_lm_pytorch.hf import ensure_pad_token, load_tokenizer

    tok = _hf_tokenizer_without_special_tokens()
    with pytest.raises(ValueError, match=r"neither a pad token nor an EOS token; set one") as info:
        ensure_pad_token(tok)
    assert "add_special_tokens" in str(info.value)
    # the CLI's loading path (a saved tokenizer folder) refuses it the same way
    tok.save_pretrained(tmp_path / "tok")
    with pytest.raises(ValueError, match=r"neither a pad token nor an EOS token"):
        load_tokenizer(tmp_path / "tok")


def test_tokenizer_without_eos_warns(tmp_path):
    no_eos = CallableTokenizer(
        lambda s: [ord(c) % 128 for c in s], lambda ids: "".join(chr(int(i)) for i in ids)
    )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(tmp_path, [preference()], tokenizer=no_eos)
    messages = [str(w.message) for w in caught]
    assert any("EOS" in m and "eos_id" in m for m in messages), messages


# ====================================================================== files and folders


def test_unwritable_output_directory(tmp_path, monkeypatch):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    if os.geteuid() != 0:
        run_dir.chmod(0o500)
    else:  # root ignores permission bits: refuse file creation in the folder instead
        real_open = os.open

        def refuse(path, flags, *args, **kwargs):
            if Path(os.fsdecode(path)).parent == run_dir and flags & os.O_CREAT:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), path)
            return real_open(path, flags, *args, **kwargs)

        monkeypatch.setattr(os, "open", refuse)
    try:
        with pytest.raises(StoreError) as info:
            make_trainer(str(run_dir), num_pairs=2).run()
    finally:
        run_dir.chmod(0o700)
    msg = str(info.value)
    assert str(run_dir) in msg
    assert "not writable: fix its permissions or choose another output directory" in msg
    assert list(run_dir.iterdir()) == []


def test_output_directory_cannot_be_created(tmp_path):
    (tmp_path / "a-file").write_text("in the way")
    with pytest.raises(StoreError, match=r"a-file/run.*choose another output directory"):
        make_trainer(str(tmp_path / "a-file" / "run"), num_pairs=2).run()


def test_disk_full_while_appending_records(tmp_path, monkeypatch):
    """ENOSPC in the middle of the third append to candidates.jsonl: StoreError naming the
    path and the fix; the records written before stay intact; the rerun finishes with
    exactly the records of a run that never failed."""
    clean = tmp_path / "clean"
    make_trainer(str(clean), num_pairs=12).run()

    class FullDisk:
        def __init__(self, f):
            self.f = f

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.f.close()
            return False

        def write(self, data):  # half the bytes reach the disk, then it is full
            self.f.write(data[: len(data) // 2])
            self.f.flush()
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.f, name)

    appends = []

    def open_(file, mode="r", *args, **kwargs):
        f = open(file, mode, *args, **kwargs)
        if str(file).endswith("candidates.jsonl") and "a" in mode:
            appends.append(file)
            if len(appends) == 3:
                return FullDisk(f)
        return f

    run_dir = tmp_path / "run"
    monkeypatch.setattr(store, "open", open_, raising=False)
    with pytest.raises(StoreError) as info:
        make_trainer(str(run_dir), num_pairs=12).run()
    monkeypatch.undo()
    cand = run_dir / DPO / "candidates.jsonl"
    assert str(cand) in str(info.value)
    assert "the disk is full: free space or point the run at another --out directory" in str(
        info.value
    )
    before = read_jsonl(cand)
    clean_records = read_jsonl(clean / DPO / "candidates.jsonl")
    # two chunks intact, plus the lines of the third that fitted before the disk filled up
    assert 8 <= len(before) < 12 and before == clean_records[: len(before)]

    make_trainer(str(run_dir), num_pairs=12).run()  # space freed: the rerun resumes
    for name in ("candidates.jsonl", "pairs.jsonl"):
        assert (run_dir / DPO / name).read_bytes() == (clean / DPO / name).read_bytes()


def test_corrupt_state_file(tmp_path):
    tmp_path.joinpath("state.json").write_text('{"finished": [')
    with pytest.raises((RuntimeError, ValueError), match=r"state.json.*delete it"):
        make_trainer(str(tmp_path), num_pairs=2).run()


def test_different_plan_in_the_same_folder(tmp_path):
    make_trainer(str(tmp_path), num_pairs=2).run()

    def files() -> dict:  # the lock file records whoever took it last: not run data
        return {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()
                and p.name != ".srlm-lock"}  # fmt: skip

    before = files()
    with pytest.raises(
        RuntimeError,
        match=r"holds a run with stages .* start it afresh: --overwrite \(overwrite=True\) or "
        r"another --out",
    ):
        make_trainer(str(tmp_path), num_pairs=2, sft=True).run()
    # nothing of the finished run was touched
    assert files() == before


def test_checkpoint_of_another_architecture(tmp_path):
    save_checkpoint(tiny_model(dim=32), tmp_path / "ckpt")
    with pytest.raises(ValueError, match=r"does not match the model.*architecture"):
        load_checkpoint(tiny_model(dim=16), tmp_path / "ckpt")


# ====================================================================== the table


def _table_rows() -> list[dict[str, str]]:
    text = (REPO / "docs" / "bad-input.md").read_text()
    rows = []
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[3].startswith("`test_"):
            rows.append(dict(zip(("input", "error", "message", "test"), cells, strict=True)))
    return rows


def _catalogue_tests() -> dict:
    """Every test of the catalogue: this file's and those of ``tests/test_bad_input_*.py``."""
    import importlib

    tests = {n: o for n, o in globals().items() if n.startswith("test_") and callable(o)}
    for path in sorted(Path(__file__).parent.glob("test_bad_input_*.py")):
        module = importlib.import_module(path.stem)
        for name, obj in vars(module).items():
            if name.startswith("test_") and callable(obj):
                assert name not in tests, f"{name} is defined in two catalogue files"
                tests[name] = obj
    tests.pop("test_catalogue_table_matches_the_tests")
    return tests


def test_catalogue_table_matches_the_tests():
    rows = _table_rows()
    named = [r["test"].strip("`") for r in rows]
    tests = _catalogue_tests()
    here = set(tests)
    assert len(named) == len(set(named)), "a test is listed twice"
    assert set(named) == here, (
        f"in the table but not here: {sorted(set(named) - here)}; "
        f"here but not in the table: {sorted(here - set(named))}"
    )
    assert all(r["input"] and r["error"] and r["message"] for r in rows)
    # each row's error type appears in its test's source (the table says what is raised)
    import inspect

    for r in rows:
        source = inspect.getsource(tests[r["test"].strip("`")])
        for error in re.findall(r"[A-Z][A-Za-z]+Error", r["error"]):
            assert error in source, f"{r['test']}: {error} is not what the test checks"
