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

from collections.abc import Iterable
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from ..data import PreferenceExample, SFTExample, materialize, to_sft_example
from ..generation import GenerationBackend, GenerationConfig, TorchBackend, response_budget
from ..losses import PreferenceLossOutput, spin_loss
from ..models import wrap_model
from ..utils import make_generator
from .config import SPIN_SCHEDULES, SPINConfig
from .dpo import PreferenceTrainer
from .sft import evaluate_nll
from .sharding import gathered

__all__ = ["SPIN_SCHEDULES", "SPINTrainer"]


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
        backend: samples the opponent's responses; it must serve the live policy (default:
            a :class:`~self_rewarding_lm_pytorch.generation.TorchBackend` over the bare
            module, so a DDP wrapper does not hide its KV cache).
        config: a :class:`~self_rewarding_lm_pytorch.trainers.config.SPINConfig` holding
            the settings above (datasets and folders aside); keywords override it.

    Other keyword arguments are those of :class:`~self_rewarding_lm_pytorch.trainers.base.BaseTrainer`.
    """

    desc = "spin"
    pos_name = "real"
    neg_name = "generated"

    config_class = SPINConfig

    def __init__(
        self,
        model: nn.Module,
        *,
        sft_dataset: Any = None,
        train_sft_dataset: Any = None,
        valid_sft_dataset: Any = None,
        checkpoint_folder: str | Path = "./spin-checkpoints",
        config: SPINConfig | None = None,
        backend: GenerationBackend | None = None,
        **kwargs: Any,
    ) -> None:
        if sft_dataset is not None and train_sft_dataset is not None:
            raise ValueError("pass sft_dataset or train_sft_dataset (an alias), not both")
        sft_dataset = sft_dataset if sft_dataset is not None else train_sft_dataset
        if sft_dataset is None:
            raise ValueError("SPINTrainer needs sft_dataset: the SFT examples to self-play on")
        config = self._resolve_config(config, self._take_overrides(kwargs))
        max_seq_len = config.max_seq_len
        if max_seq_len is None:
            raise TypeError(
                "SPINTrainer needs max_seq_len: the bound on prompt + response of real and "
                "generated responses (e.g. max_seq_len=256)"
            )
        epochs, per_iteration = config.epoch_plan()
        convert = partial(to_sft_example, pad_id=config.pad_id)
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
        checkpoint_dir = kwargs.pop("checkpoint_dir", None)
        if checkpoint_dir is None and config.checkpoint_every is not None:
            checkpoint_dir = checkpoint_folder
        super().__init__(model, config=config, checkpoint_dir=checkpoint_dir, **kwargs)
        if backend is None:
            # the bare module: a DDP wrapper would hide its KV cache, and the CausalLM that
            # accelerate prepared may run under autocast
            bare = wrap_model(self.unwrapped_model(), max_seq_len=self.lm.max_seq_len)
            backend = TorchBackend(bare)
        self.backend: GenerationBackend = backend
        self.spin_weights_dir = Path(checkpoint_folder)  # cycle policies for such a backend
        self.num_epochs = epochs
        self.sft_examples: list[SFTExample] = sft
        self.valid_examples = valid
        self.generate_batch_size = config.generate_batch_size or max(self.batch_size, 32)
        self.spin_max_seq_len = max_seq_len
        self.epochs_per_iteration = per_iteration
        self.mix_previous_iteration = self.schedule == "official"
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
        seed = None if self.seed is None else self.seed * 1_000_003 + self.cycle * 1_009 + rank
        generator = make_generator(seed, self.lm.device)
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
                        self.backend.max_seq_len,
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
                out = self.backend.generate(
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

    def _serve_policy(self, iteration: int) -> None:
        """A backend other than the torch engine does not see the live module: write the
        policy as it is now to ``<checkpoint_folder>/cycle-<k>`` and serve it there."""
        if isinstance(self.backend, TorchBackend):
            return
        folder = self.save_checkpoint(self.spin_weights_dir / f"cycle-{iteration}")
        self.backend.load_weights(folder)

    def _start_iteration(self, iteration: int) -> None:
        self.cycle = iteration
        if self._started_iteration is not None:  # trained since the backend last loaded
            self._serve_policy(iteration)
        with gathered(self.lm):  # a sharded model: the ranks decode different lengths
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
