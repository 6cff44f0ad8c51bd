"""Run under ``torch.distributed.run --nproc_per_node 2`` by test_eft_stage.py: one
``eft_build`` stage judged by the scripted backend into ``OUT/run``; ``rank-<r>.json`` holds
how many responses that rank judged."""

from __future__ import annotations

import sys
from pathlib import Path

from test_eft_stage import ScriptedJudgeBackend, run_eft
from tiny import leave_ranks


def main(out: Path) -> None:
    backend = ScriptedJudgeBackend()
    run_eft(out / "run", backend)
    leave_ranks(out, judged=backend.judged)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
