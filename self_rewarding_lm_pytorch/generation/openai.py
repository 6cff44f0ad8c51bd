"""Sampling from an OpenAI-compatible server (vLLM ``serve``, SGLang, TGI, hosted APIs).

:class:`OpenAIBackend` is a :class:`~.backend.GenerationBackend` over HTTP, with the
settings :class:`OpenAIConfig`. With ``api="completions"`` token-id prompts are sent as they
are and sampled ids come back exactly (the server's model shares the caller's tokenizer);
with ``api="chat"`` prompts are decoded to one user message and replies encoded back with
the caller's tokenizer (default: a lossless UTF-8 byte codec, :class:`ByteTokenizer`). The
HTTP client (pool, retries, request cache, usage) lives in :mod:`.http`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import torch

from ..config.core import ConfigError
from ..models import encode_response, wrap_tokenizer
from ..utils import with_overrides
from .config import GenerationConfig, GenerationOutput, _check_prompts, _eos_set, prepare_request
from .engine import _StopChecker
from .http import JSONClient
from .vllm import _finish, _request_seeds

__all__ = ["SERVED_KEYS", "ByteTokenizer", "OpenAIBackend", "OpenAIConfig"]

#: the settings that change what a server samples; the rest (base_url: where it is,
#: retries, timeouts) do not, so a judge server that moved resumes a run
SERVED_KEYS = ("model", "api", "extra_body")


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
        metadata=_help(
            "'completions' (token-id prompts, same tokenizer) or 'chat' (text messages)"
        ),
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


class ByteTokenizer:
    """Text as its UTF-8 bytes (ids 0-255), no special tokens and no chat template: the
    default token ids of ``api="chat"``, so any hosted chat model can be the judge."""

    eos_id: int | None = None
    pad_id: int | None = None
    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_response(self, text: str) -> list[int]:
        return self.encode(text)

    def decode(self, ids: Sequence[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")

    def format_prompt(self, prompt: str) -> str:
        return prompt


def _token_ids(choice: dict[str, Any]) -> list[int] | None:
    """The exact sampled ids of a completions choice (``return_tokens_as_token_ids``)."""
    tokens = (choice.get("logprobs") or {}).get("tokens")
    if tokens is None or not all(isinstance(t, str) and t.startswith("token_id:") for t in tokens):
        return None
    return [int(t.split(":", 1)[1]) for t in tokens]


class OpenAIBackend:
    """A generation backend that samples from an OpenAI-compatible server.

    ``config`` (or keyword ``overrides`` of its fields) says where and how; ``tokenizer``
    is the caller's tokenizer (``api="completions"``: needed only when the server returns
    no token ids; ``api="chat"``: the prompt/reply codec, default :class:`ByteTokenizer`);
    ``cache_dir`` keeps every request and its answer in ``cache_dir/requests.jsonl`` (when
    ``config.cache``), so a rerun sends only what was not answered before. The server
    serves its own model: :meth:`load_weights` is refused.
    """

    max_seq_len: int | None

    def __init__(
        self,
        config: OpenAIConfig | None = None,
        *,
        tokenizer: Any = None,
        cache_dir: str | Path | None = None,
        **overrides: Any,
    ) -> None:
        cfg = with_overrides(OpenAIConfig, config, overrides, owner="OpenAIBackend")
        cfg.validate()
        self.config = cfg
        if tokenizer is not None:
            self.tokenizer: Any = wrap_tokenizer(tokenizer)
        else:
            self.tokenizer = ByteTokenizer() if cfg.api == "chat" else None
        cache = Path(cache_dir) / "requests.jsonl" if cache_dir is not None and cfg.cache else None
        knobs = ("api_key_env", "timeout_s", "max_retries", "backoff_s", "max_backoff_s")
        settings = {k: getattr(cfg, k) for k in (*knobs, "max_concurrency")}
        self.client = JSONClient(cfg.base_url, cache_path=cache, **settings)
        self.model, self.max_seq_len = cfg.model, cfg.max_model_len
        if cfg.model is None or (cfg.api == "completions" and cfg.max_model_len is None):
            self._read_models()
        self.vocab_size = _vocab_size(self.tokenizer)

    def _read_models(self) -> None:
        """The served model name and its context from ``GET /models`` (not counted in usage)."""
        listed = self.client.request("/models").get("data") or []
        if not listed:
            raise ValueError(
                f"{self.config.base_url}/models lists no model; set openai.model to the "
                "served model name"
            )
        entry = next((m for m in listed if m.get("id") == self.model), listed[0])
        if self.model is None:
            self.model = str(entry["id"])
        if self.max_seq_len is None and self.config.api == "completions":
            length = entry.get("max_model_len")
            self.max_seq_len = int(length) if length else None

    def fingerprint(self) -> dict[str, Any]:
        """What of this backend changes its samples (a stage's fingerprint): the served
        model (as the server names it), the API, ``extra_body``, the context and tokenizer."""
        served = {k: getattr(self.config, k) for k in SERVED_KEYS}
        return {**served, "model": self.model, "max_seq_len": self.max_seq_len,
                "tokenizer": self.tokenizer}  # fmt: skip

    # ------------------------------------------------------------------ usage
    @property
    def usage(self) -> dict[str, int]:
        """``requests`` sent, ``cached`` answers, ``retries``, ``prompt_tokens`` and
        ``completion_tokens`` (server counts, sent requests only) since the backend began."""
        return dict(self.client.usage)

    # ------------------------------------------------------------------ sampling
    def _shape(self) -> SimpleNamespace:
        return SimpleNamespace(vocab_size=self.vocab_size, max_seq_len=self.max_seq_len)

    def _body(self, **fields: Any) -> dict[str, Any]:
        return {"model": self.model, **fields, **self.config.extra_body}

    def _post(self, endpoint: str, bodies: list[dict], units: list[int], progress: bool) -> list:
        if not progress:
            return self.client.post_many(endpoint, bodies)
        from tqdm.auto import tqdm

        with tqdm(total=sum(units), desc="generate", unit="prompt") as bar:
            return self.client.post_many(endpoint, bodies, lambda i: bar.update(units[i]))

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        config: GenerationConfig,
        *,
        generator: torch.Generator | int | None = None,
        decode: Callable[[Sequence[int]], str] | None = None,
        return_logprobs: bool = False,
        max_new_tokens_per_prompt: Sequence[int] | None = None,
        progress: bool = False,
    ) -> GenerationOutput:
        """Sample continuations of token-id ``prompts`` (the torch engine's contract).

        Sampled prompts go one per request with a seed drawn from ``generator`` (the same
        seed gives the same requests, so a cached or resumed run sends nothing twice);
        greedy prompts with the same limit share requests (``prompts_per_request``)."""
        if return_logprobs and self.config.api == "chat":
            raise ValueError(
                "return_logprobs needs openai.api='completions': chat replies are re-encoded "
                "with the caller's tokenizer, so the server's per-token log-probs do not line up"
            )
        cfg, prompt_ids, max_new = prepare_request(
            prompts, config, {}, max_new_tokens_per_prompt, self._shape(), decode
        )
        n = cfg.num_return_sequences
        sampled = cfg.temperature > 0
        seeds = _request_seeds(generator, len(prompt_ids)) if sampled else None
        todo = [i for i, m in enumerate(max_new) if m > 0]
        if sampled or self.config.api == "chat":
            groups = [[i] for i in todo]
        else:  # greedy: prompts with one limit share a request
            by_limit: dict[int, list[int]] = {}
            for i in todo:
                by_limit.setdefault(max_new[i], []).append(i)
            per = self.config.prompts_per_request
            groups = [g[k : k + per] for g in by_limit.values() for k in range(0, len(g), per)]
        chat = self.config.api == "chat"
        make = self._chat_body if chat else self._completions_body
        bodies = [make(cfg, [prompt_ids[i] for i in g], max_new[g[0]], seeds, g) for g in groups]
        answers = self._post(
            "/chat/completions" if chat else "/completions",
            bodies,
            [len(g) for g in groups],
            progress,
        )
        rows = len(prompt_ids) * n
        sequences: list[list[int]] = [[] for _ in range(rows)]
        reasons = ["length"] * rows
        logprobs: list[list[float]] | None = [[] for _ in range(rows)] if return_logprobs else None
        stop = _StopChecker(cfg.stop_strings, decode) if cfg.stop_strings and decode else None
        eos = _eos_set(cfg.eos_token_id)
        k = n if sampled else 1  # greedy rows are requested once and repeated n times
        for g, answer in zip(groups, answers):
            choices = sorted(answer.get("choices") or [], key=lambda c: c.get("index", 0))
            if len(choices) != len(g) * k:
                raise RuntimeError(
                    f"{self.config.base_url} answered {len(choices)} choices for {len(g)} "
                    f"prompts x {k} samples; the server does not follow the OpenAI API"
                )
            for c, choice in enumerate(choices):
                i, j = g[c // k], c % k
                toks, reason, lps = self._row(choice, eos, stop, max_new[i], return_logprobs)
                for r in range(i * n + j, (i + 1) * n, k):  # greedy: every sample of prompt i
                    sequences[r], reasons[r] = list(toks), reason
                    if logprobs is not None:
                        logprobs[r] = list(lps)
        return GenerationOutput(sequences, reasons, logprobs)

    def _completions_body(self, cfg, ids, max_new, seeds, group) -> dict[str, Any]:
        sampled = cfg.temperature > 0
        fields: dict[str, Any] = {
            "prompt": ids,
            "max_tokens": max_new,
            "temperature": float(cfg.temperature),
            "n": cfg.num_return_sequences if sampled else 1,
            "logprobs": 0,
            "return_tokens_as_token_ids": True,
            "ignore_eos": True,  # only the config's EOS ids stop a row
            "stop_token_ids": sorted(_eos_set(cfg.eos_token_id)),
        }
        if sampled:
            fields.update(seed=seeds[group[0]], top_p=float(cfg.top_p))
            if cfg.top_k > 0:
                fields["top_k"] = cfg.top_k
            if cfg.min_p > 0:
                fields["min_p"] = float(cfg.min_p)
        if cfg.stop_strings:
            fields["stop"] = list(cfg.stop_strings)
        return self._body(**fields)

    def _chat_body(self, cfg, ids, max_new, seeds, group) -> dict[str, Any]:
        sampled = cfg.temperature > 0
        fields: dict[str, Any] = {
            "messages": [{"role": "user", "content": self.tokenizer.decode(ids[0])}],
            "max_tokens": max_new,
            "temperature": float(cfg.temperature),
            "n": cfg.num_return_sequences if sampled else 1,
        }
        if sampled:
            fields.update(seed=seeds[group[0]], top_p=float(cfg.top_p))
        return self._body(**fields)

    def _row(self, choice, eos, stop, max_new, want_logprobs) -> tuple[list[int], str, list]:
        """One choice as (token ids, finish reason, log-probs) in the torch engine's terms."""
        if self.config.api == "chat":
            text = (choice.get("message") or {}).get("content") or ""
            toks = encode_response(self.tokenizer, text)
            cut = len(toks) > max_new
            toks, reason = _finish(toks[:max_new], None, set(), stop)
            if reason == "length" and choice.get("finish_reason") == "stop" and not cut:
                reason = "eos"  # the model ended its reply
            return toks, reason, []
        toks = _token_ids(choice)
        if toks is None:
            if self.tokenizer is None:
                raise ValueError(
                    f"{self.config.base_url} returned no token ids (return_tokens_as_token_ids); "
                    "pass tokenizer= (the served model's tokenizer) to re-encode the text"
                )
            toks = encode_response(self.tokenizer, choice.get("text") or "")
            want_logprobs = False
        lps = list((choice.get("logprobs") or {}).get("token_logprobs") or [])
        toks, reason = _finish(toks, choice.get("stop_reason"), eos, stop)
        if reason == "length" and choice.get("finish_reason") == "stop" and len(toks) < max_new:
            reason = "eos"  # a server that ended the row without saying why (EOS)
        if want_logprobs and len(lps) < len(toks):
            raise ValueError(f"{self.config.base_url} returned fewer log-probs than tokens")
        return toks, reason, lps[: len(toks)]

    def next_token_logprobs(
        self, sequences: Sequence[Sequence[int]], token_ids: Sequence[Sequence[int]]
    ) -> list[list[float]]:
        """``out[i][j] = log p(token_ids[i][j] | sequences[i])``, read from the server's
        prompt log-probs of ``sequences[i] + [token_ids[i][j]]`` (``api="completions"``)."""
        if self.config.api != "completions":
            raise ValueError(
                "next_token_logprobs (the judge's mode='expected') needs openai.api="
                "'completions' on a server that returns prompt log-probs (vLLM); use "
                "mode='mean' with api='chat'"
            )
        if len(sequences) != len(token_ids):
            raise ValueError(f"{len(sequences)} sequences but {len(token_ids)} lists of token ids")
        seqs = _check_prompts(sequences, self._shape(), [2] * len(sequences))  # type: ignore[arg-type]
        jobs = [(i, int(t)) for i, ids in enumerate(token_ids) for t in ids]
        per = self.config.prompts_per_request
        bodies = [
            self._body(
                prompt=[seqs[i] + [t] for i, t in jobs[k : k + per]],
                max_tokens=1,
                temperature=0.0,
                prompt_logprobs=0,
            )
            for k in range(0, len(jobs), per)
        ]
        answers = self.client.post_many("/completions", bodies)
        out: list[list[float]] = [[] for _ in sequences]
        for k, answer in zip(range(0, len(jobs), per), answers):
            choices = sorted(answer.get("choices") or [], key=lambda c: c.get("index", 0))
            for (i, t), choice in zip(jobs[k : k + per], choices):
                last = (choice.get("prompt_logprobs") or [None])[-1] or {}
                entry = last.get(str(t))
                if entry is None:
                    raise ValueError(
                        f"{self.config.base_url} returned no prompt log-prob for token {t}; "
                        "mode='expected' needs a server with prompt_logprobs (vLLM)"
                    )
                out[i].append(float(entry["logprob"] if isinstance(entry, dict) else entry))
        return out

    # ------------------------------------------------------------------ the rest
    def load_weights(self, checkpoint: str | Path) -> None:
        raise ValueError(
            f"an OpenAI-compatible backend samples from the server's own model, so it cannot "
            f"load the run's weights ({checkpoint}); use it as an external judge or sampler, "
            "or use backend vllm for the policy"
        )

    def close(self) -> None:
        """Shut the request pool down; the backend cannot sample afterwards."""
        self.client.close()


def _vocab_size(tokenizer: Any) -> int | None:
    size = getattr(tokenizer, "vocab_size", None)
    if size is None and hasattr(tokenizer, "tokenizer"):
        inner = tokenizer.tokenizer
        size = len(inner) if hasattr(inner, "__len__") else None
    return int(size) if size else None
