"""Tiny models, tokenizers and judges shared by the pipeline tests (and run as a script
by the kill test: ``python tests/tiny.py RUN_DIR``)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import torch
from x_transformers import Decoder, TransformerWrapper

from self_rewarding_lm_pytorch.generation import as_backend
from self_rewarding_lm_pytorch.models import CallableTokenizer
from self_rewarding_lm_pytorch.pipeline import PreferenceStage, SelfRewardingTrainer, SFTStage

EOS = 10  # "\n"


def tiny_model(seed: int = 0, dim: int = 32, max_seq_len: int = 96) -> TransformerWrapper:
    torch.manual_seed(seed)
    return TransformerWrapper(
        num_tokens=128, max_seq_len=max_seq_len, attn_layers=Decoder(dim=dim, depth=1, heads=2)
    )


class DelegatingBackend:
    """A generation backend that is not a TorchBackend: it answers through one (over a
    model, or the backend given) and records which protocol methods were called
    (``calls``) and each ``generate`` request (``requests``: prompts, config, generator)."""

    def __init__(self, model_or_backend) -> None:
        self.inner = as_backend(model_or_backend)
        self.max_seq_len = self.inner.max_seq_len
        self.calls: list[str] = []
        self.requests: list[dict] = []

    def generate(self, prompts, config, **kw):
        self.calls.append("generate")
        self.requests.append(
            {
                "prompts": [list(p) for p in prompts],
                "config": config,
                "generator": kw.get("generator"),
            }
        )
        return self.inner.generate(prompts, config, **kw)

    def next_token_logprobs(self, sequences, token_ids):
        self.calls.append("next_token_logprobs")
        return self.inner.next_token_logprobs(sequences, token_ids)

    def load_weights(self, checkpoint) -> None:
        self.inner.load_weights(checkpoint)

    def close(self) -> None:
        pass


def char_tokenizer() -> CallableTokenizer:
    return CallableTokenizer(
        lambda s: [ord(c) % 128 for c in s],
        lambda ids: "".join(chr(max(32, int(i))) for i in ids),
        eos_id=EOS,
    )


def scripted_score(prompt: str, response: str) -> float | None:
    """A deterministic judge: unparsable for some responses, few score levels (many ties)."""
    if not response or ord(response[0]) % 5 == 0:
        return None
    return float(ord(response[-1]) % 3)


SFT_DATA = [{"prompt": f"say {w}", "response": w} for w in ["abc", "hello", "xyz", "ok"] * 4]
PROMPTS = [f"prompt number {i}" for i in range(60)]


def quick_preference(**kw) -> PreferenceStage:
    """A small external-judge DPO stage (4 pairs, 4 new tokens, one training step)."""
    defaults = dict(
        kind="external_reward_dpo",
        judge="scripted",
        num_preference_pairs=4,
        max_new_tokens=4,
        chunk_size=4,
        temperature=1.0,
        top_p=1.0,
        trainer=dict(batch_size=4, num_train_steps=1),
    )
    return PreferenceStage(**{**defaults, **kw})


def make_trainer(
    run_dir: str,
    *,
    num_pairs: int = 12,
    max_new_tokens: int = 6,
    chunk_size: int = 4,
    sft: bool = False,
    seed: int = 0,
) -> SelfRewardingTrainer:
    stages = [SFTStage(trainer=dict(batch_size=4))] if sft else []
    stages.append(
        PreferenceStage(
            kind="external_reward_dpo",
            judge="scripted",
            num_preference_pairs=num_pairs,
            max_new_tokens=max_new_tokens,
            chunk_size=chunk_size,
            temperature=1.0,
            top_p=1.0,
            trainer=dict(batch_size=4, beta=0.5, start_learning_rate=1e-3),
        )
    )
    return SelfRewardingTrainer(
        tiny_model(seed),
        tokenizer=char_tokenizer(),
        datasets={"sft": SFT_DATA, "prompts": PROMPTS},
        judges={"scripted": scripted_score},
        stages=stages,
        checkpoints_folder=run_dir,
        accelerate_kwargs=dict(cpu=True),
        seed=seed,
        progress=False,
    )


def run_two_ranks(job: Path, *args: str) -> subprocess.CompletedProcess:
    """``python -m torch.distributed.run --nproc_per_node 2 job *args`` on a free port, with
    the tests folder importable and one thread per rank (bounded: 600 s)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]
    cmd += ["--master_port", str(port), str(job), *args]
    path = os.pathsep.join([str(job.parent), os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)


def leave_ranks(out: Path, **counts: int) -> None:
    """A two-rank job's end: ``out/rank-<r>.json`` holds ``counts``; then both ranks meet
    and leave the process group."""
    import json

    rank = int(os.environ.get("RANK", "0"))
    (out / f"rank-{rank}.json").write_text(json.dumps(counts))
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


if __name__ == "__main__":  # the kill test's job: a slower run with many small chunks
    torch.set_num_threads(1)
    make_trainer(sys.argv[1], num_pairs=40, max_new_tokens=24, chunk_size=2).run()
