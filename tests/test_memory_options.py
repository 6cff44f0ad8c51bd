"""The trainers' memory options: ``gradient_checkpointing`` (same updates, fewer saved
tensors, generation untouched) on a tiny Hugging Face Llama, a LoRA-wrapped one and a tiny
x-transformers model, and ``optimizer: adamw8bit`` (bitsandbytes' 8-bit AdamW) against
torch's AdamW."""

from __future__ import annotations

import copy
import sys

import pytest
import torch
from torch import nn
from x_transformers import Decoder, TransformerWrapper

from self_rewarding_lm_pytorch.config import ConfigError
from self_rewarding_lm_pytorch.data import PreferenceExample, SFTExample
from self_rewarding_lm_pytorch.generation import generate
from self_rewarding_lm_pytorch.models import wrap_model
from self_rewarding_lm_pytorch.trainers import DPOTrainer, SFTTrainer
from self_rewarding_lm_pytorch.trainers.config import SFTConfig, build_config
from self_rewarding_lm_pytorch.trainers.runtime import enable_gradient_checkpointing

VOCAB = 64
CPU = dict(cpu=True)
# Adam with a huge eps and learning rate: the first update is lr * g / (|g| + eps) ~= g,
# linear in the gradient, so parameter differences after one step are gradient differences
LINEAR_ADAM = dict(start_learning_rate=1e3, end_learning_rate=1e3, adam_kwargs=dict(eps=1e3))


def make_llama() -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )  # fmt: skip
    return LlamaForCausalLM(cfg)


def make_lora() -> nn.Module:
    import peft

    lora = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    return peft.get_peft_model(make_llama(), lora)


def make_xt() -> nn.Module:
    torch.manual_seed(0)
    return TransformerWrapper(
        num_tokens=VOCAB, max_seq_len=64, attn_layers=Decoder(dim=32, depth=2, heads=2)
    )


MODELS = {"hf": make_llama, "lora": make_lora, "xtransformers": make_xt}


def sft_data() -> list[SFTExample]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (4, 12), generator=g).tolist()
    return [SFTExample(row[: 8 + i], prompt_len=3) for i, row in enumerate(ids)]


def pref_data() -> list[PreferenceExample]:
    g = torch.Generator().manual_seed(2)
    r = lambda n: torch.randint(0, VOCAB, (n,), generator=g).tolist()  # noqa: E731
    return [PreferenceExample(r(3), r(4 + i), r(6 - i)) for i in range(4)]


def one_step(make, trainer: str, checkpointing: bool, **kw) -> dict[str, torch.Tensor]:
    model = make()
    cls, data = (SFTTrainer, sft_data()) if trainer == "sft" else (DPOTrainer, pref_data())
    t = cls(
        model, train_dataset=data, batch_size=2, grad_accum_steps=2, num_train_steps=1,
        gradient_checkpointing=checkpointing, accelerate_kwargs=CPU, progress=False,
        seed=0, max_grad_norm=None, **LINEAR_ADAM, **kw,
    )  # fmt: skip
    t.train()
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


@pytest.mark.parametrize("trainer", ["sft", "dpo"])
@pytest.mark.parametrize("kind", list(MODELS))
def test_checkpointing_gives_the_same_update(kind, trainer):
    """One SFT / DPO step (two micro-batches) with and without gradient checkpointing:
    the same parameters within 1e-6 (the update is linear in the gradient here)."""
    before = {k: v.detach().clone() for k, v in MODELS[kind]().named_parameters()}
    plain = one_step(MODELS[kind], trainer, False)
    ckpt = one_step(MODELS[kind], trainer, True)
    assert plain.keys() == ckpt.keys() and plain
    moved = max(float((plain[k] - before[k]).abs().max()) for k in plain)
    assert moved > 1e-2  # the step changed the weights
    for k in plain:
        torch.testing.assert_close(ckpt[k], plain[k], atol=1e-6, rtol=0, msg=k)


def _forward_backward(lm: nn.Module, ids: torch.Tensor) -> tuple[int, int]:
    """``(tensors autograd saved for backward, nn.Linear calls)`` of one forward and
    backward: a recomputed layer runs its linear layers again during the backward."""
    saved = calls = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal saved
        saved += 1
        return t

    def count(*_: object) -> None:
        nonlocal calls
        calls += 1

    hooks = [m.register_forward_hook(count) for m in lm.modules() if isinstance(m, nn.Linear)]
    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            logits = lm(ids)
        logits.float().sum().backward()
    finally:
        for h in hooks:
            h.remove()
    return saved, calls


@pytest.mark.parametrize("kind", list(MODELS))
def test_checkpointing_recomputes_in_training_only_and_leaves_generation_alone(kind):
    """Training mode with checkpointing: under half the saved tensors (the layers keep
    only their inputs) and the layers' linear layers run again in the backward. Eval
    mode: no recomputation, and greedy generation (KV cache) gives the same tokens."""
    ids = torch.randint(0, VOCAB, (2, 10), generator=torch.Generator().manual_seed(0))
    plain, ckpt = wrap_model(MODELS[kind]()), wrap_model(MODELS[kind]())
    enable_gradient_checkpointing(ckpt.module)
    enable_gradient_checkpointing(ckpt.module)  # twice: still one checkpoint per layer
    runs = {}
    for mode in ("train", "eval"):
        for name, lm in (("plain", plain), ("ckpt", ckpt)):
            lm.train(mode == "train")
            runs[mode, name] = _forward_backward(lm, ids)
    (saved, calls), (saved_ckpt, calls_ckpt) = runs["train", "plain"], runs["train", "ckpt"]
    assert saved_ckpt < saved / 2, runs
    # recomputed in the backward: linear layers of the decoder layers, never the output head
    # (transformers stops a recomputation once the tensors the backward needs are back)
    assert calls < calls_ckpt <= 2 * calls - 1, runs
    assert runs["eval", "ckpt"][1] == runs["eval", "plain"][1] == calls, runs
    prompts = [[1, 2, 3], [4, 5]]
    outs = [generate(m.eval(), prompts, max_new_tokens=6, temperature=0.0) for m in (plain, ckpt)]
    assert outs[0].sequences == outs[1].sequences
    assert all(len(s) == 6 for s in outs[0].sequences)


def test_checkpointed_xtransformers_copy_recomputes_its_own_layers():
    """A deep copy (DPO's on-the-fly reference) checkpoints its own layers, not the
    original's: after changing the original, the copy's output is unchanged."""
    model = make_xt().train()
    enable_gradient_checkpointing(model)
    ids = torch.randint(0, VOCAB, (1, 8), generator=torch.Generator().manual_seed(0))
    ref = copy.deepcopy(model)
    expected = ref(ids).detach()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    out = ref(ids)
    out.sum().backward()
    torch.testing.assert_close(out.detach(), expected, atol=0, rtol=0)
    assert all(p.grad is None for p in model.parameters())
    assert any(p.grad is not None for p in ref.parameters())


class NoLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.emb, self.out = nn.Embedding(VOCAB, 8), nn.Linear(8, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.out(self.emb(ids))


def test_checkpointing_refuses_a_model_without_layers():
    with pytest.raises(ValueError, match=r"gradient_checkpointing.*plain model NoLayers.*false"):
        SFTTrainer(
            NoLayers(), train_dataset=sft_data(), gradient_checkpointing=True,
            accelerate_kwargs=CPU, progress=False,
        )  # fmt: skip


def test_memory_options_are_config_keys():
    cfg = build_config(SFTTrainer, {"gradient_checkpointing": True, "optimizer": "adamw8bit"}, "x")
    assert isinstance(cfg, SFTConfig) and cfg.gradient_checkpointing
    assert cfg.optimizer == "adamw8bit"
    assert SFTConfig().optimizer == "adamw" and not SFTConfig().gradient_checkpointing
    with pytest.raises(ConfigError, match=r"optimizer.*'adamw' \| 'adamw8bit'.*did you mean"):
        build_config(SFTTrainer, {"optimizer": "adamw_8bit"}, "stages[0].trainer")
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        build_config(DPOTrainer, {"gradient_checkpointing": "sometimes"}, "trainer")


def test_adam_kwargs_the_optimizer_rejects_name_the_key():
    with pytest.raises(TypeError, match=r"adam_kwargs: torch\.optim\.adamw\.AdamW rejected"):
        SFTTrainer(
            make_xt(), train_dataset=sft_data(), adam_kwargs={"momentum": 0.9},
            accelerate_kwargs=CPU, progress=False,
        )  # fmt: skip


def test_adamw8bit_without_bitsandbytes_names_the_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import fails as if not installed
    with pytest.raises(ImportError, match=r"adamw8bit.*pip install.*\[bnb\].*optimizer: adamw"):
        SFTTrainer(
            make_xt(), train_dataset=sft_data(), optimizer="adamw8bit", accelerate_kwargs=CPU,
            progress=False,
        )  # fmt: skip


def test_adamw8bit_follows_torch_adamw_with_8bit_state():
    """Three SFT steps with bitsandbytes' AdamW8bit move the weights as torch's AdamW does
    (mean deviation under 5 % of the update); the moments of matrices of >= 4096 elements
    are stored in 8 bits (bitsandbytes keeps smaller tensors in 32 bits)."""
    import bitsandbytes as bnb  # in the test extra: this test always runs in CI

    def train(optimizer: str) -> tuple[dict[str, torch.Tensor], SFTTrainer]:
        model = make_xt()
        t = SFTTrainer(
            model, train_dataset=sft_data(), batch_size=2, num_train_steps=3,
            start_learning_rate=1e-2, end_learning_rate=1e-2, optimizer=optimizer,
            accelerate_kwargs=CPU, progress=False, seed=0,
        )  # fmt: skip
        t.train()
        return {k: v.detach().clone() for k, v in model.named_parameters()}, t

    start = {k: v.detach().clone() for k, v in make_xt().named_parameters()}
    ref, _ = train("adamw")
    got, trainer = train("adamw8bit")
    assert isinstance(trainer._raw_optimizer, bnb.optim.AdamW8bit)
    big = [k for k, v in start.items() if v.numel() >= 4096]
    assert big
    for k in big:
        update = (ref[k] - start[k]).abs().mean()
        assert update > 1e-3
        assert (got[k] - ref[k]).abs().mean() < 0.05 * update, k
    params = dict(trainer.lm.module.named_parameters())
    states = [trainer._raw_optimizer.state[params[k]] for k in big]
    assert all(
        s["state1"].dtype == torch.uint8 and s["state2"].dtype == torch.uint8 for s in states
    )
    assert all(s["state1"].shape == params[k].shape for s, k in zip(states, big))
