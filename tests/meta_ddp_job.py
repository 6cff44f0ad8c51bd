"""Run under ``torch.distributed.run --nproc_per_node 2`` by test_meta_reward.py: one
``meta_reward_dpo`` stage of the scripted policy into ``OUT/run``; ``rank-<r>.json`` holds
how many meta-judge calls that rank made."""

from __future__ import annotations

import sys
from pathlib import Path

from test_meta_reward import DDP_STAGE, ScriptedPolicy, run_meta
from tiny import leave_ranks


def main(out: Path) -> None:
    policy = ScriptedPolicy()
    run_meta(out / "run", policy, **DDP_STAGE)
    leave_ranks(out, meta_calls=policy.meta_calls)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
