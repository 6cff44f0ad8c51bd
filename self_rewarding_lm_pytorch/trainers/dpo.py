"""Direct Preference Optimization (Rafailov et al. 2023) as used by the self-rewarding
iterations (Yuan et al. 2024, section 2.3: reference = the current model Mt, beta 0.1,
learning rate 1e-6 decaying to 1e-7, batch 16).

Reference log-probabilities are computed once per dataset, in eval mode without
gradients, before the first step (the reference never changes during a DPO run), so no
second copy of the model is held in memory.  ``precompute_ref_logps=False`` keeps the
textbook path instead: a frozen deep copy of the starting model scores every batch.
Chosen and rejected responses go through the policy in one concatenated forward pass.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterable, Iterator
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn

from ..data import (
    PreferenceExample,
    SFTExample,
    collate_preference,
    materialize,
    to_preference_example,
    to_sft_example,
)
from ..losses import (
    PreferenceLossOutput,
    dpo_loss,
    nll_loss,
    sequence_logprobs,
)
from ..models import CausalLM, unwrap_model, wrap_model
from .base import BaseTrainer
from .config import DPOConfig, PreferenceConfig

__all__ = ["DPOTrainer", "PreferenceTrainer"]


def _collate_pairs(
    indices: list[int], *, examples: list[PreferenceExample], max_seq_len: int | None
) -> dict[str, Tensor]:
    batch = collate_preference([examples[i] for i in indices], max_seq_len=max_seq_len)
    batch["index"] = torch.tensor(indices, dtype=torch.long)
    return batch


class PreferenceTrainer(BaseTrainer):
    """Shared machinery of pairwise preference training (DPO, SPIN).

    Holds ``self.pairs`` (a list of :class:`PreferenceExample`), their reference
    log-probs ``self.ref_logps`` (``(N, 2)``: chosen, rejected) and an optional replay
    set of SFT examples whose NLL is added to every micro-batch's loss.
    """

    pos_name = "chosen"
    neg_name = "rejected"
    config_class = PreferenceConfig

    def __init__(
        self,
        model: nn.Module,
        *,
        replay_dataset: Any = None,
        config: PreferenceConfig | None = None,
        **kwargs: Any,
    ) -> None:
        config = self._resolve_config(config, self._take_overrides(kwargs))
        self.replay_examples: list[SFTExample] | None = None
        if replay_dataset is not None:
            self.replay_examples = materialize(
                replay_dataset, partial(to_sft_example, pad_id=config.pad_id), name="replay_dataset"
            )
        super().__init__(model, config=config, **kwargs)
        self.replay_batch_size = config.replay_batch_size or self.batch_size
        self.ref_batch_size = config.ref_batch_size or 2 * self.batch_size
        self.pairs: list[PreferenceExample] = []
        self.ref_logps: Tensor | None = None
        self.ref_lm: CausalLM | None = None  # only for on-the-fly references
        self._replay_iter: Iterator[dict[str, Tensor]] | None = None

    # ------------------------------------------------------------------ reference
    @torch.no_grad()
    def compute_reference_logps(
        self, pairs: list[PreferenceExample], lm: nn.Module | None = None
    ) -> Tensor:
        """``(N, 2)`` summed response log-probs (chosen, rejected) of ``pairs`` under
        ``lm`` (default: the policy as it is now), in eval mode, without gradients."""
        lm = self.lm if lm is None else lm
        loader = self._make_loader(
            list(range(len(pairs))),
            partial(_collate_pairs, examples=pairs, max_seq_len=self.max_seq_len),
            shuffle=False,
            batch_size=self.ref_batch_size,
        )
        out = torch.full((len(pairs), 2), float("nan"), device=self.device)
        was_training = lm.training
        lm.eval()
        try:
            for batch in loader:
                with self.accelerator.autocast():
                    logits = lm(batch["input_ids"], batch["attention_mask"])
                logps = sequence_logprobs(logits, batch["input_ids"], batch["response_mask"])
                b = batch["index"].numel()
                pair_logps = torch.stack([logps[:b], logps[b:]], dim=1).float()
                idx, pair_logps = self.accelerator.gather_for_metrics((batch["index"], pair_logps))
                out[idx] = pair_logps
        finally:
            lm.train(was_training)
        if bool(torch.isnan(out).any()):
            raise RuntimeError("internal error: some reference log-probs were not computed")
        return out

    def _reference_for(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        if self.ref_logps is not None:
            ref = self.ref_logps[batch["index"]]
            return ref[:, 0], ref[:, 1]
        b = batch["index"].numel()
        if self.ref_lm is not None:
            with torch.no_grad(), self.accelerator.autocast():
                logits = self.ref_lm(batch["input_ids"], batch["attention_mask"])
        else:  # PEFT model, reference = the same model with its adapter disabled
            peft_model = self._adapter_ref_model()
            was_training = self.lm.training
            self.lm.eval()
            try:
                with torch.no_grad(), self.accelerator.autocast(), peft_model.disable_adapter():
                    logits = self.lm(batch["input_ids"], batch["attention_mask"])
            finally:
                self.lm.train(was_training)
        logps = sequence_logprobs(logits, batch["input_ids"], batch["response_mask"])
        return logps[:b], logps[b:]

    def _adapter_ref_model(self) -> nn.Module:
        module = unwrap_model(self.lm)
        if not callable(getattr(module, "disable_adapter", None)):
            raise ValueError(
                "ref_adapter='disabled' needs a peft model (one with disable_adapter()); "
                f"got {type(module).__name__}. Use ref_adapter='current' or pass ref_model"
            )
        return module

    def _release_extra(self) -> None:
        self.ref_logps = None
        self.ref_lm = None
        self._replay_iter = None

    # ------------------------------------------------------------------ data
    def _num_items(self) -> int:
        return len(self.pairs)

    def _pair_loader(self) -> Iterable[dict[str, Tensor]]:
        return self._make_loader(
            list(range(len(self.pairs))),
            partial(_collate_pairs, examples=self.pairs, max_seq_len=self.max_seq_len),
            shuffle=True,
            batch_size=self.batch_size,
            lengths=[
                len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in self.pairs
            ],
        )

    def _replay_batches(self) -> Iterator[dict[str, Tensor]]:
        assert self.replay_examples is not None
        while True:  # the replay set is non-empty, so every pass yields batches
            yield from self.sft_loader(
                self.replay_examples, batch_size=self.replay_batch_size, shuffle=True
            )

    def _count(self, batch: dict[str, Tensor]) -> int:
        return int(batch["index"].numel())

    # ------------------------------------------------------------------ loss
    def _preference_loss(
        self, pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, lc: Tensor, lr: Tensor
    ) -> PreferenceLossOutput:
        """The per-pair loss from policy / reference log-probs and response lengths."""
        raise NotImplementedError

    def _compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        ids, am, rm = batch["input_ids"], batch["attention_mask"], batch["response_mask"]
        b = batch["index"].numel()
        logits = self.model(ids, am)  # chosen rows then rejected rows: one forward
        logps = sequence_logprobs(logits, ids, rm)
        pc, pr = logps[:b], logps[b:]
        rc, rr = self._reference_for(batch)
        lengths = rm.sum(dim=1)  # response tokens of each row (after truncation)
        out = self._preference_loss(pc, pr, rc, rr, lengths[:b], lengths[b:])
        per_pair = out.losses
        metrics: dict[str, Tensor] = {
            "pref_loss": out.losses.mean().detach(),
            "reward_accuracy": out.reward_accuracies.mean(),
            "reward_margin": out.reward_margins.mean(),
            f"{self.pos_name}_reward": out.chosen_rewards.mean(),
            f"{self.neg_name}_reward": out.rejected_rewards.mean(),
            f"{self.pos_name}_logps": pc.detach().mean(),
            f"{self.neg_name}_logps": pr.detach().mean(),
        }
        if self.nll_weight > 0:
            # iterative RPO (Pang et al. 2024, Eq. 3): length-normalised NLL of the chosen
            nll = -sequence_logprobs(logits[:b], ids[:b], rm[:b], average=True)
            per_pair = per_pair + self.nll_weight * nll
            metrics["nll"] = nll.detach().mean()
        loss = per_pair.mean()
        if self.replay_examples is not None and self.replay_weight > 0:
            if self._replay_iter is None:
                self._replay_iter = self._replay_batches()
            rb = next(self._replay_iter)
            r_logits = self.model(rb["input_ids"], rb["attention_mask"])
            replay = nll_loss(r_logits, rb["input_ids"], rb["response_mask"])
            loss = loss + self.replay_weight * replay
            metrics["replay_nll"] = replay.detach()
        return loss, metrics


class DPOTrainer(PreferenceTrainer):
    """DPO on a fixed set of preference pairs.

    Args:
        model: the policy (any causal LM accepted by :func:`~self_rewarding_lm_pytorch.models.wrap_model`).
        train_dataset: items accepted by :func:`~self_rewarding_lm_pytorch.data.to_preference_example`
            (``PreferenceExample``, dicts with ``prompt_ids/chosen_ids/rejected_ids``,
            3-tuples, the seed's ``(preferred_seq, unpreferred_seq, prompt_len)``); read once.
        beta, loss_type, label_smoothing: see :func:`~self_rewarding_lm_pytorch.losses.dpo_loss`
            (``loss_type``: "sigmoid" = DPO, or cDPO with ``label_smoothing``; "robust" =
            rDPO; "ipo", length-normalised from each pair's response lengths; "hinge").
        nll_weight: weight of the chosen response's length-normalised NLL (iterative RPO).
        replay_dataset: SFT examples (e.g. the EFT judge data) whose NLL, times
            ``replay_weight``, is added to the loss of every micro-batch
            (``replay_batch_size`` examples each, default ``batch_size``).
        ref_model: the reference; default the policy as it is when ``train()`` starts.
        precompute_ref_logps: score the whole dataset with the reference once before
            training (default) instead of running the reference on every batch.
        ref_adapter: for a peft (LoRA) policy without ``ref_model``: ``"current"``
            (default) makes the reference the model as it is when training starts, adapter
            included -- the paper's reference ``M_t``; ``"disabled"`` makes it the same
            model with its adapter switched off (the base weights; TRL's convention), which
            holds no second copy even with ``precompute_ref_logps=False``. They coincide
            only when the adapter is fresh (zero) at the start of this DPO run.
        early_stopper_eval_module: ``(model) -> float`` evaluated at the start, every
            ``check_early_stop_every`` steps and at the end; training stops after
            ``early_stop_patience`` evaluations without improvement (``early_stop_mode``
            "min" or "max") and the best state is restored.
        config: a :class:`~self_rewarding_lm_pytorch.trainers.config.DPOConfig` (beta,
            loss_type, ... above and the loop's settings); its field names given as keywords
            override it.

    Other keyword arguments are those of :class:`~self_rewarding_lm_pytorch.trainers.base.BaseTrainer`.
    """

    desc = "dpo"
    config_class = DPOConfig

    def __init__(
        self,
        model: nn.Module,
        *,
        train_dataset: Any,
        replay_dataset: Any = None,
        ref_model: nn.Module | None = None,
        config: DPOConfig | None = None,
        **kwargs: Any,
    ) -> None:
        config = self._resolve_config(config, self._take_overrides(kwargs))
        if ref_model is not None and not isinstance(ref_model, nn.Module):
            raise TypeError(f"ref_model must be an nn.Module, got {type(ref_model).__name__}")
        if config.ref_adapter == "disabled" and ref_model is not None:
            raise ValueError(
                "ref_adapter='disabled' makes the reference the policy without its adapter; "
                "it cannot be combined with ref_model"
            )
        pairs = materialize(
            train_dataset,
            partial(to_preference_example, pad_id=config.pad_id),
            name="train_dataset",
        )
        super().__init__(model, replay_dataset=replay_dataset, config=config, **kwargs)
        self.pairs = pairs
        if self.ref_adapter == "disabled":
            self._adapter_ref_model()  # fail now when the model is not a peft model
        if self.sharded and not self.precompute_ref_logps and ref_model is None:
            raise ValueError(
                "DPOTrainer: precompute_ref_logps=False keeps a frozen copy of the policy as "
                "the reference, and a sharded policy cannot be copied; keep "
                "precompute_ref_logps=True (the default: the reference log-probs are "
                "computed through the sharded model before training) or pass ref_model "
                "(sharded with shard_model the same way)"
            )
        self._given_ref: CausalLM | None = None
        if ref_model is not None:
            ref = wrap_model(unwrap_model(ref_model)).to(self.device)
            ref.requires_grad_(False)
            ref.eval()
            self._given_ref = ref

    def _on_train_start(self) -> None:
        if self.precompute_ref_logps:
            if self.ref_logps is None:
                source = self._given_ref if self._given_ref is not None else self.lm
                with (
                    self._adapter_ref_model().disable_adapter()
                    if self.ref_adapter == "disabled"
                    else contextlib.nullcontext()
                ):
                    self.ref_logps = self.compute_reference_logps(self.pairs, source)
                self._given_ref = None  # not needed any more: free its memory
        elif self.ref_adapter == "disabled":
            pass  # the reference forward switches the adapter off (see _reference_for)
        elif self.ref_lm is None:
            if self._given_ref is not None:
                self.ref_lm = self._given_ref
            else:  # frozen copy of the policy as training starts
                self.ref_lm = copy.deepcopy(self.lm)
                self.ref_lm.requires_grad_(False)
                self.ref_lm.eval()

    def _release_extra(self) -> None:
        super()._release_extra()
        self._given_ref = None

    def _epoch_loader(self, epoch: int) -> Iterable[dict[str, Tensor]]:
        return self._pair_loader()

    def _preference_loss(
        self, pc: Tensor, pr: Tensor, rc: Tensor, rr: Tensor, lc: Tensor, lr: Tensor
    ) -> PreferenceLossOutput:
        return dpo_loss(
            pc,
            pr,
            rc,
            rr,
            beta=self.beta,
            loss_type=self.loss_type,
            label_smoothing=self.label_smoothing,
            chosen_lengths=lc,
            rejected_lengths=lr,
        )
