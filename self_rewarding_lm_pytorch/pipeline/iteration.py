"""A preference stage's work in the run (:class:`PreferenceIteration`, a part of
:class:`~.runner.SelfRewardingTrainer`): which model judges (``judge_model``, or a frozen
earlier one after an unhealthy :mod:`.health` measurement), the anchor of ``rejected_from``,
the pairs (:class:`~.preference.PairBuilder`; a Meta-Rewarding stage's judge pairs,
:mod:`.meta`), then DPO on them."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from ..generation import GenerationBackend, TorchBackend
from ..judge import CallableJudge, LLMJudge
from ..trainers.sharding import gathered
from ..utils import derive_seed
from .health import stage_health
from .meta import build_judge_pairs
from .preference import PairBuilder, candidate_config, prompt_budgets, prompts_tried
from .snapshots import POLICY, policy_reference
from .stages import MetaRewardStage, PreferenceStage
from .steps import StageContext, generated_prompts

__all__ = ["PreferenceIteration"]


class PreferenceIteration:
    """The preference-stage part of the runner; it reads the runner's policy (``lm``,
    ``model``, ``backend``, ``tokenizer``), its ``judges``, ``snapshots``, ``samplers``,
    ``_inputs``, ``_finished`` and run settings."""

    def _run_preference(
        self: Any,
        index: int,
        stage: PreferenceStage,
        stage_dir: Path,
        sampler: GenerationBackend,
        ctx: StageContext,
        dirs: list[Path],
    ) -> dict:
        """Pairs from judged candidates, then DPO on them; the stage's record."""
        prompts = (
            generated_prompts(self.stages, dirs, index, latest=True)
            if stage.prompts == "generated"
            else self._inputs.prompts(stage.prompts)
        )
        name = self._plan()[index]
        own = self._judge_model(index, stage)
        health = None
        if stage.judge_health is not None:  # measured before anything is judged
            health = self._judge_health(index, stage, stage_dir, sampler, own)
        judge_model = health["judge_model"] if health else own
        anchor = None
        if stage.rejected_from != POLICY:
            anchor = self.snapshots.backend(stage.rejected_from, self._finished)
        builder = PairBuilder(
            name=name,
            index=index,
            stage=stage,
            stage_dir=stage_dir,
            backend=sampler,
            device=self.lm.device,
            tokenizer=self.tokenizer,
            judge=self._judge_for(stage, sampler, self._frozen(index, judge_model)),
            accelerator=self.accelerator,
            seed=self.seed,
            oracle=self.oracle,
            progress=self.progress,
            anchor=anchor,
            health=health,
        )
        budgets = self._inputs.prompt_budgets(name, stage, prompts[: prompts_tried(stage, prompts)])
        meta = isinstance(stage, MetaRewardStage)
        with gathered(self.model):  # the ranks sample different chunks: no collectives
            pairs = builder.build(prompts, budgets)
            judge_pairs = build_judge_pairs(builder, pairs) if meta else []
        self.samplers.pool.sleep()
        replay = self._inputs.sft_examples([stage.replay]) if stage.replay else None
        result = ctx.run_dpo(stage, stage_dir, pairs + judge_pairs, replay)
        if meta:  # the model also judged its own judgements (Meta-Rewarding)
            result["judge_pairs"] = str((stage_dir / "judge_pairs.jsonl").relative_to(self.run_dir))
        if stage.judge == "self":  # which model judged, and why
            result["judge_model"] = judge_model
            result["judge_reason"] = (
                health["reason"]
                if health and health["frozen"]
                else f"judge_model: {stage.judge_model}"
            )
        if health is not None:
            result["judge_health"] = {k: health[k] for k in ("accuracy", "pairs", "decision")}
        return result

    def _judge_model(self: Any, index: int, stage: PreferenceStage) -> str:
        """The model the stage's self judge samples with: ``judge_model`` resolved ("policy"
        is the latest earlier checkpoint's stage, or "initial")."""
        current = policy_reference(self._plan(), self._finished, index)
        return current if stage.judge_model == POLICY else stage.judge_model

    def _frozen(self: Any, index: int, model: str) -> str | None:
        """``model``, or None when it is the weights the live policy holds at stage ``index``."""
        return None if model == policy_reference(self._plan(), self._finished, index) else model

    def _judge_health(self: Any, index, stage, stage_dir, sampler, own: str) -> dict:
        """Measure the judge the stage is about to use (:mod:`.health`); may raise."""
        config, name = stage.judge_health, self._plan()[index]
        return stage_health(
            name,
            config,
            stage_dir,
            [self._stage_dir(j, s) for j, s in enumerate(self.stages[:index])],
            own,
            judge_for=lambda model: self._judge_for(stage, sampler, self._frozen(index, model)),
            data=lambda: (
                self._inputs.prompts(config.prompts)
                if config.prompts is not None
                else self._inputs.rows(config.rows, stage=name)
            ),
            main=self.accelerator.is_main_process,
            backend=sampler,
            tokenizer=self.tokenizer,
            gen_config=candidate_config(stage, self.tokenizer.eos_id),
            oracle=self.oracle,
            seed=derive_seed(self.seed, index, "judge_health"),
            device=self.lm.device,
            budgets=lambda prompts: prompt_budgets(
                name,
                stage,
                prompts,
                config.prompts,
                self.tokenizer,
                self.lm.max_seq_len,
                self.preference_max_seq_len,
            ),
        )

    def _judge_for(
        self: Any,
        stage: PreferenceStage,
        backend: GenerationBackend | None = None,
        model: str | None = None,
    ):
        """The stage's judge; the self judge samples through ``backend`` (the stage's
        sampler; the torch engine when not given, as in the pre-flight checks), or with
        the frozen weights of ``model`` (a reference) when it is not the live policy's."""
        if stage.judge != "self":
            judge = self.judges[stage.judge]
            return judge if hasattr(judge, "score") else CallableJudge(judge)
        settings = stage.judge_settings
        backend = self.backend if backend is None else backend
        # settings that configure the torch engine need a judge engine of their own, over
        # the same module (the live one, or the frozen copy of ``model``)
        if model is not None:
            frozen = self.snapshots.lm(model, self._finished)
            sampler = frozen if settings.engine_options() else TorchBackend(frozen)
        else:
            torch_engine = backend is self.backend
            sampler = self.lm if torch_engine and settings.engine_options() else backend
        return LLMJudge(sampler, self.tokenizer, self.reward_config, **dataclasses.asdict(settings))
