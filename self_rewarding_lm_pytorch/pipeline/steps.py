"""Running one stage's work: SFT, SPIN, prompt generation, the EFT build and a preference
stage's DPO training, each on data the runner prepared, in the stage's folder of the run
directory."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ..data import SFTExample, preference_example
from ..generation import GenerationBackend
from ..models import Tokenizer
from ..prompts import generate_prompts
from ..store import JsonlStore, atomic_write_json, read_jsonl
from ..trainers import DPOTrainer, SFTTrainer, SPINTrainer
from ..trainers.checkpoint import save_checkpoint
from ..trainers.sharding import full_state_dict, is_sharded
from ..utils import derive_seed
from .eft import build_eft
from .report import plain
from .stages import (
    EFTBuildStage,
    PreferenceStage,
    PromptGenerationStage,
    SFTStage,
    SPINStage,
    Stage,
)

__all__ = ["StageContext", "generated_eft", "generated_prompts", "save_policy"]


def save_policy(model: nn.Module, tokenizer: Tokenizer, accelerator: Any, path: Path) -> None:
    """Write the policy (and an HF tokenizer, so ``from_pretrained(path)`` finds both) to
    ``path`` on the main process; every rank waits for it. A sharded policy is gathered
    first (every rank takes part) and written whole."""
    full = full_state_dict(model) if is_sharded(model) else None
    if accelerator.is_main_process:
        save_checkpoint(model, path, state_dict=full)
        hf_tokenizer = getattr(tokenizer, "tokenizer", None)
        if hasattr(hf_tokenizer, "save_pretrained"):
            hf_tokenizer.save_pretrained(path)
    accelerator.wait_for_everyone()


@dataclass
class StageContext:
    """What every stage's work shares: the policy, the backend that samples it, its
    tokenizer, the accelerator, the run directory and the run-wide settings."""

    model: nn.Module
    backend: GenerationBackend
    tokenizer: Tokenizer
    accelerator: Any
    run_dir: Path
    seed: int
    progress: bool
    preference_max_seq_len: int
    early_stopper_eval_module: Any = None

    def checkpoint(self, stage_dir: Path) -> str:
        """Save the policy (and an HF tokenizer) to ``<stage>/checkpoint``; its path in
        the run directory."""
        path = stage_dir / "checkpoint"
        save_policy(self.model, self.tokenizer, self.accelerator, path)
        return str(path.relative_to(self.run_dir))

    def run_sft(self, stage: SFTStage, stage_dir: Path, examples: list[SFTExample]) -> dict:
        """Fine-tune on ``examples``; the stage's record (checkpoint, metrics)."""
        kwargs = {"seed": self.seed, "progress": self.progress, **stage.trainer}
        trainer = SFTTrainer(
            self.model,
            train_dataset=examples,
            accelerator=self.accelerator,
            output_dir=stage_dir,
            save_final_checkpoint=False,  # the pipeline writes <stage>/checkpoint
            **kwargs,
        )
        with trainer:  # gives back its optimizer and loaders when done
            metrics = trainer.train()
        return {"checkpoint": self.checkpoint(stage_dir), "metrics": plain(metrics)}

    def run_spin(self, stage: SPINStage, stage_dir: Path, examples: list[SFTExample]) -> dict:
        """SPIN cycles on ``examples``; the stage's record (checkpoint, metrics)."""
        kwargs = {"progress": self.progress, **stage.trainer}
        if not {"epochs", "num_epochs"} & kwargs.keys():  # passes in all replace cycles
            kwargs.setdefault("iterations", stage.cycles)
        max_seq_len = kwargs.pop("max_seq_len", self.preference_max_seq_len)
        trainer = SPINTrainer(
            self.model,
            sft_dataset=examples,
            max_seq_len=max_seq_len,
            eos_id=self.tokenizer.eos_id,
            accelerator=self.accelerator,
            backend=self.backend,
            checkpoint_folder=str(stage_dir / "spin-checkpoints"),
            **kwargs,
        )
        with trainer:  # gives back its optimizer and loaders when done
            metrics = trainer.train()
        return {"checkpoint": self.checkpoint(stage_dir), "metrics": plain(metrics)}

    def run_prompt_generation(
        self,
        index: int,
        stage: PromptGenerationStage,
        stage_dir: Path,
        model_or_backend: nn.Module | GenerationBackend,
        seed_prompts: list[str],
        earlier: list[str],
    ) -> dict:
        """New prompts from ``model_or_backend`` few-shot prompted with ``seed_prompts``
        (``earlier``: prompts earlier stages made, not made again) to ``prompts.jsonl``; the
        record."""
        result = generate_prompts(
            model_or_backend,
            self.tokenizer,
            seed_prompts,
            stage.num_prompts,
            num_shots=stage.num_shots,
            num_seed_shots=stage.num_seed_shots,
            temperature=stage.temperature,
            top_p=stage.top_p,
            max_new_tokens=stage.max_new_tokens,
            max_attempts=stage.max_attempts,
            generator=derive_seed(self.seed, index, "prompts"),  # seeded on the model's device
            progress=self.progress,
            generated_prompts=earlier,
        )
        main = self.accelerator.is_main_process
        if main:
            store = JsonlStore(stage_dir / "prompts.jsonl")
            store.extend(
                {"id": f"{index + 1}-{i}", "prompt": p} for i, p in enumerate(result.prompts)
            )
        stats = plain(dataclasses.asdict(result)) if dataclasses.is_dataclass(result) else {}
        stats.pop("prompts", None)
        stats["num_prompts"] = len(result.prompts)
        if main:
            atomic_write_json(stage_dir / "stats.json", stats)
        self.accelerator.wait_for_everyone()  # prompts.jsonl is complete before any rank reads it
        return {
            "prompts": str((stage_dir / "prompts.jsonl").relative_to(self.run_dir)),
            "stats": stats,
        }

    def run_eft_build(
        self,
        index: int,
        stage: EFTBuildStage,
        stage_dir: Path,
        rows: list[dict],
        judge: Any,
        device: Any,
    ) -> dict:
        """The EFT data from ``judge``'s judgements of ``rows`` (see :mod:`.eft`); the record."""
        stats = build_eft(
            index=index,
            stage=stage,
            stage_dir=stage_dir,
            rows=rows,
            judge=judge,
            reward_config=judge.config,
            seed=self.seed,
            device=device,
            accelerator=self.accelerator,
        )
        self.accelerator.wait_for_everyone()  # the files are complete before any rank reads
        return {"eft": str((stage_dir / "eft.jsonl").relative_to(self.run_dir)), "stats": stats}

    def run_dpo(
        self,
        stage: PreferenceStage,
        stage_dir: Path,
        pairs: list[dict],
        replay: list[SFTExample] | None,
    ) -> dict:
        """One DPO iteration on ``pairs`` (``replay``: the SFT replay data); the record."""
        examples = [
            preference_example(p["prompt"], p["chosen"], p["rejected"], self.tokenizer)
            for p in pairs
        ]
        kwargs = {
            "max_seq_len": self.preference_max_seq_len,
            "seed": self.seed,
            "progress": self.progress,
            **stage.trainer,
        }
        if self.early_stopper_eval_module is not None:
            kwargs.setdefault("early_stopper_eval_module", self.early_stopper_eval_module)
        trainer = DPOTrainer(
            self.model,
            train_dataset=examples,
            replay_dataset=replay,
            accelerator=self.accelerator,
            output_dir=stage_dir,
            save_final_checkpoint=False,  # the pipeline writes <stage>/checkpoint
            **kwargs,
        )
        with trainer:  # gives back its optimizer and loaders when done
            metrics = trainer.train()
        stats = json.loads((stage_dir / "stats.json").read_text())
        return {
            "checkpoint": self.checkpoint(stage_dir),
            "pairs": str((stage_dir / "pairs.jsonl").relative_to(self.run_dir)),
            "stats": stats,
            "metrics": plain(metrics),
        }


def generated_prompts(
    stages: Sequence[Stage], stage_dirs: Sequence[Path], index: int, *, latest: bool
) -> list[str]:
    """The prompts written by the prompt-generation stages before stage ``index``: all of
    them in order, or (``latest``) those of the latest one, which must have written some."""
    gen = [j for j in range(index) if isinstance(stages[j], PromptGenerationStage)]
    if not latest:
        return [r["prompt"] for j in gen for r in read_jsonl(stage_dirs[j] / "prompts.jsonl")]
    if not gen:
        raise ValueError(
            "prompts='generated' needs a prompt_generation stage before this stage; add one "
            "or name a prompt dataset"
        )
    path = stage_dirs[gen[-1]] / "prompts.jsonl"
    prompts = [r["prompt"] for r in read_jsonl(path)]
    if not prompts:
        raise ValueError(f"the prompt-generation stage wrote no prompts to {path}")
    return prompts


def generated_eft(stages: Sequence[Stage], stage_dirs: Sequence[Path], index: int) -> list[dict]:
    """The EFT rows (``eft.jsonl``) of the latest eft_build stage before stage ``index``."""
    gen = [j for j in range(index) if isinstance(stages[j], EFTBuildStage)]
    if not gen:
        raise ValueError(
            "datasets 'generated_eft' needs an eft_build stage before this stage; add one or "
            "remove the name"
        )
    path = stage_dirs[gen[-1]] / "eft.jsonl"
    rows = read_jsonl(path)
    if not rows:
        raise ValueError(
            f"the eft_build stage kept no EFT examples ({path} is empty; see stats.json "
            "beside it): fine-tune on IFT first so the model writes judgements that parse, "
            "use a reward_config whose regex matches what it writes, or give more inputs"
        )
    return rows
