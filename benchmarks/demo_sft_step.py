"""Where an SFT step of ``srlm demo`` spends its time, and what each speed-up candidate
would save, side by side in one run (process CPU seconds per step, as ratios to the plain
step).

The default demo model (0.83M parameters) and batch (64 examples of the demo's IFT + EFT
data, padded to the batch's longest sequence as ``collate_sft`` does) on the CPU.  Rounds
of every variant are interleaved, so a busy machine slows them alike; each figure is the
median over rounds.  Variants: the plain eager fp32 step with torch's AdamW (the
trainer's optimizer) split into collate / forward / backward / clip / optimizer; AdamW
``foreach=True`` and ``fused=True``; bf16 autocast; ``torch.compile`` (its compile time
reported apart); and the library's ``SFTTrainer`` itself (its per-step overhead over the
bare loop); and the plain step on the data with ``n_meta_eft`` meta-judge examples mixed
in (their longer sequences set the batch's padded length), in random batches and in the
demo's length buckets (``DemoConfig.length_buckets``: the rows longer than any judge
sequence batched apart).

    OMP_NUM_THREADS=1 python benchmarks/demo_sft_step.py              # 6 rounds of 8 steps
    OMP_NUM_THREADS=1 python benchmarks/demo_sft_step.py --rounds 3 --steps 4
    OMP_NUM_THREADS=1 python benchmarks/demo_sft_step.py --skip-slow   # no bf16 / compile
"""

from __future__ import annotations

import argparse
import itertools
import random
import statistics
import time
from collections.abc import Callable, Iterator

import torch

from self_rewarding_lm_pytorch.data import SFTExample, collate_sft
from self_rewarding_lm_pytorch.demo import task
from self_rewarding_lm_pytorch.demo.config import DemoConfig
from self_rewarding_lm_pytorch.demo.model import build_demo_model
from self_rewarding_lm_pytorch.demo.tokenizer import DemoTokenizer
from self_rewarding_lm_pytorch.losses import nll_loss
from self_rewarding_lm_pytorch.trainers import SFTTrainer
from self_rewarding_lm_pytorch.trainers.schedules import length_bucketed_batches


def _examples(cfg: DemoConfig, n_meta: int = 0) -> list[SFTExample]:
    tok = DemoTokenizer()
    pairs = [(e.prompt, e.response) for e in task.ift_data(cfg.n_ift, 0)]
    pairs += [(e.prompt, e.response) for e in task.eft_data(cfg.n_eft, 0, letters=True)]
    pairs += [(e.prompt, e.response) for e in task.meta_eft_data(n_meta, 0)]
    out = []
    for p, r in pairs:
        ids = tok.encode(p)
        out.append(SFTExample(input_ids=ids + tok.encode(r) + [tok.eos_id], prompt_len=len(ids)))
    return out


def _bucketed(examples: list[SFTExample], cfg: DemoConfig) -> Iterator[list[SFTExample]]:
    """The batches an epoch of the demo's length buckets gives, over and over."""
    lengths = [len(e.input_ids) for e in examples]
    g = torch.Generator().manual_seed(0)
    batches = length_bucketed_batches(
        lengths, cfg.sft_batch_size, cfg.length_buckets() or [], generator=g
    )
    return ([examples[i] for i in b] for b in itertools.cycle(batches))


class _Loop:
    """A bare SFT step: the trainer's loss, clipping and AdamW, timed by part."""

    def __init__(self, cfg: DemoConfig, *, adam: dict, bf16: bool = False, compile: bool = False):
        self.model = build_demo_model(0, cfg.model)
        self.forward: Callable = torch.compile(self.model, dynamic=True) if compile else self.model
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=1e-3, **adam)
        self.bf16 = bf16
        self.parts = {k: 0.0 for k in ("collate", "forward", "backward", "clip", "optimizer")}

    def step(self, rows: list[SFTExample]) -> None:
        t0 = time.process_time()
        batch = collate_sft(rows, max_seq_len=DemoConfig().model.max_seq_len)
        t1 = time.process_time()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
            logits = self.forward(batch["input_ids"], mask=batch["attention_mask"])
        loss = nll_loss(logits.float(), batch["input_ids"], batch["response_mask"])
        t2 = time.process_time()
        loss.backward()
        t3 = time.process_time()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        t4 = time.process_time()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        t5 = time.process_time()
        for k, a, b in zip(self.parts, (t0, t1, t2, t3, t4), (t1, t2, t3, t4, t5)):
            self.parts[k] += b - a


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--steps", type=int, default=8, help="steps per variant per round")
    p.add_argument("--n-meta", type=int, default=1000, help="meta-judge examples mixed in")
    p.add_argument("--skip-slow", action="store_true", help="leave out bf16 and compile")
    args = p.parse_args()
    cfg = DemoConfig()
    examples = _examples(cfg)
    with_meta = _examples(cfg, args.n_meta)
    rng = random.Random(0)
    lens = [len(e.input_ids) for e in examples]
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s); {len(examples)} "
        f"examples, length mean {statistics.fmean(lens):.1f} max {max(lens)}"
    )

    loops = {
        "plain (AdamW for-loop)": _Loop(cfg, adam={}),
        "AdamW foreach": _Loop(cfg, adam={"foreach": True}),
        "AdamW fused": _Loop(cfg, adam={"fused": True}),
        f"plain, {args.n_meta} meta-judge examples mixed in": _Loop(cfg, adam={}),
    }
    bucketed = f"plain, {args.n_meta} meta-judge examples mixed in, length buckets"
    loops[bucketed] = _Loop(cfg, adam={})

    def sampled(rows: list[SFTExample]) -> Callable[[], list[SFTExample]]:
        return lambda: rng.sample(rows, cfg.sft_batch_size)

    data = {name: sampled(examples) for name in loops}
    data[f"plain, {args.n_meta} meta-judge examples mixed in"] = sampled(with_meta)
    data[bucketed] = _bucketed(with_meta, cfg).__next__
    compile_s = None
    if not args.skip_slow:
        loops["bf16 autocast"] = _Loop(cfg, adam={}, bf16=True)
        loops["torch.compile"] = _Loop(cfg, adam={}, compile=True)
        data["bf16 autocast"] = data["torch.compile"] = sampled(examples)
        t = time.process_time()
        loops["torch.compile"].step(rng.sample(examples, cfg.sft_batch_size))  # compiles
        loops["torch.compile"].step(rng.sample(examples, cfg.sft_batch_size))  # new shape
        compile_s = time.process_time() - t
    for loop in loops.values():
        loop.parts = dict.fromkeys(loop.parts, 0.0)

    trainer = SFTTrainer(
        build_demo_model(0, cfg.model),
        train_dataset=examples,
        batch_size=cfg.sft_batch_size,
        num_train_steps=args.steps,
        start_learning_rate=1e-3,
        warmup_steps=0,
        max_seq_len=cfg.model.max_seq_len,
        accelerate_kwargs={"cpu": True},
    )
    per_round: dict[str, list[float]] = {name: [] for name in [*loops, "SFTTrainer.train"]}
    for _ in range(args.rounds):
        for name, loop in loops.items():
            t = time.process_time()
            for _ in range(args.steps):
                loop.step(data[name]())
            per_round[name].append((time.process_time() - t) / args.steps)
        t = time.process_time()
        trainer.step = 0
        trainer.train()
        per_round["SFTTrainer.train"].append((time.process_time() - t) / args.steps)

    base = statistics.median(per_round["plain (AdamW for-loop)"])
    print("\n| variant | CPU ms / step | ratio to plain |\n|---|---|---|")
    for name, xs in per_round.items():
        m = statistics.median(xs)
        print(f"| {name} | {1000 * m:.1f} | {m / base:.2f} |")
    if compile_s is not None:
        print(
            f"\ntorch.compile: {compile_s:.1f} CPU-s to compile (2 batches, dynamic shapes; "
            "excluded from the per-step figure)"
        )
    plain = loops["plain (AdamW for-loop)"].parts
    total = sum(plain.values())
    print(
        "\nplain step by part: "
        + ", ".join(f"{k} {100 * v / total:.1f}%" for k, v in plain.items())
    )


if __name__ == "__main__":
    main()
