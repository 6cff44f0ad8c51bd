"""The training loop shared by the SFT, DPO and SPIN trainers.

:class:`BaseTrainer` owns everything that is not the loss: the accelerator, AdamW, the
learning-rate schedule (linear warmup, then linear or cosine decay from the start to the
end learning rate), gradient accumulation, gradient clipping, dropout control, the
progress bar, metric logging (``accelerator.log`` and ``<output_dir>/metrics.jsonl``), a
guard against non-finite losses, early stopping on an evaluation module, and
safetensors checkpoints written atomically.

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

import contextlib
import gc
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_model
from torch import Tensor, nn
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from ..data import ListDataset, collate_sft
from ..models import CausalLM, is_peft_model, unwrap_model, wrap_model

__all__ = ["BaseTrainer", "load_checkpoint", "save_checkpoint"]

_DROPOUT_TYPES = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
)
SAFETENSORS_NAME = "model.safetensors"
STATE_NAME = "trainer_state.json"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"


# ====================================================================== checkpoints


def _check_finite_params(module: nn.Module) -> None:
    for name, p in module.state_dict().items():
        if p.is_floating_point() and not bool(torch.isfinite(p).all()):
            raise FloatingPointError(
                f"refusing to save a checkpoint: parameter {name!r} holds NaN/inf values"
            )


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    model: nn.Module,
    path: str | Path,
    *,
    state: dict[str, Any] | None = None,
    overwrite: bool = True,
) -> Path:
    """Write ``model`` to the folder ``path`` with safetensors, atomically.

    A Hugging Face model (``kind == "hf"``) is saved with ``save_pretrained`` (config
    and ``model.safetensors``); a PEFT (LoRA) model as its adapter folder with PEFT's
    ``save_pretrained`` (``adapter_config.json`` + ``adapter_model.safetensors``, which
    ``PeftModel.from_pretrained(base, path)`` and ``hf.load_model(path)`` open; the base
    weights are not copied); anything else as ``model.safetensors`` holding its
    ``state_dict`` (shared / tied tensors stored once, via ``safetensors.torch.save_model``).
    The folder is written under a temporary name and renamed into place, so ``path``
    holds either the previous checkpoint or the complete new one. A model with NaN/inf
    parameters is never saved (:class:`FloatingPointError`). ``state`` (JSON-able) is
    written next to the weights as ``trainer_state.json``.
    """
    path = Path(path)
    module = unwrap_model(model)
    kind = wrap_model(module).kind
    _check_finite_params(module)
    if path.exists() and not overwrite:
        raise FileExistsError(
            f"checkpoint {path} already exists; pass overwrite_checkpoints=True or choose "
            "another output folder"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    # a write killed mid-way leaves a full model copy in a temp folder: remove it
    for stale in (
        *path.parent.glob(f".{path.name}.tmp-*"),
        *path.parent.glob(f".{path.name}.old-*"),
    ):
        if stale.is_dir() and not path.exists() and ".old-" in stale.name:
            os.replace(stale, path)  # killed between the two renames: the old one is valid
        else:
            shutil.rmtree(stale, ignore_errors=True)
    tag = f"{os.getpid()}-{time.monotonic_ns()}"
    tmp = path.parent / f".{path.name}.tmp-{tag}"
    old = path.parent / f".{path.name}.old-{tag}"
    try:
        tmp.mkdir()
        if is_peft_model(module):
            module.save_pretrained(str(tmp), safe_serialization=True)
        elif kind == "hf":
            import inspect

            kwargs = {}
            if "safe_serialization" in inspect.signature(module.save_pretrained).parameters:
                kwargs["safe_serialization"] = True  # transformers < 5; v5 always uses it
            module.save_pretrained(tmp, **kwargs)
        else:
            save_model(module, str(tmp / SAFETENSORS_NAME))
        if state is not None:
            (tmp / STATE_NAME).write_text(json.dumps(state, indent=2, default=float) + "\n")
        for f in (*tmp.rglob("*"), tmp):  # on disk before the rename makes it visible
            _fsync_path(f)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
        _fsync_path(path.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)
    return path


def load_checkpoint(model: nn.Module, path: str | Path, *, strict: bool = True) -> nn.Module:
    """Load safetensors weights from a checkpoint folder (or ``.safetensors`` file) into
    ``model`` in place and return it. Never unpickles anything.

    An adapter folder (``adapter_config.json``, as :func:`save_checkpoint` writes for a
    PEFT model) loads into a PEFT model's adapters of the same names.

    Sharded Hugging Face checkpoints (``model-0000x-of-0000y.safetensors``) are merged.
    Keys absent from the file are accepted only when they are tied to a loaded tensor
    (e.g. an output head sharing the embedding); with ``strict`` any other missing or
    unexpected key raises :class:`ValueError`.
    """
    path = Path(path)
    if path.is_dir() and (path / ADAPTER_CONFIG_NAME).exists():
        _load_adapter_checkpoint(unwrap_model(model), path, strict=strict)
        return model
    if path.is_dir():
        files = sorted(path.glob("*.safetensors"))
        if not files:
            extra = (
                " (found pickle files: this loader never unpickles; re-save with safetensors)"
                if any(path.glob("*.bin")) or any(path.glob("*.pt"))
                else ""
            )
            raise FileNotFoundError(f"no .safetensors file in checkpoint folder {path}{extra}")
    elif path.is_file() and path.suffix == ".safetensors":
        files = [path]
    else:
        raise FileNotFoundError(
            f"{path} is neither a checkpoint folder nor a .safetensors file; pass the folder "
            "written by save_checkpoint()"
        )
    module = unwrap_model(model)
    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    tensors: dict[str, Tensor] = {}
    for f in files:
        tensors.update(load_file(str(f), device=str(device)))
    own_shapes = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    for key, tensor in tensors.items():
        if key in own_shapes and tuple(tensor.shape) != own_shapes[key]:
            raise ValueError(
                f"checkpoint {path} does not match the model: {key} has shape "
                f"{tuple(tensor.shape)} in the checkpoint but {own_shapes[key]} in the model; "
                "load it into the architecture it was saved from"
            )
    missing, unexpected = module.load_state_dict(tensors, strict=False)
    if wrap_model(module).kind == "hf" and hasattr(module, "tie_weights"):
        module.tie_weights()
    if strict:
        own = module.state_dict()
        loaded_ptrs = {own[k].data_ptr() for k in tensors if k in own}
        really_missing = [k for k in missing if own[k].data_ptr() not in loaded_ptrs]
        if really_missing or unexpected:
            raise ValueError(
                f"checkpoint {path} does not match the model: missing keys {really_missing[:8]}"
                f", unexpected keys {list(unexpected)[:8]}; load it into the same "
                "architecture it was saved from (or pass strict=False)"
            )
    return model


def _load_adapter_checkpoint(module: nn.Module, path: Path, *, strict: bool) -> None:
    """Load the adapter folder ``path`` (PEFT's layout: the ``default`` adapter at the top,
    any other adapter in a subfolder of its name) into the PEFT model ``module``."""
    if not is_peft_model(module):
        raise ValueError(
            f"checkpoint {path} holds LoRA adapter weights ({ADAPTER_CONFIG_NAME}), but the "
            "model has no LoRA adapters; apply the same LoRA first (lora: in the model "
            "config, or hf.apply_lora) or open the folder with hf.load_model"
        )
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    device = next((p.device for p in module.parameters()), torch.device("cpu"))
    for name in module.peft_config:
        folder = path if name == "default" else path / name
        weights = folder / ADAPTER_WEIGHTS_NAME
        if not weights.exists():
            if not strict:
                continue
            raise FileNotFoundError(
                f"checkpoint {path} has no {weights.relative_to(path)} for the model's adapter "
                f"{name!r} (pickled adapter files are never loaded); load it into the model "
                "it was saved from, or pass strict=False"
            )
        tensors = load_file(str(weights), device=str(device))
        own = set(get_peft_model_state_dict(module, adapter_name=name))
        missing, unexpected = sorted(own - set(tensors)), sorted(set(tensors) - own)
        if strict and (missing or unexpected):
            raise ValueError(
                f"checkpoint {path} does not match the model's adapter {name!r}: missing keys "
                f"{missing[:8]}, unexpected keys {unexpected[:8]}; load it into a model with "
                "the LoRA settings (target modules) it was saved with (or pass strict=False)"
            )
        try:
            set_peft_model_state_dict(module, tensors, adapter_name=name)
        except RuntimeError as exc:  # a shape mismatch (e.g. another LoRA rank)
            raise ValueError(
                f"checkpoint {path} does not match the model's adapter {name!r}: {exc}; load "
                "it into a model with the LoRA settings it was saved with"
            ) from exc


# ====================================================================== schedule


def lr_multiplier(
    step: int,
    *,
    start_lr: float,
    end_lr: float,
    warmup_steps: int,
    decay_steps: int,
    schedule: str,
) -> float:
    """Multiplier of ``start_lr`` for optimizer update number ``step`` (0-based).

    Linear warmup over ``warmup_steps`` updates, then decay from ``start_lr`` to
    ``end_lr`` over ``decay_steps`` updates (``"linear"`` or ``"cosine"``), then constant.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, decay_steps))
    if schedule == "linear":
        lr = start_lr + (end_lr - start_lr) * progress
    else:
        lr = end_lr + (start_lr - end_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return lr / start_lr


# ====================================================================== trainer


def _check_int(name: str, value: Any, *, minimum: int, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")


def _check_float(name: str, value: Any, *, minimum: float, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value < minimum:
        raise ValueError(f"{name} must be a finite number >= {minimum}, got {value}")


def length_grouped_batches(
    lengths: Sequence[int],
    batch_size: int,
    *,
    generator: torch.Generator | None = None,
    mega_batch_factor: int = 50,
) -> list[list[int]]:
    """Batches of indices with similar lengths, in random order (HF ``group_by_length``).

    Indices are shuffled, cut into mega-batches of ``mega_batch_factor * batch_size``,
    each sorted by length (longest first), cut into batches; the batch order is shuffled.
    Every index appears exactly once.
    """
    order = torch.randperm(len(lengths), generator=generator).tolist()
    mega = mega_batch_factor * batch_size
    batches = []
    for start in range(0, len(order), mega):
        group = sorted(order[start : start + mega], key=lambda i: -lengths[i])
        batches += [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
    perm = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in perm]


class BaseTrainer:
    """Shared loop; see the module docstring. Not used directly.

    Args:
        model: any causal LM accepted by :func:`~self_rewarding_lm_pytorch.models.wrap_model`.
        batch_size: examples (SFT) or pairs (DPO/SPIN) per micro-batch and process.
        grad_accum_steps: micro-batches per optimizer step.
        num_epochs: passes over the data; ``num_train_steps`` (optimizer steps) overrides
            it, cycling over the data as often as needed.
        start_learning_rate, end_learning_rate: AdamW learning rate after warmup and at the
            end of the decay (``lr_schedule`` "linear" or "cosine", over ``num_decay_steps``
            updates, default all updates after ``warmup_steps``; constant afterwards).
        weight_decay: AdamW decoupled weight decay on matrices (not on biases / norms).
        adam_kwargs: extra ``torch.optim.AdamW`` arguments (betas, eps).
        max_grad_norm: gradient clipping (None: no clipping; the norm is then not logged).
        dropout: when given, every ``nn.Dropout`` module's ``p`` during training (restored
            afterwards). Attention dropout that a model applies functionally from its
            config (many Hugging Face models) is not reached by this.
        max_seq_len: truncate training rows to this many tokens (also capped at the
            model's own context length).
        early_stopper_eval_module: ``(model) -> float`` called (eval mode, no grad, main
            process) before training, every ``check_early_stop_every`` steps and at the
            end; after ``early_stop_patience`` evaluations without improvement
            (``early_stop_mode`` "min"/"max") training stops. The best state is kept in CPU
            memory and restored at the end.
        eval_every: run the trainer's validation every N steps (always at the end).
        accelerator / accelerate_kwargs: an ``accelerate.Accelerator``, or the keyword
            arguments to build one (e.g. ``dict(cpu=True, mixed_precision="bf16",
            log_with="tensorboard", project_dir=...)``).
        output_dir: ``metrics.jsonl`` is appended there, and the final model is saved to
            ``output_dir/checkpoint`` (unless ``save_final_checkpoint=False``).
        checkpoint_every, checkpoint_dir, keep_last_checkpoints: periodic checkpoints
            ``checkpoint-<step>`` (in ``checkpoint_dir``, default ``output_dir``), keeping
            the newest ``keep_last_checkpoints`` when set.
        log_every: log metrics every N steps. progress: show a tqdm bar (main process).
        seed: seeds Python/NumPy/torch RNGs (``accelerate.utils.set_seed``) and the data
            order.
    """

    desc = "training"

    def __init__(
        self,
        model: nn.Module,
        *,
        batch_size: int = 16,
        grad_accum_steps: int = 1,
        num_epochs: int = 1,
        num_train_steps: int | None = None,
        start_learning_rate: float = 1e-6,
        end_learning_rate: float = 1e-7,
        warmup_steps: int = 0,
        lr_schedule: str = "linear",
        num_decay_steps: int | None = None,
        weight_decay: float = 0.0,
        adam_kwargs: dict[str, Any] | None = None,
        max_grad_norm: float | None = 1.0,
        dropout: float | None = None,
        max_seq_len: int | None = None,
        group_by_length: bool = False,
        early_stopper_eval_module: Callable[[nn.Module], Any] | None = None,
        early_stop_mode: str = "min",
        check_early_stop_every: int = 200,
        early_stop_patience: int = 1,
        eval_every: int | None = None,
        accelerator: Any = None,
        accelerate_kwargs: dict[str, Any] | None = None,
        output_dir: str | Path | None = None,
        checkpoint_every: int | None = None,
        checkpoint_dir: str | Path | None = None,
        keep_last_checkpoints: int | None = None,
        save_final_checkpoint: bool = True,
        log_every: int = 1,
        progress: bool = True,
        project_name: str = "self-rewarding-lm",
        seed: int | None = None,
    ) -> None:
        _check_int("batch_size", batch_size, minimum=1)
        _check_int("grad_accum_steps", grad_accum_steps, minimum=1)
        _check_int("num_epochs", num_epochs, minimum=1)
        _check_int("num_train_steps", num_train_steps, minimum=1, allow_none=True)
        _check_float("start_learning_rate", start_learning_rate, minimum=0.0)
        _check_float("end_learning_rate", end_learning_rate, minimum=0.0)
        if start_learning_rate <= 0:
            raise ValueError("start_learning_rate must be > 0")
        _check_int("warmup_steps", warmup_steps, minimum=0)
        if lr_schedule not in ("linear", "cosine"):
            raise ValueError(f"lr_schedule must be 'linear' or 'cosine', got {lr_schedule!r}")
        _check_int("num_decay_steps", num_decay_steps, minimum=1, allow_none=True)
        _check_float("weight_decay", weight_decay, minimum=0.0)
        _check_float("max_grad_norm", max_grad_norm, minimum=0.0, allow_none=True)
        if max_grad_norm is not None and max_grad_norm <= 0:
            raise ValueError("max_grad_norm must be > 0, or None to disable clipping")
        _check_float("dropout", dropout, minimum=0.0, allow_none=True)
        if dropout is not None and dropout >= 1:
            raise ValueError(f"dropout must lie in [0, 1), got {dropout}")
        _check_int("max_seq_len", max_seq_len, minimum=2, allow_none=True)
        if early_stop_mode not in ("min", "max"):
            raise ValueError(f"early_stop_mode must be 'min' or 'max', got {early_stop_mode!r}")
        _check_int("check_early_stop_every", check_early_stop_every, minimum=1)
        _check_int("early_stop_patience", early_stop_patience, minimum=1)
        _check_int("eval_every", eval_every, minimum=1, allow_none=True)
        _check_int("checkpoint_every", checkpoint_every, minimum=1, allow_none=True)
        _check_int("keep_last_checkpoints", keep_last_checkpoints, minimum=1, allow_none=True)
        _check_int("log_every", log_every, minimum=1)
        if early_stopper_eval_module is not None and not callable(early_stopper_eval_module):
            raise TypeError("early_stopper_eval_module must be callable: (model) -> float")
        if accelerator is not None and accelerate_kwargs:
            raise ValueError(
                "pass either accelerator or accelerate_kwargs, not both (the kwargs would be "
                "ignored)"
            )
        checkpoint_dir = checkpoint_dir if checkpoint_dir is not None else output_dir
        if checkpoint_every is not None and checkpoint_dir is None:
            raise ValueError(
                "checkpoint_every needs a folder to write to: pass output_dir (or checkpoint_dir)"
            )

        if seed is not None:
            from accelerate.utils import set_seed

            set_seed(seed)
        self.seed = seed
        self.group_by_length = bool(group_by_length)

        # ---------------------------------------------------------------- accelerator
        self._owns_trackers = False
        if accelerator is None:
            from accelerate import Accelerator

            accelerator = Accelerator(**(accelerate_kwargs or {}))
            if (accelerate_kwargs or {}).get("log_with") is not None:
                accelerator.init_trackers(project_name)
                self._owns_trackers = True
        self.accelerator = accelerator

        # ---------------------------------------------------------------- model
        self.lm: CausalLM = (
            model if isinstance(model, CausalLM) else wrap_model(unwrap_model(model))
        )
        limits = [v for v in (max_seq_len, self.lm.max_seq_len) if v is not None]
        self.max_seq_len: int | None = min(limits) if limits else None

        params = [p for p in self.lm.parameters() if p.requires_grad]
        if not params:
            raise ValueError("the model has no trainable parameters (all requires_grad=False)")
        decay = [p for p in params if p.ndim >= 2]
        no_decay = [p for p in params if p.ndim < 2]
        groups = [{"params": decay, "weight_decay": weight_decay}]
        if no_decay:
            groups.append({"params": no_decay, "weight_decay": 0.0})
        optimizer = torch.optim.AdamW(groups, lr=start_learning_rate, **(adam_kwargs or {}))
        self.model, self.optimizer = self.accelerator.prepare(self.lm, optimizer)
        self._raw_optimizer = optimizer
        # everything this trainer prepared on the (possibly shared) accelerator, as given
        # and as returned (accelerate lists the bare module under DDP); release() removes
        # exactly these from its lists
        self._prepared: list[Any] = [self.lm, optimizer, self.model, self.optimizer]
        self._released = False

        # ---------------------------------------------------------------- settings
        self.batch_size = batch_size
        self.grad_accum_steps = grad_accum_steps
        self.num_epochs = num_epochs
        self.num_train_steps = num_train_steps
        self.start_learning_rate = float(start_learning_rate)
        self.end_learning_rate = float(end_learning_rate)
        self.warmup_steps = warmup_steps
        self.lr_schedule = lr_schedule
        self.num_decay_steps = num_decay_steps
        self.max_grad_norm = max_grad_norm
        self.dropout = dropout
        self.early_stopper_eval_module = early_stopper_eval_module
        self.early_stop_mode = early_stop_mode
        self.check_early_stop_every = check_early_stop_every
        self.early_stop_patience = early_stop_patience
        self.eval_every = eval_every
        self.output_dir = Path(output_dir) if output_dir is not None else None
        self.checkpoint_every = checkpoint_every
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
        self.keep_last_checkpoints = keep_last_checkpoints
        self.save_final_checkpoint = bool(save_final_checkpoint)
        self.log_every = log_every
        self.progress = progress

        self.step = 0
        self.epoch = 0
        self.last_checkpoint: Path | None = None
        self.history: list[dict[str, float]] = []
        self.early_stopped = False
        self._scheduler: torch.optim.lr_scheduler.LambdaLR | None = None
        self._scheduler_total: int | None = None

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
        batches, so little compute goes to padding (the order of batches stays random)."""
        generator = None
        if shuffle and self.seed is not None:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
        if shuffle and self.group_by_length and lengths is not None:
            sampler = length_grouped_batches(lengths, batch_size, generator=generator)
            loader = DataLoader(ListDataset(items), batch_sampler=sampler, collate_fn=collate_fn)
        else:
            loader = DataLoader(
                ListDataset(items),
                batch_size=batch_size,
                shuffle=shuffle,
                drop_last=False,
                collate_fn=collate_fn,
                generator=generator,
            )
        prepared = self.accelerator.prepare(loader)
        self._prepared += [loader, prepared]
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
        decay = (
            self.num_decay_steps
            if self.num_decay_steps is not None
            else max(1, total - self.warmup_steps)
        )
        kw = dict(
            start_lr=self.start_learning_rate,
            end_lr=self.end_learning_rate,
            warmup_steps=self.warmup_steps,
            decay_steps=decay,
            schedule=self.lr_schedule,
        )
        for g in self._raw_optimizer.param_groups:
            g.setdefault("initial_lr", self.start_learning_rate)
        self._scheduler = torch.optim.lr_scheduler.LambdaLR(
            self._raw_optimizer,
            lambda s: lr_multiplier(s, **kw),
            last_epoch=self.step - 1,
        )
        self._scheduler_total = total

    @contextlib.contextmanager
    def _dropout_context(self) -> Iterator[None]:
        saved: list[tuple[nn.Module, float]] = []
        if self.dropout is not None:
            for m in self.lm.modules():
                if isinstance(m, _DROPOUT_TYPES):
                    saved.append((m, m.p))
                    m.p = self.dropout
        try:
            yield
        finally:
            for m, p in saved:
                m.p = p

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
        acc = self.accelerator
        mine = {id(obj) for obj in self._prepared}
        gradient_state = getattr(acc, "gradient_state", None)
        refs = getattr(gradient_state, "dataloader_references", None) or []
        for loader in [r for r in refs if id(r) in mine]:
            loader.end()  # a loop left before its end stays registered as active otherwise
        for name in ("_models", "_optimizers", "_schedulers", "_dataloaders"):
            held = getattr(acc, name, None)
            if isinstance(held, list):
                held[:] = [obj for obj in held if id(obj) not in mine]
        self._prepared = []
        self._release_extra()
        self.model = self.lm  # the bare CausalLM: no DDP wrapper (and its buckets) kept
        self.optimizer = None  # type: ignore[assignment]
        self._raw_optimizer = None  # type: ignore[assignment]
        self._scheduler = None
        self._scheduler_total = None
        self._es_best_state = None
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
        """Write the model to ``path`` (see :func:`save_checkpoint`); main process only."""
        path = Path(path)
        self.accelerator.wait_for_everyone()
        if self.is_main:
            state = {"step": self.step, "epoch": self.epoch}
            if self.history:
                state["metrics"] = self.history[-1]
            save_checkpoint(self.unwrapped_model(), path, state=state, overwrite=overwrite)
        self.accelerator.wait_for_everyone()
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        """Load safetensors weights from ``path`` into the model."""
        load_checkpoint(self.unwrapped_model(), path)

    def _periodic_checkpoint(self, overwrite: bool) -> None:
        assert self.checkpoint_dir is not None
        path = self.save_checkpoint(
            self.checkpoint_dir / f"checkpoint-{self.step}", overwrite=overwrite
        )
        self.last_checkpoint = path
        if self.keep_last_checkpoints is not None and self.is_main:
            found = sorted(
                (
                    p
                    for p in self.checkpoint_dir.glob("checkpoint-*")
                    if p.is_dir() and p.name.split("-")[-1].isdigit()
                ),
                key=lambda p: int(p.name.split("-")[-1]),
            )
            for old in found[: -self.keep_last_checkpoints]:
                shutil.rmtree(old, ignore_errors=True)

    # ------------------------------------------------------------------ early stopping
    def _early_stop_score(self) -> float:
        assert self.early_stopper_eval_module is not None
        score = torch.zeros((), device=self.device, dtype=torch.float64)
        if self.is_main:
            was_training = self.lm.training
            self.lm.eval()
            try:
                with torch.no_grad():
                    value = self.early_stopper_eval_module(self.unwrapped_model())
            finally:
                self.lm.train(was_training)
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
        if self.num_processes > 1:
            from accelerate.utils import broadcast

            score = broadcast(score)
        return float(score)

    def _early_stop_check(self) -> bool:
        """Evaluate, keep the best state in CPU memory; True when patience is used up."""
        score = self._early_stop_score()
        self._es_last_eval_step = self.step
        better = (
            self._es_best_score is None
            or (self.early_stop_mode == "min" and score < self._es_best_score)
            or (self.early_stop_mode == "max" and score > self._es_best_score)
        )
        if not math.isfinite(score):
            better = False
        if better:
            self._es_best_score = score
            self._es_best_step = self.step
            self._es_best_state = {
                k: v.detach().to("cpu", copy=True)
                for k, v in self.unwrapped_model().state_dict().items()
            }
            self._es_bad = 0
        else:
            self._es_bad += 1
        self._log({"step": self.step, "early_stop_score": score})
        return self._es_bad >= self.early_stop_patience

    def _early_stop_finish(self) -> dict[str, float]:
        if self._es_last_eval_step != self.step:
            self._early_stop_check()
        restored = self._es_best_step != self.step and self._es_best_state is not None
        if restored:
            self.unwrapped_model().load_state_dict(self._es_best_state)
        out = {
            "early_stop_best_score": float(self._es_best_score)
            if self._es_best_score is not None
            else float("nan"),
            "early_stop_best_step": float(self._es_best_step),
            "early_stopped": float(self.early_stopped),
            "restored_best": float(restored),
        }
        self._es_best_state = None
        return out

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
        self._es_best_score: float | None = None
        self._es_best_step = self.step
        self._es_best_state: dict[str, Tensor] | None = None
        self._es_bad = 0
        self._es_last_eval_step = -1
        was_training = self.lm.training
        eval_metrics: dict[str, float] = {}
        pbar = tqdm(
            total=total - self.step,
            desc=self.desc,
            disable=not (self.progress and self.is_main),
        )
        try:
            with self._dropout_context():
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
