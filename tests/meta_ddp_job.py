"""Run under ``torch.distributed.run --nproc_per_node 2`` by test_meta_reward.py: one
``meta_reward_dpo`` stage of the scripted policy into ``OUT/run``; ``rank-<r>.json`` holds
how many meta-judge calls that rank made."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from test_meta_reward import DDP_STAGE, ScriptedPolicy, run_meta


def main(out: Path) -> None:
    policy = ScriptedPolicy()
    run_meta(out / "run", policy, **DDP_STAGE)
    rank = int(os.environ.get("RANK", "0"))
    (out / f"rank-{rank}.json").write_text(json.dumps({"meta_calls": policy.meta_calls}))
    if torch.distributed.is_initialized():  # both ranks meet, then leave the group
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
