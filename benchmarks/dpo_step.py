"""One DPO optimizer step: precomputed reference log-probs vs a reference model run on the fly.

Side by side in one run, for a few batch sizes / sequence lengths of one model:

* ``precomputed``: ``DPOTrainer(precompute_ref_logps=True)`` -- the reference scored the
  whole dataset once before training (that one-time cost is shown amortised per step
  for one epoch); no second model is held.
* ``on-the-fly``: ``DPOTrainer(precompute_ref_logps=False)`` -- a frozen deep copy of the
  policy runs a no-grad forward on every batch (the textbook implementation).

Every (config, variant) runs in a fresh subprocess so that peak memory is its own: on
CPU the peak resident set size above the post-import baseline (``ru_maxrss``), on CUDA
``torch.cuda.max_memory_allocated`` (everything resident: weights, grads, AdamW state,
reference copy, activations).  Times are medians over the measured steps after warmup.

    python benchmarks/dpo_step.py            # x-transformers dim 512, depth 6
    python benchmarks/dpo_step.py --quick    # dim 256, depth 2, small batches (CPU smoke)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


def _maxrss_mib() -> float:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def worker(cfg: dict) -> dict:
    import torch
    from x_transformers import Decoder, TransformerWrapper

    from self_rewarding_lm_pytorch.data import PreferenceExample
    from self_rewarding_lm_pytorch.trainers import DPOTrainer

    device = cfg["device"]
    if cfg.get("threads"):
        torch.set_num_threads(cfg["threads"])
    base = _rss_mib()
    torch.manual_seed(0)
    model = TransformerWrapper(
        num_tokens=cfg["vocab"],
        max_seq_len=cfg["seq_len"],
        attn_layers=Decoder(dim=cfg["dim"], depth=cfg["depth"], heads=cfg["heads"]),
    ).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    steps = cfg["warmup"] + cfg["steps"]
    B, T = cfg["batch"], cfg["seq_len"]
    g = torch.Generator().manual_seed(1)
    prompt_len = T // 4

    def ids(n: int) -> list[int]:
        return torch.randint(0, cfg["vocab"], (n,), generator=g).tolist()

    pairs = [
        PreferenceExample(ids(prompt_len), ids(T - prompt_len), ids(T - prompt_len - 1))
        for _ in range(B * steps)
    ]
    trainer = DPOTrainer(
        model,
        train_dataset=pairs,
        batch_size=B,
        precompute_ref_logps=cfg["variant"] == "precomputed",
        accelerate_kwargs=dict(cpu=device == "cpu"),
        progress=False,
        seed=0,
    )
    cuda = device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    with torch.no_grad():  # first-call initialisation stays out of the timings
        trainer.lm(torch.zeros(B, T, dtype=torch.long, device=trainer.device))
    sync()
    t0 = time.perf_counter()
    trainer._on_train_start()  # precompute (or copy the reference)
    sync()
    ref_setup_s = time.perf_counter() - t0
    trainer._ensure_scheduler(steps)
    trainer.lm.train()
    batches = iter(trainer._epoch_loader(0))
    times = []
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    for i in range(steps):
        batch = next(batches)
        sync()
        t = time.perf_counter()
        trainer._optimizer_step([batch])
        sync()
        if i >= cfg["warmup"]:
            times.append(time.perf_counter() - t)
    peak = torch.cuda.max_memory_allocated() / 2**20 if cuda else _maxrss_mib() - base
    return {
        "params": n_params,
        "step_ms": 1e3 * statistics.median(times),
        "ref_setup_ms_per_step": 1e3 * ref_setup_s / steps,
        "peak_mib": peak,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small model and shapes (CPU smoke run)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--steps", type=int, default=None, help="measured steps per config")
    ap.add_argument(
        "--threads", type=int, default=None, help="torch intra-op threads (default: torch's)"
    )
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker is not None:
        print("RESULT " + json.dumps(worker(json.loads(args.worker))), flush=True)
        return

    import torch

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.quick:
        model = dict(vocab=256, dim=256, depth=2, heads=4)
        shapes = [(2, 64), (8, 64)]
        warmup, steps = 1, args.steps or 2
    elif device == "cpu":
        model = dict(vocab=256, dim=512, depth=6, heads=8)
        shapes = [(2, 64), (4, 128), (8, 128)]
        warmup, steps = 1, args.steps or 3
    else:
        model = dict(vocab=256, dim=512, depth=6, heads=8)
        shapes = [(4, 256), (16, 256), (16, 1024), (64, 512)]
        warmup, steps = 3, args.steps or 10
    rows = []
    for batch, seq_len in shapes:
        res = {}
        for variant in ("precomputed", "on-the-fly"):
            cfg = dict(
                model, batch=batch, seq_len=seq_len, variant=variant, device=device,
                warmup=warmup, steps=steps, threads=args.threads,
            )  # fmt: skip
            proc = subprocess.run(
                [sys.executable, __file__, "--worker", json.dumps(cfg)],
                capture_output=True,
                text=True,
                check=False,
            )
            line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")]
            if proc.returncode != 0 or not line:
                sys.stderr.write(proc.stderr[-3000:])
                raise SystemExit(f"worker failed for {cfg}")
            res[variant] = json.loads(line[-1][len("RESULT ") :])
        rows.append((batch, seq_len, res))

    p = rows[0][2]["precomputed"]["params"]
    name = f"x-transformers dim {model['dim']} depth {model['depth']} ({p / 1e6:.1f}M params)"
    threads = args.threads or torch.get_num_threads()
    print(
        f"DPO step on {device} ({threads} CPU threads): {name}; pairs per step = batch "
        f"(2x rows), median of {steps} steps after {warmup} warmup"
    )
    print()
    print(
        "| pairs | seq len | step ms precomputed | step ms on-the-fly | time ratio otf/pre "
        "| ref precompute ms/step (1 epoch) | peak MiB precomputed | peak MiB on-the-fly "
        "| mem ratio otf/pre |"
    )
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for batch, seq_len, res in rows:
        a, b = res["precomputed"], res["on-the-fly"]
        print(
            f"| {batch} | {seq_len} | {a['step_ms']:.1f} | {b['step_ms']:.1f} "
            f"| {b['step_ms'] / a['step_ms']:.2f} | {a['ref_setup_ms_per_step']:.1f} "
            f"| {a['peak_mib']:.0f} | {b['peak_mib']:.0f} | {b['peak_mib'] / a['peak_mib']:.2f} |"
        )


if __name__ == "__main__":
    main()
