"""Run under ``torch.distributed.run --nproc_per_node 2`` by test_eft_stage.py: one
``eft_build`` stage judged by the scripted backend into ``OUT/run``; ``rank-<r>.json`` holds
how many responses that rank judged."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch
from test_eft_stage import ScriptedJudgeBackend, run_eft


def main(out: Path) -> None:
    backend = ScriptedJudgeBackend()
    run_eft(out / "run", backend)
    rank = int(os.environ.get("RANK", "0"))
    (out / f"rank-{rank}.json").write_text(json.dumps({"judged": backend.judged}))
    if torch.distributed.is_initialized():  # both ranks meet, then leave the group
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
