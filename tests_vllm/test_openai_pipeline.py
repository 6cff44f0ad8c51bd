"""``srlm run`` with an external llm judge served over HTTP by a real vLLM OpenAI server:
the server is killed mid-stage (the run stops, bounded, naming the URL and the fix), comes
back on a new port, and the run resumes there with the cached requests not sent again and
the same candidates and pairs as an uninterrupted run. Also: the server's address is not
part of a fingerprint (its served model is), and the API key is never written to the run.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import tiny_folder
from server import VLLMServer

from self_rewarding_lm_pytorch.config import load_run_config
from self_rewarding_lm_pytorch.fingerprint import identity
from self_rewarding_lm_pytorch.generation import OpenAIBackend
from self_rewarding_lm_pytorch.generation.selection import BackendConfig, backend_fingerprint
from self_rewarding_lm_pytorch.hf import load_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SRLM = [sys.executable, "-m", "self_rewarding_lm_pytorch.cli", "-q", "run"]
KEY = "sk-test-never-written-8c1f"  # the API key the runs get in their environment
#: a vocabulary of mostly digits: the random judge's outputs hold numbers to parse
WORDS = [*"0123456789", *"score the answer to : . tell me a story what is".split()]
PER_CHUNK = 8  # judge requests per chunk: chunk_size 4 x num_candidates 2, one per request


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_folder(tmp_path_factory.mktemp("digits") / "model", words=WORDS)


def _offline(url: str, model: str = "tiny", **kw) -> OpenAIBackend:
    """A backend that contacts no server (model and context given)."""
    return OpenAIBackend(base_url=url, model=model, max_model_len=128, **kw)


def test_server_address_is_not_fingerprinted(tiny: Path) -> None:
    """The same served model at another address: the same judge and backend fingerprints;
    another served model or API: different ones (a resumed run refuses it)."""
    from self_rewarding_lm_pytorch.judge import LLMJudge, RewardConfig
    from self_rewarding_lm_pytorch.models import HFTokenizer

    tok = HFTokenizer(load_tokenizer(tiny))
    reward = RewardConfig(
        prompt_template="{{ prompt }} {{ response }}", reward_regex_template="{{ reward }}"
    )

    def judge(url: str, **kw) -> dict:
        return identity(LLMJudge(_offline(url, tokenizer=tok.tokenizer, **kw), tok, reward))

    a = judge("http://127.0.0.1:8000/v1")
    assert judge("https://judge.example.com:9/v1", max_retries=0, timeout_s=3) == a
    assert judge("http://127.0.0.1:8000/v1", model="other") != a
    assert judge("http://127.0.0.1:8000/v1", extra_body={"top_k": 1}) != a

    def config(url: str, **kw) -> dict:
        return backend_fingerprint(
            BackendConfig.of({"backend": "openai", "openai": {"base_url": url, **kw}})
        )

    b = config("http://127.0.0.1:8000/v1", model="m")
    assert "base_url" not in str(b)
    assert config("http://10.0.0.2:1/v1", model="m", max_retries=1) == b
    assert config("http://127.0.0.1:8000/v1", model="m2") != b
    assert config("http://127.0.0.1:8000/v1", model="m", api="chat") != b


def test_http_judge_example_is_a_served_judge() -> None:
    """examples/http_judge.yaml: an llm judge asked over HTTP (completions, token ids, its
    tokenizer given), and the hosted chat variant its comments describe."""
    example = ROOT / "examples" / "http_judge.yaml"
    cfg = load_run_config(example, check_files=False)
    (stage,) = [s for s in cfg.stage_objects if s.kind == "external_reward_dpo"]
    judge = cfg.judges[stage.judge]
    assert judge.kind == "llm" and judge.path is None and judge.tokenizer is not None
    assert judge.generation.backend == "openai" and judge.generation.openai.api == "completions"
    assert judge.generation.openai.base_url.startswith("http://") and judge.temperature == 0
    chat = load_run_config(
        example,
        check_files=False,
        overrides=[
            "judges.judge.tokenizer=null",
            "judges.judge.generation.openai.api=chat",
            "judges.judge.generation.openai.base_url=https://api.openai.com/v1",
        ],
    )
    assert chat.judges["judge"].generation.openai.api == "chat"
    assert "api_key" not in example.read_text().replace("api_key_env", "")  # no key in a file


def _bench(*args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "benchmarks" / "backends.py"), *args]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": ""}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def test_backends_benchmark_gpu_mode_plans_and_refuses_without_cuda() -> None:
    """``--gpu --dry-run`` plans the ~1B bf16 shape; ``--gpu`` without CUDA stops at once
    with a message (no traceback, nothing built)."""
    import json

    planned = _bench("--gpu", "--dry-run", "--prompts", "4")
    assert planned.returncode == 0, planned.stderr[-2000:]
    plan = json.loads(planned.stdout)
    shape = json.loads((ROOT / "examples/shapes/llama-3.2-1b/config.json").read_text())
    assert plan["shape"]["hidden_size"] == shape["hidden_size"] and plan["dtype"] == "bfloat16"
    assert 1.1e9 < plan["parameters"] < 1.4e9 and plan["prompts"] == 4
    refused = _bench("--gpu")
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "no CUDA device" in refused.stderr and "drop --gpu" in refused.stderr
    bad = _bench("--gpu", "--gpu-memory-utilization", "0.9")
    assert bad.returncode == 2 and "two engines share the GPU" in bad.stderr


def _config(folder: Path, tiny: Path, url: str) -> Path:
    """A run: one external_reward_dpo stage on the tiny policy (torch), judged greedily by
    an llm judge on an OpenAI-compatible server, one judge request at a time."""
    openai = {"base_url": url, "max_retries": 2, "backoff_s": 0.1, "max_backoff_s": 0.2,
              "timeout_s": 20, "max_concurrency": 1, "prompts_per_request": 1}  # fmt: skip
    data = {
        "model": {"path": str(tiny), "dtype": "float32"},
        "data": {"prompts": {"rows": [{"prompt": f"tell me a story {i}"} for i in range(12)]}},
        "judges": {
            "served": {
                "kind": "llm",
                "tokenizer": str(tiny),
                "num_samples": 1,
                "temperature": 0,
                "max_new_tokens": 4,
                "reward_config": {
                    "prompt_template": "score the answer {{ response }} to {{ prompt }} : score",
                    "reward_regex_template": "{{ reward }}",
                },
                "generation": {"backend": "openai", "openai": openai},
            }
        },
        "stages": [
            {
                "kind": "external_reward_dpo",
                "judge": "served",
                "prompts": "prompts",
                "num_preference_pairs": 4,  # 1, 2, 5 pairs after chunks 0-2: all 3 are judged
                "num_candidates": 2,
                "max_new_tokens": 6,
                "chunk_size": 4,
                "min_parse_rate": 0.0,
                "trainer": {"batch_size": 2, "num_train_steps": 1},
            }
        ],
        "accelerate": {"cpu": True},
        "seed": 0,
    }
    path = folder / "run.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def _srlm(config: Path, out: Path, *overrides: str) -> list[str]:
    return [*SRLM, str(config), f"out={out}", *overrides]


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "OPENAI_API_KEY": KEY}


def _lines(path: Path) -> int:
    return path.read_bytes().count(b"\n") if path.exists() else 0


def _usage(out: Path) -> dict[str, int]:
    import json

    (stats,) = out.glob("*/stats.json")
    return json.loads(stats.read_text())["usage"]["judge"]


def test_judge_server_killed_mid_stage_resumes_on_a_new_port(tiny: Path, tmp_path: Path) -> None:
    log = tmp_path / "server.log"
    server = VLLMServer(tiny, log=log).start()
    try:
        config = _config(tmp_path, tiny, server.base_url)
        whole = tmp_path / "whole"
        done = subprocess.run(_srlm(config, whole), env=_env(), capture_output=True, text=True,
                              timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        total = _usage(whole)
        assert total["cached"] == 0 and total["requests"] > PER_CHUNK  # more than one chunk

        killed = tmp_path / "killed"
        cache = killed / "http-cache" / "judge-served" / "requests.jsonl"
        proc = subprocess.Popen(_srlm(config, killed), env=_env(), stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        t0 = time.monotonic()
        # kill in the second chunk: the first chunk's records are written (so the stage's
        # settings are fixed), three of the second's answers are cached
        while _lines(cache) < PER_CHUNK + 3 and proc.poll() is None and time.monotonic() - t0 < 300:
            time.sleep(0.01)
        old_url = server.base_url
        server.kill()
        t_kill = time.monotonic()
        _, stderr = proc.communicate(timeout=120)
        stopped_s = time.monotonic() - t_kill
        print(f"stopped {stopped_s:.1f} s after the kill; message: {stderr.strip()[-600:]}")
        assert proc.returncode != 0
        assert old_url in stderr and "check that the server is running" in stderr
        assert "openai.base_url (a server that moved: set its new URL and rerun" in stderr
        assert stopped_s < 60  # bounded: 3 attempts, 0.1-0.2 s apart
        sent = _lines(cache)
        assert PER_CHUNK + 3 <= sent < 2 * PER_CHUNK, "the kill did not land in the second chunk"

        server.start()  # a new free port
        assert server.base_url != old_url
        moved = f"judges.served.generation.openai.base_url={server.base_url}"
        # another served model is another judge (on a copy of the run): the stage's judged
        # candidates are set aside and judged again, none of the cached answers is reused
        copy = tmp_path / "copy"
        shutil.copytree(killed, copy)
        other = "judges.served.generation.openai.model=another-model"
        changed = subprocess.run(_srlm(config, copy, moved, other), env=_env(),
                                 capture_output=True, text=True, timeout=600)  # fmt: skip
        print(f"changed model: {changed.stderr.strip()[-900:]}")
        assert 'judge_identity.backend.model: "tiny" -> "another-model"' in changed.stderr
        assert "base_url" not in changed.stderr.split("srlm run: error")[0]  # no change
        assert (next(copy.glob("*/stale-judge-1")) / "candidates.jsonl").exists()
        assert changed.returncode != 0 and "`another-model` does not exist" in changed.stderr
        again = subprocess.run(_srlm(config, killed, moved), env=_env(), capture_output=True,
                               text=True, timeout=600)  # fmt: skip
        assert again.returncode == 0, again.stderr[-3000:]
    finally:
        server.kill()
    for name in ("candidates.jsonl", "pairs.jsonl"):
        (a,) = whole.glob(f"*/{name}")
        (b,) = killed.glob(f"*/{name}")
        assert a.read_bytes() == b.read_bytes(), name
    resumed = _usage(killed)
    assert resumed["cached"] == sent - PER_CHUNK  # the second chunk's answers, not sent again
    assert resumed["requests"] + sent == total["requests"]
    assert _lines(cache) == total["requests"]  # every request sent once
    for path in killed.rglob("*"):
        if path.is_file():
            assert KEY.encode() not in path.read_bytes(), path
