"""The Hugging Face path: local models and tokenizers, LoRA adapters, export.

* :func:`load_tokenizer` loads ``AutoTokenizer`` from a local folder, optionally replaces
  its chat template, and gives tokenizers without a pad token the EOS token as pad
  (padding is always described by masks in this library, so this never hides an EOS).
* :func:`load_model` loads ``AutoModelForCausalLM`` (or a saved LoRA adapter on top of
  its base model) from a local folder; nothing is ever downloaded
  (``local_files_only=True``) and weights load through safetensors only.
* :func:`apply_lora` wraps a model with a peft ``LoraConfig``: only the adapter weights
  train; the base weights are frozen.
* :func:`export_model` writes a model that ``AutoModelForCausalLM.from_pretrained``
  loads (``merged``: the adapter folded into the weights with ``merge_and_unload``) or
  the adapter alone (``adapter``: ``adapter_model.safetensors`` + ``adapter_config.json``,
  loaded with :func:`load_model`), plus the tokenizer.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import LoRAConfig
from .models import is_peft_model

__all__ = [
    "TINY_CHAT_TEMPLATE",
    "apply_lora",
    "build_tiny_model",
    "ensure_pad_token",
    "export_model",
    "is_peft_model",
    "load_model",
    "load_reward_model",
    "load_tokenizer",
    "torch_dtype",
]

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype | str:
    """``"float32" | "bfloat16" | "float16"`` as a torch dtype; ``"auto"`` stays ``"auto"``
    (the dtype stored in the checkpoint's config)."""
    if name == "auto":
        return "auto"
    if name not in _DTYPES:
        raise ValueError(f"dtype must be one of auto, {', '.join(_DTYPES)}; got {name!r}")
    return _DTYPES[name]


def _local_dir(path: str | Path, what: str) -> Path:
    p = Path(path)
    if not p.is_dir():
        raise FileNotFoundError(
            f"{what} {p} is not a folder; give a local folder written by save_pretrained "
            "(models are never downloaded)"
        )
    return p


# ====================================================================== tokenizers


def ensure_pad_token(tokenizer: Any, model: nn.Module | None = None) -> Any:
    """Give ``tokenizer`` (and ``model``'s generation config) a pad token: EOS when it
    has none. Returns ``tokenizer``. Raises ValueError when it has neither."""
    if getattr(tokenizer, "pad_token_id", None) is None:
        if getattr(tokenizer, "eos_token", None) is None:
            raise ValueError(
                "the tokenizer has neither a pad token nor an EOS token; set one, e.g. "
                "tokenizer.add_special_tokens({'eos_token': '</s>'}) and save it again"
            )
        tokenizer.pad_token = tokenizer.eos_token
    if model is not None:
        gen = getattr(model, "generation_config", None)
        if gen is not None and getattr(gen, "pad_token_id", None) is None:
            gen.pad_token_id = tokenizer.pad_token_id
    return tokenizer


def load_tokenizer(
    path: str | Path,
    *,
    chat_template: str | None = None,
    chat_template_file: str | Path | None = None,
) -> Any:
    """``AutoTokenizer`` from a local folder, right padding, pad = EOS when missing.

    ``chat_template`` (a Jinja string) or ``chat_template_file`` replaces the tokenizer's
    own template (prompts and judge prompts are formatted with it).
    """
    from transformers import AutoTokenizer

    if chat_template is not None and chat_template_file is not None:
        raise ValueError("give chat_template or chat_template_file, not both")
    tok = AutoTokenizer.from_pretrained(
        str(_local_dir(path, "tokenizer folder")), local_files_only=True
    )
    if chat_template_file is not None:
        from .io import read_text

        chat_template = read_text(chat_template_file)
    if chat_template is not None:
        tok.chat_template = chat_template
    tok.padding_side = "right"
    return ensure_pad_token(tok)


# ====================================================================== models


def _peft_config(lora: LoRAConfig | dict[str, Any]) -> Any:
    from peft import LoraConfig, TaskType

    if isinstance(lora, dict):
        from .config import from_dict

        lora = from_dict(LoRAConfig, lora, path="lora")
    if not isinstance(lora, LoRAConfig):
        raise TypeError(f"lora must be a LoRAConfig or a mapping, got {type(lora).__name__}")
    return LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=lora.target_modules,
        bias=lora.bias,
        modules_to_save=lora.modules_to_save,
        task_type=TaskType.CAUSAL_LM,
    )


def apply_lora(model: nn.Module, lora: LoRAConfig | dict[str, Any], **overrides: Any) -> nn.Module:
    """Wrap ``model`` with LoRA adapters (``peft.get_peft_model``); returns the PeftModel.

    Only adapter weights (and ``modules_to_save``) have ``requires_grad``. ``overrides``
    set further ``peft.LoraConfig`` fields (e.g. ``init_lora_weights=False``).
    """
    from peft import get_peft_model

    if is_peft_model(model):
        raise ValueError("the model already has LoRA adapters; apply_lora takes the base model")
    config = _peft_config(lora)
    for key, value in overrides.items():
        if not hasattr(config, key):
            raise TypeError(f"peft.LoraConfig has no field {key!r}")
        setattr(config, key, value)
    try:
        return get_peft_model(model, config)
    except ValueError as exc:
        raise ValueError(
            f"LoRA could not be applied ({exc}); check lora.target_modules against the "
            "model's module names (or use 'all-linear')"
        ) from exc


def load_model(
    path: str | Path,
    *,
    dtype: str = "float32",
    lora: LoRAConfig | dict[str, Any] | None = None,
    trainable_adapter: bool = True,
) -> nn.Module:
    """A causal LM from a local folder.

    A folder written by ``save_pretrained`` gives ``AutoModelForCausalLM``; a folder with
    ``adapter_config.json`` (an adapter export) gives its base model (``base_model_name_or_path``
    inside it) with the adapter loaded (``trainable_adapter`` keeps it trainable).
    ``lora`` adds new LoRA adapters (see :func:`apply_lora`).
    """
    from transformers import AutoModelForCausalLM

    folder = _local_dir(path, "model folder")
    adapter_cfg = folder / "adapter_config.json"
    if adapter_cfg.exists() and not (folder / "config.json").exists():
        from peft import PeftModel

        if not (folder / "adapter_model.safetensors").exists():
            raise FileNotFoundError(
                f"{folder} has no adapter_model.safetensors (pickled adapter files are never "
                "loaded); re-save the adapter with save_pretrained(safe_serialization=True)"
            )
        base_path = json.loads(adapter_cfg.read_text()).get("base_model_name_or_path")
        if not base_path or not Path(base_path).is_dir():
            raise FileNotFoundError(
                f"adapter {folder} names base model {base_path!r}, which is not a local folder; "
                "edit base_model_name_or_path in adapter_config.json"
            )
        base = AutoModelForCausalLM.from_pretrained(
            base_path, dtype=torch_dtype(dtype), local_files_only=True, use_safetensors=True
        )
        model = PeftModel.from_pretrained(base, str(folder), is_trainable=trainable_adapter)
        if lora is not None:
            raise ValueError(
                f"{folder} already holds an adapter; drop lora: or load the merged model"
            )
        return model
    model = AutoModelForCausalLM.from_pretrained(
        str(folder), dtype=torch_dtype(dtype), local_files_only=True, use_safetensors=True
    )
    if lora is not None:
        model = apply_lora(model, lora)
    return model


def load_reward_model(path: str | Path, *, dtype: str = "float32") -> nn.Module:
    """``AutoModelForSequenceClassification`` from a local folder (a reward model)."""
    from transformers import AutoModelForSequenceClassification

    return AutoModelForSequenceClassification.from_pretrained(
        str(_local_dir(path, "reward model folder")),
        dtype=torch_dtype(dtype),
        local_files_only=True,
        use_safetensors=True,
    )


# ====================================================================== export


def export_model(
    model: nn.Module,
    out_dir: str | Path,
    *,
    tokenizer: Any = None,
    mode: str = "merged",
    base_model_path: str | Path | None = None,
) -> Path:
    """Write ``model`` (and ``tokenizer``) to ``out_dir`` with safetensors.

    ``mode="merged"``: a plain Hugging Face model folder; a PeftModel's adapters are first
    folded into the base weights with ``merge_and_unload`` (this changes ``model`` in
    place: use the returned folder afterwards, not the object). ``mode="adapter"``: only
    the LoRA weights and ``adapter_config.json`` (its ``base_model_name_or_path`` is set
    to ``base_model_path`` when given, so :func:`load_model` finds the base).
    """
    from .models import unwrap_model

    if mode not in ("merged", "adapter"):
        raise ValueError(f"mode must be 'merged' or 'adapter', got {mode!r}")
    model = unwrap_model(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if mode == "adapter":
        if not is_peft_model(model):
            raise ValueError(
                "mode='adapter' exports LoRA adapters, but the model has none; use mode='merged'"
            )
        if base_model_path is not None:
            for cfg in model.peft_config.values():
                cfg.base_model_name_or_path = str(Path(base_model_path).resolve())
        model.save_pretrained(str(out))
    else:
        if is_peft_model(model):
            model = model.merge_and_unload()
        if not hasattr(model, "save_pretrained"):
            raise TypeError(
                f"{type(model).__name__} is not a Hugging Face model; save it with "
                "trainers.save_checkpoint instead"
            )
        model.save_pretrained(str(out))
    hf_tok = getattr(tokenizer, "tokenizer", tokenizer)  # an HFTokenizer adapter or the tokenizer
    if hf_tok is not None and hasattr(hf_tok, "save_pretrained"):
        hf_tok.save_pretrained(str(out))
    return out


# ====================================================================== tiny models

#: the chat template of :func:`build_tiny_model` (role markers are special tokens)
TINY_CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|> {{ m['content'] }} <|end|> {% endfor %}"
    "{% if add_generation_prompt %}<|assistant|> {% endif %}"
)

_TINY_WORDS = (
    "the a an and or but if then so of to in on at by for with from about as is are was "
    "were be been it this that these those i you he she we they me him her us them my your "
    "what which who why how when where tell write give explain list name describe story poem "
    "answer question score good bad best worst fine great small big fast slow cat dog bird "
    "fish tree sun moon sky sea rain snow red blue green one two three four five six seven "
    "eight nine ten 0 1 2 3 4 5 6 7 8 9 . , ? ! :"
).split()


def build_tiny_model(
    out_dir: str | Path,
    *,
    words: list[str] | None = None,
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    max_position_embeddings: int = 256,
    pad_token: bool = False,
    chat_template: str | None = TINY_CHAT_TEMPLATE,
    seed: int = 0,
) -> Path:
    """Write a tiny random Llama and a word-level tokenizer (trained locally with the
    ``tokenizers`` library, with a chat template) to ``out_dir``; returns ``out_dir``.

    For smoke tests and examples without downloads: ``AutoModelForCausalLM`` and
    ``AutoTokenizer`` load the folder. The tokenizer has ``<s>``/``</s>`` and, unless
    ``pad_token``, no pad token (as many causal LM tokenizers).
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab_words = list(words if words is not None else _TINY_WORDS)
    specials = ["<unk>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    if pad_token:
        specials.append("<pad>")
    tok = Tokenizer(models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    trainer = trainers.WordLevelTrainer(special_tokens=specials, min_frequency=1)
    tok.train_from_iterator([" ".join(vocab_words)], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>" if pad_token else None,
        additional_special_tokens=specials[3:7],
    )
    if chat_template is not None:
        fast.chat_template = chat_template
    out = Path(out_dir)
    fast.save_pretrained(str(out))
    config = LlamaConfig(
        vocab_size=len(fast),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=max_position_embeddings,
        bos_token_id=fast.bos_token_id,
        eos_token_id=fast.eos_token_id,
        pad_token_id=fast.pad_token_id,
        tie_word_embeddings=True,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    model.save_pretrained(str(out))
    return out
