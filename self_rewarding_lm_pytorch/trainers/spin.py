"""Self-Play fIne-tuNing (Chen et al. 2024, Algorithm 1).

Each cycle (one epoch of this trainer), with the model frozen at the cycle's start as
the opponent / reference ``p_t``:

1. sample the model's own response ``y'`` to every SFT prompt once (temperature and
   top-p as configured; ``max_seq_len`` bounds prompt + response);
2. score the real response ``y`` (the SFT target, truncated to ``max_seq_len``) and
   ``y'`` under ``p_t`` once, in eval mode without gradients;
3. train one pass over the pairs with the SPIN loss (Eq. 4.7,
   :func:`~self_rewarding_lm_pytorch.losses.spin_loss`): real as chosen, generated as
   rejected.

The seed's keyword arguments (``sft_dataset``, ``max_seq_len``, ``spin_λ``,
``checkpoint_every``, ``checkpoint_folder``, ``spin_kwargs``, ...) work as written.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..data import PreferenceExample, SFTExample, materialize, to_sft_example
from ..generation import GenerationConfig, generate, response_budget
from ..losses import SPIN_LOSS_TYPES, PreferenceLossOutput, spin_loss
from ..models import wrap_model
from .dpo import PreferenceTrainer
from .sft import evaluate_nll

__all__ = ["SPINTrainer"]


class SPINTrainer(PreferenceTrainer):
    """SPIN on an SFT dataset (see the module docstring).

    Args:
        model: the policy.
        sft_dataset: SFT items (the seed's ``(seq, prompt_len)`` tuples, dicts,
            :class:`~self_rewarding_lm_pytorch.data.SFTExample`); read once.
            ``train_sft_dataset`` is accepted as an alias.
        max_seq_len: bound on prompt + response, for real and generated responses.
        valid_sft_dataset: optional; the NLL of its (truncated) responses is logged as
            ``valid_nll`` every ``valid_every`` steps (if given) and at the end.
        epochs: number of SPIN cycles (one pass over the data each).
        learning_rate_num_decay_steps: linear decay from start to end learning rate over
            this many optimizer steps, then constant (the seed's schedule).
        temperature, top_p, top_k: sampling of the opponent's responses
            (``filter_kwargs=dict(thres=p)`` is the seed's spelling of ``top_p``).
        pad_id: trailing ``pad_id`` tokens of dataset items are stripped (seed: ``-1``).
        eos_id: end-of-sequence id: generation stops there and the id is kept at the end
            of the generated response, so the model learns when to stop.
        checkpoint_every, checkpoint_folder: write a checkpoint every N steps there.
        spin_λ: the SPIN regulariser lambda; ``spin_kwargs`` may give ``λ``/``lam`` and
            ``loss_type`` ("sigmoid" or "hinge").
        generate_batch_size: prompts per ``generate`` call (default ``max(batch_size, 32)``).
        seed: seeds the global RNG, data order and sampling.

    Other keyword arguments are those of :class:`~self_rewarding_lm_pytorch.trainers.base.BaseTrainer`.
    """

    desc = "spin"
    pos_name = "real"
    neg_name = "generated"

    def __init__(
        self,
        model: nn.Module,
        *,
        sft_dataset: Any = None,
        max_seq_len: int,
        train_sft_dataset: Any = None,
        valid_sft_dataset: Any = None,
        valid_every: int | None = None,
        batch_size: int = 16,
        grad_accum_steps: int = 2,
        epochs: int = 2,
        start_learning_rate: float = 1e-6,
        end_learning_rate: float = 1e-7,
        learning_rate_num_decay_steps: int = 1000,
        dropout: float | None = 0.0,
        weight_decay: float = 0.0,
        temperature: float = 0.7,
        top_p: float = 0.9,
        top_k: int = 0,
        filter_kwargs: dict[str, Any] | None = None,
        pad_id: int | None = -1,
        eos_id: int | None = None,
        checkpoint_every: int | None = None,
        checkpoint_folder: str | Path = "./spin-checkpoints",
        spin_λ: float = 0.1,  # the seed's keyword
        spin_kwargs: dict[str, Any] | None = None,
        generate_batch_size: int | None = None,
        max_grad_norm: float | None = 1.0,
        accelerator: Any = None,
        accelerate_kwargs: dict[str, Any] | None = None,
        output_dir: str | Path | None = None,
        seed: int | None = None,
        **kwargs: Any,
    ) -> None:
        if sft_dataset is not None and train_sft_dataset is not None:
            raise ValueError("pass sft_dataset or train_sft_dataset (an alias), not both")
        sft_dataset = sft_dataset if sft_dataset is not None else train_sft_dataset
        if sft_dataset is None:
            raise ValueError("SPINTrainer needs sft_dataset: the SFT examples to self-play on")
        if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
            raise ValueError(f"max_seq_len must be an int >= 2, got {max_seq_len!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
        if not math.isfinite(temperature) or temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if filter_kwargs:
            unknown = set(filter_kwargs) - {"thres"}
            if unknown:
                raise ValueError(
                    f"filter_kwargs only supports 'thres' (the seed's top-p threshold), got "
                    f"{sorted(unknown)}; use top_p / top_k instead"
                )
            top_p = float(filter_kwargs["thres"])
        if not 0 < top_p <= 1:
            raise ValueError(f"top_p must lie in (0, 1], got {top_p}")
        lam, loss_type = float(spin_λ), "sigmoid"
        if spin_kwargs:
            allowed = {"λ", "lam", "loss_type"}
            unknown = set(spin_kwargs) - allowed
            if unknown:
                raise ValueError(
                    f"unsupported spin_kwargs {sorted(unknown)}; supported: {sorted(allowed)}"
                )
            lam = float(spin_kwargs.get("λ", spin_kwargs.get("lam", lam)))
            loss_type = spin_kwargs.get("loss_type", loss_type)
        if loss_type not in SPIN_LOSS_TYPES:
            raise ValueError(
                f"unknown SPIN loss_type {loss_type!r}; choose one of {', '.join(SPIN_LOSS_TYPES)}"
            )
        z = torch.zeros(1)
        spin_loss(z, z, z, z, lam=lam, loss_type=loss_type)  # validates lam
        if generate_batch_size is not None and (
            isinstance(generate_batch_size, bool)
            or not isinstance(generate_batch_size, int)
            or generate_batch_size < 1
        ):
            raise ValueError(
                f"generate_batch_size must be a positive int, got {generate_batch_size!r}"
            )

        convert = partial(to_sft_example, pad_id=pad_id)
        sft = materialize(sft_dataset, convert, name="sft_dataset")
        limit = min(max_seq_len, getattr(model, "max_seq_len", None) or max_seq_len)
        for i, ex in enumerate(sft):
            if ex.prompt_len >= limit:
                raise ValueError(
                    f"sft_dataset[{i}]: its prompt of {ex.prompt_len} tokens leaves no room for a "
                    f"response within max_seq_len={limit}; raise max_seq_len or shorten "
                    "the prompt"
                )
        valid = (
            materialize(valid_sft_dataset, convert, name="valid_sft_dataset")
            if valid_sft_dataset is not None
            else None
        )
        super().__init__(
            model,
            pad_id=pad_id,
            batch_size=batch_size,
            grad_accum_steps=grad_accum_steps,
            num_epochs=epochs,
            start_learning_rate=start_learning_rate,
            end_learning_rate=end_learning_rate,
            lr_schedule="linear",
            num_decay_steps=learning_rate_num_decay_steps,
            weight_decay=weight_decay,
            max_grad_norm=max_grad_norm,
            dropout=dropout,
            max_seq_len=max_seq_len,
            eval_every=valid_every,
            accelerator=accelerator,
            accelerate_kwargs=accelerate_kwargs,
            output_dir=output_dir,
            checkpoint_every=checkpoint_every,
            checkpoint_dir=checkpoint_folder if checkpoint_every is not None else None,
            seed=seed,
            **kwargs,
        )
        self.sft_examples: list[SFTExample] = sft
        self.valid_examples = valid
        self.lam = lam
        self.loss_type = loss_type
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.top_k = int(top_k)
        self.eos_id = eos_id
        self.generate_batch_size = generate_batch_size or max(batch_size, 32)
        self.spin_max_seq_len = max_seq_len
        self.cycle = 0
        self.cycle_finish_reasons: list[str] = []
        # pairs / reference of the current cycle; rebuilt at the start of every cycle
        self.pairs = []

    # ------------------------------------------------------------------ self-play data
    def _budget(self, ex: SFTExample) -> int:
        assert self.max_seq_len is not None
        return self.max_seq_len - ex.prompt_len

    @torch.no_grad()
    def generate_responses(self) -> tuple[list[list[int]], list[str]]:
        """Sample one response per SFT prompt from the model as it is now (eval mode).

        Prompts are split across processes and the results gathered, so every process
        ends with the full list. Returns (responses, finish reasons).
        """
        n = len(self.sft_examples)
        rank, world = self.accelerator.process_index, self.num_processes
        mine = list(range(rank, n, world))
        generator = None
        if self.seed is not None:
            generator = torch.Generator(device=self.lm.device)
            generator.manual_seed(self.seed * 1_000_003 + self.cycle * 1_009 + rank)
        was_training = self.lm.training
        self.lm.eval()
        local: list[tuple[int, list[int], str]] = []
        try:
            for start in range(0, len(mine), self.generate_batch_size):
                chunk = mine[start : start + self.generate_batch_size]
                exs = [self.sft_examples[i] for i in chunk]
                # each row its own budget: max_seq_len and the model's context both bound
                # prompt + response (one rule, response_budget)
                budgets = [
                    response_budget(
                        ex.prompt_len,
                        self._budget(ex),
                        self.lm.max_seq_len,
                        cap=True,
                        where=f"sft_dataset[{i}]: its prompt",
                        fix="shorten the prompt",
                    )
                    for i, ex in zip(chunk, exs)
                ]
                config = GenerationConfig(
                    max_new_tokens=max(budgets),
                    temperature=self.temperature,
                    top_p=self.top_p,
                    top_k=self.top_k,
                    eos_token_id=self.eos_id,
                )
                # the bare module, so a DDP wrapper does not hide its KV cache
                bare = wrap_model(self.unwrapped_model(), max_seq_len=self.lm.max_seq_len)
                out = generate(
                    bare,
                    [ex.prompt_ids for ex in exs],
                    config,
                    generator=generator,
                    max_new_tokens_per_prompt=budgets,
                )
                for i, seq, reason, budget in zip(
                    chunk, out.sequences, out.finish_reasons, budgets
                ):
                    if len(seq) > budget:  # the chunk ran to its longest budget
                        seq, reason = list(seq)[:budget], "length"
                    seq = list(seq)
                    if reason == "eos" and self.eos_id is not None and len(seq) < budget:
                        seq.append(int(self.eos_id))
                    local.append((i, seq, reason))
        finally:
            self.lm.train(was_training)
        if world > 1:
            from accelerate.utils import gather_object

            local = gather_object(local)
        responses: list[list[int] | None] = [None] * n
        reasons = [""] * n
        for i, seq, reason in local:
            responses[i], reasons[i] = seq, reason
        missing = [i for i, r in enumerate(responses) if r is None]
        if missing:
            raise RuntimeError(f"internal error: no generation for SFT examples {missing[:8]}")
        for i, r in enumerate(responses):
            if not r:
                raise RuntimeError(
                    f"the model generated an empty response for sft_dataset[{i}]; set eos_id so "
                    "that an immediate stop is kept as the EOS token"
                )
        return responses, reasons  # type: ignore[return-value]

    def _start_cycle(self) -> None:
        generated, reasons = self.generate_responses()
        pairs = []
        for ex, gen in zip(self.sft_examples, generated):
            real = ex.response_ids[: self._budget(ex)]
            pairs.append(PreferenceExample(list(ex.prompt_ids), real, gen))
        self.pairs = pairs
        self.cycle_finish_reasons = reasons
        # the model is still the cycle-start model: it is the reference for this cycle
        self.ref_logps = self.compute_reference_logps(pairs)
        same = sum(p.chosen_ids == p.rejected_ids for p in pairs) / len(pairs)
        self._log(
            {
                "step": self.step,
                "cycle": self.cycle,
                "generated_len": sum(len(p.rejected_ids) for p in pairs) / len(pairs),
                "generated_eos_fraction": sum(r == "eos" for r in reasons) / len(reasons),
                "generated_equals_real_fraction": same,
            }
        )

    # ------------------------------------------------------------------ trainer hooks
    def _num_items(self) -> int:
        return len(self.sft_examples)

    def _epoch_loader(self, epoch: int) -> Iterable[dict[str, Tensor]]:
        self.cycle = epoch
        self._start_cycle()
        return self._pair_loader()

    def _preference_loss(
        self, pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor
    ) -> PreferenceLossOutput:
        return spin_loss(pc, pr, rc, rr, lam=self.lam, loss_type=self.loss_type)

    def _evaluate(self) -> dict[str, float]:
        if not self.valid_examples:
            return {}
        return {"valid_nll": evaluate_nll(self, self.valid_examples)}

    def train(self, overwrite_checkpoints: bool = True) -> dict[str, float]:
        """Run ``epochs`` SPIN cycles; returns the final metrics."""
        out = super().train(overwrite_checkpoints=overwrite_checkpoints)
        self.accelerator.print("self-play training complete")
        return out
