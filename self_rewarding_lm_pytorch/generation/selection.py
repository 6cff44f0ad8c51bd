"""Choosing the sampling backend: :class:`BackendConfig` (``generation:`` in YAML, the
CLI's ``--backend`` flags), :func:`build_backend`, and :class:`BackendPool`, the backends of
one run, each built once and kept serving the policy's latest weights.

``torch`` samples the live module (new weights are seen at once); ``vllm`` serves a Hugging
Face folder of the policy and is reloaded after every training stage; ``openai`` is an
external server that never sees the run's weights.
"""

from __future__ import annotations

import copy
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from torch import nn

from ..config.core import ConfigError, from_dict, to_dict
from .backend import GenerationBackend, TorchBackend
from .openai import SERVED_KEYS, OpenAIConfig
from .vllm import VLLMConfig

__all__ = [
    "BACKENDS",
    "BackendConfig",
    "BackendPool",
    "backend_fingerprint",
    "build_backend",
    "check_generation_override",
    "check_servable",
    "check_single_process",
    "merge_generation",
    "resolve_backend",
    "usage_delta",
]

log = logging.getLogger(__name__)

BACKENDS = ("torch", "vllm", "openai")
#: settings that change what a backend samples (the rest: speed, memory, retries, and a
#: server's address: the same served model elsewhere samples the same)
_FINGERPRINT_KEYS = {"vllm": ("dtype", "max_model_len"), "openai": SERVED_KEYS}


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class BackendConfig:
    """Which backend samples (``backend``) and that backend's settings.

    ``vllm`` applies to ``backend: vllm`` only, ``openai`` (required there) to ``backend:
    openai`` only; setting the section of a backend that is not chosen is refused.
    """

    backend: Literal["torch", "vllm", "openai"] = field(
        default="torch", metadata=_help("'torch' (the live model), 'vllm' or 'openai' (a server)")
    )
    vllm: VLLMConfig = field(
        default_factory=VLLMConfig, metadata=_help("vLLM engine settings (backend: vllm)")
    )
    openai: OpenAIConfig | None = field(
        default=None, metadata=_help("OpenAI-compatible server settings (backend: openai)")
    )

    def __post_init__(self) -> None:
        if isinstance(self.vllm, dict):
            self.vllm = from_dict(VLLMConfig, self.vllm, path="vllm")
        if isinstance(self.openai, dict):
            self.openai = from_dict(OpenAIConfig, self.openai, path="openai")
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the key, the problem and the fix."""
        if self.backend not in BACKENDS:
            import difflib

            close = difflib.get_close_matches(str(self.backend), BACKENDS, n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"generation.backend: {self.backend!r} is not a backend{hint} "
                f"(choose one of {', '.join(BACKENDS)})"
            )
        if self.openai is not None and not isinstance(self.openai, OpenAIConfig):
            raise ConfigError(
                f"generation.openai must be an OpenAIConfig or a mapping of its keys, got "
                f"{type(self.openai).__name__}"
            )
        if self.backend == "openai" and self.openai is None:
            raise ConfigError(
                "generation.backend 'openai' needs the server's settings: add generation.openai "
                "(YAML: openai: {base_url: http://HOST:PORT/v1}; CLI: --openai.base-url URL)"
            )
        if self.backend != "vllm" and self.vllm != VLLMConfig():
            raise ConfigError(
                f"generation.vllm is set but generation.backend is {self.backend!r}; set "
                "backend: vllm, or remove the vllm settings"
            )
        if self.backend != "openai" and self.openai is not None:
            raise ConfigError(
                f"generation.openai is set but generation.backend is {self.backend!r}; set "
                "backend: openai, or remove the openai settings"
            )

    @classmethod
    def of(cls, value: str | BackendConfig | dict | None) -> BackendConfig:
        """``"vllm"``, a mapping of keys or a config as a :class:`BackendConfig`."""
        if value is None:
            return cls()
        if isinstance(value, cls):
            return value
        if isinstance(value, str):
            return cls(backend=value)  # type: ignore[arg-type]
        if isinstance(value, dict):
            return from_dict(cls, value, path="generation")
        raise ConfigError(
            f"generation: expected 'torch', 'vllm', 'openai', a BackendConfig or a "
            f"GenerationBackend, got {type(value).__name__}"
        )


def check_generation_override(override: dict[str, Any], where: str) -> None:
    """Check a stage's partial ``generation:`` mapping: its keys and their values (the
    combination with the run's section is checked by :func:`merge_generation`)."""
    if not isinstance(override, dict):
        raise ConfigError(f"{where}: expected a mapping of generation keys, got {override!r}")
    unknown = sorted(set(override) - {"backend", "vllm", "openai"})
    if unknown:
        raise ConfigError(f"unknown key '{where}.{unknown[0]}' (valid keys: backend, openai, vllm)")
    if "backend" in override:
        BackendConfig(backend=override["backend"])
    if isinstance(override.get("vllm"), dict):
        from_dict(VLLMConfig, override["vllm"], path=f"{where}.vllm")
    if isinstance(override.get("openai"), dict):
        from_dict(OpenAIConfig, override["openai"], path=f"{where}.openai")


def merge_generation(base: BackendConfig, override: dict[str, Any] | None) -> BackendConfig:
    """A stage's backend: its ``generation:`` mapping merged key by key over the run's.

    A stage that chooses another backend drops the run's sections of the backends it does
    not use (``{backend: torch}`` over a vLLM run is simply the torch engine)."""
    if not override:
        return base
    merged = to_dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = {**merged[key], **copy.deepcopy(value)}
        else:
            merged[key] = copy.deepcopy(value)
    chosen = merged.get("backend", base.backend)
    if chosen != "vllm" and "vllm" not in override:
        merged["vllm"] = to_dict(VLLMConfig())
    if chosen != "openai" and "openai" not in override:
        merged["openai"] = None
    return from_dict(BackendConfig, merged, path="generation")


def backend_fingerprint(backend: BackendConfig | GenerationBackend) -> dict[str, Any]:
    """What of a backend changes the samples (for a stage's fingerprint); empty for the
    default torch engine, so runs made before backends could be chosen still resume.
    A ready backend object is named by its class."""
    if not isinstance(backend, BackendConfig):
        kind = type(backend)
        return {"backend": f"{kind.__module__}.{kind.__qualname__}"}
    if backend.backend == "torch":
        return {}
    section = getattr(backend, backend.backend)
    return {
        "backend": backend.backend,
        **{key: getattr(section, key) for key in _FINGERPRINT_KEYS[backend.backend]},
    }


def check_single_process(config: BackendConfig, where: str = "generation") -> None:
    """Refuse vLLM under several processes: one in-process engine per rank forms a
    data-parallel group whose engines must step together, while the ranks' sampling
    rounds differ (a rank without a chunk, judge calls of other sizes), so they would wait
    on each other for ever."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if config.backend == "vllm" and world > 1:
        raise ConfigError(
            f"{where}.backend: vllm under several processes (WORLD_SIZE={world}) is not "
            "supported: the ranks' engines would wait on each other; run the sampling stages "
            "in one process (e.g. without torchrun), or use backend: torch under torchrun"
        )


def check_servable(config: BackendConfig, model: nn.Module, where: str = "generation") -> None:
    """Refuse, before any work, a backend that cannot serve ``model`` (vLLM serves Hugging
    Face and PEFT models only) or that is not installed."""
    if config.backend != "vllm":
        return
    check_single_process(config, where)
    from ..models import detect_kind, unwrap_model

    kind = detect_kind(unwrap_model(model))
    if kind != "hf":
        what = (
            "an x-transformers TransformerWrapper" if kind == "xtransformers" else "a plain module"
        )
        raise ConfigError(
            f"{where}.backend: vllm serves Hugging Face (or PEFT) models, but the policy is "
            f"{what} ({type(unwrap_model(model)).__name__}); use backend: torch for it, or "
            "train a Hugging Face model (model.path)"
        )
    from .vllm import INSTALL_HINT

    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        raise ConfigError(
            f"{where}.backend: vllm is not installed ({exc}); {INSTALL_HINT}, or use backend: torch"
        ) from exc


def _policy_dtype(model: nn.Module) -> str:
    param = next(iter(model.parameters()), None)
    return str(param.dtype).removeprefix("torch.") if param is not None else "float32"


def build_backend(
    config: BackendConfig | str,
    *,
    model: nn.Module | None = None,
    tokenizer: Any = None,
    weights_dir: str | Path | None = None,
    cache_dir: str | Path | None = None,
    tokenizer_dir: str | Path | None = None,
    dtype: str | None = None,
) -> GenerationBackend:
    """The backend ``config`` names: ``torch`` over ``model``; ``vllm`` on the Hugging
    Face folder ``weights_dir`` (a PEFT ``model`` starts it with LoRA serving; its
    ``dtype: auto`` is ``model``'s dtype, else ``dtype``; ``tokenizer_dir``: another
    tokenizer folder); ``openai`` with ``tokenizer`` (token-id prompts) and its request
    cache in ``cache_dir``."""
    config = BackendConfig.of(config)
    if config.backend == "torch":
        if model is None:
            raise ValueError("build_backend: backend 'torch' needs model=")
        return TorchBackend(model)
    if config.backend == "openai":
        from .openai import OpenAIBackend

        return OpenAIBackend(config.openai, tokenizer=tokenizer, cache_dir=cache_dir)
    if weights_dir is None:
        raise ValueError("build_backend: backend 'vllm' needs weights_dir= (a Hugging Face folder)")
    from .vllm import VLLMBackend

    kwargs = config.vllm.backend_kwargs(
        _policy_dtype(model) if model is not None else dtype or "auto"
    )
    if tokenizer_dir is not None:
        kwargs["tokenizer"] = tokenizer_dir
    check_single_process(config)
    if model is not None:
        from ..models import is_peft_model, unwrap_model

        check_servable(config, model)
        kwargs["enable_lora"] = is_peft_model(unwrap_model(model))
    return VLLMBackend(weights_dir, **kwargs)


def resolve_backend(value: Any) -> BackendConfig | GenerationBackend:
    """``backend=`` of the pipeline: a name, a mapping or :class:`BackendConfig`, or a
    ready :class:`GenerationBackend` (used as given)."""
    from .backend import is_backend

    return value if is_backend(value) else BackendConfig.of(value)


class BackendPool:
    """The backends of one run, each distinct one built once, at first use.

    ``policy`` is the run's torch engine over the live policy; ``given`` a ready backend
    the caller passed (used as given, never closed here). ``weights()`` names a Hugging
    Face folder of the current policy (a vLLM engine starts there); ``cache_dir(name)``
    the folder of an OpenAI backend's request cache. After :meth:`trained`, every backend
    that samples the policy loads the new checkpoint before it next samples (a run whose
    last stage trains restarts no engine); :meth:`close` shuts down those built here.
    """

    def __init__(
        self,
        policy: TorchBackend,
        *,
        model: nn.Module,
        tokenizer: Any,
        weights: Callable[[], Path],
        cache_dir: Callable[[str], Path],
        given: GenerationBackend | None = None,
    ) -> None:
        self.policy = policy
        self.model = model
        self.tokenizer = tokenizer
        self._weights = weights
        self._cache_dir = cache_dir
        self.given = given
        self._built: dict[str, tuple[BackendConfig, GenerationBackend]] = {}
        self._asleep = False
        self._stale: dict[int, Path] = {}  # id(backend) -> the checkpoint it must load

    @staticmethod
    def _key(config: BackendConfig) -> str:
        return json.dumps(to_dict(config), sort_keys=True, default=str)

    def get(self, config: BackendConfig | None, name: str) -> GenerationBackend:
        """The backend for ``config`` (``None``: the one given), built on first use and
        serving the policy's latest weights; ``name`` names an OpenAI backend's cache folder."""
        if config is None:
            assert self.given is not None
            return self._fresh(self.given)
        if config.backend == "torch":
            return self.policy
        key = self._key(config)
        if key not in self._built:
            hf_tok = getattr(self.tokenizer, "tokenizer", None)
            if config.backend == "vllm":
                folder = self._weights()
                log.info("starting the vLLM engine on %s", folder)
                backend = build_backend(config, model=self.model, weights_dir=folder)
            else:
                backend = build_backend(
                    config, tokenizer=hf_tok or self.tokenizer, cache_dir=self._cache_dir(name)
                )
            self._built[key] = (config, backend)
        return self._fresh(self._built[key][1])

    def _fresh(self, backend: GenerationBackend) -> GenerationBackend:
        """``backend`` awake and serving the latest checkpoint."""
        self.wake()
        checkpoint = self._stale.pop(id(backend), None)
        if checkpoint is not None:
            log.info("serving %s on the %s", checkpoint, type(backend).__name__)
            backend.load_weights(checkpoint)
        return backend

    def _followers(self) -> list[tuple[BackendConfig | None, GenerationBackend]]:
        """The backends that sample the policy and must be given its new weights."""
        out: list[tuple[BackendConfig | None, GenerationBackend]] = [
            (c, b) for c, b in self._built.values() if c.backend == "vllm"
        ]
        if self.given is not None and not _over(self.given, self.model):
            out.append((None, self.given))
        return out

    def sleep(self) -> None:
        """Before a training stage: free the memory of engines with sleep mode."""
        for config, backend in self._followers():
            if config is not None and config.vllm.enable_sleep_mode and hasattr(backend, "sleep"):
                backend.sleep()
                self._asleep = True

    def wake(self) -> None:
        """Before sampling (or loading weights): undo :meth:`sleep`."""
        if not self._asleep:
            return
        for config, backend in self._followers():
            if config is not None and config.vllm.enable_sleep_mode and hasattr(backend, "wake_up"):
                backend.wake_up()
        self._asleep = False

    def trained(self, checkpoint: Path) -> None:
        """A training stage wrote ``checkpoint``: every backend of the policy loads it
        before it samples again."""
        for _, backend in self._followers():
            self._stale[id(backend)] = checkpoint

    def usage(self) -> dict[str, dict[str, int]]:
        """The usage counters of the built backends that keep them, by cache name."""
        return {k: dict(b.usage) for k, (_, b) in self._built.items() if hasattr(b, "usage")}

    def close(self) -> None:
        """Shut down every backend built here (a given one belongs to the caller)."""
        errors = []
        for _, backend in self._built.values():
            try:
                backend.close()
            except Exception as exc:  # close the others; report the first failure
                errors.append(exc)
        self._built.clear()
        if errors:
            raise errors[0]


def _over(backend: Any, model: nn.Module) -> bool:
    """Whether ``backend`` is a torch engine over ``model`` itself (it sees new weights)."""
    from ..models import unwrap_model

    lm = getattr(backend, "lm", None)
    return (
        isinstance(backend, TorchBackend)
        and lm is not None
        and (unwrap_model(lm.module) is unwrap_model(model))
    )


def usage_delta(before: dict[str, int] | None, after: dict[str, int] | None) -> dict[str, int]:
    """The counters used between two ``.usage`` snapshots."""
    before, after = before or {}, after or {}
    return {k: int(after[k]) - int(before.get(k, 0)) for k in after}
