"""Sampling from an OpenAI-compatible server (vLLM ``serve``, SGLang, TGI, hosted APIs).

This module holds the settings, :class:`OpenAIConfig`; the backend itself follows.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from ..config.core import ConfigError

__all__ = ["OpenAIConfig"]


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class OpenAIConfig:
    """How to reach an OpenAI-compatible server and how hard to try.

    The API key is read from the environment variable named by ``api_key_env`` when a
    request is sent; it is never a config value and is never written to the run directory.
    """

    base_url: str = field(
        default="http://127.0.0.1:8000/v1", metadata=_help("server URL up to and including /v1")
    )
    model: str | None = field(
        default=None, metadata=_help("served model name (null: the first of GET /models)")
    )
    api: Literal["completions", "chat"] = field(
        default="completions",
        metadata=_help("'completions' (token-id prompts, same tokenizer) or 'chat' (text messages)"),
    )
    api_key_env: str | None = field(
        default="OPENAI_API_KEY", metadata=_help("environment variable holding the API key")
    )
    max_concurrency: int = field(default=8, metadata=_help("requests in flight at most"))
    timeout_s: float = field(default=60.0, metadata=_help("seconds per request at most"))
    max_retries: int = field(
        default=5, metadata=_help("retries of a request after 429, 5xx or a connection error")
    )
    backoff_s: float = field(
        default=1.0, metadata=_help("first retry delay in seconds (doubles, with jitter)")
    )
    max_backoff_s: float = field(default=30.0, metadata=_help("longest retry delay in seconds"))
    max_model_len: int | None = field(
        default=None, metadata=_help("context length (null: as the server reports, if it does)")
    )
    prompts_per_request: int = field(
        default=16, metadata=_help("token-id prompts sent in one completions request at most")
    )
    extra_body: dict[str, Any] = field(
        default_factory=dict, metadata=_help("extra fields added to every request body")
    )
    cache: bool = field(
        default=True, metadata=_help("cache requests and responses in the run directory")
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the key, the problem and the fix."""
        if not self.base_url.startswith(("http://", "https://")):
            raise ConfigError(
                f"openai.base_url must start with http:// or https://, got {self.base_url!r} "
                "(e.g. http://127.0.0.1:8000/v1)"
            )
        for key in ("max_concurrency", "prompts_per_request"):
            if getattr(self, key) < 1:
                raise ConfigError(f"openai.{key} must be >= 1, got {getattr(self, key)}")
        if self.max_retries < 0:
            raise ConfigError(f"openai.max_retries must be >= 0, got {self.max_retries}")
        for key in ("timeout_s", "backoff_s", "max_backoff_s"):
            if getattr(self, key) <= 0:
                raise ConfigError(f"openai.{key} must be > 0 seconds, got {getattr(self, key)}")
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(f"openai.max_model_len must be >= 2, got {self.max_model_len}")
        if "api_key" in self.extra_body or "Authorization" in self.extra_body:
            raise ConfigError(
                "openai.extra_body must not hold the API key; put the key in the environment "
                "variable named by openai.api_key_env"
            )
