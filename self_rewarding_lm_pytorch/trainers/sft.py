"""Supervised fine-tuning: next-token NLL on response tokens only (the paper's IFT + EFT
stage that produces M1, Yuan et al. 2024 section 2.1)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from ..data import SFTExample, materialize, to_sft_example
from ..losses import nll_loss
from .base import BaseTrainer
from .config import SFTConfig

__all__ = ["SFTTrainer", "evaluate_nll"]


@torch.no_grad()
def evaluate_nll(trainer: BaseTrainer, examples: list[SFTExample]) -> float:
    """Mean NLL per response token of ``examples`` under the trainer's model (eval mode),
    summed over all processes."""
    loader = trainer.sft_loader(examples, batch_size=trainer.batch_size, shuffle=False)
    was_training = trainer.lm.training
    trainer.lm.eval()
    total = torch.zeros(2, dtype=torch.float64, device=trainer.device)
    try:
        for batch in loader:
            logits = trainer.model(batch["input_ids"], batch["attention_mask"])
            n = batch["response_mask"].sum()
            loss = nll_loss(logits, batch["input_ids"], batch["response_mask"])
            total += torch.stack([loss.double() * n, n.double()])
    finally:
        trainer.lm.train(was_training)
    # accelerate pads the last batch of each process by repeating samples; the
    # repetition is small and only affects the validation average
    total = trainer._reduce_sum(total)
    return float(total[0] / total[1])


class SFTTrainer(BaseTrainer):
    """Supervised fine-tuning on ``(prompt, response)`` examples.

    The loss is the mean negative log-likelihood of the response tokens
    (:func:`~self_rewarding_lm_pytorch.losses.nll_loss`); prompt tokens are context only.
    Dataset items may be anything :func:`~self_rewarding_lm_pytorch.data.to_sft_example`
    accepts (the seed's ``(seq, prompt_len)`` tuples, dicts, :class:`SFTExample`); they are
    read once when the trainer is built.

    Args (beyond :class:`~self_rewarding_lm_pytorch.trainers.base.BaseTrainer`'s):
        train_dataset: the training examples.
        valid_dataset: optional; its response NLL is logged as ``valid_nll`` every
            ``eval_every`` steps and at the end.
        config: an :class:`~self_rewarding_lm_pytorch.trainers.config.SFTConfig` (its
            fields may also be given as keywords; ``pad_id``: trailing pad tokens of
            dataset items are stripped). Defaults follow the paper's SFT: learning rate
            5.5e-6 decaying (cosine) to 1.1e-6.
    """

    desc = "sft"
    config_class = SFTConfig

    def __init__(
        self,
        model: nn.Module,
        *,
        train_dataset: Any,
        valid_dataset: Any = None,
        config: SFTConfig | None = None,
        **kwargs: Any,
    ) -> None:
        config = self._resolve_config(config, self._take_overrides(kwargs))
        convert: Callable[[Any], SFTExample] = partial(to_sft_example, pad_id=config.pad_id)
        self.train_examples = materialize(train_dataset, convert, name="train_dataset")
        self.valid_examples = (
            materialize(valid_dataset, convert, name="valid_dataset")
            if valid_dataset is not None
            else None
        )
        super().__init__(model, config=config, **kwargs)

    def _num_items(self) -> int:
        return len(self.train_examples)

    def _epoch_loader(self, epoch: int) -> Iterable[dict[str, Tensor]]:
        return self.sft_loader(self.train_examples, batch_size=self.batch_size, shuffle=True)

    def _count(self, batch: dict[str, Tensor]) -> int:
        return int(batch["response_mask"].sum())

    def _compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        logits = self.model(batch["input_ids"], batch["attention_mask"])
        return nll_loss(logits, batch["input_ids"], batch["response_mask"]), {}

    def _evaluate(self) -> dict[str, float]:
        if not self.valid_examples:
            return {}
        return {"valid_nll": evaluate_nll(self, self.valid_examples)}
