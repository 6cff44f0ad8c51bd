"""The pipeline's entry point, :class:`SelfRewardingTrainer`: it checks the plan and the
data, takes the run directory (lock, overwrite, resume) and runs the unfinished stages in
order, handing each stage's work to :mod:`.steps` and :mod:`.preference`."""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from torch import nn

from ..config import ConfigError
from ..data import tokenize_sft_item
from ..generation import GenerationBackend, TorchBackend
from ..generation.selection import BackendConfig, backend_fingerprint, check_servable
from ..judge import DEFAULT_REWARD_CONFIG, RewardConfig
from ..models import CausalLM, wrap_model, wrap_tokenizer
from ..store import (
    RunDirError,
    RunLock,
    atomic_write_json,
    atomic_write_text,
    clear_run_dir,
    ensure_run_dir,
)
from ..trainers.checkpoint import load_checkpoint
from ..trainers.sharding import gathered, is_sharded, load_full_state_dict, shard_model
from .backends import StageSamplers
from .head_to_head_stage import resolve_baseline, run_head_to_head, stage_judge
from .health import check_oracle
from .inputs import StageInputs
from .iteration import PreferenceIteration
from .plan import check_plan, datasets_of, plan_names
from .report import config_yaml, write_report
from .rundir import (
    check_fingerprints,
    load_state,
    set_aside_interrupted_metrics,
    stage_defaults,
    stage_fingerprint,
)
from .seed_api import seed_stages
from .snapshots import Snapshots, capture_base, check_support, needs_base
from .stages import (
    GENERATED_EFT,
    SAMPLING_STAGES,
    START_AFRESH,
    EFTBuildStage,
    HeadToHeadStage,
    PreferenceStage,
    PromptGenerationStage,
    SFTStage,
    SPINStage,
    Stage,
    _stage_slug,
    check_trainer_kwargs,
)
from .steps import StageContext, generated_eft, generated_prompts

__all__ = ["SelfRewardingTrainer"]

log = logging.getLogger(__name__)


class SelfRewardingTrainer(PreferenceIteration):
    """Run SFT, SPIN, prompt generation and self-/external-reward DPO stages in order.

    Either give ``stages`` explicitly, or use the seed's keyword API, which builds the
    paper's default order: SFT on ``train_sft_dataset``, ``num_spin_cycles`` SPIN cycles,
    then ``self_reward_num_iterations`` self-rewarding DPO iterations with
    ``num_preference_pairs[i]`` pairs each.

    Datasets are named: ``train_sft_dataset`` is ``"sft"``, ``prompt_dataset`` is
    ``"prompts"``, and ``datasets={"eft": ...}`` adds more. SFT items are the seed's
    ``(token_ids, prompt_len)`` tuples or text dicts ``{"prompt", "response"}``.

    ``backend`` samples the policy: ``"torch"`` (the live module), ``"vllm"``, ``"openai"``,
    a :class:`~self_rewarding_lm_pytorch.generation.BackendConfig`, or a ready
    :class:`~self_rewarding_lm_pytorch.generation.GenerationBackend` (used as given and
    left open); a stage's ``generation={...}`` overrides it. A backend other than the
    torch engine is built once, at the first stage that samples, and after every training
    stage serves that stage's checkpoint (``load_weights``). A vLLM engine starts from
    ``model_path`` (the Hugging Face folder the model was loaded from, unchanged) or the
    latest checkpoint, else from ``<checkpoints_folder>/policy-initial``.

    ``shard_parameters`` shards the policy over the processes (FSDP2 FULL_SHARD per decoder
    layer, :func:`~self_rewarding_lm_pytorch.trainers.shard_model`): every rank holds
    about ``1 / world_size`` of the weights, gradients and optimizer state while training;
    the torch backend samples with the weights gathered whole on every rank (a vLLM
    backend serves the gathered stage checkpoints instead).
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        tokenizer: Any = None,
        tokenizer_encode: Callable[[str], Any] | None = None,
        tokenizer_decode: Callable[[Any], str] | None = None,
        eos_id: int | None = None,
        stages: Sequence[Stage] | None = None,
        train_sft_dataset: Any = None,
        valid_sft_dataset: Any = None,
        prompt_dataset: Any = None,
        datasets: dict[str, Any] | None = None,
        judges: dict[str, Any] | None = None,
        models: dict[str, nn.Module] | None = None,
        reward_prompt_config: RewardConfig | None = None,
        oracle: Callable[[str, str], float] | None = None,
        # the seed's keyword API
        initial_sft: bool = True,
        spin: bool = False,
        num_spin_cycles: int = 0,
        self_reward_num_iterations: int | None = None,
        num_preference_pairs: int | Sequence[int] = 1000,
        num_candidate_responses: int = 4,
        preference_max_seq_len: int = 1024,
        generate_reward_max_seq_len: int = 256,
        dpo_beta: float = 0.1,
        pad_id: int | None = None,
        accelerate_kwargs: dict | None = None,
        sft_trainer_kwargs: dict | None = None,
        spin_trainer_kwargs: dict | None = None,
        dpo_trainer_kwargs: dict | None = None,
        early_stopper_eval_module: Callable[[nn.Module], float] | None = None,
        checkpoints_folder: str | Path = "./checkpoints",
        seed: int = 0,
        progress: bool = True,
        backend: str | BackendConfig | GenerationBackend = "torch",
        model_path: str | Path | None = None,
        shard_parameters: bool = False,
    ) -> None:
        self.lm: CausalLM = wrap_model(model)
        self.model = self.lm.module
        #: samples the live policy for every stage (candidates, the self judge, prompt
        #: generation, SPIN): training updates the module it reads
        self.backend = TorchBackend(self.lm)
        self.tokenizer = wrap_tokenizer(
            tokenizer,
            encode=tokenizer_encode,
            decode=tokenizer_decode,
            eos_id=eos_id,
            pad_id=pad_id,
        )
        self.pad_id = pad_id
        self.reward_config = reward_prompt_config or DEFAULT_REWARD_CONFIG
        self.oracle = oracle
        self.run_dir = Path(checkpoints_folder)
        self.seed = seed
        self.progress = progress
        self.early_stopper_eval_module = early_stopper_eval_module
        self.preference_max_seq_len = preference_max_seq_len
        self.accelerate_kwargs = dict(accelerate_kwargs or {})

        #: the backends that sample each stage (the run's `backend`, stages' `generation:`)
        self.samplers = StageSamplers(
            backend,
            torch_backend=lambda: self.backend,
            model=self.model,
            tokenizer=self.tokenizer,
            accelerator=lambda: self.accelerator,
            run_dir=self.run_dir,
            model_path=model_path,
        )
        self.datasets: dict[str, Any] = {}
        if train_sft_dataset is not None:
            self.datasets["sft"] = train_sft_dataset
        if valid_sft_dataset is not None:
            self.datasets["valid_sft"] = valid_sft_dataset
        if prompt_dataset is not None:
            self.datasets["prompts"] = prompt_dataset
        self.datasets.update(datasets or {})
        self.judges = dict(judges or {})
        self.models = dict(models or {})
        self._inputs = StageInputs(
            self.datasets,
            self.tokenizer,
            max_seq_len=self.lm.max_seq_len,
            preference_max_seq_len=preference_max_seq_len,
        )
        self._preflight_done = False

        if stages is None:
            stages = seed_stages(
                has_eft="eft" in self.datasets,
                initial_sft=initial_sft and train_sft_dataset is not None,
                num_spin_cycles=num_spin_cycles if (spin or num_spin_cycles) else 0,
                iterations=self_reward_num_iterations,
                num_preference_pairs=num_preference_pairs,
                num_candidates=num_candidate_responses,
                judge_max_new_tokens=generate_reward_max_seq_len,
                sft_kwargs=sft_trainer_kwargs or {},
                spin_kwargs=spin_trainer_kwargs or {},
                dpo_kwargs={"beta": dpo_beta, **(dpo_trainer_kwargs or {})},
            )
        self.stages: list[Stage] = list(stages)
        self._validate()
        samples = SAMPLING_STAGES
        if self.tokenizer.eos_id is None and any(isinstance(s, samples) for s in self.stages):
            warnings.warn(
                "the tokenizer has no EOS id, so sampled responses never end before "
                "max_new_tokens and the model is never taught to stop; pass eos_id=... (or a "
                "tokenizer with an eos token)",
                UserWarning,
                stacklevel=2,
            )
        #: for SFT stages with init="base" and references to "initial": the trainable
        #: weights the run started from, on CPU
        self._base_weights = capture_base(self.model) if needs_base(self.stages) else None
        #: frozen earlier models (rejected_from, judge_model, a frozen judge)
        self.snapshots = Snapshots(self.model, lambda: self._base_weights, self.run_dir)
        self._finished: dict[str, dict] = {}
        check_support(
            self.stages, self._plan(), shard_parameters, lambda s, n: self.samplers.config_of(s, n)
        )
        check_oracle(self.stages, self._plan(), oracle)
        self._accelerator = None
        self._lock = RunLock(self.run_dir)
        self._run_open = False
        self._state: dict = {"finished": []}
        self._model_identity: str | None = None
        if shard_parameters:  # after everything that reads the whole model
            from ..fingerprint import model_identity

            self._model_identity = model_identity(self.model)
            self.model.to(self.accelerator.device)
            shard_model(self.model)

    # ------------------------------------------------------------------ set-up

    def _validate(self) -> None:
        if not self.stages:
            raise ValueError(
                "no stages to run: give stages=[...] or a train_sft_dataset / prompt_dataset"
            )
        for stage, name in zip(self.stages, self._plan()):
            try:
                check_trainer_kwargs(stage)
            except ConfigError as exc:
                raise ConfigError(f"stage {name}: {exc}") from exc
        check_plan(
            self.stages,
            datasets=set(self.datasets),
            judges=set(self.judges),
            models=set(self.models),
        )
        for stage, name in zip(self.stages, self._plan()):
            config = self.samplers.config_of(stage, name)
            if isinstance(config, BackendConfig):
                check_servable(config, self.model, f"stage {name}: generation")
            for ds in datasets_of(stage):
                if len(self.datasets[ds]) == 0:
                    raise ValueError(f"dataset {ds!r} (used by stage {stage.kind}) is empty")
            if (
                isinstance(stage, PreferenceStage)
                and stage.judge == "self"
                and stage.judge_settings.num_samples > 1
                and not stage.judge_settings.temperature
            ):
                n = stage.judge_settings.num_samples
                warnings.warn(
                    f"stage {name}: judge_settings.num_samples={n} with "
                    "judge_settings.temperature=0 judges each candidate greedily, so all "
                    f"{n} judgements are the same and their mean is one judgement; set "
                    "judge_settings.num_samples=1 (as fast, same scores) or "
                    "judge_settings.temperature > 0 (the paper uses 0.7)",
                    UserWarning,
                    stacklevel=3,
                )

    def preflight(self) -> None:
        """Check what the stages need from the data, tokenizer and model before any runs.

        Every dataset is read and tokenized (SFT items, prompts: blank ones are refused,
        empty SFT responses warned about), every prompt of a preference stage must fit the
        model's context with the stage's ``max_new_tokens`` (and leave room for a response
        within ``preference_max_seq_len``), SPIN prompts must leave room for a response, and
        the self-judge's template must render. ``run()`` calls this first; ``srlm run
        --check`` runs it without training. The checks run once per trainer.
        """
        if not self._preflight_done:
            self._inputs.preflight(self.stages, self._plan(), self._judge_for)
            self._preflight_done = True

    @property
    def accelerator(self):
        if self._accelerator is None:
            from accelerate import Accelerator

            self._accelerator = Accelerator(**self.accelerate_kwargs)
        return self._accelerator

    def _stage_dir(self, index: int, stage: Stage) -> Path:
        return self.run_dir / f"{index + 1:02d}-{_stage_slug(stage)}"

    @property
    def state_path(self) -> Path:
        return self.run_dir / "state.json"

    def _save_state(self, state: dict) -> None:
        if self.accelerator.is_main_process:
            atomic_write_json(self.state_path, state)

    def _plan(self) -> list[str]:
        return plan_names(self.stages)

    def _fingerprint(self, stage: Stage) -> dict[str, dict[str, Any]]:
        from ..fingerprint import model_identity

        if self._model_identity is None:  # the model as given, before any checkpoint
            self._model_identity = model_identity(self.model)
        run = {
            "seed": self.seed,
            "mixed_precision": str(self.accelerator.mixed_precision),  # as resolved
            "model": self._model_identity,
            "tokenizer": self.tokenizer,
        }
        config = self.samplers.config_of(stage, stage.kind)
        return stage_fingerprint(
            stage,
            run=run,
            datasets=self.datasets,
            models=self.models,
            judges=self.judges,
            reward_config=self.reward_config,
            oracle=self.oracle,
            early_stopper_eval_module=self.early_stopper_eval_module,
            preference_max_seq_len=self.preference_max_seq_len,
            generation=backend_fingerprint(config) if config is not None else None,
        )

    # ------------------------------------------------------------------ run directory
    def open_run_dir(self, *, overwrite: bool = False) -> None:
        """Take the run directory for this launch (done by :meth:`run`; call it first to
        write files of your own into the folder).

        One launch writes a run directory at a time: the main process takes a lock, and
        a second process is refused at once, naming the holder. ``overwrite`` empties a
        directory this library made (anything else is refused, nothing deleted). Stages
        that finished or have records must keep their settings (see ``state.json``);
        ``config.yaml`` is written once, when the run starts. Every rank gets the outcome,
        so a refusal stops all of them."""
        if self._run_open:
            return
        self.preflight()  # data, tokenizer and model checked before any file is touched
        acc = self.accelerator
        self._lock = RunLock(self.run_dir)
        error: Exception | None = None
        if acc.is_main_process:
            try:
                self._take_run_dir(overwrite)
            except Exception as exc:  # shared with the other ranks below, then raised
                self._lock.release()
                error = exc
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            outcome = [None if error is None else str(error)]
            broadcast_object_list(outcome, from_process=0)
            if error is None and outcome[0] is not None:
                raise RunDirError(outcome[0])
        if error is not None:
            raise error
        self._state = load_state(self.state_path)  # every rank reads what the main process wrote
        self._run_open = True

    def close_run_dir(self) -> None:
        """Give the run directory up (the lock); :meth:`run` does this when it ends."""
        self._lock.release()
        self._run_open = False

    def _take_run_dir(self, overwrite: bool) -> None:
        run_dir = self.run_dir
        if overwrite:  # refuse a folder that is not a run directory before writing to it
            clear_run_dir(run_dir, dry_run=True)
        ensure_run_dir(run_dir)
        self._lock.acquire()
        if overwrite:
            clear_run_dir(run_dir)
        state = load_state(self.state_path)
        plan = self._plan()
        if state.get("plan") not in (None, plan):
            raise RuntimeError(
                f"{run_dir} holds a run with stages {state['plan']}, but this run has "
                f"{plan}; start it afresh: {START_AFRESH}"
            )
        state["plan"] = plan
        check_fingerprints(
            state,
            [self._fingerprint(s) for s in self.stages],
            [self._stage_dir(i, s) for i, s in enumerate(self.stages)],
            [stage_defaults(s) for s in self.stages],
        )
        atomic_write_json(self.state_path, state)  # first: it marks the folder as a run
        if not (run_dir / "config.yaml").exists():
            atomic_write_text(run_dir / "config.yaml", self._config_yaml())

    # ------------------------------------------------------------------ run
    def __call__(self, overwrite_checkpoints: bool = False) -> dict:
        return self.run(overwrite=overwrite_checkpoints)

    def run(self, *, overwrite: bool = False) -> dict:
        """Run every stage not yet finished; returns the run report (also written to disk)."""
        if overwrite:  # refused before the folder is emptied
            self._check_base(self.stages)
        self.open_run_dir(overwrite=overwrite)
        try:
            return self._run_stages(self._state)
        finally:
            try:
                self.samplers.pool.close()  # every backend the run built (not a given one)
            finally:
                self.close_run_dir()

    def _run_stages(self, state: dict) -> dict:
        plan = self._plan()
        main = self.accelerator.is_main_process
        finished = {r["stage"]: r for r in state["finished"]}
        self._finished = finished  # what frozen references load
        last_ckpt = None
        for name in plan:
            if name in finished and finished[name].get("checkpoint"):
                last_ckpt = finished[name]["checkpoint"]
        if last_ckpt is not None:
            load_checkpoint(self.model, self.run_dir / last_ckpt)
            self.samplers.weights = self.run_dir / last_ckpt  # a vLLM engine starts from it
        remaining = [s for s, n in zip(self.stages, plan) if n not in finished]
        self._check_base(remaining)
        self._release_base(remaining)

        for index, stage in enumerate(self.stages):
            name = plan[index]
            if name in finished:
                continue
            stage_dir = self._stage_dir(index, stage)
            if main:
                stage_dir.mkdir(parents=True, exist_ok=True)
                set_aside_interrupted_metrics(stage_dir)
            self.accelerator.wait_for_everyone()
            log.info("stage %s", name)
            result = self._run_stage(index, stage, stage_dir)
            if result.get("checkpoint"):  # the policy changed: its backends serve it
                self.samplers.trained(self.run_dir / result["checkpoint"])
            record = {"stage": name, **result}
            state["finished"].append(record)
            self._save_state(state)
            finished[name] = record
            self.snapshots.release(self.snapshots.keep_for(self.stages[index + 1 :]))
            self._release_base(self.stages[index + 1 :])
        return write_report(self.run_dir, state["finished"], main=main)

    def _check_base(self, remaining: Sequence[Stage]) -> None:
        if self._base_weights is None and needs_base(remaining):
            raise RuntimeError(
                "this trainer freed the weights it started from after the last stage that "
                "needed them, and the stages to run now need them again (init: base, "
                "'initial', judge_health freeze); build a new SelfRewardingTrainer to run again"
            )

    def _release_base(self, remaining: Sequence[Stage]) -> None:
        """Free the CPU copy of the initial weights once no ``remaining`` stage needs it
        (a model's worth of host memory for the rest of the run)."""
        if self._base_weights is not None and not needs_base(remaining):
            self._base_weights = None

    def _run_stage(self, index: int, stage: Stage, stage_dir: Path) -> dict:
        sampler = None
        if isinstance(stage, SAMPLING_STAGES):
            folder = self._stage_dir(index, stage).name
            sampler = self.samplers.sampler(stage, self._plan()[index], folder)
        ctx = StageContext(
            model=self.model,
            backend=sampler or self.backend,
            tokenizer=self.tokenizer,
            accelerator=self.accelerator,
            run_dir=self.run_dir,
            seed=self.seed,
            progress=self.progress,
            preference_max_seq_len=self.preference_max_seq_len,
            early_stopper_eval_module=self.early_stopper_eval_module,
        )
        dirs = [self._stage_dir(j, s) for j, s in enumerate(self.stages)]
        if isinstance(stage, SFTStage):
            self.samplers.pool.sleep()
            examples = self._inputs.sft_examples(datasets_of(stage))
            if GENERATED_EFT in stage.datasets:
                rows = generated_eft(self.stages, dirs, index)
                examples = examples + [tokenize_sft_item(r, self.tokenizer) for r in rows]
            if stage.init == "base":  # the model as given, not the previous stage's
                if is_sharded(self.model):
                    load_full_state_dict(self.model, self._base_weights)
                else:
                    self.model.load_state_dict(self._base_weights, strict=False)
            return ctx.run_sft(stage, stage_dir, examples)
        if isinstance(stage, SPINStage):
            return ctx.run_spin(stage, stage_dir, self._inputs.sft_examples([stage.dataset]))
        if isinstance(stage, EFTBuildStage):
            judge = self._judge_for(stage, sampler)
            rows = self._inputs.rows(stage.inputs)
            with gathered(self.model):  # sharded: whole weights while the ranks sample
                return ctx.run_eft_build(index, stage, stage_dir, rows, judge, self.lm.device)
        if isinstance(stage, HeadToHeadStage):
            name, prompts = self._plan()[index], self._inputs.prompts(stage.prompts)
            judge = stage_judge(stage, self._judge_for(stage, sampler), name)
            base = resolve_baseline(index, self.stages, self._plan(), dirs, self.datasets)
            with gathered(self.model):  # sharded: whole weights while the ranks sample
                return run_head_to_head(
                    ctx, index=index, name=name, stage=stage, stage_dir=stage_dir,
                    prompts=prompts, judge=judge, baseline=base, device=self.lm.device,
                )  # fmt: skip
        if isinstance(stage, PromptGenerationStage):
            if stage.generator_model != "self":
                sampler = self.models[stage.generator_model]
            with gathered(self.model):
                return ctx.run_prompt_generation(
                    index,
                    stage,
                    stage_dir,
                    sampler,
                    self._inputs.prompts(stage.seed_dataset),
                    generated_prompts(self.stages, dirs, index, latest=False),
                )
        return self._run_preference(index, stage, stage_dir, sampler, ctx, dirs)

    def _config_yaml(self) -> str:
        return config_yaml(
            seed=self.seed,
            preference_max_seq_len=self.preference_max_seq_len,
            datasets=self.datasets,
            judges=self.judges,
            reward_config=self.reward_config,
            stages=self.stages,
        )
