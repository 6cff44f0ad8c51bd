"""The eft_build stage (paper §3.1) on the OASST fixture, judged by a scripted backend whose
scores are chosen per response; the plan rules of ``generated_eft``; SFT ``init``."""

from __future__ import annotations

import gc
import json
import weakref
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tiny import SFT_DATA, char_tokenizer, run_two_ranks, tiny_model

from self_rewarding_lm_pytorch.config import ConfigError, parse_run_config
from self_rewarding_lm_pytorch.generation import GenerationOutput
from self_rewarding_lm_pytorch.io import read_rows
from self_rewarding_lm_pytorch.models import CallableTokenizer
from self_rewarding_lm_pytorch.oasst import OasstConfig, prepare_oasst
from self_rewarding_lm_pytorch.pipeline import EFTBuildStage, SelfRewardingTrainer, SFTStage
from self_rewarding_lm_pytorch.pipeline.plan import check_plan
from self_rewarding_lm_pytorch.store import RunDirError

FIXTURE = Path(__file__).parent / "fixtures" / "oasst_sample.jsonl"

#: the score the scripted judge gives each fixture response (None: an unparsable judgement)
SCORES = {
    # France, ranks 0 1 2: best > worst, but 3 < 4 on the pair ranked (1, 2)
    "The capital of France is Paris.": 5,
    "Paris.": 3,
    "I think it is Lyon.": 4,
    # haiku, ranks 0 2: agrees
    "Red leaves drift and fall\nwhispering to the cold ground\nsummer says goodbye": 4,
    "Autumn leaves are nice.": 2,
    # photosynthesis, ranks 1 2: a tie in score disagrees
    "Plants turn light, water and carbon dioxide into sugar and oxygen.": 3,
    "It is how plants eat.": 3,
    # prime, ranks 0 0: no human ordering
    "11 is prime.": 4,
    "13 is one.": 4,
    # HTTP, ranks 0 1: the second judgement does not parse
    "HyperText Transfer Protocol.": 5,
    "Hyper Text Transfer Protocol, the web's protocol.": None,
    # black cat, ranks 0 1 2 3: agrees
    "Salem, after the witch's cat.": 5,
    "Shadow.": 4,
    "Midnight.": 3,
    "Cat.": 1,
}


def eft_rows() -> list[dict]:
    data = prepare_oasst(read_rows(str(FIXTURE)), OasstConfig(heldout_fraction=0.0))
    return data.eft


def byte_tokenizer() -> CallableTokenizer:
    return CallableTokenizer(
        lambda s: list(s.encode()), lambda ids: bytes(int(i) for i in ids).decode(), eos_id=0
    )


class ScriptedJudgeBackend:
    """A generation backend that writes a judgement of the fixture response it finds in
    each judge prompt (the longest one), scored as :data:`SCORES` says; each judgement
    names a number drawn from the request's generator, so the files show its seeding.
    ``fail_after`` calls, it raises (a crash)."""

    max_seq_len = None

    def __init__(self, fail_after: int | None = None) -> None:
        self.tok = byte_tokenizer()
        self.calls = 0
        self.judged = 0
        self.fail_after = fail_after

    def generate(self, prompts, config, *, generator=None, **kw) -> GenerationOutput:
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise RuntimeError("scripted crash")
        self.calls += 1
        draw = int(torch.randint(0, 10**6, (1,), generator=generator))
        out = []
        for ids in prompts:
            text = self.tok.decode(ids)
            response = max((r for r in SCORES if r in text), key=len)
            score = SCORES[response]
            verdict = "no verdict" if score is None else f"Score: {score}"
            for _ in range(config.num_return_sequences):
                out.append(self.tok.encode(f"It answers {len(response)} chars ({draw}). {verdict}"))
        self.judged += len(prompts)
        return GenerationOutput(sequences=out, finish_reasons=["eos"] * len(out))

    def next_token_logprobs(self, sequences, token_ids):
        raise NotImplementedError

    def load_weights(self, checkpoint) -> None:
        pass

    def close(self) -> None:
        pass


def run_eft(run_dir: Path, backend=None, **stage_kw) -> SelfRewardingTrainer:
    stage = EFTBuildStage(**{"heldout_fraction": 0.0, "chunk_size": 2, **stage_kw})
    trainer = SelfRewardingTrainer(
        tiny_model(),
        tokenizer=byte_tokenizer(),
        datasets={"eft_inputs": eft_rows()},
        stages=[stage],
        checkpoints_folder=run_dir,
        accelerate_kwargs=dict(cpu=True),
        backend=backend or ScriptedJudgeBackend(),
        progress=False,
    )
    trainer.run()
    return trainer


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def score_of(row: dict) -> int:
    return int(row["response"].rsplit("Score: ", 1)[1])


@pytest.mark.parametrize(
    "agreement, sets, histogram_before",
    [
        # all_pairs keeps haiku (4, 2) and cat (5, 4, 3, 1); France fails on (1, 2)
        ("all_pairs", (2, 2, 1, 1), {"1": 1, "2": 1, "3": 1, "4": 2, "5": 1}),
        # best_worst also keeps France (5 > 4)
        ("best_worst", (3, 1, 1, 1), {"1": 1, "2": 1, "3": 2, "4": 3, "5": 2}),
    ],
)
def test_agreement_filter_and_balancing_match_a_hand_count(
    tmp_path, agreement, sets, histogram_before
):
    run_eft(tmp_path, agreement=agreement)
    stage_dir = tmp_path / "01-eft-build"
    stats = json.loads((stage_dir / "stats.json").read_text())
    agreeing, disagreeing, unparsable, unranked = sets
    kept = sum(histogram_before.values())
    assert stats["rows"] == stats["judgement_sets"] == 6
    assert stats["agreeing_sets"] == agreeing
    assert stats["disagreeing_sets"] == disagreeing
    assert stats["unparsable_sets"] == unparsable
    assert stats["unranked_sets"] == unranked
    assert stats["kept_examples"] == kept
    assert stats["score_histogram_before"] == histogram_before
    # balanced: every score as often as the rarest (1 each, five scores)
    assert stats["score_histogram_after"] == {k: 1 for k in histogram_before}
    assert stats["balanced_away"] == kept - 5
    rows = read(stage_dir / "eft.jsonl")
    assert sorted(score_of(r) for r in rows) == [1, 2, 3, 4, 5]
    assert len(read(stage_dir / "judgements.jsonl")) == 6
    assert not (stage_dir / "checkpoint").exists()  # the stage trains nothing
    # each row: the Figure 2 prompt of one kept response and the judgement written for it
    for row in rows:
        assert "Review the user's question" in row["prompt"]
        response = max((r for r in SCORES if r in row["prompt"]), key=len)
        assert SCORES[response] == score_of(row)


def test_unbalanced_max_examples_and_heldout_split_by_prompt(tmp_path):
    run_eft(tmp_path / "a", balance=False)
    all_kept = read(tmp_path / "a" / "01-eft-build" / "eft.jsonl")
    assert len(all_kept) == 6  # haiku 2 + cat 4, nothing balanced away

    run_eft(tmp_path / "b", balance=False, max_examples=4)
    capped = read(tmp_path / "b" / "01-eft-build" / "eft.jsonl")
    assert len(capped) == 4 and all(r in all_kept for r in capped)

    run_eft(tmp_path / "c", balance=False, agreement="best_worst", heldout_fraction=0.5)
    stage_dir = tmp_path / "c" / "01-eft-build"
    stats = json.loads((stage_dir / "stats.json").read_text())
    assert stats["heldout_prompts"] == 3  # half of the 6 prompts
    sources = [r["prompt"] for r in eft_rows()]

    def source(row: dict) -> str:
        return next(p for p in sources if p in row["prompt"])

    train = read(stage_dir / "eft.jsonl")
    heldout = read(stage_dir / "eft_heldout.jsonl")
    assert not {source(r) for r in train} & {source(r) for r in heldout}  # by prompt
    assert len(train) + len(heldout) == 9  # France 3 + haiku 2 + cat 4
    assert stats["heldout_examples"] == len(heldout) and stats["train_examples"] == len(train)


def test_resume_after_a_crash_writes_the_same_files(tmp_path):
    run_eft(tmp_path / "whole")
    with pytest.raises(RuntimeError, match="scripted crash"):
        run_eft(tmp_path / "crashed", ScriptedJudgeBackend(fail_after=2))  # 2 of 3 chunks
    stage_dir = tmp_path / "crashed" / "01-eft-build"
    assert len(read(stage_dir / "judgements.jsonl")) == 4
    backend = ScriptedJudgeBackend()
    run_eft(tmp_path / "crashed", backend)
    assert backend.judged == 6  # only the last chunk again: HTTP (2) + cat (4) responses
    for name in ("judgements.jsonl", "eft.jsonl", "eft_heldout.jsonl", "stats.json"):
        whole = (tmp_path / "whole" / "01-eft-build" / name).read_bytes()
        assert (stage_dir / name).read_bytes() == whole, name


def test_two_processes_split_the_judging_and_write_the_files_of_one(tmp_path):
    one = ScriptedJudgeBackend()
    run_eft(tmp_path / "one", one)
    done = run_two_ranks(Path(__file__).parent / "eft_ddp_job.py", str(tmp_path / "two"))
    assert done.returncode == 0, done.stderr[-4000:]
    judged = [
        json.loads((tmp_path / "two" / f"rank-{r}.json").read_text())["judged"] for r in (0, 1)
    ]
    # 3 chunks dealt to 2 ranks: each response judged once, by one of them
    assert all(n > 0 for n in judged) and sum(judged) == one.judged == 15, judged
    for name in ("judgements.jsonl", "eft.jsonl", "eft_heldout.jsonl", "stats.json"):
        a = (tmp_path / "one" / "01-eft-build" / name).read_bytes()
        assert (tmp_path / "two" / "run" / "01-eft-build" / name).read_bytes() == a, name


def test_a_changed_judge_sets_the_judgements_of_an_unfinished_stage_aside(tmp_path):
    with pytest.raises(RuntimeError, match="scripted crash"):
        run_eft(tmp_path, ScriptedJudgeBackend(fail_after=1))
    backend = ScriptedJudgeBackend()
    run_eft(tmp_path, backend, judge_settings={"temperature": 0.5})
    stage_dir = tmp_path / "01-eft-build"
    assert len(read(stage_dir / "stale-judge-1" / "judgements.jsonl")) == 2  # the first chunk
    assert backend.judged == 15  # every response of the 6 rows judged again


def _yaml(stages: list[dict]) -> dict:
    return {
        "model": {"path": "tiny-llama"},
        "data": {
            "ift": {"rows": [{"prompt": "a", "response": "b"}]},
            "eft_inputs": {
                "rows": [{"prompt": "a", "responses": ["b", "c"], "human_ranks": [0, 1]}]
            },
        },
        "stages": stages,
    }


def test_generated_eft_needs_an_earlier_eft_build_stage():
    datasets = {"ift", "eft_inputs"}
    sft = SFTStage(datasets=["ift", "generated_eft"], init="base")
    with pytest.raises(ConfigError, match=r"stage 01-sft, datasets: 'generated_eft' .* eft_build"):
        check_plan([sft], datasets=datasets, judges=set(), models=set())
    with pytest.raises(ConfigError, match=r"kind='eft_build'"):
        check_plan([sft, EFTBuildStage()], datasets=datasets, judges=set(), models=set())
    check_plan([EFTBuildStage(), sft], datasets=datasets, judges=set(), models=set())
    with pytest.raises(ConfigError, match=r"'generated-eft' .* did you mean 'generated_eft'"):
        check_plan(
            [EFTBuildStage(), SFTStage(datasets=["generated-eft"])],
            datasets=datasets,
            judges=set(),
            models=set(),
        )
    with pytest.raises(ConfigError, match=r"stages\[0\]\.datasets: .*\(kind: eft_build\)"):
        parse_run_config(
            _yaml([{"kind": "sft", "datasets": ["ift", "generated_eft"]}]), check_files=False
        )
    with pytest.raises(ConfigError, match=r"stages\[0\]\.inputs: dataset 'eft' is not defined"):
        parse_run_config(_yaml([{"kind": "eft_build", "inputs": "eft"}]), check_files=False)
    cfg = parse_run_config(
        _yaml(
            [
                {"kind": "eft_build", "judge_settings": {"max_new_tokens": 8}},
                {"kind": "sft", "datasets": ["ift", "generated_eft"], "init": "base"},
            ]
        ),
        check_files=False,
    )
    assert cfg.stage_objects[0].judge_settings.num_samples == 1  # the stage's own default
    with pytest.raises(ConfigError, match=r"stages\[0\]\.init: 'first' is not one of"):
        parse_run_config(
            _yaml([{"kind": "sft", "datasets": ["ift"], "init": "first"}]), check_files=False
        )


def _sft_trainer(run_dir: Path, stages: list[SFTStage]) -> SelfRewardingTrainer:
    return SelfRewardingTrainer(
        tiny_model(),
        tokenizer=char_tokenizer(),
        datasets={"a": SFT_DATA[:8], "b": SFT_DATA[8:]},
        stages=stages,
        checkpoints_folder=run_dir,
        accelerate_kwargs=dict(cpu=True),
        progress=False,
    )


def _sft_run(run_dir: Path, stages: list[SFTStage]) -> list[dict[str, torch.Tensor]]:
    """Each stage's checkpoint weights after running ``stages`` on the tiny model."""
    _sft_trainer(run_dir, stages).run()
    return [
        load_file(next((run_dir / f"{i + 1:02d}-sft" / "checkpoint").glob("*.safetensors")))
        for i in range(len(stages))
    ]


def test_sft_init_base_starts_from_the_initial_weights_and_previous_continues(tmp_path):
    train = dict(batch_size=4, num_train_steps=2, start_learning_rate=1e-2)
    first = SFTStage(datasets=["a"], trainer=train)
    (alone,) = _sft_run(tmp_path / "alone", [SFTStage(datasets=["b"], trainer=train)])
    _, base = _sft_run(
        tmp_path / "base", [first, SFTStage(datasets=["b"], init="base", trainer=train)]
    )
    one, previous = _sft_run(tmp_path / "prev", [first, SFTStage(datasets=["b"], trainer=train)])
    assert base.keys() == alone.keys()
    assert all(torch.equal(base[k], alone[k]) for k in alone)  # as if stage 1 never ran
    assert not all(torch.equal(previous[k], alone[k]) for k in alone)
    assert not all(torch.equal(previous[k], one[k]) for k in one)  # it trained on from 1
    # init is part of the stage's fingerprint: a finished stage keeps it
    changed = [first, SFTStage(datasets=["b"], init="previous", trainer=train)]
    with pytest.raises(RunDirError, match=r"stage 02-sft finished with other settings.*init"):
        _sft_trainer(tmp_path / "base", changed).run()


def test_the_initial_weights_are_freed_after_the_last_stage_that_needs_them(tmp_path):
    train = dict(batch_size=4, num_train_steps=2, start_learning_rate=1e-2)
    stages = [
        SFTStage(datasets=["a"], trainer=train),
        SFTStage(datasets=["b"], init="base", trainer=train),
        SFTStage(datasets=["a"], trainer=train),
    ]
    trainer = _sft_trainer(tmp_path / "run", stages)
    kept = [weakref.ref(t) for t in trainer._base_weights.values()]
    seen: list[bool] = []  # before each stage: is the CPU copy still alive?
    run_stage = trainer._run_stage

    def watched(index, stage, stage_dir):
        gc.collect()
        seen.append(all(r() is not None for r in kept))
        return run_stage(index, stage, stage_dir)

    trainer._run_stage = watched
    trainer.run()
    gc.collect()
    # kept for stage 2 (init: base), freed once it finished: stage 3 trains without it
    assert seen == [True, True, False]
    assert all(r() is None for r in kept)
    # running the plan again on this trainer would need them: refused, naming the fix,
    # before the finished run's folder is emptied
    before = sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*"))
    with pytest.raises(RuntimeError, match=r"freed the weights it started from.*new Self"):
        trainer.run(overwrite=True)
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "run").rglob("*")) == before
    # a new trainer (the weights as given) resumes and reruns as before
    fresh = _sft_trainer(tmp_path / "run", stages)
    assert fresh._base_weights is not None
    fresh.run(overwrite=True)
