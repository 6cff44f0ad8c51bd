"""The seed README's examples: verbatim self-rewarding run is refused before training with
a clear error; the custom RewardConfig example parses its rating."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from self_rewarding_lm_pytorch import RewardConfig

EXAMPLES = Path(__file__).parent.parent / "examples"


def test_seed_self_reward_example_verbatim_stops_with_clear_error(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    start = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / "seed_self_reward_verbatim.py")],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        timeout=600,
    )
    assert time.monotonic() - start < 600
    err = done.stderr.decode()
    assert done.returncode != 0
    last = [line for line in err.splitlines() if line.startswith("ValueError")][-1]
    assert "the judge prompt" in last and "context of 1024" in last, last
    assert "stage 02-self-reward-dpo" in last and "on_too_long" in last, last
    # the judge prompt cannot fit whatever the response: refused before SFT trains
    assert not (tmp_path / "checkpoints" / "01-sft" / "checkpoint").exists()


def test_seed_custom_reward_config_example():
    config = RewardConfig(
        prompt_template="""
        Pretty please rate the following user prompt and response
        User: {{ prompt }}
        Response: {{ response }}

        Format your score as follows:
        Rating: <rating as integer from 0 - 10>
        """,
        reward_regex_template="""
        Rating: {{ reward }}
        """,
    )
    rendered = config.render("What is 2+2?", "4")
    assert "User: What is 2+2?" in rendered and "Response: 4" in rendered
    assert config.parse("I think this is decent. Rating: 7 overall, well done") == 7.0
    assert config.parse("no rating given") is None
