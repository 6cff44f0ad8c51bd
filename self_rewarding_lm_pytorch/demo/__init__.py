"""The built-in miniature task of ``srlm demo``: the task and its oracle
(:mod:`.task`), the tokenizer, the tiny model, and the demo run (:mod:`.run`)."""

from . import task
from .model import DEMO_MAX_SEQ_LEN, DemoModelConfig, build_demo_model, count_parameters
from .tokenizer import DemoTokenizer

__all__ = [
    "DEMO_MAX_SEQ_LEN",
    "DemoModelConfig",
    "DemoTokenizer",
    "build_demo_model",
    "count_parameters",
    "task",
]
