"""Run by test_sharded_training.py: ``python -m torch.distributed.run --nproc_per_node 2
sharded_worker.py MODEL_DIR OUT`` trains a tiny Llama sharded with ``shard_model`` (FSDP2,
gloo, CPU); :func:`run` with ``sharded=False`` in one plain process is the reference.

Both write into OUT, from the main process: the parameters after one SFT, one DPO and one
SPIN step on the same global batches (4 examples: 2 ranks x 2 or 1 process x 4; SFT in
two micro-batches), the DPO reference log-probs, the SPIN generations and the metrics
(``results.json``), and one SFT step of a tiny x-transformers model. The sharded run also
writes each rank's shard sizes (``numels-<rank>.json``), the checkpoint folders (``ckpt``,
``xt_ckpt``), the state of a fresh sharded model that loaded ``ckpt``
(``resumed.safetensors``), the state early stopping restored (``restored.safetensors``)
and the messages of the refused cases (in ``results.json``).
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file

from self_rewarding_lm_pytorch.trainers import (
    DPOTrainer,
    SFTTrainer,
    SPINTrainer,
    full_state_dict,
    load_checkpoint,
    save_checkpoint,
    shard_model,
)
from self_rewarding_lm_pytorch.trainers.early_stopping import EarlyStopping

EOS = 2  # "</s>" of hf.build_tiny_model's tokenizer
SFT = [([5 + i, 6, 7 + i, 8], 2) for i in range(4)]  # (ids, prompt_len)
VALID = [([9, 10 + i, 11, 12], 1) for i in range(4)]
PAIRS = [([3 + i, 4], [5, 6 + i], [7 + i, 8, 9]) for i in range(4)]
# prompts of different lengths: the two ranks decode different numbers of tokens
SPIN_SFT = [
    {"prompt_ids": list(range(4, 4 + n)), "response_ids": [20, 21, 22]} for n in (2, 9, 3, 10)
]


def _state(model: torch.nn.Module, sharded: bool) -> dict[str, torch.Tensor]:
    """The whole state of ``model`` (gathered when sharded; empty off the main process)."""
    sd = full_state_dict(model) if sharded else model.state_dict()
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def run(model_dir: str, out: str, *, sharded: bool) -> None:
    from accelerate import Accelerator
    from transformers import AutoModelForCausalLM

    acc = Accelerator(cpu=True)
    main, world = acc.is_main_process, acc.num_processes
    folder = Path(out)
    model = AutoModelForCausalLM.from_pretrained(model_dir)  # the same weights on every rank
    if sharded:
        shard_model(model)
        numels = {
            n: [p.to_local().numel(), p.numel(), p.shape[0]] for n, p in model.named_parameters()
        }
        (folder / f"numels-{acc.process_index}.json").write_text(json.dumps(numels))
    common = dict(
        accelerator=acc,
        batch_size=4 // world,
        num_train_steps=1,
        start_learning_rate=1e-3,
        end_learning_rate=1e-3,
        # a larger eps: Adam's first step is lr * g / (|g| + eps), which would blow the
        # round-off of tiny gradients (another summation order) up to a full step
        adam_kwargs={"eps": 1e-4},
        max_grad_norm=1.0,
        dropout=0.0,
        seed=0,
        progress=False,
    )
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        results, states, spin = _train(model, common, sharded)
    results["gathered_warnings"] = [str(w.message) for w in seen if "gathered" in str(w.message)]
    if sharded:
        spin.save_checkpoint(folder / "ckpt")
        fresh = AutoModelForCausalLM.from_pretrained(model_dir)
        shard_model(fresh)
        load_checkpoint(fresh, folder / "ckpt")  # resume: every rank keeps its shard
        states["resumed"] = _state(fresh, sharded)
        # early stopping's best state (the local shards, on CPU) restores a sharded model
        best = EarlyStopping(mode="max", patience=1, start_step=0)
        best.check(model, 1.0, 0)
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(0)
        best.finish(model, 1, stopped=True)
        states["restored"] = _state(model, sharded)
        results["refused"] = _refusals(model, acc, folder)
    states["xt_after_sft"] = _x_transformers_step(folder, common, sharded)
    if main:
        for name, state in states.items():
            save_file(state, str(folder / f"{name}.safetensors"))
        (folder / "results.json").write_text(json.dumps(results, default=float))
    acc.wait_for_everyone()


def _train(
    model: torch.nn.Module, common: dict, sharded: bool
) -> tuple[dict, dict[str, dict[str, torch.Tensor]], SPINTrainer]:
    """One SFT, one DPO and one SPIN step on ``model``: (metrics, states, the SPIN trainer)."""
    results: dict[str, object] = {}
    states: dict[str, dict[str, torch.Tensor]] = {}
    probe = torch.tensor([[4, 5, 6, 7, 8]])
    probes: list[float] = []

    def main_only_score(m: torch.nn.Module) -> float:
        """Runs on the main process only (early stopping); improves at every call."""
        probes.append(float(m(probe).logits.float().mean()))
        return float(len(probes))

    sft = SFTTrainer(
        model,
        train_dataset=SFT,
        valid_dataset=VALID,
        early_stopper_eval_module=main_only_score,
        early_stop_mode="max",
        # two micro-batches per step: each backward reduce-scatters its gradients
        **{**common, "batch_size": common["batch_size"] // 2, "grad_accum_steps": 2},
    )
    results["sft"] = sft.train()
    results["probes"] = probes
    states["after_sft"] = _state(model, sharded)
    world = 4 // common["batch_size"]
    dpo = DPOTrainer(model, train_dataset=PAIRS, beta=0.5, ref_batch_size=2 // world, **common)
    results["dpo"] = dpo.train()
    states["ref_logps"] = {"ref_logps": dpo.ref_logps.cpu().clone()}
    states["after_dpo"] = _state(model, sharded)
    spin = SPINTrainer(
        model,
        sft_dataset=SPIN_SFT,
        max_seq_len=16,
        temperature=0.0,
        eos_id=EOS,
        generate_batch_size=1,
        **common,
    )
    results["spin"] = spin.train()
    results["generated"] = [p.rejected_ids for p in spin.generated_pairs]
    states["after_spin"] = _state(model, sharded)
    return results, states, spin


def _x_transformers_step(folder: Path, common: dict, sharded: bool) -> dict[str, torch.Tensor]:
    """One SFT step of a tiny x-transformers model (its blocks found without
    ``_no_split_modules``); the sharded run saves it to ``xt_ckpt``."""
    from x_transformers import Decoder, TransformerWrapper

    torch.manual_seed(0)
    model = TransformerWrapper(
        num_tokens=128, max_seq_len=32, attn_layers=Decoder(dim=32, depth=1, heads=2)
    )
    if sharded:
        shard_model(model)
    trainer = SFTTrainer(model, train_dataset=SFT, **common)
    trainer.train()
    if sharded:
        trainer.save_checkpoint(folder / "xt_ckpt")
    return _state(model, sharded)


def _refusals(model: torch.nn.Module, acc: object, folder: Path) -> dict[str, str]:
    """The messages of the refused cases, as every rank raised them."""
    from accelerate import Accelerator
    from accelerate.utils import DataLoaderConfiguration

    out: dict[str, str] = {}
    try:  # the bare function: it cannot gather the shards of the other ranks
        save_checkpoint(model, folder / f"refused-{acc.process_index}")
    except ValueError as exc:
        out["save"] = str(exc)
    try:
        DPOTrainer(model, train_dataset=PAIRS, precompute_ref_logps=False, accelerator=acc)
    except ValueError as exc:
        out["copy"] = str(exc)
    uneven = Accelerator(cpu=True, dataloader_config=DataLoaderConfiguration(even_batches=False))
    dpo = DPOTrainer(
        model, train_dataset=PAIRS[:3], ref_batch_size=1, accelerator=uneven, progress=False
    )
    try:
        dpo.train()  # 3 reference batches: 2 on rank 0, 1 on rank 1
    except ValueError as exc:
        out["uneven"] = str(exc)
    return out


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(sys.argv[1], sys.argv[2], sharded=True)
    if torch.distributed.is_initialized():  # leave together: gloo may abort at exit otherwise
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
