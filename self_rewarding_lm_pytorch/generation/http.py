"""The HTTP client of the OpenAI-compatible backend: a bounded pool, retries, a request cache.

:class:`JSONClient` posts JSON bodies to ``base_url + endpoint`` with the standard library
only (``urllib.request`` in a ``ThreadPoolExecutor`` of ``max_concurrency`` threads). Every
request has a timeout; 429, 5xx, refused or reset connections and timeouts are retried at
most ``max_retries`` times after a delay that starts at ``backoff_s`` and doubles (with
jitter, at most ``max_backoff_s``; a ``Retry-After`` is honoured up to that cap). Other 4xx
answers fail at once with the server's message. With a cache file, each (endpoint, body)
-> response is appended to a :class:`~..store.JsonlStore` and a repeated request is answered
from it without an HTTP call. :attr:`JSONClient.usage` counts what was sent.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

from ..store import JsonlStore

__all__ = ["USAGE_KEYS", "JSONClient", "ServerRefused", "request_key"]

USAGE_KEYS = ("requests", "cached", "retries", "prompt_tokens", "completion_tokens")


class ServerRefused(RuntimeError):
    """The server answered a 4xx other than 429: the request itself is wrong (not retried)."""

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status


def request_key(endpoint: str, body: dict[str, Any]) -> str:
    """The cache key of a request: sha256 of the canonical JSON of endpoint and body."""
    canon = json.dumps([endpoint, body], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canon.encode("utf-8")).hexdigest()


def _server_message(raw: bytes) -> str:
    """The ``error.message`` of an OpenAI-style error body, else the body's first 500 chars."""
    text = raw.decode("utf-8", errors="replace")
    try:
        err = json.loads(text).get("error", text)
        return str(err.get("message", err) if isinstance(err, dict) else err)[:500]
    except (ValueError, AttributeError):
        return text[:500]


def _retry_after(value: str | None) -> float | None:
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:  # an HTTP date: not worth parsing, the backoff applies
        return None


class JSONClient:
    """Posts JSON to an OpenAI-compatible server; see the module docstring."""

    def __init__(
        self,
        base_url: str,
        *,
        api_key_env: str | None = None,
        timeout_s: float = 60.0,
        max_retries: int = 5,
        backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        max_concurrency: int = 8,
        cache_path: str | Path | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key_env = api_key_env
        self.timeout_s, self.max_retries = timeout_s, max_retries
        self.backoff_s, self.max_backoff_s = backoff_s, max_backoff_s
        self.max_concurrency = max_concurrency
        self._pool: ThreadPoolExecutor | None = ThreadPoolExecutor(
            max_workers=max_concurrency, thread_name_prefix="openai-http"
        )
        self._lock = threading.Lock()
        self._rng = random.Random()  # jitter only: never the caller's random streams
        self.usage: dict[str, int] = dict.fromkeys(USAGE_KEYS, 0)
        self.cache = JsonlStore(cache_path) if cache_path is not None else None
        self._answers = {r["id"]: r["response"] for r in self.cache or ()}

    # ------------------------------------------------------------------ one request
    def _key(self) -> str | None:
        return os.environ.get(self.api_key_env) or None if self.api_key_env else None

    def _redact(self, text: str) -> str:
        """``text`` without the API key (a server may echo it in an error)."""
        key = self._key()
        return text.replace(key, "***") if key else text

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        key = self._key()
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return headers

    def _delay(self, attempt: int, retry_after: float | None) -> float:
        delay = min(self.max_backoff_s, self.backoff_s * 2**attempt)
        delay *= 0.5 + 0.5 * self._rng.random()
        if retry_after is not None:
            delay = max(delay, retry_after)
        return min(delay, self.max_backoff_s)

    def _count(self, key: str, value: int = 1) -> None:
        with self._lock:
            self.usage[key] += value

    def request(self, endpoint: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        """One request (POST with ``body``, GET without), retried as the module says."""
        url = self.base_url + endpoint
        data = json.dumps(body).encode("utf-8") if body is not None else None
        last = "no answer"
        for attempt in range(self.max_retries + 1):
            retry_after = None
            req = urllib.request.Request(url, data=data, headers=self._headers())
            try:
                with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
                    raw = resp.read()
                try:
                    return json.loads(raw)
                except ValueError:
                    last = f"an answer that is not JSON ({raw[:200]!r})"
            except urllib.error.HTTPError as exc:
                try:
                    raw = exc.read()
                except (OSError, http.client.HTTPException):  # the body was cut off
                    raw = b""
                message = self._redact(_server_message(raw))
                if exc.code != 429 and exc.code < 500:
                    raise ServerRefused(
                        f"{url} refused the request with HTTP {exc.code}: {message}; fix the "
                        "request settings (model name, lengths, extra_body) or the server",
                        exc.code,
                    ) from None
                last = f"HTTP {exc.code}: {message}"
                retry_after = _retry_after(exc.headers.get("Retry-After"))
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                reason = getattr(exc, "reason", exc)
                last = f"{type(reason).__name__}: {reason}"
            if attempt < self.max_retries:
                self._count("retries")
                time.sleep(self._delay(attempt, retry_after))
        raise ConnectionError(
            f"{url} failed {self.max_retries + 1} attempts (last: {last}); check that the "
            "server is running and reachable at openai.base_url (a server that moved: set its "
            "new URL and rerun; cached answers are not sent again), or raise "
            "openai.max_retries / openai.timeout_s"
        )

    def post(self, endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
        """POST ``body``, answered from the cache when the same request was made before."""
        key = request_key(endpoint, body) if self.cache is not None else None
        if key is not None:
            with self._lock:
                hit = self._answers.get(key)
            if hit is not None:
                self._count("cached")
                return hit
        response = self.request(endpoint, body)
        usage = response.get("usage") or {}
        with self._lock:
            self.usage["requests"] += 1
            for name in ("prompt_tokens", "completion_tokens"):
                self.usage[name] += int(usage.get(name) or 0)
            if key is not None:
                self.cache.append(
                    {"id": key, "endpoint": endpoint, "body": body, "response": response}
                )
                self._answers[key] = response
        return response

    # ------------------------------------------------------------------ many requests
    def post_many(
        self,
        endpoint: str,
        bodies: Sequence[dict[str, Any]],
        on_done: Callable[[int], None] | None = None,
    ) -> list[dict[str, Any]]:
        """POST every body, ``max_concurrency`` at a time; answers in the order of ``bodies``.

        The first failure cancels the requests not yet started and is raised; ``on_done(i)``
        is called as request ``i`` completes (a progress bar)."""
        if self._pool is None:
            raise RuntimeError("this OpenAI backend was closed; create a new one to sample again")
        futures = [self._pool.submit(self.post, endpoint, body) for body in bodies]
        index = {f: i for i, f in enumerate(futures)}
        pending = set(futures)
        while pending:
            done, pending = wait(pending, return_when=FIRST_COMPLETED)
            for f in done:
                if f.exception() is not None:
                    for other in pending:
                        other.cancel()
                    raise f.exception()
                if on_done is not None:
                    on_done(index[f])
        return [f.result() for f in futures]

    def close(self) -> None:
        """Shut the pool down (requests not started are cancelled)."""
        if self._pool is not None:
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = None
