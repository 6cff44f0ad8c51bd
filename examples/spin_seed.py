"""The seed README's standalone SPIN example, verbatim (the code below is unchanged).

A 6-layer, 512-dim x-transformers decoder self-plays on 100 random SFT sequences
(prompt length 1, real response = the next 15 tokens), 2 SPIN cycles, on CPU or GPU.

    python examples/spin_seed.py
"""
# ruff: noqa: I001
# fmt: off

import torch

from self_rewarding_lm_pytorch import (
    SPINTrainer,
    create_mock_dataset
)

from x_transformers import TransformerWrapper, Decoder

transformer = TransformerWrapper(
    num_tokens = 256,
    max_seq_len = 1024,
    attn_layers = Decoder(
        dim = 512,
        depth = 6,
        heads = 8
    )
)

sft_dataset = create_mock_dataset(100, lambda: (torch.randint(0, 256, (256,)), torch.tensor(1)))

spin_trainer = SPINTrainer(
    transformer,
    max_seq_len = 16,
    sft_dataset = sft_dataset,
    spin_λ = 0.1,
    checkpoint_every = 100
)

spin_trainer()
