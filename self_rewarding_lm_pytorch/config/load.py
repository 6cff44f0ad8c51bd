"""Read and check a ``srlm run`` YAML file: the strict safe YAML loader, the checks across
sections, relative paths, and the files and names a config points to.

``load_run_config(path)`` reads a YAML file into a :class:`~.run.RunConfig` with
:func:`~.core.from_dict` (an unknown key names the closest valid key, a wrong type names
the expected type), then checks what a type cannot say: each stage against the pipeline
stage dataclass of its ``kind`` and its ``trainer:`` mapping against the trainer's
signature, the names stages use (datasets, judges), the files the config points to, and
the trackers in ``accelerate.log_with``. Nothing is loaded (no model, no data) until the
whole file is known to be good. ``key=value`` overrides (:mod:`.overrides`) are applied
to the YAML mapping before any of this.

Relative paths in the file are relative to the folder of the file, so a config and its
data can move together. A minimal config::

    model: {path: ./tiny-llama}
    data:
      sft: {path: sft.jsonl}
      prompts: {path: prompts.csv, prompt_field: instruction}
    stages:
      - {kind: sft, trainer: {num_train_steps: 10}}
      - {kind: self_reward_dpo, num_preference_pairs: 8}
    out: runs/tiny
"""

from __future__ import annotations

import difflib
import importlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from .core import ConfigError, from_dict
from .run import AccelerateConfig, RunConfig

__all__ = [
    "BUILTIN_TRACKERS",
    "build_stages",
    "load_run_config",
    "load_yaml",
    "parse_run_config",
    "resolve_object",
]

#: trackers implemented here that need no extra package
BUILTIN_TRACKERS = ("jsonl",)


def build_stages(stages: list[dict[str, Any]]) -> list[Any]:
    """Each stage mapping as its pipeline dataclass (chosen by ``kind``), with its
    ``trainer:`` keyword arguments checked against the trainer's signature."""
    from ..pipeline import STAGE_TYPES, check_trainer_kwargs

    out = []
    for i, raw in enumerate(stages):
        where = f"stages[{i}]"
        if not isinstance(raw, dict):
            raise ConfigError(f"{where}: expected a mapping with a 'kind' key, got {raw!r}")
        kind = raw.get("kind")
        if kind not in STAGE_TYPES:
            close = difflib.get_close_matches(str(kind), list(STAGE_TYPES), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"{where}.kind: {kind!r} is not a stage kind{hint} "
                f"(valid kinds: {', '.join(STAGE_TYPES)})"
            )
        stage = from_dict(STAGE_TYPES[kind], raw, path=where)
        try:
            check_trainer_kwargs(stage)
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from exc
        out.append(stage)
    return out


def resolve_object(spec: str) -> Any:
    """Import ``"package.module:attr.path"`` and return the attribute (trusted code only)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ValueError(f"expected 'package.module:name', got {spec!r}")
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as exc:
        raise ValueError(
            f"cannot import module {module_name!r} named in {spec!r} ({exc}); make it "
            "importable (install it, or add its folder to PYTHONPATH)"
        ) from exc
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"module {module_name!r} has no attribute {attr!r} (from {spec!r})")
        obj = getattr(obj, part)
    return obj


def _resolve(base: Path, value: str | None) -> str | None:
    if value is None:
        return None
    p = Path(value).expanduser()
    return os.path.normpath(p if p.is_absolute() else (base / p))


def _check_exists(path: str | None, what: str, *, hf_model: bool = False) -> None:
    if path is None:
        return
    p = Path(path)
    if not p.exists():
        raise ConfigError(
            f"{what}: {path} does not exist; fix the path (relative paths are relative to the config file)"
        )
    if hf_model:
        if not p.is_dir():
            raise ConfigError(
                f"{what}: {path} is not a folder; give a local Hugging Face model folder"
            )
        if not ((p / "config.json").exists() or (p / "adapter_config.json").exists()):
            raise ConfigError(
                f"{what}: {path} has no config.json (nor adapter_config.json); give a folder "
                "written by save_pretrained (models are never downloaded)"
            )


def _check_trackers(acc: AccelerateConfig, *, installed: bool) -> None:
    from accelerate.tracking import LOGGER_TYPE_TO_CLASS, get_available_trackers

    available = {str(t) for t in get_available_trackers()}
    known = set(LOGGER_TYPE_TO_CLASS) | set(BUILTIN_TRACKERS)
    for name in acc.trackers:
        if name in BUILTIN_TRACKERS:
            continue
        if name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f"; did you mean {close[0]!r}?" if close else ""
            raise ConfigError(
                f"accelerate.log_with: unknown tracker {name!r}{hint} (known: {', '.join(sorted(known))})"
            )
        if installed and name not in available:
            raise ConfigError(
                f"accelerate.log_with: tracker {name!r} needs its Python package, which is not "
                f"installed (pip install {name}); or use the built-in 'jsonl' tracker"
            )


def _check_names(cfg: RunConfig) -> None:
    """The names and order of the stages (:func:`~..pipeline.stages.check_plan`, in the
    words of a YAML file), after the rules only a ``srlm run`` file has."""
    from ..pipeline.plan import YAML_PLAN, check_plan
    from ..pipeline.stages import PromptGenerationStage

    for i, stage in enumerate(cfg.stage_objects):
        # YAML-only: a srlm run file has one model (model:) and no models: section, so the
        # only prompt generator it can name is the policy itself
        if isinstance(stage, PromptGenerationStage) and stage.generator_model != "self":
            raise ConfigError(
                f"stages[{i}].generator_model: srlm run supports only 'self' (the policy) "
                f"as the prompt generator, got {stage.generator_model!r}; remove the key "
                "(another generator model needs the Python API's models=)"
            )
    check_plan(
        cfg.stage_objects,
        datasets=set(cfg.data),
        judges=set(cfg.judges),
        models=set(),
        vocabulary=YAML_PLAN,
    )


def _resolve_paths(cfg: RunConfig, base: Path) -> None:
    m = cfg.model
    m.path = _resolve(base, m.path)
    m.checkpoint = _resolve(base, m.checkpoint)
    t = cfg.tokenizer
    t.path = _resolve(base, t.path)
    t.chat_template_file = _resolve(base, t.chat_template_file)
    for src in cfg.data.values():
        src.path = _resolve(base, src.path)
    for spec in cfg.judges.values():
        spec.path = _resolve(base, spec.path)
        spec.tokenizer = _resolve(base, spec.tokenizer)
        if spec.reward_config is not None:
            rc = spec.reward_config
            rc.prompt_template_file = _resolve(base, rc.prompt_template_file)
    if cfg.reward_config is not None:
        cfg.reward_config.prompt_template_file = _resolve(
            base, cfg.reward_config.prompt_template_file
        )
    cfg.out = _resolve(base, cfg.out) or cfg.out
    cfg.accelerate.project_dir = _resolve(base, cfg.accelerate.project_dir)


def _check_files(cfg: RunConfig) -> None:
    _check_exists(cfg.model.path, "model.path", hf_model=True)
    _check_exists(cfg.model.checkpoint, "model.checkpoint")
    if cfg.tokenizer.kind == "hf":
        if cfg.tokenizer.path is None and cfg.model.path is None:
            raise ConfigError(
                "tokenizer.path is needed for an x-transformers model (or use tokenizer.kind: bytes)"
            )
        _check_exists(cfg.tokenizer.path, "tokenizer.path")
    elif cfg.model.xtransformers is not None and int(cfg.model.xtransformers["num_tokens"]) < 256:
        raise ConfigError(
            "tokenizer.kind 'bytes' needs model.xtransformers.num_tokens >= 256 (one id per byte)"
        )
    _check_exists(cfg.tokenizer.chat_template_file, "tokenizer.chat_template_file")
    for name, src in cfg.data.items():
        _check_exists(src.path, f"data.{name}.path")
        if src.path is not None and src.format == "auto":
            from ..io import detect_format

            try:
                detect_format(src.path)
            except ValueError as exc:
                raise ConfigError(f"data.{name}.path: {exc}") from exc
    for name, spec in cfg.judges.items():
        _check_exists(spec.path, f"judges.{name}.path", hf_model=True)
        _check_exists(spec.tokenizer, f"judges.{name}.tokenizer")
        if spec.reward_config is not None:
            _check_exists(
                spec.reward_config.prompt_template_file,
                f"judges.{name}.reward_config.prompt_template_file",
            )
        if spec.kind == "python":
            assert spec.function is not None
            try:
                obj = resolve_object(spec.function)
            except ValueError as exc:
                raise ConfigError(f"judges.{name}.function: {exc}") from exc
            if not (callable(obj) or hasattr(obj, "score")):
                raise ConfigError(
                    f"judges.{name}.function: {spec.function!r} is neither callable nor a judge "
                    "with a score() method"
                )
    if cfg.reward_config is not None:
        _check_exists(cfg.reward_config.prompt_template_file, "reward_config.prompt_template_file")


def _check_reward_configs(cfg: RunConfig, *, read_files: bool) -> None:
    """Compile the judge templates now (a bad template fails before any work)."""
    from jinja2.sandbox import SecurityError

    from ..judge import RewardConfig

    specs = [("reward_config", cfg.reward_config)]
    specs += [(f"judges.{n}.reward_config", j.reward_config) for n, j in cfg.judges.items()]
    for where, spec in specs:
        if spec is None:
            continue
        try:
            template = spec.prompt_template
            if spec.prompt_template_file is not None:
                if not read_files:
                    continue
                from ..io import read_text

                template = read_text(spec.prompt_template_file)
            if template is not None:
                RewardConfig(
                    prompt_template=template,
                    reward_regex_template=spec.reward_regex_template or "Score: {{ reward }}",
                )
        except (TypeError, ValueError, SecurityError) as exc:
            raise ConfigError(f"{where}: {exc}") from exc


def _check_accelerate(acc: AccelerateConfig, *, environment: bool) -> None:
    if environment and acc.mixed_precision == "fp16":
        import torch

        if acc.cpu or not torch.cuda.is_available():
            raise ConfigError(
                "accelerate.mixed_precision: 'fp16' needs a CUDA GPU; use 'bf16' (supported "
                "on CPU) or 'no'"
            )
    _check_trackers(acc, installed=environment)


def parse_run_config(
    data: Any, *, base_dir: str | Path = ".", check_files: bool = True
) -> RunConfig:
    """Validate a config mapping (the parsed YAML) into a :class:`RunConfig`.

    Relative paths are resolved against ``base_dir``. Raises :class:`ConfigError` naming
    the key and the fix for anything wrong, before any model or data is loaded.
    ``check_files=False`` checks the schema and names only, not this machine: files,
    importable judge functions, installed tracker packages, a GPU for fp16.
    """
    if not isinstance(data, dict):
        raise ConfigError(
            f"the config must be a mapping of keys (model:, stages:, ...), got {type(data).__name__}"
        )
    cfg = from_dict(RunConfig, data)
    cfg.stage_objects = build_stages(cfg.stages)
    _check_names(cfg)
    _resolve_paths(cfg, Path(base_dir))
    if check_files:
        _check_files(cfg)
    _check_reward_configs(cfg, read_files=check_files)
    _check_accelerate(cfg.accelerate, environment=check_files)
    return cfg


def _strict_loader() -> type:
    import yaml

    class StrictSafeLoader(yaml.SafeLoader):
        """PyYAML's safe loader (no Python tags) that refuses a key given twice in a mapping."""

        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            if isinstance(node, yaml.MappingNode):
                seen: dict[Any, int] = {}
                for key_node, _ in node.value:
                    if key_node.tag == "tag:yaml.org,2002:merge":
                        continue  # `<<: *anchor` keys may be overridden by design
                    key = self.construct_object(key_node, deep=True)
                    line = key_node.start_mark.line + 1
                    try:
                        first = seen.get(key)
                        seen.setdefault(key, line)
                    except TypeError:  # an unhashable key: the base class reports it
                        continue
                    if first is not None:
                        raise ConfigError(
                            f"{key_node.start_mark.name}:{line}: the key {key!r} is given twice "
                            f"in the same mapping (first on line {first}); YAML would keep only "
                            "the last value: remove one of them"
                        )
            return super().construct_mapping(node, deep=deep)

    return StrictSafeLoader


def load_yaml(path: str | Path) -> Any:
    """Parse a YAML file with PyYAML's safe loader (Python tags are refused), refusing a
    key given twice in one mapping; errors are :class:`ConfigError` naming the file and line."""
    import yaml

    from ..io import read_text

    try:
        text = read_text(path)
    except ValueError as exc:  # not UTF-8
        raise ConfigError(str(exc)) from exc
    loader = _strict_loader()(text)
    loader.name = str(path)  # marks (line numbers in errors) name the file
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}") from exc
    finally:
        loader.dispose()


def load_run_config(
    path: str | Path, *, check_files: bool = True, overrides: Sequence[str] = ()
) -> RunConfig:
    """Read and validate a ``srlm run`` YAML file (see the module docstring), with the
    ``KEY=VALUE`` ``overrides`` applied to its mapping first."""
    from .overrides import apply_overrides

    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path} does not exist")
    data = load_yaml(path)
    if data is None:
        raise ConfigError(f"{path} is empty; see examples/*.yaml for a complete config")
    data = apply_overrides(data, overrides)
    return parse_run_config(data, base_dir=path.resolve().parent, check_files=check_files)
