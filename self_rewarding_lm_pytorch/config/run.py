"""The sections of a ``srlm run`` YAML file as typed dataclasses (what each key means).

Each section checks its own values in ``validate()`` (run when it is made); the checks
across sections (stage kinds, dataset and judge names, files) are in :mod:`.load`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from ..generation.selection import BackendConfig
from ..judge.config import JudgeConfig
from .core import ConfigError

__all__ = [
    "AccelerateConfig",
    "DataSource",
    "JudgeSpec",
    "LoRAConfig",
    "ModelConfig",
    "RewardConfigSpec",
    "RunConfig",
    "TokenizerConfig",
]

DType = Literal["auto", "float32", "bfloat16", "float16"]


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class LoRAConfig:
    """LoRA adapters (peft ``LoraConfig``) trained instead of the full model.

    ``export``: what ``srlm run`` writes to ``<out>/final`` at the end: ``merged`` (the
    adapter folded into the weights, a plain Hugging Face model) or ``adapter`` (the
    adapter only, loadable on top of the base model).
    """

    r: int = field(default=8, metadata=_help("rank of the adapter matrices"))
    alpha: float = field(default=16.0, metadata=_help("LoRA scaling numerator (alpha / r)"))
    dropout: float = field(default=0.0, metadata=_help("dropout on the adapter input, in [0, 1)"))
    target_modules: list[str] | str = field(
        default="all-linear", metadata=_help("modules that get adapters ('all-linear' or names)")
    )
    bias: Literal["none", "all", "lora_only"] = field(
        default="none", metadata=_help("which biases are trained")
    )
    modules_to_save: list[str] | None = field(
        default=None, metadata=_help("modules trained in full and saved with the adapter")
    )
    export: Literal["merged", "adapter"] = field(
        default="merged", metadata=_help("what <out>/final holds: the merged model or the adapter")
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the key, the problem and the fix."""
        if self.r < 1:
            raise ConfigError(f"lora.r must be >= 1, got {self.r}")
        if self.alpha <= 0:
            raise ConfigError(f"lora.alpha must be > 0, got {self.alpha}")
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"lora.dropout must lie in [0, 1), got {self.dropout}")
        if isinstance(self.target_modules, list) and not self.target_modules:
            raise ConfigError("lora.target_modules is empty; name modules or use 'all-linear'")


@dataclass
class ModelConfig:
    """The policy model: a local Hugging Face folder (``path``) or an x-transformers
    ``TransformerWrapper`` built from keyword arguments (``xtransformers``, with the
    decoder's keywords under ``attn_layers``), optionally loaded from ``checkpoint``
    (a safetensors file or folder written by a previous run)."""

    path: str | None = field(default=None, metadata=_help("local Hugging Face model folder"))
    xtransformers: dict[str, Any] | None = field(
        default=None, metadata=_help("TransformerWrapper keyword arguments (attn_layers: Decoder)")
    )
    checkpoint: str | None = field(
        default=None, metadata=_help("safetensors weights for the x-transformers model")
    )
    dtype: DType = field(default="float32", metadata=_help("parameter dtype"))
    lora: LoRAConfig | None = field(
        default=None, metadata=_help("train LoRA adapters instead of the full model")
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the key, the problem and the fix."""
        if (self.path is None) == (self.xtransformers is None):
            raise ConfigError(
                "give exactly one of model.path (a local Hugging Face model folder) or "
                "model.xtransformers (TransformerWrapper keyword arguments)"
            )
        if self.lora is not None and self.path is None:
            raise ConfigError("model.lora needs a Hugging Face model (model.path)")
        if self.checkpoint is not None and self.path is not None:
            raise ConfigError(
                "model.checkpoint is for x-transformers models; a Hugging Face checkpoint "
                "folder is given as model.path itself"
            )
        if self.xtransformers is not None:
            for key in ("num_tokens", "max_seq_len", "attn_layers"):
                if key not in self.xtransformers:
                    raise ConfigError(
                        f"model.xtransformers needs {key!r} (e.g. num_tokens: 256, "
                        "max_seq_len: 256, attn_layers: {dim: 64, depth: 2, heads: 4})"
                    )
            if not isinstance(self.xtransformers["attn_layers"], dict):
                raise ConfigError(
                    "model.xtransformers.attn_layers must be a mapping of Decoder keyword "
                    "arguments, e.g. {dim: 64, depth: 2, heads: 4}"
                )


@dataclass
class TokenizerConfig:
    """``kind: hf`` loads ``AutoTokenizer`` from ``path`` (default: ``model.path``);
    ``kind: bytes`` encodes text as UTF-8 bytes (ids 0-255; for x-transformers models
    with ``num_tokens >= 256``). ``chat_template`` / ``chat_template_file`` replace the
    tokenizer's chat template; ``use_chat_template: false`` feeds prompts as plain text."""

    kind: Literal["hf", "bytes"] = field(
        default="hf", metadata=_help("'hf' (AutoTokenizer) or 'bytes' (UTF-8 bytes as ids)")
    )
    path: str | None = field(default=None, metadata=_help("tokenizer folder (default: model.path)"))
    chat_template: str | None = field(
        default=None, metadata=_help("Jinja2 chat template replacing the tokenizer's")
    )
    chat_template_file: str | None = field(
        default=None, metadata=_help("file holding the chat template")
    )
    use_chat_template: bool | None = field(
        default=None, metadata=_help("false: feed prompts as plain text (null: if it has one)")
    )
    eos_id: int | None = field(
        default=None, metadata=_help("end-of-sequence byte of the bytes tokenizer")
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the key, the problem and the fix."""
        if self.chat_template is not None and self.chat_template_file is not None:
            raise ConfigError(
                "give tokenizer.chat_template or tokenizer.chat_template_file, not both"
            )
        if self.kind == "bytes":
            extra = [
                k
                for k in ("path", "chat_template", "chat_template_file", "use_chat_template")
                if getattr(self, k) is not None
            ]
            if extra:
                raise ConfigError(f"tokenizer.{extra[0]} does not apply to kind 'bytes'")
            if self.eos_id is not None and not 0 <= self.eos_id < 256:
                raise ConfigError(f"tokenizer.eos_id must be a byte value 0-255, got {self.eos_id}")
        elif self.eos_id is not None:
            raise ConfigError(
                "tokenizer.eos_id applies to kind 'bytes' only (HF tokenizers know theirs)"
            )


@dataclass
class DataSource:
    """A data file: JSONL, JSON, CSV/TSV, Parquet or a local ``datasets`` folder
    (``save_to_disk``; ``split`` picks from a ``DatasetDict``). Rows hold text in
    ``prompt_field`` / ``response_field`` or chat messages in ``messages_field``
    (a list of ``{role, content}``; the last assistant turn is the response).
    Small data can be written inline instead of ``path``: ``rows: [{prompt: ...}, ...]``."""

    path: str | None = field(default=None, metadata=_help("data file or datasets folder"))
    rows: list[dict[str, Any]] | None = field(
        default=None, metadata=_help("the rows written inline instead of a path")
    )
    format: Literal["auto", "jsonl", "json", "csv", "tsv", "parquet", "datasets"] = field(
        default="auto", metadata=_help("file format (auto: from the suffix)")
    )
    split: str | None = field(default=None, metadata=_help("split of a DatasetDict folder"))
    prompt_field: str = field(default="prompt", metadata=_help("column with the prompt text"))
    response_field: str = field(default="response", metadata=_help("column with the response text"))
    messages_field: str | None = field(
        default=None, metadata=_help("column with chat messages (instead of prompt/response)")
    )
    limit: int | None = field(default=None, metadata=_help("use only the first N rows"))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the key, the problem and the fix."""
        if (self.path is None) == (self.rows is None):
            raise ConfigError("give exactly one of path: (a data file or folder) or rows: (inline)")
        if self.rows is not None and not self.rows:
            raise ConfigError("rows: is empty; give at least one row")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"limit must be >= 1 (or omitted), got {self.limit}")


@dataclass
class RewardConfigSpec:
    """How a model is asked to judge and how its score is read (``judge.RewardConfig``):
    a Jinja2 ``prompt_template`` with ``{{ prompt }}`` and ``{{ response }}`` (or a
    ``prompt_template_file``), a ``reward_regex_template`` with ``{{ reward }}``, and
    optionally the accepted ``score_range: [low, high]``. Omitted: the paper's Figure 2."""

    prompt_template: str | None = field(
        default=None, metadata=_help("Jinja2 judge prompt with {{ prompt }} and {{ response }}")
    )
    prompt_template_file: str | None = field(
        default=None, metadata=_help("file holding the judge prompt template")
    )
    reward_regex_template: str | None = field(
        default=None, metadata=_help("score pattern with {{ reward }}, e.g. 'Score: {{ reward }}'")
    )
    score_range: list[float] | None = field(
        default=None, metadata=_help("accepted scores [low, high]")
    )
    match: Literal["first", "last"] = field(
        default="last", metadata=_help("which score match of a judgement counts")
    )
    score_values: list[int] | None = field(
        default=None, metadata=_help("the possible scores (for mode 'expected')")
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the key, the problem and the fix."""
        if self.prompt_template is not None and self.prompt_template_file is not None:
            raise ConfigError("give prompt_template or prompt_template_file, not both")
        if self.score_range is not None:
            if len(self.score_range) != 2 or self.score_range[0] > self.score_range[1]:
                raise ConfigError(
                    f"score_range must be [low, high] with low <= high, got {self.score_range}"
                )


#: the judge settings of an LLM judge's sampling (one spelling: ``JudgeConfig``)
_SAMPLING = tuple(f.name for f in dataclasses.fields(JudgeConfig))


@dataclass(kw_only=True)
class JudgeSpec(JudgeConfig):
    """An external judge for ``external_reward_dpo`` stages (and ``srlm judge``).

    * ``kind: llm``: a causal LM at ``path`` prompted as a judge with ``reward_config``
      (default: the run's ``reward_config``, else the paper's template), sampled as the
      :class:`~self_rewarding_lm_pytorch.judge.JudgeConfig` fields say (given flat:
      ``num_samples: 5``).
    * ``kind: reward_model``: ``AutoModelForSequenceClassification`` at ``path``; the text
      is ``template`` rendered with the prompt and response; ``head`` scalar or classes.
    * ``kind: python``: ``function: "package.module:name"``, a callable
      ``(prompt, response) -> float | None``, an object with a ``score`` method, or a
      class of such objects (instantiated without arguments).
      This imports and runs the code you name: only name code you trust.
    """

    kind: Literal["llm", "reward_model", "python"] = field(
        metadata=_help("'llm' (a judge prompt), 'reward_model' or 'python' (a function)")
    )
    path: str | None = field(default=None, metadata=_help("local model folder"))
    tokenizer: str | None = field(default=None, metadata=_help("tokenizer folder (default: path)"))
    dtype: DType = field(default="float32", metadata=_help("parameter dtype"))
    reward_config: RewardConfigSpec | None = field(
        default=None, metadata=_help("judge prompt and score parser (llm)")
    )
    template: str = field(
        default="{{ prompt }}\n{{ response }}",
        metadata=_help("Jinja2 input text of a reward model"),
    )
    head: Literal["scalar", "classes"] = field(
        default="scalar", metadata=_help("reward model output: one score or score classes")
    )
    class_values: list[float] | None = field(
        default=None, metadata=_help("the score of each class (head: classes)")
    )
    function: str | None = field(
        default=None, metadata=_help("'package.module:name' of a judge callable (python)")
    )
    generation: BackendConfig | None = field(
        default=None,
        metadata=_help("the backend the llm judge samples with (vllm: path; openai: a server)"),
    )

    _LLM = ("reward_config", "generation", *_SAMPLING)
    _RM = ("template", "head", "class_values")

    def __post_init__(self) -> None:
        self.validate()

    def validate(self, where: str = "") -> None:
        """Raise :class:`ConfigError` naming the key, the problem and the fix."""
        defaults = {f.name: f.default for f in dataclasses.fields(self) if f.init}
        used = {k for k, d in defaults.items() if getattr(self, k) != d and k != "kind"}
        allowed = {
            "llm": {"path", "tokenizer", "dtype", "batch_size", *self._LLM},
            "reward_model": {"path", "tokenizer", "dtype", "batch_size", *self._RM},
            "python": {"function"},
        }[self.kind]
        wrong = sorted(used - allowed)
        if wrong:
            raise ConfigError(
                f"{wrong[0]!r} does not apply to a judge of kind {self.kind!r} "
                f"(it takes: {', '.join(sorted(allowed))})"
            )
        remote = self.generation is not None and self.generation.backend == "openai"
        if remote and self.path is None and self.tokenizer is None:
            assert self.generation is not None and self.generation.openai is not None
            if self.generation.openai.api == "completions":
                raise ConfigError(
                    "an llm judge served by generation.backend 'openai' with api 'completions' "
                    "sends token ids: give tokenizer: <tokenizer folder> (or path:), or use "
                    "generation.openai.api: chat (the server's own tokenizer)"
                )
        elif self.kind in ("llm", "reward_model") and self.path is None and not remote:
            raise ConfigError(f"a judge of kind {self.kind!r} needs path: <local model folder>")
        if self.kind == "python" and (self.function is None or ":" not in self.function):
            raise ConfigError(
                "a judge of kind 'python' needs function: 'package.module:name' (an importable "
                "callable (prompt, response) -> float | None)"
            )
        JudgeConfig.validate(self, where=where or f"{self.kind} judge")

    def judge_config(self) -> JudgeConfig:
        """The sampling settings alone (``LLMJudge`` keyword arguments)."""
        return JudgeConfig(**{k: getattr(self, k) for k in _SAMPLING})


@dataclass
class AccelerateConfig:
    """Arguments of ``accelerate.Accelerator``. ``log_with``: tracker names accelerate
    knows (``tensorboard``, ``wandb``, ... each needs its package) or ``jsonl`` (built in:
    ``<project_dir>/<project_name>/metrics.jsonl``). ``project_dir`` defaults to
    ``<out>/logs``."""

    mixed_precision: Literal["no", "fp16", "bf16"] = field(
        default="no", metadata=_help("mixed precision: 'no', 'fp16' (CUDA) or 'bf16'")
    )
    log_with: list[str] | str | None = field(
        default=None, metadata=_help("trackers: 'jsonl' (built in), 'tensorboard', 'wandb', ...")
    )
    project_dir: str | None = field(
        default=None, metadata=_help("tracker folder (default: <out>/logs)")
    )
    project_name: str = field(
        default="self-rewarding-lm", metadata=_help("run name given to the trackers")
    )
    cpu: bool = field(default=False, metadata=_help("run on the CPU even with a GPU"))
    shard_parameters: bool = field(
        default=False,
        metadata=_help("shard weights, gradients, optimizer state over processes (FSDP2)"),
    )

    @property
    def trackers(self) -> list[str]:
        if self.log_with is None:
            return []
        return [self.log_with] if isinstance(self.log_with, str) else list(self.log_with)


@dataclass
class RunConfig:
    """A whole ``srlm run``: model, tokenizer, named data, ordered stages, judges."""

    model: ModelConfig = field(metadata=_help("the policy model"))
    stages: list[dict[str, Any]] = field(
        metadata=_help("the stages, in order, each a mapping with a 'kind'")
    )
    tokenizer: TokenizerConfig = field(
        default_factory=TokenizerConfig, metadata=_help("the policy's tokenizer")
    )
    data: dict[str, DataSource] = field(
        default_factory=dict, metadata=_help("named data files the stages use")
    )
    judges: dict[str, JudgeSpec] = field(
        default_factory=dict, metadata=_help("named external judges")
    )
    reward_config: RewardConfigSpec | None = field(
        default=None, metadata=_help("the self-judging prompt (default: the paper's)")
    )
    accelerate: AccelerateConfig = field(
        default_factory=AccelerateConfig, metadata=_help("accelerate.Accelerator settings")
    )
    out: str = field(default="runs/srlm", metadata=_help("the run folder"))
    seed: int = field(default=0, metadata=_help("seed of everything random"))
    preference_max_seq_len: int = field(
        default=1024, metadata=_help("tokens of a preference pair at most (prompt + response)")
    )
    progress: bool = field(default=True, metadata=_help("show progress bars"))
    generation: BackendConfig = field(
        default_factory=BackendConfig,
        metadata=_help("the backend that samples the policy (stages may override it)"),
    )

    #: the validated stage dataclasses (built by :func:`~.load.build_stages`)
    stage_objects: list[Any] = field(
        default_factory=list,
        init=False,
        repr=False,
        metadata=_help("the stages as pipeline dataclasses (derived from stages)"),
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the key, the problem and the fix."""
        if not self.stages:
            raise ConfigError("stages is empty; list at least one stage (e.g. - {kind: sft})")
        if self.preference_max_seq_len < 2:
            raise ConfigError(
                f"preference_max_seq_len must be >= 2, got {self.preference_max_seq_len}"
            )
