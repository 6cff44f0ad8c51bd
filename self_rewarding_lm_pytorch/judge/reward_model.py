"""A reward model as a judge: token ids in, one score (or class distribution) per sequence."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor, nn

from ..models import unwrap_model, wrap_tokenizer
from ..utils import eval_mode
from .base import JudgeBase, JudgeResult
from .templates import _PROMPT_EXAMPLE, _compile, _render

__all__ = ["RewardModelJudge"]


class RewardModelJudge(JudgeBase):
    """Score with a reward model: token ids ``(B, T)`` -> scores.

    ``head="scalar"``: the model returns ``(B,)``, ``(B, 1)`` (one score per sequence)
    or ``(B, T)`` / ``(B, T, 1)`` (a score per position; the last token's is used).
    ``head="classes"``: the model returns class logits ``(B, C)`` or ``(B, T, C)``; the
    score is the expected class value ``sum_c softmax(logits)_c * class_values[c]``
    (``class_values`` defaults to ``0..C-1``). Outputs with ``.logits`` or tuples are
    unwrapped. Sequences are batched only with others of the same length, so no padding
    ever reaches the model and any module (pooling, bidirectional) is scored exactly.

    The text fed to the model is ``template`` (sandboxed Jinja2 with ``{{ prompt }}`` and
    ``{{ response }}``) encoded with ``tokenizer.encode``.
    """

    def __init__(
        self,
        model: nn.Module,
        tokenizer: Any,
        *,
        template: str = "{{ prompt }}\n{{ response }}",
        head: Literal["scalar", "classes"] = "scalar",
        class_values: Sequence[float] | None = None,
        batch_size: int = 16,
        max_seq_len: int | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if head not in ("scalar", "classes"):
            raise ValueError(f"head must be 'scalar' or 'classes', got {head!r}")
        if class_values is not None and head != "classes":
            raise ValueError("class_values only applies to head='classes'")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        self.model = model
        self.tokenizer = wrap_tokenizer(tokenizer)
        self.template = template
        self._compiled = _compile(
            template, "template", {"prompt", "response"}, {"response"}, _PROMPT_EXAMPLE
        )
        # fail at construction, not mid-run, for templates that break the sandbox
        _render(self._compiled, "template", prompt="x", response="y")
        self.head = head
        self.class_values = None if class_values is None else [float(v) for v in class_values]
        self.batch_size = batch_size
        self.max_seq_len = (
            max_seq_len if max_seq_len is not None else getattr(model, "max_seq_len", None)
        )

    def _device(self) -> torch.device:
        for p in self.model.parameters():
            return p.device
        return torch.device("cpu")

    def _call(self, input_ids: Tensor) -> Tensor:
        m = unwrap_model(self.model)
        if any(c.__name__ == "PreTrainedModel" for c in type(m).__mro__):
            out = self.model(input_ids=input_ids)
        else:
            out = self.model(input_ids)
        if hasattr(out, "logits"):
            out = out.logits
        elif isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
            out = out[0]
        if not isinstance(out, Tensor):
            raise TypeError(
                f"the reward model returned {type(out).__name__}; expected a tensor of scores "
                "(B,), (B, 1), (B, T, 1) or class logits (B, C) / (B, T, C)"
            )
        return out.float()

    def _reduce(self, out: Tensor, batch: int, seq: int) -> tuple[Tensor, Tensor | None]:
        """Per-row scores ``(B,)`` and, for classes, the class probabilities ``(B, C)``."""
        shape = tuple(out.shape)
        if out.shape[0] != batch:
            raise ValueError(f"the reward model returned shape {shape} for a batch of {batch}")
        if self.head == "scalar":
            if out.ndim == 3 and out.shape[1:] == (seq, 1):
                return out[:, -1, 0], None
            if out.ndim == 2 and out.shape[1] == 1:
                return out[:, 0], None
            if out.ndim == 2 and out.shape[1] == seq:
                return out[:, -1], None
            if out.ndim == 1:
                return out, None
            raise ValueError(
                f"head='scalar' expects reward model outputs (B,), (B, 1), (B, T) or (B, T, 1) "
                f"with B={batch}, T={seq}; got {shape} (use head='classes' for class logits)"
            )
        if out.ndim == 3 and out.shape[1] == seq:
            out = out[:, -1]
        if out.ndim != 2:
            raise ValueError(f"head='classes' expects logits (B, C) or (B, T, C); got {shape}")
        n = out.shape[1]
        values = (
            self.class_values if self.class_values is not None else [float(c) for c in range(n)]
        )
        if len(values) != n:
            raise ValueError(
                f"the reward model returned {n} classes but class_values has {len(values)}; "
                "pass one value per class"
            )
        probs = torch.softmax(out, dim=-1)
        return probs @ torch.tensor(values, dtype=probs.dtype, device=probs.device), probs

    @torch.no_grad()
    def _score(
        self, prompts: list[str], responses: list[str], generator: torch.Generator | int | None
    ) -> list[JudgeResult]:
        encoded = []
        for i, (p, r) in enumerate(zip(prompts, responses)):
            ids = self.tokenizer.encode(_render(self._compiled, "template", prompt=p, response=r))
            if not ids:
                raise ValueError(f"candidate {i}: the reward model input encodes to no tokens")
            if self.max_seq_len is not None and len(ids) > self.max_seq_len:
                raise ValueError(
                    f"candidate {i}: reward model input is {len(ids)} tokens, more than its "
                    f"context of {self.max_seq_len}; shorten the response or the template"
                )
            encoded.append(ids)
        by_len: dict[int, list[int]] = {}
        for i, ids in enumerate(encoded):
            by_len.setdefault(len(ids), []).append(i)
        results: list[JudgeResult | None] = [None] * len(encoded)
        device = self._device()
        with eval_mode(self.model):
            for seq, idx in by_len.items():
                for s in range(0, len(idx), self.batch_size):
                    part = idx[s : s + self.batch_size]
                    x = torch.tensor([encoded[i] for i in part], dtype=torch.long, device=device)
                    scores, probs = self._reduce(self._call(x), len(part), seq)
                    for b, i in enumerate(part):
                        value = float(scores[b])
                        ok = math.isfinite(value)
                        dist = None
                        if probs is not None:
                            values = self.class_values or list(range(probs.shape[1]))
                            dist = {v: float(p) for v, p in zip(values, probs[b])}
                        results[i] = JudgeResult(
                            score=value if ok else None,
                            sample_scores=[value if ok else None],
                            failures=[None if ok else f"the reward model returned {value}"],
                            score_distribution=dist,
                        )
        return [r for r in results if r is not None]
