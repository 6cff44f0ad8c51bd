"""A run directory written before the library gained a stage setting resumes when the
setting is at its default (the earlier run did what the default does), and is refused when
the resuming run sets it to something else."""

from __future__ import annotations

import pytest

from self_rewarding_lm_pytorch.pipeline import SFTStage
from self_rewarding_lm_pytorch.pipeline.rundir import (
    check_fingerprints,
    stage_defaults,
    stage_fingerprint,
)
from self_rewarding_lm_pytorch.store import RunDirError


def _fingerprint(stage: SFTStage) -> dict:
    return stage_fingerprint(
        stage,
        run={"seed": 0},
        datasets={"sft": [{"prompt": "a", "response": "b"}]},
        models={},
        judges={},
        reward_config=None,
        oracle=None,
        early_stopper_eval_module=None,
        preference_max_seq_len=64,
    )


def _state_written_before(key: str, stage: SFTStage) -> dict:
    """The state of a finished run whose library had no stage setting ``key``."""
    old = _fingerprint(stage)
    del old["settings"][key]
    return {"plan": ["01-sft"], "finished": [{"stage": "01-sft"}], "fingerprints": {"01-sft": old}}


def test_a_setting_added_later_at_its_default_resumes(tmp_path):
    stage = SFTStage(datasets=["sft"])  # init: "previous", the default
    state = _state_written_before("init", stage)
    check_fingerprints(state, [_fingerprint(stage)], [tmp_path / "01-sft"], [stage_defaults(stage)])
    assert state["fingerprints"]["01-sft"]["settings"]["init"] == "previous"  # now recorded


def test_a_setting_added_later_but_changed_is_refused(tmp_path):
    state = _state_written_before("init", SFTStage(datasets=["sft"]))
    changed = SFTStage(datasets=["sft"], init="base")
    with pytest.raises(RunDirError, match=r'init: <unset> -> "base"'):
        check_fingerprints(
            state, [_fingerprint(changed)], [tmp_path / "01-sft"], [stage_defaults(changed)]
        )
