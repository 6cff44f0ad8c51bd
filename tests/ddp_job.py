"""Run under ``torch.distributed.run --nproc_per_node 2`` (or alone) by test_distributed.py.

Writes, into OUT: the pipeline run (pairs sharded across ranks) and the parameters after
one DPO step on a fixed global batch of 4 pairs.
"""

from __future__ import annotations

import sys

import torch
from safetensors.torch import save_file
from tiny import char_tokenizer, make_trainer, tiny_model

from self_rewarding_lm_pytorch.pipeline import preference_example
from self_rewarding_lm_pytorch.trainers import DPOTrainer

if __name__ == "__main__":
    torch.set_num_threads(1)
    out = sys.argv[1]
    trainer = make_trainer(f"{out}/run", num_pairs=10, max_new_tokens=5, chunk_size=2)
    trainer.run()
    acc = trainer.accelerator

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
