"""Sampling: the backend protocol and its backends (the torch KV-cache engine, vLLM).

Everything that samples (candidates, the LLM judge, prompt generation, SPIN, the CLI)
talks to a :class:`GenerationBackend`; :class:`TorchBackend` wraps the engine of
:mod:`.engine`, which also stays callable directly through :func:`generate`.  Modules:
:mod:`.config` (settings, output, the context rule), :mod:`.sampling` (filters, one
sampling step, the reference decoder), :mod:`.kv_cache` (the cache paths), :mod:`.engine`
(planning and the batch loop), :mod:`.backend` (the protocol and :class:`TorchBackend`),
:mod:`.vllm` (:class:`VLLMBackend`; vLLM itself is imported only when one is built),
:mod:`.openai` (:class:`OpenAIBackend`, an OpenAI-compatible server over HTTP; its client
in :mod:`.http`),
:mod:`.selection` (:class:`BackendConfig`, :func:`build_backend`: choosing one).
"""

from .backend import GenerationBackend, TorchBackend, as_backend
from .config import GenerationConfig, GenerationOutput, response_budget
from .engine import generate, generate_text
from .kv_cache import COMPACT_FRACTION, MIN_SHARED_PREFIX
from .openai import OpenAIBackend, OpenAIConfig
from .sampling import filter_logits, reference_generate, sample_next
from .selection import BackendConfig, build_backend
from .vllm import VLLMBackend, VLLMConfig

__all__ = [
    "COMPACT_FRACTION",
    "MIN_SHARED_PREFIX",
    "BackendConfig",
    "GenerationBackend",
    "GenerationConfig",
    "GenerationOutput",
    "OpenAIBackend",
    "OpenAIConfig",
    "TorchBackend",
    "VLLMBackend",
    "VLLMConfig",
    "as_backend",
    "build_backend",
    "filter_logits",
    "generate",
    "generate_text",
    "reference_generate",
    "response_budget",
    "sample_next",
]
