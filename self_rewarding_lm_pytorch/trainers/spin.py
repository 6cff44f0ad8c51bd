"""Self-Play fIne-tuNing (Chen et al. 2024, Algorithm 1).

Each SPIN iteration ``t``, with the model frozen at the iteration's start as the
opponent / reference ``p_t``:

1. sample the model's own response ``y'`` to every SFT prompt once (temperature and
   top-p as configured; ``max_seq_len`` bounds prompt + response);
2. build the training pairs: real response ``y`` (the SFT target, truncated to
   ``max_seq_len``) as chosen, ``y'`` as rejected; with ``schedule="official"`` and
   ``t >= 1`` the previous iteration's pairs are added (current + previous synthetic
   data, as the official code's ``dataset_mixer`` does from iteration 1 on);
3. score all pairs under ``p_t`` once, in eval mode without gradients;
4. train ``epochs_per_iteration`` passes over these pairs with the SPIN loss (Eq. 4.7,
   :func:`~self_rewarding_lm_pytorch.losses.spin_loss`).

``schedule="official"`` (default) follows uclaml/SPIN (``configs/config_iter*.yaml``:
``num_train_epochs: 3`` per iteration, iteration ``t`` mixes ``SPIN_iter{t-1}`` and
``SPIN_iter{t}``). ``schedule="per_epoch"`` is the former schedule of this library: fresh
generations every epoch, one pass over them, no mixing.

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

__all__ = ["SPIN_SCHEDULES", "SPINTrainer"]


SPIN_SCHEDULES: tuple[str, ...] = ("official", "per_epoch")
_OFFICIAL_EPOCHS_PER_ITERATION = 3  # uclaml/SPIN configs/config*.yaml: num_train_epochs


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def _schedule_epochs(
    schedule: str, epochs: int | None, iterations: int | None, epochs_per_iteration: int | None
) -> tuple[int, int]:
    """``(total epochs, epochs per iteration)`` from the SPIN schedule settings."""
    if schedule not in SPIN_SCHEDULES:
        raise ValueError(
            f"unknown SPIN schedule {schedule!r}; choose 'official' (generate once per "
            "iteration, several epochs on it, mixed with the previous iteration's data) or "
            "'per_epoch' (generate anew every epoch)"
        )
    if schedule == "per_epoch":
        if epochs_per_iteration not in (None, 1):
            raise ValueError(
                f"schedule='per_epoch' trains one epoch per iteration, got "
                f"epochs_per_iteration={epochs_per_iteration!r}; drop it or use "
                "schedule='official'"
            )
        per_iteration = 1
    elif epochs_per_iteration is None:
        per_iteration = _OFFICIAL_EPOCHS_PER_ITERATION
    else:
        per_iteration = _positive_int("epochs_per_iteration", epochs_per_iteration)
    if epochs is not None and iterations is not None:
        raise ValueError(
            "pass epochs (passes in all) or iterations (SPIN iterations of "
            "epochs_per_iteration epochs each), not both"
        )
    if iterations is not None:
        return _positive_int("iterations", iterations) * per_iteration, per_iteration
    return (2 if epochs is None else _positive_int("epochs", epochs)), per_iteration


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
        epochs: passes over the training pairs in all (the seed's meaning; default 2);
            with ``schedule="official"`` a new iteration starts every
            ``epochs_per_iteration`` epochs (the last one may be shorter).
        iterations: instead of ``epochs``: the number of SPIN iterations, i.e.
            ``epochs = iterations * epochs_per_iteration``.
        schedule: ``"official"`` (default): generate once per iteration, train
            ``epochs_per_iteration`` epochs on it, and from the second iteration on train
            on the current and the previous iteration's generations together.
            ``"per_epoch"``: generate anew every epoch and train one pass on those pairs
            only (one epoch per iteration).
        epochs_per_iteration: epochs per iteration for ``schedule="official"`` (default
            3, the official configs' ``num_train_epochs``); must be 1 for ``"per_epoch"``.
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
        epochs: int | None = None,
        iterations: int | None = None,
        schedule: str = "official",
        epochs_per_iteration: int | None = None,
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
        epochs, per_iteration = _schedule_epochs(schedule, epochs, iterations, epochs_per_iteration)
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
        self.schedule = schedule
        self.epochs_per_iteration = per_iteration
        self.mix_previous_iteration = schedule == "official"
        self.cycle = 0  # the current SPIN iteration
        self.cycle_finish_reasons: list[str] = []
        # pairs / reference of the current iteration; rebuilt at the start of every one
        self.pairs = []
        self.generated_pairs: list[PreferenceExample] = []  # this iteration's own pairs
        self._started_iteration: int | None = None

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

    def _start_iteration(self, iteration: int) -> None:
        self.cycle = iteration
        generated, reasons = self.generate_responses()
        current = []
        for ex, gen in zip(self.sft_examples, generated):
            real = ex.response_ids[: self._budget(ex)]
            current.append(PreferenceExample(list(ex.prompt_ids), real, gen))
        previous = self.generated_pairs if self.mix_previous_iteration else []
        self.generated_pairs = current
        self.pairs = current + previous
        self.cycle_finish_reasons = reasons
        # the model is still the iteration-start model: the reference of all its pairs
        self.ref_logps = self.compute_reference_logps(self.pairs)
        self._started_iteration = iteration
        same = sum(p.chosen_ids == p.rejected_ids for p in current) / len(current)
        self._log(
            {
                "step": self.step,
                "cycle": self.cycle,
                "train_pairs": len(self.pairs),
                "generated_len": sum(len(p.rejected_ids) for p in current) / len(current),
                "generated_eos_fraction": sum(r == "eos" for r in reasons) / len(reasons),
                "generated_equals_real_fraction": same,
            }
        )

    # ------------------------------------------------------------------ trainer hooks
    def _num_items(self) -> int:
        return len(self.sft_examples)

    def _iteration_of(self, epoch: int) -> int:
        return epoch // self.epochs_per_iteration

    def _total_steps(self) -> int:
        if self.num_train_steps is not None:
            return self.num_train_steps
        n = len(self.sft_examples)
        total = 0
        for epoch in range(self.epoch, self.epoch + self.num_epochs):
            mixed = self.mix_previous_iteration and self._iteration_of(epoch) >= 1
            total += self._steps_per_epoch(2 * n if mixed else n)
        return total

    def _epoch_loader(self, epoch: int) -> Iterable[dict[str, Tensor]]:
        iteration = self._iteration_of(epoch)
        if iteration != self._started_iteration:
            self._start_iteration(iteration)
        return self._pair_loader()

    def _release_extra(self) -> None:
        super()._release_extra()
        self.generated_pairs = []

    def _preference_loss(
        self, pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, lc: Tensor, lr: Tensor
    ) -> PreferenceLossOutput:
        return spin_loss(pc, pr, rc, rr, lam=self.lam, loss_type=self.loss_type)

    def _evaluate(self) -> dict[str, float]:
        if not self.valid_examples:
            return {}
        return {"valid_nll": evaluate_nll(self, self.valid_examples)}

    def train(self, overwrite_checkpoints: bool = True) -> dict[str, float]:
        """Run the SPIN iterations (``epochs`` passes in all); returns the final metrics."""
        out = super().train(overwrite_checkpoints=overwrite_checkpoints)
        self.accelerator.print("self-play training complete")
        return out
