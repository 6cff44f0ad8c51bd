"""Time DPO training steps of ours (``trainers.DPOTrainer``) against TRL's ``DPOTrainer``.

Same tiny random Llama, same tokenizer, same pairs, batch size and sequence lengths, in
the same process. Two things are measured:

1. **First-step loss**: both trainers take one step on one batch (the whole dataset, so
   shuffling cannot make the batches differ) with a reference model that differs from the
   policy (so the loss is not the trivial log 2); the losses must agree (``--tol``).
2. **Time per optimizer step**: ``train()`` for ``--steps`` steps, wall clock divided by
   the steps, median over ``--repeats`` interleaved runs. Each run includes everything
   one DPO epoch costs: ours precomputes the reference log-probs once (its default) and
   that time is included; TRL's default computes the reference in every step, and
   ``--trl-precompute`` times TRL's own precomputation mode as well.

TRL is a benchmark-only dependency: ``pip install trl``. Run::

    python benchmarks/dpo_vs_trl.py                # defaults: hidden 128, 4 layers
    python benchmarks/dpo_vs_trl.py --steps 10 --repeats 3 --threads 2

TRL's defaults that differ from ours are set to match: fp32 (``bf16=False``), no
gradient checkpointing, AdamW without weight decay, max grad norm 1.0, beta 0.1, sigmoid
loss, no dropout.
"""

from __future__ import annotations

import argparse
import copy
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from self_rewarding_lm_pytorch.data import PreferenceExample  # noqa: E402
from self_rewarding_lm_pytorch.hf import build_tiny_model, load_model, load_tokenizer  # noqa: E402
from self_rewarding_lm_pytorch.trainers import DPOTrainer  # noqa: E402


def make_texts(n: int, prompt_len: int, response_len: int, words: list[str], seed: int):
    """``n`` (prompt, chosen, rejected) texts of exactly the given numbers of words."""
    g = torch.Generator().manual_seed(seed)

    def sentence(k: int) -> str:
        idx = torch.randint(0, len(words), (k,), generator=g).tolist()
        return " ".join(words[i] for i in idx)

    return [
        {
            "prompt": sentence(prompt_len),
            "chosen": " " + sentence(response_len),
            "rejected": " " + sentence(response_len),
        }
        for _ in range(n)
    ]


def ours_examples(rows: list[dict], tok) -> list[PreferenceExample]:
    eos = [tok.eos_token_id]
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    return [
        PreferenceExample(enc(r["prompt"]), enc(r["chosen"]) + eos, enc(r["rejected"]) + eos)
        for r in rows
    ]


def run_ours(
    policy, ref, examples, args, steps: int, precompute: bool = True
) -> tuple[float, float, list[float]]:
    """(seconds for train(), first-step loss, seconds of each optimizer step)."""
    trainer = DPOTrainer(
        policy,
        train_dataset=examples,
        ref_model=ref,
        beta=0.1,
        batch_size=args.batch,
        num_train_steps=steps,
        start_learning_rate=args.lr,
        end_learning_rate=args.lr,
        max_grad_norm=1.0,
        accelerate_kwargs={"cpu": True},
        progress=False,
        seed=0,
        precompute_ref_logps=precompute,
    )
    step_times: list[float] = []
    inner = trainer._optimizer_step

    def timed_step(group):  # instrumentation only: times the wrapped update
        t = time.perf_counter()
        out = inner(group)
        step_times.append(time.perf_counter() - t)
        return out

    trainer._optimizer_step = timed_step
    t0 = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - t0
    return elapsed, float(trainer.history[0]["loss"]), step_times


def run_trl(policy, ref, rows, tok, args, steps: int, precompute: bool, out_dir: str):
    """(seconds for train(), first-step loss, seconds of each step, TRL's tokenized data)."""
    from datasets import Dataset
    from transformers import PrinterCallback, TrainerCallback
    from trl import DPOConfig
    from trl import DPOTrainer as TRLDPOTrainer

    step_times: list[float] = []

    class StepTimer(TrainerCallback):  # on_step_begin .. on_step_end: one optimizer step
        def on_step_begin(self, *a, **k):
            self.t = time.perf_counter()

        def on_step_end(self, *a, **k):
            step_times.append(time.perf_counter() - self.t)

    config = DPOConfig(
        output_dir=out_dir,
        per_device_train_batch_size=args.batch,
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        weight_decay=0.0,
        max_grad_norm=1.0,
        beta=0.1,
        loss_type="sigmoid",
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        use_cpu=True,
        logging_steps=1,
        report_to="none",
        save_strategy="no",
        disable_tqdm=True,
        precompute_ref_log_probs=precompute,
        max_length=None,
        seed=0,
        dataloader_num_workers=0,
    )
    trainer = TRLDPOTrainer(
        model=policy,
        ref_model=ref,
        args=config,
        train_dataset=Dataset.from_list(rows),
        processing_class=tok,
        callbacks=[StepTimer()],
    )
    trainer.remove_callback(PrinterCallback)
    t0 = time.perf_counter()
    trainer.train()
    elapsed = time.perf_counter() - t0
    first = next(h for h in trainer.state.log_history if "loss" in h)
    return elapsed, float(first["loss"]), step_times, trainer.train_dataset


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab-words", type=int, default=500, help="word-level vocabulary size")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--response-len", type=int, default=32)
    p.add_argument("--steps", type=int, default=10, help="optimizer steps per timed run")
    p.add_argument("--repeats", type=int, default=3, help="interleaved timed runs per trainer")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    p.add_argument("--tol", type=float, default=1e-4, help="allowed first-step loss difference")
    p.add_argument(
        "--trl-precompute", action="store_true", help="also time TRL with precompute_ref_log_probs"
    )
    args = p.parse_args(argv)

    try:
        import trl
    except ImportError:
        print("TRL is not installed; pip install trl (benchmark-only dependency)", file=sys.stderr)
        return 2
    torch.set_num_threads(args.threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    logging.disable(logging.WARNING)
    warnings.filterwarnings("ignore")
    import datasets

    datasets.disable_progress_bars()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()

    tmp = tempfile.mkdtemp(prefix="dpo_vs_trl-")
    words = [f"w{i}" for i in range(args.vocab_words)]
    common = dict(
        words=words,
        hidden_size=args.hidden,
        num_layers=args.layers,
        num_heads=args.heads,
        max_position_embeddings=max(64, args.prompt_len + args.response_len + 8),
    )
    policy_dir = build_tiny_model(Path(tmp) / "policy", seed=0, **common)
    ref_dir = build_tiny_model(Path(tmp) / "ref", seed=1, **common)
    tok = load_tokenizer(policy_dir)
    base_policy = load_model(policy_dir)
    base_ref = load_model(ref_dir)
    n_params = sum(p.numel() for p in base_policy.parameters())

    # ---------------------------------------------------------------- 1. same loss
    check_rows = make_texts(args.batch, args.prompt_len, args.response_len, words, seed=0)
    ours_ex = ours_examples(check_rows, tok)
    fresh = lambda: (copy.deepcopy(base_policy), copy.deepcopy(base_ref))  # noqa: E731
    _, ours_loss, _ = run_ours(*fresh(), ours_ex, args, 1)
    _, trl_loss, _, trl_ds = run_trl(*fresh(), check_rows, tok, args, 1, False, tmp)
    for ex, row in zip(ours_ex, trl_ds):  # the token ids each side trains on are identical
        assert ex.prompt_ids == list(row["prompt_ids"]), "prompt tokens differ"
        assert ex.chosen_ids == list(row["chosen_ids"]), "chosen tokens differ"
        assert ex.rejected_ids == list(row["rejected_ids"]), "rejected tokens differ"
    same = abs(ours_loss - trl_loss) <= args.tol

    # ---------------------------------------------------------------- 2. time
    rows = make_texts(args.batch * args.steps, args.prompt_len, args.response_len, words, seed=1)
    examples = ours_examples(rows, tok)
    labels = {
        "ours": "ours (default: reference precomputed once)",
        "ours_otf": "ours, reference every step (precompute_ref_logps=False)",
        "trl": "TRL DPOTrainer default (reference every step)",
        "trl_pre": "TRL, precompute_ref_log_probs=True",
    }
    if not args.trl_precompute:
        del labels["trl_pre"]
    whole: dict[str, list[float]] = {k: [] for k in labels}
    steady: dict[str, list[float]] = {k: [] for k in labels}
    for _ in range(args.repeats):  # interleaved, so load changes hit every trainer alike
        for key in labels:
            if key.startswith("ours"):
                t, _, steps = run_ours(*fresh(), examples, args, args.steps, key == "ours")
            else:
                t, _, steps, _ = run_trl(
                    *fresh(), rows, tok, args, args.steps, key == "trl_pre", tmp
                )
            whole[key].append(t / args.steps)
            steady[key].extend(steps[1:])  # the first step includes one-off warm-up

    med_whole = {k: statistics.median(v) for k, v in whole.items()}
    med_steady = {k: statistics.median(v) for k, v in steady.items()}
    seq = args.prompt_len + args.response_len + 1
    print(
        f"\nDPO step: Llama hidden {args.hidden}, {args.layers} layers, "
        f"{n_params / 1e6:.2f}M params, vocab {len(tok)}; batch {args.batch} pairs, {seq} "
        f"tokens per sequence; {args.steps} steps x {args.repeats} runs; torch "
        f"{torch.__version__}, trl {trl.__version__}, {args.threads} thread(s), "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    )
    print(
        f"first-step loss: ours {ours_loss:.6f}  trl {trl_loss:.6f}  "
        f"|diff| {abs(ours_loss - trl_loss):.2e}  {'SAME' if same else 'DIFFERENT'} "
        f"(tol {args.tol:g})"
    )
    print()
    print(
        "| trainer | ms/step, train() wall / steps | ratio vs TRL | ms/step, steady "
        "(median of steps 2..n) | ratio vs TRL |"
    )
    print("|---|---|---|---|---|")
    for k, label in labels.items():
        print(
            f"| {label} | {1000 * med_whole[k]:.1f} | {med_whole[k] / med_whole['trl']:.2f}x "
            f"| {1000 * med_steady[k]:.1f} | {med_steady[k] / med_steady['trl']:.2f}x |"
        )
    print(
        "\ntrain() wall includes everything one epoch costs (ours: the reference "
        "precomputation; TRL: its optimizer/dataloader set-up). Steady-state steps of "
        "'ours (default)' exclude the reference, which was paid once up front."
    )
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
