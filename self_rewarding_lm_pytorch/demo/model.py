"""The demo's tiny language model: an x-transformers decoder of about 0.8M parameters.

Round 2 of the feasibility study used d=128, 4 layers, 4 heads (head size 32) and a
character vocabulary; :func:`build_demo_model` builds exactly that as a
``TransformerWrapper`` (whose KV cache the generation engine uses).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from x_transformers import Decoder, TransformerWrapper

from .tokenizer import DemoTokenizer

__all__ = ["DEMO_MAX_SEQ_LEN", "DemoModelConfig", "build_demo_model", "count_parameters"]

DEMO_MAX_SEQ_LEN = 128
"""Context length of the demo model; the longest judge sequence of the default task
(a 16-character response) is :func:`~.task.max_sequence_length` = 64 characters."""


@dataclass(frozen=True)
class DemoModelConfig:
    """Size of the demo model (defaults: the feasibility study's round-2 model)."""

    dim: int = 128
    depth: int = 4
    heads: int = 4
    dim_head: int = 32
    max_seq_len: int = DEMO_MAX_SEQ_LEN

    def __post_init__(self) -> None:
        for name in ("dim", "depth", "heads", "dim_head", "max_seq_len"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"DemoModelConfig.{name} must be a positive int, got {value!r}")


def build_demo_model(
    seed: int = 0, config: DemoModelConfig | None = None, *, vocab_size: int | None = None
) -> TransformerWrapper:
    """A freshly initialised demo model; the same ``seed`` gives the same weights.

    The global RNG state is left as it was.  ``vocab_size`` defaults to the
    :class:`~.tokenizer.DemoTokenizer` vocabulary.
    """
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    config = config or DemoModelConfig()
    num_tokens = vocab_size if vocab_size is not None else DemoTokenizer().vocab_size
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return TransformerWrapper(
            num_tokens=num_tokens,
            max_seq_len=config.max_seq_len,
            attn_layers=Decoder(
                dim=config.dim,
                depth=config.depth,
                heads=config.heads,
                attn_dim_head=config.dim_head,
            ),
        )


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
