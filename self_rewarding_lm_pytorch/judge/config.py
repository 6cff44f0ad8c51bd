"""How an LLM judge samples its judgements: one typed config for the Python API, YAML and CLI."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass, field
from typing import Any, Literal

from ..config import ConfigError
from ..generation import GenerationBackend, GenerationConfig, generate

__all__ = ["JUDGE_MODES", "ON_TOO_LONG", "JudgeConfig"]

JUDGE_MODES = ("mean", "expected")
ON_TOO_LONG = ("error", "truncate_response", "truncate_left")


def _keyword_options(fn: Any) -> set[str]:
    return {
        name
        for name, p in inspect.signature(fn).parameters.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY
    }


#: what the judge passes to ``generate`` itself (not settable through generation_kwargs)
_JUDGE_OWN = {"generator", "decode", "return_logprobs"}
#: keyword options of every backend's ``generate`` (read, not assumed)
BACKEND_OPTIONS = _keyword_options(GenerationBackend.generate) - _JUDGE_OWN
#: options of the torch engine beyond those: they configure the :class:`TorchBackend`
ENGINE_OPTIONS = _keyword_options(generate) - _JUDGE_OWN - BACKEND_OPTIONS
CONFIG_FIELDS = {f.name for f in dataclasses.fields(GenerationConfig)}


@dataclass
class JudgeConfig:
    """Sampling settings of an LLM judge (paper §2.3: 3 judgements at T=0.7, averaged)."""

    num_samples: int = field(
        default=3, metadata={"help": "judgements sampled per response and averaged (paper: 3)"}
    )
    mode: Literal["mean", "expected"] = field(
        default="mean",
        metadata={
            "help": "'mean' of sampled scores (paper) or 'expected' score under the greedy "
            "judgement's score-token distribution"
        },
    )
    temperature: float = field(default=0.7, metadata={"help": "judgement sampling temperature"})
    top_p: float = field(default=0.9, metadata={"help": "judgement nucleus sampling top-p"})
    max_new_tokens: int = field(default=256, metadata={"help": "tokens per judgement at most"})
    batch_size: int | None = field(
        default=None, metadata={"help": "responses per generate call (null: all at once)"}
    )
    token_budget: int | None = field(
        default=None,
        metadata={"help": "tokens (prompt + new, times samples) per generate call at most"},
    )
    on_too_long: Literal["error", "truncate_response", "truncate_left"] = field(
        default="error",
        metadata={
            "help": "when judge prompt + max_new_tokens exceeds the context: 'error', "
            "'truncate_response' (cut the response's tail) or 'truncate_left'"
        },
    )
    generation_kwargs: dict[str, Any] | None = field(
        default=None,
        metadata={
            "help": "extra GenerationConfig fields (top_k, stop_strings, ...) or generate() "
            "options (progress, token_budget, ...) of the judgements"
        },
    )

    def engine_options(self) -> list[str]:
        """The settings that configure the torch engine of a judge handed a model:
        ``token_budget`` and the engine keys of ``generation_kwargs`` (a judge handed a
        backend samples in chunks of ``token_budget`` instead, and refuses the others)."""
        engine = sorted(set(self.generation_kwargs or {}) & ENGINE_OPTIONS)
        return (["token_budget"] if self.token_budget is not None else []) + engine

    def validate(self, where: str = "judge") -> None:
        """Raise :class:`ConfigError` naming the key, the problem and the fix."""

        def need(ok: bool, key: str, problem: str, fix: str) -> None:
            if not ok:
                raise ConfigError(f"{where}: {key} must {problem}; {fix}")

        def positive_int(v: object) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 1

        need(positive_int(self.num_samples), "num_samples", "be an int >= 1", "the paper uses 3")
        need(self.mode in JUDGE_MODES, "mode", f"be one of {', '.join(JUDGE_MODES)}", "use mean")
        need(
            isinstance(self.temperature, (int, float)) and self.temperature >= 0,
            "temperature",
            "be >= 0 (0 is greedy)",
            "the paper uses 0.7",
        )
        need(
            isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1,
            "top_p",
            "lie in (0, 1]",
            "the paper uses 0.9",
        )
        need(positive_int(self.max_new_tokens), "max_new_tokens", "be an int >= 1", "use 256")
        for key in ("batch_size", "token_budget"):
            value = getattr(self, key)
            need(value is None or positive_int(value), key, "be an int >= 1 or null", "or null")
        need(
            self.on_too_long in ON_TOO_LONG,
            "on_too_long",
            f"be one of {', '.join(ON_TOO_LONG)}",
            "use error",
        )
        extra = self.generation_kwargs
        need(extra is None or isinstance(extra, dict), "generation_kwargs", "be a dict", "or null")
        valid = CONFIG_FIELDS | BACKEND_OPTIONS | ENGINE_OPTIONS
        unknown = sorted(set(extra or {}) - valid)
        if unknown:
            raise ConfigError(
                f"{where}: generation_kwargs {unknown} are neither GenerationConfig fields nor "
                f"generate() options; use only {sorted(valid)}"
            )
