"""Run under ``torch.distributed.run --nproc_per_node 2`` (or alone) by test_distributed.py.

Writes, into OUT: the pipeline run (pairs sharded across ranks), ``rank-<r>.json`` (the
world size and the prompts this rank judged), the parameters after one DPO step on a
fixed global batch of 4 pairs, and a prompt-generation run whose prompts feed a DPO
stage (``pg/``). With ``--expect-busy`` the run folder's lock is held by another
process: each rank records the refusal in ``refused-rank-<r>.txt`` and exits 0.
"""

from __future__ import annotations

import json
import sys

import torch
from safetensors.torch import save_file
from tiny import char_tokenizer, make_trainer, scripted_score, tiny_model

from self_rewarding_lm_pytorch.pipeline import (
    PreferenceStage,
    PromptGenerationStage,
    SelfRewardingTrainer,
    preference_example,
)
from self_rewarding_lm_pytorch.store import RunDirError
from self_rewarding_lm_pytorch.trainers import DPOTrainer


def _shut_down(acc) -> None:
    """Both ranks meet, then leave the process group: a rank that exits while the other
    still talks to it can abort in gloo's threads at interpreter exit."""
    acc.wait_for_everyone()
    if torch.distributed.is_initialized():  # the job also runs as one plain process
        torch.distributed.destroy_process_group()


def length_judge(prompt: str, response: str) -> float:
    return float(len(response.split()))


def prompt_generation_run(out: str) -> None:
    from test_prompts import WORDS, TaskBigramLM, WordTokenizer

    model = TaskBigramLM()
    model.table.requires_grad_(True)
    seeds = [" ".join(WORDS[i : i + 6]) for i in range(0, 30, 3)]
    SelfRewardingTrainer(
        model,
        tokenizer=WordTokenizer(),
        prompt_dataset=seeds,
        judges={"length": length_judge},
        stages=[
            PromptGenerationStage(num_prompts=5, max_new_tokens=8, max_attempts=200),
            PreferenceStage(
                kind="external_reward_dpo",
                judge="length",
                prompts="generated",
                num_preference_pairs=3,
                max_new_tokens=8,
                chunk_size=2,
                trainer=dict(batch_size=2),
            ),
        ],
        checkpoints_folder=f"{out}/pg",
        accelerate_kwargs=dict(cpu=True),
        progress=False,
    ).run()


if __name__ == "__main__":
    torch.set_num_threads(1)
    out = sys.argv[1]
    trainer = make_trainer(f"{out}/run", num_pairs=10, max_new_tokens=5, chunk_size=2)
    acc = trainer.accelerator
    judged: list[str] = []

    def recording_judge(prompt: str, response: str) -> float | None:
        judged.append(prompt)
        return scripted_score(prompt, response)

    trainer.judges["scripted"] = recording_judge
    if "--expect-busy" in sys.argv:
        try:
            trainer.run()
        except RunDirError as exc:
            with open(f"{out}/refused-rank-{acc.process_index}.txt", "w") as f:
                f.write(str(exc))
        _shut_down(acc)
        sys.exit(0)
    trainer.run()
    with open(f"{out}/rank-{acc.process_index}.json", "w") as f:
        json.dump({"world": acc.num_processes, "judged": sorted(set(judged))}, f)

    tok = char_tokenizer()
    pairs = [preference_example(f"q{i}", "good" * (i + 1), "bad" + "x" * i, tok) for i in range(4)]
    model = tiny_model(seed=3)
    if acc.is_main_process:
        save_file(
            {k: v.clone().contiguous() for k, v in model.state_dict().items()},
            f"{out}/before_step.safetensors",
        )
    dpo = DPOTrainer(
        model,
        train_dataset=pairs,
        batch_size=4 // acc.num_processes,
        num_train_steps=1,
        start_learning_rate=1e-2,
        end_learning_rate=1e-2,
        max_grad_norm=None,
        accelerator=acc,
        seed=0,
    )
    dpo.train()
    if acc.is_main_process:
        state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
        save_file(state, f"{out}/after_step.safetensors")
    acc.wait_for_everyone()
    prompt_generation_run(out)
    _shut_down(acc)
