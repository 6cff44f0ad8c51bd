"""The OpenAI backend's HTTP client against a small real HTTP server written here.

The server (a ``ThreadingHTTPServer`` on 127.0.0.1) answers ``/v1/completions`` and
``/v1/chat/completions`` in the OpenAI schema from a script of statuses, counts the
requests in flight, and records the headers it was sent: retries, backoff, timeouts,
refusals, the API key, concurrency, the cache and the chat codec are checked through it.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from self_rewarding_lm_pytorch.generation import GenerationConfig, OpenAIBackend, OpenAIConfig
from self_rewarding_lm_pytorch.generation.http import JSONClient, ServerRefused
from self_rewarding_lm_pytorch.generation.openai import ByteTokenizer
from self_rewarding_lm_pytorch.generation.selection import usage_delta


class Script:
    """What the fake server answers: a queue of (status, headers, sleep_s) before 200s."""

    def __init__(self) -> None:
        self.queue: list[tuple[int, dict, float]] = []
        self.lock = threading.Lock()
        self.times: list[float] = []
        self.headers: list[dict] = []
        self.in_flight = self.peak = 0
        self.sleep_s = 0.0  # every 200 answer waits this long

    def next(self) -> tuple[int, dict, float]:
        with self.lock:
            return self.queue.pop(0) if self.queue else (200, {}, self.sleep_s)


def _answer(path: str, body: dict) -> dict:
    """A completion that echoes the prompt: token ids + 1, or the chat text reversed."""
    if path.endswith("/chat/completions"):
        text = body["messages"][0]["content"][::-1]
        choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        return {"choices": [dict(choice, finish_reason="stop")], "usage": {"prompt_tokens": 1}}
    prompts = body["prompt"]
    choices = []
    for p, ids in enumerate(prompts):
        toks = [(t + 1) % 50 for t in ids][: body["max_tokens"]]
        choices.append(
            {
                "index": p,
                "text": "",
                "logprobs": {
                    "tokens": [f"token_id:{t}" for t in toks],
                    "token_logprobs": [-1.0] * len(toks),
                },
                "finish_reason": "length",
                "stop_reason": None,
            }
        )
    usage = {"prompt_tokens": sum(map(len, prompts)), "completion_tokens": 3}
    return {"choices": choices, "usage": usage}


@pytest.fixture
def server():
    script = Script()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def _send(self, status: int, payload: dict, headers: dict) -> None:
            data = json.dumps(payload).encode()
            self.send_response(status)
            for k, v in headers.items():
                self.send_header(k, v)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def do_GET(self) -> None:
            self._send(200, {"data": [{"id": "fake", "max_model_len": 64}]}, {})

        def do_POST(self) -> None:
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            with script.lock:
                script.times.append(time.monotonic())
                script.headers.append(dict(self.headers))
                script.in_flight += 1
                script.peak = max(script.peak, script.in_flight)
            counted = True
            try:
                status, headers, sleep_s = script.next()
                time.sleep(sleep_s)
                # no longer in flight once the answer is ready: the client may send its next
                # request as soon as the answer arrives, before this thread's finally runs
                with script.lock:
                    script.in_flight -= 1
                    counted = False
                if status == 200:
                    self._send(200, _answer(self.path, body), headers)
                else:
                    echo = self.headers.get("Authorization", "")  # as careless servers do
                    error = {"message": f"scripted {status} {echo}".strip(), "type": "test"}
                    self._send(status, {"error": error}, headers)
            except (BrokenPipeError, ConnectionResetError):
                pass  # the client gave up (timeout)
            finally:
                if counted:
                    with script.lock:
                        script.in_flight -= 1

    httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    script.url = f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    yield script
    httpd.shutdown()
    httpd.server_close()


def _client(url: str, **kw) -> JSONClient:
    settings = dict(timeout_s=5.0, max_retries=3, backoff_s=0.05, max_backoff_s=1.0)
    return JSONClient(url, **{**settings, **kw})


BODY = {"model": "fake", "prompt": [[1, 2, 3]], "max_tokens": 2}


def test_429_retry_after_is_obeyed_then_success(server):
    server.queue = [(429, {"Retry-After": "0.4"}, 0.0)] * 2
    client = _client(server.url)
    out = client.post("/completions", BODY)
    assert out["choices"][0]["logprobs"]["tokens"] == ["token_id:2", "token_id:3"]
    assert client.usage["retries"] == 2 and client.usage["requests"] == 1
    gaps = [b - a for a, b in zip(server.times, server.times[1:])]
    assert len(gaps) == 2 and all(0.38 <= g < 2.0 for g in gaps)  # waited Retry-After, bounded


def test_500_backoff_doubles_within_cap(server):
    server.queue = [(500, {}, 0.0)] * 3
    client = _client(server.url, backoff_s=0.2, max_backoff_s=0.5)
    client.post("/completions", BODY)
    gaps = [b - a for a, b in zip(server.times, server.times[1:])]
    # jittered delays: [0.1, 0.2], [0.2, 0.4], then capped at 0.5 ([0.4, 0.5])
    assert len(gaps) == 3 and client.usage["retries"] == 3
    assert 0.09 <= gaps[0] < 1.0 and 0.19 <= gaps[1] < 1.2 and 0.25 <= gaps[2] < 1.3


def test_400_fails_at_once_with_the_server_message(server):
    server.queue = [(400, {}, 0.0)]
    client = _client(server.url)
    with pytest.raises(ServerRefused, match="HTTP 400: scripted 400;") as info:
        client.post("/completions", BODY)
    assert info.value.status == 400 and len(server.times) == 1 and client.usage["retries"] == 0


def test_exhaustion_names_the_url_and_attempts(server):
    server.queue = [(503, {}, 0.0)] * 10
    client = _client(server.url, max_retries=2)
    t0 = time.monotonic()
    with pytest.raises(ConnectionError) as info:
        client.post("/completions", BODY)
    msg = str(info.value)
    assert f"{server.url}/completions failed 3 attempts" in msg and "HTTP 503" in msg
    assert "max_retries" in msg and "server is running" in msg
    assert len(server.times) == 3 and time.monotonic() - t0 < 5


def test_timeout_is_retried_and_bounded(server):
    server.queue = [(200, {}, 1.5)] * 10  # every answer comes after timeout_s
    client = _client(server.url, timeout_s=0.3, max_retries=1)
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match="2 attempts .*timed out"):
        client.post("/completions", BODY)
    assert time.monotonic() - t0 < 3.0 and len(server.times) == 2


def test_connection_refused_is_retried_and_bounded():
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    client = _client(f"http://127.0.0.1:{port}/v1", max_retries=2)
    t0 = time.monotonic()
    with pytest.raises(ConnectionError, match="3 attempts .*(refused|Connection)"):
        client.post("/completions", BODY)
    assert client.usage["retries"] == 2 and time.monotonic() - t0 < 3.0


def test_api_key_header_sent_but_never_written(server, tmp_path, monkeypatch):
    monkeypatch.setenv("SRLM_TEST_KEY", "sk-secret-123")
    backend = OpenAIBackend(
        base_url=server.url, api_key_env="SRLM_TEST_KEY", backoff_s=0.05, cache_dir=tmp_path
    )
    backend.generate([[1, 2]], GenerationConfig(max_new_tokens=2, temperature=0.0))
    assert server.headers[-1]["Authorization"] == "Bearer sk-secret-123"
    server.queue = [(401, {}, 0.0)]
    with pytest.raises(ServerRefused, match=r"HTTP 401: scripted 401 Bearer \*\*\*") as info:
        backend.generate([[3, 4]], GenerationConfig(max_new_tokens=2, temperature=0.0))
    assert "sk-secret" not in str(info.value)
    assert "sk-secret" not in (tmp_path / "requests.jsonl").read_text()
    monkeypatch.delenv("SRLM_TEST_KEY")
    backend.generate([[5, 6]], GenerationConfig(max_new_tokens=2, temperature=0.0))
    assert "Authorization" not in server.headers[-1]


def test_concurrency_never_exceeds_max(server, capsys):
    server.sleep_s = 0.15
    backend = OpenAIBackend(base_url=server.url, max_concurrency=3, prompts_per_request=1)
    prompts = [[i + 1] for i in range(12)]
    config = GenerationConfig(max_new_tokens=1, temperature=0.0)
    out = backend.generate(prompts, config, progress=True)
    assert "12/12" in capsys.readouterr().err  # the progress bar counted every prompt
    assert out.sequences == [[(p[0] + 1) % 50] for p in prompts]  # answers in prompt order
    assert server.peak == 3 and backend.usage["requests"] == 12


def test_cache_answers_repeats_and_survives_a_torn_line(server, tmp_path):
    cfg = GenerationConfig(max_new_tokens=2, temperature=0.0, num_return_sequences=2)
    prompts = [[1, 2, 3], [4, 5], [7]]
    first = OpenAIBackend(base_url=server.url, cache_dir=tmp_path, prompts_per_request=1)
    ref = first.generate(prompts, cfg)
    assert ref.sequences == [[2, 3], [2, 3], [5, 6], [5, 6], [8], [8]]
    assert first.usage["requests"] == 3 and first.usage["prompt_tokens"] == 6
    snapshot = first.usage
    again = first.generate(prompts, cfg)
    assert again.sequences == ref.sequences
    assert usage_delta(snapshot, first.usage) == {
        "requests": 0, "cached": 3, "retries": 0, "prompt_tokens": 0, "completion_tokens": 0,
    }  # fmt: skip
    cache = tmp_path / "requests.jsonl"
    raw = cache.read_bytes()
    cache.write_bytes(raw[: len(raw) - 20])  # a crash mid-append tore the last record
    sent = len(server.times)
    second = OpenAIBackend(base_url=server.url, cache_dir=tmp_path, prompts_per_request=1)
    assert second.generate(prompts, cfg).sequences == ref.sequences
    assert second.usage["requests"] == 1 and second.usage["cached"] == 2
    assert len(server.times) == sent + 1
    assert len(cache.read_text().splitlines()) == 3  # repaired, then the answer re-appended


def test_chat_round_trips_non_ascii_text_with_the_byte_codec(server):
    backend = OpenAIBackend(base_url=server.url, model="fake", api="chat")
    assert isinstance(backend.tokenizer, ByteTokenizer) and backend.max_seq_len is None
    text = "Grüße, 世界 — naïve ✓"
    out = backend.generate(
        [backend.tokenizer.encode(text)], GenerationConfig(max_new_tokens=200, temperature=0.0)
    )
    assert backend.tokenizer.decode(out.sequences[0]) == text[::-1]
    assert out.finish_reasons == ["eos"]
    short = backend.generate(
        [backend.tokenizer.encode(text)], GenerationConfig(max_new_tokens=5, temperature=0.0)
    )
    assert len(short.sequences[0]) == 5 and short.finish_reasons == ["length"]
    with pytest.raises(ValueError, match="needs openai.api='completions'"):
        backend.next_token_logprobs([[1, 2]], [[3]])
    with pytest.raises(ValueError, match="cannot load the run's weights"):
        backend.load_weights("ckpt")


def test_config_rejects_bad_values():
    with pytest.raises(Exception, match="openai.max_concurrency must be >= 1"):
        OpenAIConfig(max_concurrency=0)
    with pytest.raises(Exception, match="must not hold the API key"):
        OpenAIConfig(extra_body={"api_key": "x"})
