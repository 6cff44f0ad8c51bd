"""Typed hyper-parameters of the trainers: one config dataclass per trainer.

The split: a config holds every plain value that shapes training (sizes, learning rates,
schedule, loss settings, logging and checkpoint cadence, seed), so it can come from YAML
and be checked before any work starts. What a run is made of stays a constructor argument
of the trainer: the model, the datasets, a reference model, the accelerator (or
``accelerate_kwargs`` to build one), the run's folders (``output_dir``, ``checkpoint_dir``)
and callables such as ``early_stopper_eval_module``.

A trainer takes ``config=`` and/or config field names as keywords (overrides of the
config's values); :meth:`TrainingConfig.from_kwargs` builds and checks it, and
:func:`build_config` checks a pipeline stage's ``trainer:`` mapping the same way.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import typing
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import torch

from ..config import ConfigError, _convert, _type_name
from ..losses import DPO_LOSS_TYPES, SPIN_LOSS_TYPES, dpo_loss, spin_loss

__all__ = [
    "SPIN_SCHEDULES",
    "ConfigTypeError",
    "DPOConfig",
    "PreferenceConfig",
    "SFTConfig",
    "SPINConfig",
    "TrainingConfig",
    "build_config",
]

SPIN_SCHEDULES: tuple[str, ...] = ("official", "per_epoch")
_OFFICIAL_EPOCHS_PER_ITERATION = 3  # uclaml/SPIN configs/config*.yaml: num_train_epochs


class ConfigTypeError(ConfigError, TypeError):
    """A trainer setting of the wrong type, or an unknown one (a ``TypeError`` too)."""

    def __init__(self, message: str, key: str | None = None, expected: str | None = None):
        super().__init__(message)
        self.key, self.expected = key, expected


def _opt(default: Any, help: str) -> Any:
    return field(default=default, metadata={"help": help})


def _at_least(n: int) -> tuple[Any, str]:
    return (lambda v: v >= n), f"be >= {n}"


def _finite(minimum: float, *, strict: bool = False) -> tuple[Any, str]:
    if strict:
        return (lambda v: math.isfinite(v) and v > minimum), f"be a finite number > {minimum}"
    return (lambda v: math.isfinite(v) and v >= minimum), f"be a finite number >= {minimum}"


def _one_of(*choices: str) -> tuple[Any, str]:
    return (lambda v: v in choices), "be " + " or ".join(repr(c) for c in choices)


def _unknown_message(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    return f"{key!r}{hint} (valid names: {', '.join(sorted(valid))})"


@dataclass
class TrainingConfig:
    """The loop's hyper-parameters, shared by every trainer (defaults: the DPO stage's)."""

    batch_size: int = _opt(16, "examples (SFT) or pairs (DPO/SPIN) per micro-batch and process")
    grad_accum_steps: int = _opt(1, "micro-batches per optimizer step")
    num_epochs: int = _opt(1, "passes over the data (num_train_steps overrides it)")
    num_train_steps: int | None = _opt(None, "optimizer steps in all, cycling over the data")
    start_learning_rate: float = _opt(1e-6, "AdamW learning rate after the warmup")
    end_learning_rate: float = _opt(1e-7, "learning rate at the end of the decay")
    warmup_steps: int = _opt(0, "updates of linear warmup from 0 to start_learning_rate")
    lr_schedule: str = _opt("linear", "decay shape after the warmup: 'linear' or 'cosine'")
    num_decay_steps: int | None = _opt(None, "updates of decay (default: all after warmup)")
    weight_decay: float = _opt(0.0, "AdamW decoupled weight decay on matrices")
    adam_kwargs: dict[str, Any] | None = _opt(None, "extra arguments of the optimizer's class")
    optimizer: Literal["adamw", "adamw8bit"] = _opt(
        "adamw", "'adamw' (torch) or 'adamw8bit' (bitsandbytes, CUDA: 8-bit m and v)"
    )
    gradient_checkpointing: bool = _opt(
        False, "recompute each decoder layer in the backward pass (less activation memory)"
    )
    max_grad_norm: float | None = _opt(1.0, "gradient clipping norm (None: no clipping)")
    dropout: float | None = _opt(None, "p of every nn.Dropout during training (None: as is)")
    max_seq_len: int | None = _opt(None, "truncate rows to this many tokens")
    group_by_length: bool = _opt(False, "batch rows of similar length (less padding)")
    length_buckets: list[int] | None = _opt(
        None, "token-length boundaries; every batch takes rows of one bucket (less padding)"
    )
    early_stop_mode: str = _opt("min", "'min' or 'max': which early-stop scores are better")
    check_early_stop_every: int = _opt(200, "steps between early-stop evaluations")
    early_stop_patience: int = _opt(1, "evaluations without improvement before stopping")
    eval_every: int | None = _opt(None, "steps between validations (always at the end)")
    checkpoint_every: int | None = _opt(None, "steps between periodic checkpoints")
    keep_last_checkpoints: int | None = _opt(None, "periodic checkpoints kept (None: all)")
    save_final_checkpoint: bool = _opt(True, "save output_dir/checkpoint after training")
    log_every: int = _opt(1, "steps between metric logs")
    progress: bool = _opt(True, "show a progress bar (main process)")
    project_name: str = _opt("self-rewarding-lm", "tracker project name (log_with)")
    seed: int | None = _opt(None, "seed of the RNGs and the data order")
    pad_id: int | None = _opt(None, "trailing pad_id tokens of dataset items are stripped")

    #: seed / legacy spellings of fields: ``{alias: field name}``
    aliases: ClassVar[dict[str, str]] = {}

    # ------------------------------------------------------------------ building
    @classmethod
    def accepted_keys(cls) -> list[str]:
        """Field names and their aliases: the keywords a trainer takes as overrides."""
        return [f.name for f in dataclasses.fields(cls)] + list(cls.aliases)

    @classmethod
    def _normalize(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        """Alias keywords renamed to their fields (both given: an error)."""
        out = dict(kwargs)
        for alias, name in cls.aliases.items():
            if alias in out:
                if name in out:
                    raise ConfigError(f"pass {name} or {alias} (the same setting), not both")
                out[name] = out.pop(alias)
        return out

    @classmethod
    def from_kwargs(
        cls,
        config: TrainingConfig | None,
        overrides: dict[str, Any],
        *,
        owner: str,
        extra: list[str] | None = None,
    ) -> TrainingConfig:
        """``config`` (default: this class's defaults) with ``overrides`` applied, validated.

        An unknown keyword raises :class:`ConfigTypeError` naming it and the valid names
        (``extra``: the owner's other keyword arguments, listed too).
        """
        if config is not None and not isinstance(config, cls):
            raise ConfigTypeError(
                f"{owner}: config must be a {cls.__name__}, got {type(config).__name__}; "
                f"build one with {cls.__name__}(...) or pass its fields as keywords"
            )
        valid = cls.accepted_keys()
        for key in overrides:
            if key not in valid:
                raise ConfigTypeError(
                    f"{owner}() got an unknown argument "
                    f"{_unknown_message(key, valid + list(extra or []))}",
                    key,
                )
        kwargs = cls._normalize(overrides)
        out = dataclasses.replace(config, **kwargs) if config is not None else cls(**kwargs)
        try:
            out.validate()
        except ConfigTypeError as exc:
            if exc.expected is None:
                raise
            raise ConfigTypeError(
                f"{exc}; {owner}'s {exc.key} takes {exc.expected}", exc.key, exc.expected
            ) from None
        return out

    # ------------------------------------------------------------------ validation
    def _rules(self) -> list[tuple[str, tuple[Any, str], str]]:
        """``(key, (predicate, rule), fix)``; checked on values that are not None."""
        return [
            ("batch_size", _at_least(1), "use e.g. 16"),
            ("grad_accum_steps", _at_least(1), "use 1 for no accumulation"),
            ("num_epochs", _at_least(1), "use e.g. 1"),
            ("num_train_steps", _at_least(1), "or None to train num_epochs epochs"),
            ("start_learning_rate", _finite(0.0, strict=True), "use e.g. 1e-6"),
            ("end_learning_rate", _finite(0.0), "use e.g. a tenth of start_learning_rate"),
            ("warmup_steps", _at_least(0), "use 0 for no warmup"),
            ("lr_schedule", _one_of("linear", "cosine"), "pick one of these"),
            ("num_decay_steps", _at_least(1), "or None to decay over all updates"),
            ("weight_decay", _finite(0.0), "use 0 for none"),
            ("max_grad_norm", _finite(0.0, strict=True), "or None to disable clipping"),
            ("dropout", ((lambda v: 0 <= v < 1), "lie in [0, 1)"), "or None to keep it"),
            ("max_seq_len", _at_least(2), "or None for the model's context length"),
            ("early_stop_mode", _one_of("min", "max"), "'min' for a loss, 'max' for a score"),
            ("check_early_stop_every", _at_least(1), "use e.g. 200"),
            ("early_stop_patience", _at_least(1), "use e.g. 1"),
            ("eval_every", _at_least(1), "or None to validate at the end only"),
            ("checkpoint_every", _at_least(1), "or None for no periodic checkpoints"),
            ("keep_last_checkpoints", _at_least(1), "or None to keep them all"),
            ("log_every", _at_least(1), "use 1 to log every step"),
            (
                "length_buckets",
                (_increasing_lengths, "be strictly increasing token counts >= 1"),
                "e.g. [64, 256], or None for no buckets",
            ),
        ]

    def validate(self) -> None:
        """Check every field's type (against its annotation) and range.

        Raises :class:`ConfigTypeError` for a wrong type, :class:`ConfigError` for a value
        out of range; the message starts with the key.
        """
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value = getattr(self, f.name)
            try:
                value = _convert(value, hints[f.name], f.name)
            except ConfigError as exc:
                raise ConfigTypeError(str(exc), f.name, _type_name(hints[f.name])) from None
            setattr(self, f.name, value)  # ints given for floats become floats
        for key, (ok, rule), fix in self._rules():
            value = getattr(self, key)
            if value is not None and not ok(value):
                raise ConfigError(f"{key} must {rule}, got {value!r}; {fix}")
        if self.group_by_length and self.length_buckets:
            raise ConfigError(
                f"group_by_length and length_buckets {self.length_buckets!r} are both set; "
                "batches are either length-sorted or bucketed: keep one"
            )
        self._validate_more()

    def _validate_more(self) -> None:
        """Subclass hook: checks across fields, run after the per-field ones."""


def _increasing_lengths(bounds: list[int]) -> bool:
    return all(b >= 1 for b in bounds) and all(a < b for a, b in zip(bounds, bounds[1:]))


def _loss_check(key: str, call: Any) -> None:
    try:
        call()
    except (TypeError, ValueError) as exc:
        msg = str(exc)
        raise ConfigError(msg if msg.startswith(key) else f"{key}: {msg}") from None


@dataclass
class SFTConfig(TrainingConfig):
    """Supervised fine-tuning; defaults follow the paper's SFT (5.5e-6 cosine to 1.1e-6)."""

    start_learning_rate: float = _opt(5.5e-6, "AdamW learning rate after the warmup")
    end_learning_rate: float = _opt(1.1e-6, "learning rate at the end of the decay")
    lr_schedule: str = _opt("cosine", "decay shape after the warmup: 'linear' or 'cosine'")


@dataclass
class PreferenceConfig(TrainingConfig):
    """Settings shared by the pairwise preference trainers (DPO, SPIN)."""

    nll_weight: float = _opt(0.0, "weight of the chosen response's NLL (iterative RPO)")
    replay_weight: float = _opt(1.0, "weight of the replay set's NLL in every micro-batch")
    replay_batch_size: int | None = _opt(None, "replay examples per micro-batch (batch_size)")
    ref_batch_size: int | None = _opt(None, "pairs per reference pass (2 * batch_size)")

    def _rules(self) -> list[tuple[str, tuple[Any, str], str]]:
        return super()._rules() + [
            ("nll_weight", _finite(0.0), "use 0 to turn it off"),
            ("replay_weight", _finite(0.0), "use 0 to turn replay off"),
            ("replay_batch_size", _at_least(1), "or None for batch_size"),
            ("ref_batch_size", _at_least(1), "or None for 2 * batch_size"),
        ]


@dataclass
class DPOConfig(PreferenceConfig):
    """DPO (defaults: the paper's, beta 0.1, learning rate 1e-6 decaying to 1e-7)."""

    beta: float = _opt(0.1, "DPO temperature of the implicit reward")
    loss_type: str = _opt("sigmoid", f"one of {', '.join(DPO_LOSS_TYPES)}")
    label_smoothing: float = _opt(0.0, "cDPO / rDPO label noise in [0, 0.5)")
    precompute_ref_logps: bool = _opt(True, "score all pairs with the reference once up front")
    ref_adapter: str = _opt("current", "LoRA reference: 'current' (M_t) or 'disabled' (base)")

    def _rules(self) -> list[tuple[str, tuple[Any, str], str]]:
        return super()._rules() + [
            ("ref_adapter", _one_of("current", "disabled"), "'current' is the paper's M_t"),
        ]

    def _validate_more(self) -> None:
        if self.loss_type not in DPO_LOSS_TYPES:
            raise ConfigError(
                f"unknown DPO loss_type {self.loss_type!r}; choose one of "
                f"{', '.join(DPO_LOSS_TYPES)}"
            )
        z, n = torch.zeros(1), torch.ones(1)
        _loss_check("beta", lambda: dpo_loss(
            z, z, z, z, beta=self.beta, loss_type=self.loss_type,
            label_smoothing=self.label_smoothing, chosen_lengths=n, rejected_lengths=n,
        ))  # fmt: skip


def _positive_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive int, got {value!r}")
    return value


@dataclass
class SPINConfig(PreferenceConfig):
    """SPIN (defaults: the seed's SPINTrainer; see ``trainers/spin.py`` for the schedule).

    Seed spellings: ``epochs`` (num_epochs), ``learning_rate_num_decay_steps``
    (num_decay_steps), ``valid_every`` (eval_every), ``spin_λ`` (lam), and the bundles
    ``spin_kwargs`` (``λ``/``lam``, ``loss_type``) and ``filter_kwargs`` (``thres``: top_p).
    """

    grad_accum_steps: int = _opt(2, "micro-batches per optimizer step")
    num_epochs: int | None = _opt(None, "passes over the pairs in all (default 2)")
    num_decay_steps: int | None = _opt(1000, "updates of decay, then constant")
    dropout: float | None = _opt(0.0, "p of every nn.Dropout during training (None: as is)")
    pad_id: int | None = _opt(-1, "trailing pad_id tokens of dataset items are stripped")
    iterations: int | None = _opt(None, "SPIN iterations instead of num_epochs")
    schedule: str = _opt("official", "'official' (uclaml/SPIN) or 'per_epoch'")
    epochs_per_iteration: int | None = _opt(None, "epochs per iteration ('official': 3)")
    temperature: float = _opt(0.7, "sampling temperature of the opponent (0 = greedy)")
    top_p: float = _opt(0.9, "nucleus sampling threshold in (0, 1]")
    top_k: int = _opt(0, "top-k sampling (0: off)")
    eos_id: int | None = _opt(None, "generation stops at (and keeps) this token")
    lam: float = _opt(0.1, "the SPIN regulariser lambda (the seed's spin_λ)")
    loss_type: str = _opt("sigmoid", f"one of {', '.join(SPIN_LOSS_TYPES)}")
    generate_batch_size: int | None = _opt(None, "prompts per generate call")

    aliases: ClassVar[dict[str, str]] = {
        "epochs": "num_epochs",
        "learning_rate_num_decay_steps": "num_decay_steps",
        "valid_every": "eval_every",
        "spin_λ": "lam",
    }
    _bundles: ClassVar[tuple[str, ...]] = ("spin_kwargs", "filter_kwargs")

    @classmethod
    def accepted_keys(cls) -> list[str]:
        return super().accepted_keys() + list(cls._bundles)

    @classmethod
    def _normalize(cls, kwargs: dict[str, Any]) -> dict[str, Any]:
        out = super()._normalize(kwargs)
        spin_kwargs = out.pop("spin_kwargs", None) or {}
        filter_kwargs = out.pop("filter_kwargs", None) or {}
        for name, bundle, allowed in (
            ("spin_kwargs", spin_kwargs, {"λ", "lam", "loss_type"}),
            ("filter_kwargs", filter_kwargs, {"thres"}),
        ):
            if not isinstance(bundle, dict):
                raise ConfigTypeError(
                    f"{name} must be a dict, got {type(bundle).__name__}", name, "dict"
                )
            unknown = set(bundle) - allowed
            if unknown:
                raise ConfigError(
                    f"unsupported {name} {sorted(unknown)}; supported: {sorted(allowed)}"
                    + ("; use top_p / top_k instead" if name == "filter_kwargs" else "")
                )
        if "λ" in spin_kwargs or "lam" in spin_kwargs:
            out["lam"] = spin_kwargs.get("λ", spin_kwargs.get("lam"))
        if "loss_type" in spin_kwargs:
            out["loss_type"] = spin_kwargs["loss_type"]
        if "thres" in filter_kwargs:
            out["top_p"] = filter_kwargs["thres"]
        return out

    def _rules(self) -> list[tuple[str, tuple[Any, str], str]]:
        return super()._rules() + [
            ("temperature", _finite(0.0), "0 = greedy"),
            ("top_p", ((lambda v: 0 < v <= 1), "lie in (0, 1]"), "1 disables it"),
            ("top_k", _at_least(0), "0 disables it"),
            ("generate_batch_size", _at_least(1), "or None for max(batch_size, 32)"),
        ]

    def _validate_more(self) -> None:
        self.epoch_plan()
        if self.loss_type not in SPIN_LOSS_TYPES:
            raise ConfigError(
                f"unknown SPIN loss_type {self.loss_type!r}; choose one of "
                f"{', '.join(SPIN_LOSS_TYPES)}"
            )
        z = torch.zeros(1)
        _loss_check("lam", lambda: spin_loss(z, z, z, z, lam=self.lam, loss_type=self.loss_type))

    def epoch_plan(self) -> tuple[int, int]:
        """``(total epochs, epochs per iteration)`` from the schedule settings."""
        schedule, epochs, iterations = self.schedule, self.num_epochs, self.iterations
        if schedule not in SPIN_SCHEDULES:
            raise ConfigError(
                f"unknown SPIN schedule {schedule!r}; choose 'official' (generate once per "
                "iteration, several epochs on it, mixed with the previous iteration's data) or "
                "'per_epoch' (generate anew every epoch)"
            )
        if schedule == "per_epoch":
            if self.epochs_per_iteration not in (None, 1):
                raise ConfigError(
                    f"schedule='per_epoch' trains one epoch per iteration, got "
                    f"epochs_per_iteration={self.epochs_per_iteration!r}; drop it or use "
                    "schedule='official'"
                )
            per_iteration = 1
        elif self.epochs_per_iteration is None:
            per_iteration = _OFFICIAL_EPOCHS_PER_ITERATION
        else:
            per_iteration = _positive_int("epochs_per_iteration", self.epochs_per_iteration)
        if epochs is not None and iterations is not None:
            raise ConfigError(
                "pass epochs (passes in all) or iterations (SPIN iterations of "
                "epochs_per_iteration epochs each), not both"
            )
        if iterations is not None:
            return _positive_int("iterations", iterations) * per_iteration, per_iteration
        return (2 if epochs is None else epochs), per_iteration


def _constructor_args(trainer_cls: type) -> list[str]:
    """Keyword arguments of a trainer's constructors that are not config fields."""
    names: list[str] = []
    for cls in trainer_cls.__mro__:
        init = cls.__dict__.get("__init__")
        if init is None:
            continue
        for n, p in inspect.signature(init).parameters.items():
            if p.kind is p.KEYWORD_ONLY and n not in ("config",) and n not in names:
                names.append(n)
    return names


def build_config(trainer_cls: type, kwargs: dict[str, Any], where: str) -> TrainingConfig:
    """Check a mapping of ``trainer_cls`` keyword arguments (a pipeline stage's ``trainer:``)
    and return its config; keys that are constructor arguments (datasets, callables) are
    accepted and left out of the config.

    Raises :class:`ConfigError` prefixed with ``where`` (e.g. ``"trainer"``): an unknown key
    names the valid ones, a wrong type the expected type, a bad value the config's rule.
    """
    config_class: type[TrainingConfig] = trainer_cls.config_class
    name = trainer_cls.__name__
    valid = config_class.accepted_keys()
    extra = _constructor_args(trainer_cls)
    for key in kwargs:
        if key not in valid and key not in extra:
            close = difflib.get_close_matches(key, valid + extra, n=1, cutoff=0.5)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{where}: unknown {name} argument {key!r}{hint} (valid keys: "
                f"{', '.join(sorted(valid + extra))})"
            )
    overrides = {k: v for k, v in kwargs.items() if k in valid}
    try:
        return config_class.from_kwargs(None, overrides, owner=name)
    except ConfigTypeError as exc:
        raise ConfigError(f"{where}.{exc}" if exc.expected else f"{where}: {exc}") from None
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from None
