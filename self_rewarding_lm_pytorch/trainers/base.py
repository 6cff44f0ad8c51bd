"""The training loop shared by the SFT, DPO and SPIN trainers.

:class:`BaseTrainer` owns everything that is not the loss: the accelerator, AdamW, the
learning-rate schedule (linear warmup, then linear or cosine decay from the start to the
end learning rate), gradient accumulation, gradient clipping, dropout control, the
progress bar, metric logging (``accelerator.log`` and ``<output_dir>/metrics.jsonl``), a
guard against non-finite losses, early stopping on an evaluation module, and
periodic checkpoints. Its hyper-parameters are a :class:`~.config.TrainingConfig`; the
checkpoint format is in ``checkpoint.py``, schedules in ``schedules.py``, the early-stopping
state in ``early_stopping.py``, accelerator / optimizer / loader set-up in ``runtime.py``.

Subclasses implement three methods:

* ``_epoch_loader(epoch)`` -> an iterable of micro-batches for one pass over the data;
* ``_count(batch)`` -> how many loss units (response tokens, pairs) the micro-batch holds;
* ``_compute_loss(batch)`` -> ``(loss, metrics)``: ``loss`` is the mean over those units.

Gradient accumulation is exact: each micro-batch's mean loss is weighted by its share of
the units in the whole optimizer step (across micro-batches and processes), so ``k``
micro-batches of ``b`` examples give the same update as one batch of ``k * b`` examples
even when micro-batches hold different numbers of response tokens.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import math
import time
from collections.abc import Callable, Iterable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data import collate_sft
from ..models import CausalLM, unwrap_model, wrap_model
from .checkpoint import load_checkpoint, prune_checkpoints, save_checkpoint
from .config import TrainingConfig, _constructor_args
from .early_stopping import EarlyStopping, score_model
from .runtime import (
    enable_gradient_checkpointing,
    forget_prepared,
    make_accelerator,
    make_loader,
    make_optimizer,
    set_dropout,
)
from .schedules import length_grouped_batches, lr_multiplier, make_scheduler
from .sharding import check_equal_batches, full_state_dict, gathered, is_sharded

# lr_multiplier / length_grouped_batches are re-exported for code importing them from here
__all__ = [
    "BaseTrainer",
    "length_grouped_batches",
    "load_checkpoint",
    "lr_multiplier",
    "save_checkpoint",
]


class BaseTrainer:
    """Shared loop; see the module docstring. Not used directly.

    Args:
        model: any causal LM accepted by :func:`~self_rewarding_lm_pytorch.models.wrap_model`;
            one sharded with :func:`~.sharding.shard_model` (FSDP2) trains as it is.
        config: the hyper-parameters (a :attr:`config_class`; default its defaults). Config
            field names given as keywords override its values; see
            :class:`~self_rewarding_lm_pytorch.trainers.config.TrainingConfig` for each.
        early_stopper_eval_module: ``(model) -> float`` called (eval mode, no grad, main
            process) before training, every ``check_early_stop_every`` steps and at the
            end; after ``early_stop_patience`` evaluations without improvement
            (``early_stop_mode`` "min"/"max") training stops. The best state is kept in CPU
            memory and restored at the end.
        accelerator / accelerate_kwargs: an ``accelerate.Accelerator``, or the keyword
            arguments to build one (e.g. ``dict(cpu=True, mixed_precision="bf16",
            log_with="tensorboard", project_dir=...)``).
        output_dir: ``metrics.jsonl`` is appended there, and the final model is saved to
            ``output_dir/checkpoint`` (unless ``save_final_checkpoint=False``).
        checkpoint_dir: the folder of the periodic checkpoints ``checkpoint-<step>``
            (``checkpoint_every``; default ``output_dir``), keeping the newest
            ``keep_last_checkpoints`` when set.
    """

    desc = "training"
    config_class: type[TrainingConfig] = TrainingConfig

    def __init__(
        self,
        model: nn.Module,
        *,
        config: TrainingConfig | None = None,
        early_stopper_eval_module: Callable[[nn.Module], Any] | None = None,
        accelerator: Any = None,
        accelerate_kwargs: dict[str, Any] | None = None,
        output_dir: str | Path | None = None,
        checkpoint_dir: str | Path | None = None,
        **overrides: Any,
    ) -> None:
        config = self._resolve_config(config, overrides)
        if early_stopper_eval_module is not None and not callable(early_stopper_eval_module):
            raise TypeError("early_stopper_eval_module must be callable: (model) -> float")
        checkpoint_dir = checkpoint_dir if checkpoint_dir is not None else output_dir
        if config.checkpoint_every is not None and checkpoint_dir is None:
            raise ValueError(
                "checkpoint_every needs a folder to write to: pass output_dir (or checkpoint_dir)"
            )
        if config.seed is not None:
            from accelerate.utils import set_seed

            set_seed(config.seed)
        self.config = config
        for f in dataclasses.fields(config):  # every setting is an attribute too
            setattr(self, f.name, getattr(config, f.name))

        self.accelerator, self._owns_trackers = make_accelerator(
            accelerator, accelerate_kwargs, config.project_name
        )
        self.lm: CausalLM = (
            model if isinstance(model, CausalLM) else wrap_model(unwrap_model(model))
        )
        limits = [v for v in (config.max_seq_len, self.lm.max_seq_len) if v is not None]
        self.max_seq_len: int | None = min(limits) if limits else None
        if config.gradient_checkpointing:
            enable_gradient_checkpointing(self.lm.module)
        optimizer = make_optimizer(
            self.lm,
            lr=config.start_learning_rate,
            weight_decay=config.weight_decay,
            adam_kwargs=config.adam_kwargs,
            optimizer=config.optimizer,
        )
        if is_sharded(self.lm):
            # FSDP2 (shard_model) reduces the gradients itself: a DDP wrapper must not
            self.model, self.optimizer = self.lm, self.accelerator.prepare(optimizer)
        else:
            self.model, self.optimizer = self.accelerator.prepare(self.lm, optimizer)
        # parameters sharded across processes (shard_model, or accelerate's FSDP plugin)
        self.sharded = is_sharded(self.model)
        self._raw_optimizer = optimizer
        # everything this trainer prepared on the (possibly shared) accelerator, as given
        # and as returned (accelerate lists the bare module under DDP); release() removes
        # exactly these from its lists
        self._prepared: list[Any] = [self.lm, optimizer, self.model, self.optimizer]
        self._released = False

        self.early_stopper_eval_module = early_stopper_eval_module
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.step = 0
        self.epoch = 0
        self.last_checkpoint: Path | None = None
        self.history: list[dict[str, float]] = []
        self.early_stopped = False
        self._early_stop: EarlyStopping | None = None
        self._scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self._scheduler_total: int | None = None

    @classmethod
    def _take_overrides(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Remove the config keywords from ``kwargs`` and return them."""
        keys = set(cls.config_class.accepted_keys())
        return {k: kwargs.pop(k) for k in list(kwargs) if k in keys}

    def _resolve_config(
        self, config: TrainingConfig | None, overrides: dict[str, Any]
    ) -> TrainingConfig:
        """``config`` with the keyword ``overrides`` applied, checked (unknown: TypeError)."""
        return self.config_class.from_kwargs(
            config, overrides, owner=type(self).__name__, extra=_constructor_args(type(self))
        )

    # ------------------------------------------------------------------ helpers
    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def num_processes(self) -> int:
        return self.accelerator.num_processes

    def unwrapped_model(self) -> nn.Module:
        """The user's module (no DDP / CausalLM wrapper)."""
        return unwrap_model(self.model)

    def _make_loader(
        self,
        items: Sequence[Any],
        collate_fn: Callable,
        *,
        shuffle: bool,
        batch_size: int,
        lengths: Sequence[int] | None = None,
    ) -> DataLoader:
        """A loader over ``items``, sharded by accelerate. With ``group_by_length`` (and
        ``lengths``), shuffled batches are drawn from length-sorted mega-batches of 50
        batches, so little compute goes to padding (the order of batches stays random);
        with ``length_buckets``, every batch from one bucket of rows of those lengths."""
        generator = None
        if shuffle and self.seed is not None:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
        loader = make_loader(
            items,
            collate_fn,
            shuffle=shuffle,
            batch_size=batch_size,
            generator=generator,
            lengths=lengths if self.group_by_length or self.length_buckets else None,
            boundaries=self.length_buckets or (),
        )
        prepared = self.accelerator.prepare(loader)
        self._prepared += [loader, prepared]
        if self.sharded:  # every forward is collective: equal batch counts, or a hang
            check_equal_batches(prepared, self.accelerator, type(self).__name__)
        return prepared

    def sft_loader(self, examples: Sequence[Any], *, batch_size: int, shuffle: bool) -> DataLoader:
        """A loader of collated SFT batches (``collate_sft``) over ``examples``."""
        return self._make_loader(
            examples,
            partial(collate_sft, max_seq_len=self.max_seq_len),
            shuffle=shuffle,
            batch_size=batch_size,
            lengths=[len(e.input_ids) for e in examples],
        )

    def _steps_per_epoch(self, num_items: int) -> int:
        per_process = math.ceil(num_items / self.num_processes)
        return math.ceil(math.ceil(per_process / self.batch_size) / self.grad_accum_steps)

    def _total_steps(self) -> int:
        if self.num_train_steps is not None:
            return self.num_train_steps
        return self.num_epochs * self._steps_per_epoch(self._num_items())

    def _ensure_scheduler(self, total: int) -> None:
        if self._scheduler is not None and self._scheduler_total == total:
            return
        self._scheduler = make_scheduler(
            self._raw_optimizer,
            start_lr=self.start_learning_rate,
            end_lr=self.end_learning_rate,
            warmup_steps=self.warmup_steps,
            decay_steps=self.num_decay_steps,
            schedule=self.lr_schedule,
            total_steps=total,
            done_steps=self.step,
        )
        self._scheduler_total = total

    # ------------------------------------------------------------------ release
    def release(self) -> None:
        """Give back the memory this trainer holds once it has finished training.

        Removes the model wrapper (e.g. DDP), optimizer and data loaders it prepared from
        its accelerator's lists (leaving anything else prepared on a shared accelerator
        alone), drops the optimizer state (AdamW: two fp32 copies of the trainable
        parameters), gradients, schedule and subclass data (reference log-probs or model),
        then runs the garbage collector and empties the device cache. The model itself
        stays usable and keeps its trained weights; the trainer can still save, load and
        evaluate, but not train again. Calling it twice is harmless.
        """
        if self._released:
            return
        self._released = True
        # the raw optimizer: accelerate's wrapper skips zero_grad mid-accumulation
        self._raw_optimizer.zero_grad(set_to_none=True)
        self._raw_optimizer.state.clear()
        forget_prepared(self.accelerator, self._prepared)
        self._prepared = []
        self._release_extra()
        self.model = self.lm  # the bare CausalLM: no DDP wrapper (and its buckets) kept
        self.optimizer = None  # type: ignore[assignment]
        self._raw_optimizer = None  # type: ignore[assignment]
        self._scheduler = None
        self._scheduler_total = None
        self._early_stop = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    def _release_extra(self) -> None:
        """Subclass hook of :meth:`release`: drop data held for training only."""

    def __enter__(self) -> BaseTrainer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    # ------------------------------------------------------------------ subclass API
    def _num_items(self) -> int:
        raise NotImplementedError

    def _epoch_loader(self, epoch: int) -> Iterable[dict[str, Tensor]]:
        raise NotImplementedError

    def _count(self, batch: dict[str, Tensor]) -> int:
        raise NotImplementedError

    def _compute_loss(self, batch: dict[str, Tensor]) -> tuple[Tensor, dict[str, Tensor]]:
        raise NotImplementedError

    def _on_train_start(self) -> None:
        """Runs once at the start of every ``train()`` call, before the first step."""

    def _evaluate(self) -> dict[str, float]:
        """Validation metrics (``eval_every`` steps and at the end); none by default."""
        return {}

    # ------------------------------------------------------------------ logging
    def _log(self, metrics: dict[str, float]) -> None:
        self.history.append(metrics)
        self.accelerator.log(metrics, step=self.step)
        if self.output_dir is not None and self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            with open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(metrics, default=float) + "\n")
                f.flush()

    # ------------------------------------------------------------------ checkpoints
    def save_checkpoint(self, path: str | Path, *, overwrite: bool = True) -> Path:
        """Write the model to ``path`` (see :func:`save_checkpoint`) from the main process;
        a sharded model is gathered first (every process takes part) and saved whole."""
        path = Path(path)
        self.accelerator.wait_for_everyone()
        full = full_state_dict(self.unwrapped_model()) if self.sharded else None
        if self.is_main:
            state = {"step": self.step, "epoch": self.epoch}
            if self.history:
                state["metrics"] = self.history[-1]
            save_checkpoint(
                self.unwrapped_model(), path, state=state, overwrite=overwrite, state_dict=full
            )
        self.accelerator.wait_for_everyone()
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        """Load safetensors weights from ``path`` into the model (every process calls it;
        a sharded model keeps its shards)."""
        load_checkpoint(self.unwrapped_model(), path)

    def _periodic_checkpoint(self, overwrite: bool) -> None:
        assert self.checkpoint_dir is not None
        path = self.save_checkpoint(
            self.checkpoint_dir / f"checkpoint-{self.step}", overwrite=overwrite
        )
        self.last_checkpoint = path
        if self.keep_last_checkpoints is not None and self.is_main:
            prune_checkpoints(self.checkpoint_dir, self.keep_last_checkpoints)

    # ------------------------------------------------------------------ early stopping
    def _early_stop_check(self) -> bool:
        """Evaluate, keep the best state in CPU memory; True when patience is used up."""
        assert self._early_stop is not None
        assert self.early_stopper_eval_module is not None
        with gathered(self.lm):  # the main process alone runs its forwards
            score = score_model(
                self.early_stopper_eval_module, self.unwrapped_model(), self.lm, self.accelerator
            )
        stop = self._early_stop.check(self.unwrapped_model(), score, self.step)
        self._log({"step": self.step, "early_stop_score": score})
        return stop

    def _early_stop_finish(self) -> dict[str, float]:
        assert self._early_stop is not None
        if self._early_stop.last_eval_step != self.step:
            self._early_stop_check()
        return self._early_stop.finish(
            self.unwrapped_model(), self.step, stopped=self.early_stopped
        )

    # ------------------------------------------------------------------ one update
    def _reduce_sum(self, t: Tensor) -> Tensor:
        return self.accelerator.reduce(t, reduction="sum") if self.num_processes > 1 else t

    def _nonfinite_error(self, what: str, value: float, micro: int | None) -> FloatingPointError:
        where = f"step {self.step + 1}" + (f" (micro-batch {micro})" if micro is not None else "")
        ckpt = (
            f"the last good checkpoint is {self.last_checkpoint}"
            if self.last_checkpoint is not None
            else "no checkpoint was saved yet (set output_dir and checkpoint_every to keep one)"
        )
        return FloatingPointError(
            f"non-finite {what} ({value}) at {where}; training stopped before updating the "
            f"model with it, and {ckpt}. Lower the learning rate, keep max_grad_norm set, "
            "or check the data of this step"
        )

    def _optimizer_step(self, group: list[dict[str, Tensor]]) -> dict[str, float]:
        acc = self.accelerator
        counts = [self._count(mb) for mb in group]
        local_total = torch.tensor(float(sum(counts)), device=self.device)
        global_total = float(self._reduce_sum(local_total))
        if global_total <= 0:
            raise ValueError(f"step {self.step + 1} has no loss units (no response tokens)")
        n = len(group)
        # accelerate syncs gradients (DDP) on the last micro-batch of the group only; the
        # accelerator may be shared, so its own setting is restored afterwards
        saved_accum = acc.gradient_accumulation_steps
        acc.gradient_accumulation_steps = n
        acc.step = 0
        sums: dict[str, Tensor] = {}
        try:
            for i, (mb, count) in enumerate(zip(group, counts)):
                with acc.accumulate(self.model):
                    loss, metrics = self._compute_loss(mb)
                    bad = torch.tensor(float(not bool(torch.isfinite(loss))), device=self.device)
                    if float(self._reduce_sum(bad)) > 0:
                        self.optimizer.zero_grad(set_to_none=True)
                        raise self._nonfinite_error("loss", float(loss.detach()), i)
                    weight = count * self.num_processes / global_total
                    # accelerate divides by gradient_accumulation_steps (= n) in backward
                    acc.backward(loss * (weight * n))
                metrics = {"loss": loss.detach(), **metrics}
                for k, v in metrics.items():
                    v = v.detach().float() * count
                    sums[k] = sums[k] + v if k in sums else v
        finally:
            acc.gradient_accumulation_steps = saved_accum
        out: dict[str, float] = {}
        keys = sorted(sums)
        stacked = self._reduce_sum(torch.stack([sums[k] for k in keys]).to(self.device))
        for k, v in zip(keys, stacked.tolist()):
            out[k] = v / global_total
        if self.max_grad_norm is not None:
            norm = acc.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
            norm = float(norm)
            out["grad_norm"] = norm
            if not math.isfinite(norm) and acc.scaler is None:
                self.optimizer.zero_grad(set_to_none=True)
                raise self._nonfinite_error("gradient norm", norm, None)
        out["lr"] = self._raw_optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        assert self._scheduler is not None
        self._scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return out

    # ------------------------------------------------------------------ loop
    def train(self, *, overwrite_checkpoints: bool = True) -> dict[str, float]:
        """Run training; returns the final metrics (last step's, plus evaluation ones)."""
        if self._released:
            raise RuntimeError(
                f"this {type(self).__name__} was released (release() gave back its optimizer); "
                "create a new trainer to train again"
            )
        t0 = time.perf_counter()
        self._on_train_start()
        total = self.step + self._total_steps()
        self._ensure_scheduler(total)
        self.early_stopped = False
        self._early_stop = (
            EarlyStopping(
                mode=self.early_stop_mode, patience=self.early_stop_patience, start_step=self.step
            )
            if self.early_stopper_eval_module is not None
            else None
        )
        was_training = self.lm.training
        eval_metrics: dict[str, float] = {}
        pbar = tqdm(
            total=total - self.step,
            desc=self.desc,
            disable=not (self.progress and self.is_main),
        )
        try:
            with set_dropout(self.lm, self.dropout):
                if self.early_stopper_eval_module is not None:
                    self._early_stop_check()  # the starting model is a candidate too
                stop = False
                max_epochs = total - self.step  # every epoch makes >= 1 step
                for _ in range(max_epochs):
                    if stop or self.step >= total:
                        break
                    steps_before = self.step
                    group: list[dict[str, Tensor]] = []
                    self.lm.train()
                    for batch in self._epoch_loader(self.epoch):
                        group.append(batch)
                        if len(group) < self.grad_accum_steps:
                            continue
                        stop = self._run_step(group, pbar, overwrite_checkpoints)
                        group = []
                        if stop or self.step >= total:
                            break
                    if group and not stop and self.step < total:
                        stop = self._run_step(group, pbar, overwrite_checkpoints)
                    if self.step == steps_before:
                        raise RuntimeError(
                            f"epoch {self.epoch} produced no training step; the dataset yielded "
                            "no batches"
                        )
                    self.epoch += 1
                if self.early_stopper_eval_module is not None:
                    eval_metrics.update(self._early_stop_finish())
                self.lm.eval()
                eval_metrics.update(self._evaluate())
        finally:
            pbar.close()
            self.lm.train(was_training)
        if eval_metrics:
            self._log({"step": self.step, **eval_metrics})
        if self.output_dir is not None and self.save_final_checkpoint:
            self.save_checkpoint(self.output_dir / "checkpoint", overwrite=True)
        if self._owns_trackers:
            self.accelerator.end_training()
            self._owns_trackers = False
        final = {**self._last_train_metrics(), **eval_metrics}
        final["step"] = float(self.step)
        final["train_time_s"] = time.perf_counter() - t0
        return final

    def _last_train_metrics(self) -> dict[str, float]:
        for m in reversed(self.history):
            if "loss" in m:
                return dict(m)
        return {}

    def _run_step(
        self, group: list[dict[str, Tensor]], pbar: Any, overwrite_checkpoints: bool
    ) -> bool:
        metrics = self._optimizer_step(group)
        self.step += 1
        pbar.update(1)
        record = {"step": self.step, "epoch": self.epoch, **metrics}
        if self.step % self.log_every == 0:
            self._log(record)
        else:
            self.history.append(record)
        pbar.set_postfix(loss=f"{metrics['loss']:.4f}")
        stop = False
        if self.eval_every is not None and self.step % self.eval_every == 0:
            ev = self._evaluate()
            if ev:
                self._log({"step": self.step, **ev})
            self.lm.train()
        if self.checkpoint_every is not None and self.step % self.checkpoint_every == 0:
            self._periodic_checkpoint(overwrite_checkpoints)
        if (
            self.early_stopper_eval_module is not None
            and self.step % self.check_early_stop_every == 0
        ):
            stop = self._early_stop_check()
            self.early_stopped = stop
        return stop

    def __call__(self, *args: Any, **kwargs: Any) -> dict[str, float]:
        return self.train(*args, **kwargs)
