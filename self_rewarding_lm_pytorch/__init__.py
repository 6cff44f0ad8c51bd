"""Self-Rewarding Language Models (Yuan et al., 2024) with SPIN and DPO, in PyTorch."""

from .models import CallableTokenizer, CausalLM, HFTokenizer, unwrap_model, wrap_model, wrap_tokenizer

__all__ = [
    "CallableTokenizer",
    "CausalLM",
    "HFTokenizer",
    "unwrap_model",
    "wrap_model",
    "wrap_tokenizer",
]
