"""Early stopping: score the model with a user callable, keep the best state on CPU, count
evaluations without improvement and restore the best state at the end."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["EarlyStopping", "score_model"]


class EarlyStopping:
    """The state machine of one ``train()`` call.

    ``check(model, step)`` records a score (already the same on every process) and returns
    True once ``patience`` evaluations in a row did not improve on the best (``mode`` "min"
    or "max"; a non-finite score never improves). ``finish(model, step)`` loads the best
    state back into ``model`` when it is not the current one and returns the summary metrics.
    """

    def __init__(self, *, mode: str, patience: int, start_step: int) -> None:
        self.mode = mode
        self.patience = patience
        self.best_score: float | None = None
        self.best_step = start_step
        self.best_state: dict[str, Tensor] | None = None
        self.bad = 0
        self.last_eval_step = -1

    def _better(self, score: float) -> bool:
        if not math.isfinite(score):
            return False
        return (
            self.best_score is None
            or (self.mode == "min" and score < self.best_score)
            or (self.mode == "max" and score > self.best_score)
        )

    def check(self, model: nn.Module, score: float, step: int) -> bool:
        """Record ``score`` of ``model`` at ``step``; True when patience is used up."""
        self.last_eval_step = step
        if self._better(score):
            self.best_score, self.best_step, self.bad = score, step, 0
            self.best_state = {
                k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()
            }
        else:
            self.bad += 1
        return self.bad >= self.patience

    def finish(self, model: nn.Module, step: int, *, stopped: bool) -> dict[str, float]:
        """Restore the best state into ``model`` (if it is not the current one); the metrics
        (``stopped``: whether training ended early)."""
        restored = self.best_step != step and self.best_state is not None
        if restored:
            model.load_state_dict(self.best_state)
        self.best_state = None
        return {
            "early_stop_best_score": float(self.best_score)
            if self.best_score is not None
            else float("nan"),
            "early_stop_best_step": float(self.best_step),
            "early_stopped": float(stopped),
            "restored_best": float(restored),
        }


def score_model(
    evaluate: Callable[[nn.Module], Any], model: nn.Module, lm: nn.Module, accelerator: Any
) -> float:
    """``evaluate(model)`` on the main process (``lm`` in eval mode, no gradients), checked to
    be one number and broadcast to every process."""
    score = torch.zeros((), device=accelerator.device, dtype=torch.float64)
    if accelerator.is_main_process:
        was_training = lm.training
        lm.eval()
        try:
            with torch.no_grad():
                value = evaluate(model)
        finally:
            lm.train(was_training)
        if isinstance(value, Tensor):
            if value.numel() != 1:
                raise ValueError(
                    f"early_stopper_eval_module must return one number, got a tensor of "
                    f"shape {tuple(value.shape)}"
                )
            value = value.item()
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(
                "early_stopper_eval_module must return a float (or a one-element tensor), "
                f"got {type(value).__name__}"
            )
        score.fill_(float(value))
    if accelerator.num_processes > 1:
        from accelerate.utils import broadcast

        score = broadcast(score)
    return float(score)
