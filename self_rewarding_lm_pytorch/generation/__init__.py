"""Sampling: the backend protocol and its backends (today: the torch KV-cache engine).

Everything that samples (candidates, the LLM judge, prompt generation, SPIN, the CLI)
talks to a :class:`GenerationBackend`; :class:`TorchBackend` wraps the engine of
:mod:`.engine`, which also stays callable directly through :func:`generate`.
"""

from .backend import GenerationBackend, TorchBackend, as_backend
from .engine import (
    COMPACT_FRACTION,
    MIN_SHARED_PREFIX,
    GenerationConfig,
    GenerationOutput,
    filter_logits,
    generate,
    generate_text,
    reference_generate,
    response_budget,
    sample_next,
)

__all__ = [
    "COMPACT_FRACTION",
    "MIN_SHARED_PREFIX",
    "GenerationBackend",
    "GenerationConfig",
    "GenerationOutput",
    "TorchBackend",
    "as_backend",
    "filter_logits",
    "generate",
    "generate_text",
    "reference_generate",
    "response_budget",
    "sample_next",
]
