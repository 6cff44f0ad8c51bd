"""SFT / DPO trainers: learning, exact accumulation, NaN guard, checkpoints, early stopping."""

from __future__ import annotations

import contextlib
import copy
import json
import math

import pytest
import torch
from torch import nn
from x_transformers import Decoder, TransformerWrapper

from self_rewarding_lm_pytorch.data import (
    PreferenceExample,
    SFTExample,
    collate_preference,
    collate_sft,
)
from self_rewarding_lm_pytorch.losses import nll_loss, sequence_logprobs
from self_rewarding_lm_pytorch.trainers import (
    DPOTrainer,
    SFTTrainer,
    load_checkpoint,
    save_checkpoint,
)
from self_rewarding_lm_pytorch.trainers.schedules import lr_multiplier

VOCAB = 32


CPU = dict(cpu=True)
# Adam with a huge eps and learning rate: the first update is lr * g / (|g| + eps) ~= g,
# i.e. linear in the gradient, so update differences expose gradient differences
LINEAR_ADAM = dict(start_learning_rate=1e3, end_learning_rate=1e3, adam_kwargs=dict(eps=1e3))


def tiny_lm(seed: int = 0, **kw) -> TransformerWrapper:
    torch.manual_seed(seed)
    return TransformerWrapper(
        num_tokens=VOCAB, max_seq_len=32, attn_layers=Decoder(dim=32, depth=1, heads=2), **kw
    )


def rand_ids(g: torch.Generator, n: int) -> list[int]:
    return torch.randint(0, VOCAB, (n,), generator=g).tolist()


def pref_data(n: int = 8, seed: int = 1) -> list[PreferenceExample]:
    g = torch.Generator().manual_seed(seed)
    return [PreferenceExample(rand_ids(g, 3), rand_ids(g, 4), rand_ids(g, 5)) for _ in range(n)]


def sft_data(n: int = 8, seed: int = 2) -> list[SFTExample]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        length = int(torch.randint(4, 13, (1,), generator=g))
        prompt_len = int(torch.randint(1, 4, (1,), generator=g))
        out.append(SFTExample(rand_ids(g, length), prompt_len))
    return out


@torch.no_grad()
def mean_margin(model: nn.Module, pairs: list[PreferenceExample]) -> float:
    batch = collate_preference(pairs)
    lp = sequence_logprobs(model(batch["input_ids"]), batch["input_ids"], batch["response_mask"])
    n = len(pairs)
    return float((lp[:n] - lp[n:]).mean())


def params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_lr_schedule_warmup_then_decay():
    kw = dict(start_lr=1.0, end_lr=0.1, warmup_steps=2, decay_steps=4)
    lin = [lr_multiplier(s, schedule="linear", **kw) for s in range(8)]
    cos = [lr_multiplier(s, schedule="cosine", **kw) for s in range(8)]
    assert lin[:2] == [0.5, 1.0] and cos[:2] == [0.5, 1.0]
    assert lin[2] == pytest.approx(1.0) and lin[4] == pytest.approx(0.55)
    assert lin[6] == pytest.approx(0.1) and lin[7] == pytest.approx(0.1)
    assert cos[4] == pytest.approx(0.55) and cos[3] > lin[3] and cos[6] == pytest.approx(0.1)


# ---------------------------------------------------------------------------- DPO


def test_dpo_raises_margin_and_precomputed_reference_equals_on_the_fly():
    pairs = pref_data()
    model = tiny_lm()
    start = copy.deepcopy(model)
    before = mean_margin(model, pairs)
    kw = dict(
        train_dataset=pairs,
        batch_size=4,
        start_learning_rate=1e-3,
        end_learning_rate=1e-4,
        accelerate_kwargs=CPU,
        seed=0,
        progress=False,
    )
    trainer = DPOTrainer(model, num_epochs=10, **kw)
    out = trainer.train()
    after = mean_margin(model, pairs)
    assert after > before + 2.0, (before, after)
    assert out["reward_accuracy"] == 1.0 and out["loss"] < math.log(2) - 0.1
    # precomputed: no second model copy; reference = the starting model's log-probs
    assert trainer.ref_lm is None
    batch = collate_preference(pairs)
    with torch.no_grad():
        lp0 = sequence_logprobs(
            start(batch["input_ids"]), batch["input_ids"], batch["response_mask"]
        )
    torch.testing.assert_close(trainer.ref_logps[:, 0], lp0[:8], atol=1e-5, rtol=0)
    torch.testing.assert_close(trainer.ref_logps[:, 1], lp0[8:], atol=1e-5, rtol=0)

    # same first steps with the reference run on the fly by a frozen copy
    a = DPOTrainer(copy.deepcopy(start), num_train_steps=3, **kw)
    b = DPOTrainer(copy.deepcopy(start), num_train_steps=3, precompute_ref_logps=False, **kw)
    a.train()
    b.train()
    assert b.ref_logps is None and b.ref_lm is not None
    la = [h["loss"] for h in a.history if "loss" in h]
    lb = [h["loss"] for h in b.history if "loss" in h]
    assert abs(la[0] - lb[0]) < 1e-6
    assert la[0] == pytest.approx(math.log(2), abs=1e-6)  # policy == reference at step 1
    assert la[1] != pytest.approx(math.log(2), abs=1e-4)  # ... but not afterwards
    assert la[1:] == pytest.approx(lb[1:], abs=1e-5)


def test_dpo_replay_loss_adds_its_gradient_to_the_update():
    pairs = pref_data(4)
    replay = sft_data(3)
    kw = dict(
        train_dataset=pairs,
        batch_size=4,
        num_train_steps=1,
        max_grad_norm=None,
        accelerate_kwargs=CPU,
        seed=0,
        progress=False,
        **LINEAR_ADAM,
    )
    base = tiny_lm()
    start = params(base)
    DPOTrainer(base, **kw).train()
    with_replay = tiny_lm()
    tr = DPOTrainer(
        with_replay, replay_dataset=replay, replay_weight=2.0, replay_batch_size=3, **kw
    )
    tr.train()
    assert "replay_nll" in tr.history[-1]
    # the replay term's own gradient, from the starting model
    ref = tiny_lm()
    batch = collate_sft(replay)
    loss = 2.0 * nll_loss(ref(batch["input_ids"]), batch["input_ids"], batch["response_mask"])
    loss.backward()
    grads = {n: p.grad for n, p in ref.named_parameters()}
    checked = 0
    for name, p in with_replay.named_parameters():
        diff = (p.detach() - start[name]) - (
            dict(base.named_parameters())[name].detach() - start[name]
        )
        g = grads[name]
        assert diff.abs().max() > 0 or g.abs().max() == 0
        # linear regime: the extra update is -lr * g / (|g| + eps) ~= -g
        torch.testing.assert_close(diff, -g, atol=2e-4, rtol=2e-2)
        checked += 1
    assert checked > 3


@pytest.mark.parametrize("kind", ["sft", "dpo"])
def test_grad_accumulation_equals_one_big_batch(kind):
    if kind == "sft":
        data, cls = sft_data(4, seed=5), SFTTrainer  # ragged response lengths
        assert len({len(e.response_ids) for e in data}) > 1
    else:
        data, cls = pref_data(4, seed=5), DPOTrainer
    kw = dict(
        train_dataset=data,
        num_train_steps=1,
        max_grad_norm=None,
        dropout=0.0,
        accelerate_kwargs=CPU,
        seed=0,
        progress=False,
        **LINEAR_ADAM,
    )
    if kind == "dpo":  # make step 1 non-trivial: reference != policy
        kw["ref_model"] = tiny_lm(seed=7)
    start = params(tiny_lm())
    big, acc = tiny_lm(), tiny_lm()
    cls(big, batch_size=4, grad_accum_steps=1, **kw).train()
    cls(acc, batch_size=2, grad_accum_steps=2, **kw).train()
    moved = max((big.state_dict()[k] - start[k]).abs().max().item() for k in start)
    assert moved > 1e-3  # the update is large enough for the tolerance to mean something
    for k, v in acc.state_dict().items():
        torch.testing.assert_close(v, big.state_dict()[k], atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------- SFT


class PositionalLM(nn.Module):
    """Logits depend on the position only: changing a token changes only its own target."""

    def __init__(self, max_len: int = 16, vocab: int = VOCAB) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.zeros(max_len, vocab))
        self.max_seq_len = max_len

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.table[: ids.shape[1]].unsqueeze(0).expand(ids.shape[0], -1, -1)


def test_sft_lowers_response_nll_and_ignores_prompt_targets():
    data = [SFTExample([1, 2, 3, 4, 5, 6], 3), SFTExample([7, 8, 9, 10, 11], 2)]
    model = PositionalLM()
    trainer = SFTTrainer(
        model,
        train_dataset=data,
        batch_size=2,
        num_epochs=30,
        start_learning_rate=0.1,
        end_learning_rate=0.01,
        accelerate_kwargs=CPU,
        seed=0,
        progress=False,
    )
    batch = collate_sft(data)
    loss_a, _ = trainer._compute_loss(batch)
    loss_a.backward()
    grad = model.table.grad.clone()
    model.table.grad = None
    # rows predicting prompt tokens (logits[t-1] for t < prompt_len) get no gradient
    assert grad[0:1].abs().max() == 0  # row 0 predicts token 1: prompt in both rows
    assert grad[2].abs().max() > 0  # row 2 predicts token 3: response of example 2
    # other prompt tokens, same responses: same loss
    changed = [SFTExample([30, 29, 28, 4, 5, 6], 3), SFTExample([27, 26, 9, 10, 11], 2)]
    loss_b, _ = trainer._compute_loss(collate_sft(changed))
    assert float(loss_b.detach()) == pytest.approx(float(loss_a.detach()), abs=1e-7)
    # while changing a response token does change it (the check can fail)
    other = [SFTExample([1, 2, 3, 4, 5, 31], 3), SFTExample([7, 8, 9, 10, 11], 2)]
    model.table.data.normal_(generator=torch.Generator().manual_seed(0))
    la, _ = trainer._compute_loss(batch)
    lo, _ = trainer._compute_loss(collate_sft(other))
    assert abs(float(la) - float(lo)) > 1e-3
    model.table.data.zero_()

    with torch.no_grad():
        nll_before = float(
            nll_loss(model(batch["input_ids"]), batch["input_ids"], batch["response_mask"])
        )
    out = trainer.train()
    with torch.no_grad():
        nll_after = float(
            nll_loss(model(batch["input_ids"]), batch["input_ids"], batch["response_mask"])
        )
    assert nll_before == pytest.approx(math.log(VOCAB), abs=1e-5)
    assert nll_after < 0.5 * nll_before
    assert out["loss"] < nll_before


# ---------------------------------------------------------------------------- safety


class ExplodingLM(nn.Module):
    """A tiny LM whose ``explode_at``-th training forward returns NaN logits."""

    def __init__(self, explode_at: int) -> None:
        super().__init__()
        self.inner = tiny_lm()
        self.max_seq_len = 32
        self.explode_at = explode_at
        self.calls = 0

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        logits = self.inner(ids)
        if self.training:
            self.calls += 1
            if self.calls == self.explode_at:
                return logits * float("nan")
        return logits


def test_nan_guard_names_step_and_keeps_last_checkpoint_loadable(tmp_path):
    model = ExplodingLM(explode_at=3)
    trainer = SFTTrainer(
        model,
        train_dataset=sft_data(4),
        batch_size=2,
        num_epochs=5,
        start_learning_rate=1e-3,
        end_learning_rate=1e-3,
        accelerate_kwargs=CPU,
        output_dir=tmp_path,
        checkpoint_every=1,
        seed=0,
        progress=False,
    )
    with pytest.raises(FloatingPointError, match=r"step 3 .*checkpoint-2"):
        trainer.train()
    assert trainer.step == 2
    assert (tmp_path / "checkpoint-2").is_dir()
    assert not (tmp_path / "checkpoint-3").exists() and not (tmp_path / "checkpoint").exists()
    # the in-memory model was not updated by the bad step and matches the checkpoint
    assert all(torch.isfinite(p).all() for p in model.parameters())
    fresh = ExplodingLM(explode_at=0)
    fresh.inner = tiny_lm(seed=123)
    load_checkpoint(fresh, tmp_path / "checkpoint-2")
    ids = torch.randint(0, VOCAB, (2, 9))
    model.eval()
    fresh.eval()
    torch.testing.assert_close(fresh(ids), model(ids), atol=0, rtol=0)
    state = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())
    assert state["step"] == 2
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["step"] for x in lines] == [1, 2]


class TiedLM(nn.Module):
    """Output head sharing the embedding matrix: two state-dict keys, one tensor."""

    def __init__(self, seed: int) -> None:
        super().__init__()
        torch.manual_seed(seed)
        self.emb = nn.Embedding(VOCAB, 16)
        self.mix = nn.Linear(16, 16)
        self.head = nn.Linear(16, VOCAB, bias=False)
        self.head.weight = self.emb.weight

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(torch.tanh(self.mix(self.emb(ids))))


def test_checkpoint_roundtrip_shared_tensors(tmp_path):
    model = TiedLM(seed=0)
    save_checkpoint(model, tmp_path / "ck")
    fresh = TiedLM(seed=1)
    ids = torch.randint(0, VOCAB, (2, 5))
    assert not torch.equal(fresh(ids), model(ids))
    load_checkpoint(fresh, tmp_path / "ck")
    assert fresh.head.weight is fresh.emb.weight  # still tied after loading
    torch.testing.assert_close(fresh(ids), model(ids), atol=0, rtol=0)


def test_checkpoint_roundtrip_safetensors_x_transformers(tmp_path):
    model = tiny_lm(seed=3, tie_embedding=True)
    save_checkpoint(model, tmp_path / "ck")
    assert (tmp_path / "ck" / "model.safetensors").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["ck"]  # no temp folders left behind
    fresh = tiny_lm(seed=4, tie_embedding=True)
    ids = torch.randint(0, VOCAB, (2, 7))
    model.eval()
    fresh.eval()
    assert not torch.equal(fresh(ids), model(ids))
    load_checkpoint(fresh, tmp_path / "ck")
    torch.testing.assert_close(fresh(ids), model(ids), atol=0, rtol=0)
    with pytest.raises(FileExistsError, match="overwrite"):
        save_checkpoint(model, tmp_path / "ck", overwrite=False)
    model.token_emb.emb.weight.data[0, 0] = float("nan")
    with pytest.raises(FloatingPointError, match="NaN"):
        save_checkpoint(model, tmp_path / "ck")
    load_checkpoint(fresh, tmp_path / "ck")  # the old checkpoint is intact


def test_checkpoint_roundtrip_hugging_face_model(tmp_path):
    transformers = pytest.importorskip("transformers")
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(cfg).eval()
    save_checkpoint(model, tmp_path / "hf")
    assert (tmp_path / "hf" / "config.json").is_file()
    torch.manual_seed(1)
    fresh = transformers.LlamaForCausalLM(cfg).eval()
    ids = torch.randint(0, VOCAB, (2, 6))
    load_checkpoint(fresh, tmp_path / "hf")
    torch.testing.assert_close(fresh(ids).logits, model(ids).logits, atol=0, rtol=0)


def test_early_stopping_stops_and_restores_best_state():
    scores = iter([3.0, 2.0, 1.0, 1.5, 1.6, 0.5, 0.4])
    seen: list[dict[str, torch.Tensor]] = []

    def evaluate(model: nn.Module) -> float:
        seen.append(params(model))
        return next(scores)

    model = tiny_lm()
    trainer = DPOTrainer(
        model,
        train_dataset=pref_data(4),
        batch_size=1,
        num_train_steps=20,
        start_learning_rate=1e-3,
        end_learning_rate=1e-3,
        early_stopper_eval_module=evaluate,
        check_early_stop_every=1,
        early_stop_patience=2,
        accelerate_kwargs=CPU,
        seed=0,
        progress=False,
    )
    out = trainer.train()
    # evaluations at steps 0..4; two evaluations without improvement after step 2
    assert len(seen) == 5 and trainer.step == 4 and trainer.early_stopped
    assert out["early_stop_best_step"] == 2 and out["restored_best"] == 1.0
    final = params(model)
    assert any(not torch.equal(seen[2][k], seen[4][k]) for k in final)
    for k, v in final.items():
        assert torch.equal(v, seen[2][k]), k


def test_peft_reference_current_adapter_or_disabled_adapter():
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    cfg = transformers.LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(cfg)
    lora = peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )  # a non-zero adapter, so "adapter off" differs from "adapter on"
    model = peft.get_peft_model(base, lora)
    pairs = pref_data(4)
    batch = collate_preference(pairs)

    def logps(disable: bool) -> torch.Tensor:
        model.eval()
        ctx = model.disable_adapter() if disable else contextlib.nullcontext()
        with torch.no_grad(), ctx:
            logits = model(input_ids=batch["input_ids"]).logits
        return sequence_logprobs(logits, batch["input_ids"], batch["response_mask"])

    with_adapter, without = logps(False), logps(True)
    assert not torch.allclose(with_adapter, without, atol=1e-3)
    kw = dict(
        train_dataset=pairs, batch_size=4, num_train_steps=1, accelerate_kwargs=CPU,
        seed=0, progress=False,
    )  # fmt: skip
    cur = DPOTrainer(model, **kw)
    cur._on_train_start()
    torch.testing.assert_close(cur.ref_logps.T.reshape(-1), with_adapter, atol=1e-5, rtol=0)
    off = DPOTrainer(model, ref_adapter="disabled", **kw)
    off._on_train_start()
    torch.testing.assert_close(off.ref_logps.T.reshape(-1), without, atol=1e-5, rtol=0)
    # on the fly with the adapter disabled: no copy, same first loss as precomputed
    fly = DPOTrainer(model, ref_adapter="disabled", precompute_ref_logps=False, **kw)
    start = params(model)
    off.train()
    model.load_state_dict(start)
    fly.train()
    assert fly.ref_lm is None
    assert off.history[0]["loss"] != pytest.approx(math.log(2), abs=1e-3)  # ref != policy
    assert fly.history[0]["loss"] == pytest.approx(off.history[0]["loss"], abs=1e-6)
    with pytest.raises(ValueError, match="peft model"):
        DPOTrainer(tiny_lm(), ref_adapter="disabled", **kw)


def _padding(batches: list[list[int]], lengths: list[int]) -> int:
    """Tokens the batches hold once padded to their longest row."""
    return sum(len(b) * max(lengths[i] for i in b) for b in batches)


def _random_batches_padding(lengths: list[int], size: int) -> int:
    """The padded tokens of plain shuffled batches (seed 1) of ``size`` rows."""
    order = torch.randperm(len(lengths), generator=torch.Generator().manual_seed(1)).tolist()
    return _padding([order[i : i + size] for i in range(0, len(order), size)], lengths)


def test_length_grouped_batches_cover_every_item_once_with_less_padding():
    from self_rewarding_lm_pytorch.trainers.schedules import length_grouped_batches

    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, 200, (1000,), generator=g).tolist()
    batches = length_grouped_batches(lengths, 16, generator=torch.Generator().manual_seed(1))
    flat = [i for b in batches for i in b]
    assert sorted(flat) == list(range(1000))
    assert all(len(b) <= 16 for b in batches) and len(batches) == 63
    grouped_pad = _padding(batches, lengths)
    plain_pad = _random_batches_padding(lengths, 16)
    assert grouped_pad < 0.7 * plain_pad
    # the batch order is shuffled: not sorted by length across the epoch
    firsts = [max(lengths[i] for i in b) for b in batches]
    assert firsts != sorted(firsts, reverse=True)


def test_length_bucketed_batches_keep_each_batch_in_one_bucket():
    from self_rewarding_lm_pytorch.trainers.schedules import length_bucketed_batches

    g = torch.Generator().manual_seed(0)
    # a mix like the demo's: many short rows and a few long ones
    lengths = torch.randint(10, 60, (900,), generator=g).tolist()
    lengths += torch.randint(61, 90, (100,), generator=g).tolist()
    bounds = (30, 60)

    def bucket(n: int) -> int:
        return 0 if n <= 30 else 1 if n <= 60 else 2

    batches = length_bucketed_batches(
        lengths, 16, bounds, generator=torch.Generator().manual_seed(1)
    )
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert all(len({bucket(lengths[i]) for i in b}) == 1 for b in batches)
    per_bucket = [sum(bucket(n) == k for n in lengths) for k in range(3)]
    assert len(batches) == sum(-(-n // 16) for n in per_bucket)  # one short batch a bucket
    assert sum(len(b) < 16 for b in batches) <= 3
    # the long rows no longer set the padded length of most batches
    pad = _padding(batches, lengths)
    plain_pad = _random_batches_padding(lengths, 16)
    assert pad < 0.85 * plain_pad
    # rows of different lengths inside a bucket stay mixed (not sorted as group_by_length)
    assert any(max(lengths[i] for i in b) - min(lengths[i] for i in b) > 20 for b in batches)
    # the batch order is shuffled (buckets interleaved) and seeded
    order = [bucket(lengths[b[0]]) for b in batches]
    assert order != sorted(order)
    again = length_bucketed_batches(lengths, 16, bounds, generator=torch.Generator().manual_seed(1))
    assert again == batches
    with pytest.raises(ValueError, match="strictly increasing"):
        length_bucketed_batches(lengths, 16, (60, 30))


def _sft_lengths_task():
    """A 1-layer model, 64 SFT rows of 4-12 tokens (tokens 1..9, pads 0) and the mean NLL
    of every row under the model: the setting of the length-batching tests."""
    from x_transformers import Decoder, TransformerWrapper

    from self_rewarding_lm_pytorch.data import SFTExample, collate_sft
    from self_rewarding_lm_pytorch.losses import nll_loss

    torch.manual_seed(0)
    model = TransformerWrapper(
        num_tokens=32, max_seq_len=64, attn_layers=Decoder(dim=32, depth=1, heads=2)
    )
    examples = [SFTExample([1, 2] + [3 + (i % 7)] * (2 + i % 9), 2) for i in range(64)]

    def loss() -> float:
        batch = collate_sft(examples)
        with torch.no_grad():
            return float(
                nll_loss(model(batch["input_ids"]), batch["input_ids"], batch["response_mask"])
            )

    return model, examples, loss


def test_sft_length_buckets_batch_within_buckets_and_learn():
    from self_rewarding_lm_pytorch.config import ConfigError
    from self_rewarding_lm_pytorch.trainers import SFTTrainer

    model, examples, loss = _sft_lengths_task()
    before = loss()
    trainer = SFTTrainer(
        model,
        train_dataset=examples,
        batch_size=8,
        num_epochs=3,
        length_buckets=(6, 8),
        start_learning_rate=3e-3,
        end_learning_rate=3e-3,
        seed=0,
        progress=False,
        accelerate_kwargs=dict(cpu=True),
    )
    seen = []
    for batch in trainer.sft_loader(trainer.train_examples, batch_size=8, shuffle=True):
        n = (batch["input_ids"] != 0).sum(-1)  # tokens are 1..9, pads 0
        seen.append({0 if k <= 6 else 1 if k <= 8 else 2 for k in n.tolist()})
    assert seen and all(len(s) == 1 for s in seen) and len(set().union(*seen)) == 3
    trainer.train()
    assert loss() < 0.5 * before
    with pytest.raises(ConfigError, match="length_buckets must be strictly increasing"):
        SFTTrainer(model, train_dataset=examples, length_buckets=(8, 8), progress=False)
    with pytest.raises(ConfigError, match="group_by_length and length_buckets"):
        SFTTrainer(
            model, train_dataset=examples, group_by_length=True, length_buckets=(8,), progress=False
        )


def test_sft_with_group_by_length_learns():
    from self_rewarding_lm_pytorch.trainers import SFTTrainer

    model, examples, loss = _sft_lengths_task()
    before = loss()
    SFTTrainer(
        model,
        train_dataset=examples,
        batch_size=8,
        num_epochs=3,
        group_by_length=True,
        start_learning_rate=3e-3,
        end_learning_rate=3e-3,
        seed=0,
        progress=False,
        accelerate_kwargs=dict(cpu=True),
    ).train()
    assert loss() < 0.5 * before


# --------------------------------------------------------------------------- release
def _live_optimizers() -> list[torch.optim.Optimizer]:
    """Live torch optimizers, not counting accelerate's wrappers around them."""
    import gc

    gc.collect()
    return [
        o
        for o in gc.get_objects()
        if issubclass(type(o), torch.optim.Optimizer) and type(o).__name__ != "AcceleratedOptimizer"
    ]


def test_pipeline_stages_release_their_optimizers(tmp_path):
    """SFT -> DPO -> DPO on one shared accelerator: each finished stage gives back its
    optimizer (and AdamW state), model wrapper and data loaders; one optimizer at most is
    alive at any time."""
    import weakref

    from self_rewarding_lm_pytorch.pipeline import PreferenceStage, SelfRewardingTrainer, SFTStage
    from tests.tiny import PROMPTS, SFT_DATA, char_tokenizer, scripted_score, tiny_model

    seen: dict[str, list] = {"judge": [], "train": []}
    stage_optimizers: list[weakref.ref] = []
    check_next_judge = [True]

    def judge(prompt: str, response: str) -> float | None:
        if check_next_judge[0]:  # first judging after SFT / after the first DPO stage
            check_next_judge[0] = False
            seen["judge"].append(len(_live_optimizers()))
        return scripted_score(prompt, response)

    def eval_module(model: nn.Module) -> float:  # at the start and end of a DPO stage
        if len(seen["train"]) < len(seen["judge"]):  # once per stage, as training starts
            live = _live_optimizers()
            seen["train"].append(len(live))
            stage_optimizers.extend(weakref.ref(o) for o in live)
        check_next_judge[0] = True
        return 0.0

    dpo = dict(
        kind="external_reward_dpo",
        judge="scripted",
        num_preference_pairs=4,
        max_new_tokens=4,
        trainer=dict(batch_size=2, num_train_steps=2, start_learning_rate=1e-3),
    )
    pipe = SelfRewardingTrainer(
        tiny_model(),
        tokenizer=char_tokenizer(),
        datasets={"sft": SFT_DATA[:8], "prompts": PROMPTS},
        judges={"scripted": judge},
        stages=[
            SFTStage(trainer=dict(batch_size=4, num_train_steps=2)),
            PreferenceStage(**dpo),
            PreferenceStage(**dpo),
        ],
        checkpoints_folder=str(tmp_path),
        accelerate_kwargs=dict(cpu=True),
        early_stopper_eval_module=eval_module,
        progress=False,
    )
    model = pipe.model
    before = [p.detach().clone() for p in model.parameters()]
    pipe.run()
    assert seen["judge"] == [0, 0]  # nothing of the SFT stage / first DPO stage is left
    assert seen["train"] == [1, 1]  # the DPO stage's own optimizer only
    assert _live_optimizers() == []
    assert all(ref() is None for ref in stage_optimizers)
    acc = pipe.accelerator
    assert (acc._optimizers, acc._models, acc._schedulers, acc._dataloaders) == ([], [], [], [])
    # the shared model stayed the user's module, trained, with no gradients left behind
    assert pipe.model is model
    assert all(p.grad is None for p in model.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(before, model.parameters()))


def test_release_keeps_others_prepared_objects_and_refuses_to_train_again(tmp_path):
    from accelerate import Accelerator

    acc = Accelerator(cpu=True)
    other = torch.optim.SGD(nn.Linear(2, 2).parameters(), lr=0.1)
    other = acc.prepare(other)
    model = tiny_lm()
    trainer = SFTTrainer(
        model,
        train_dataset=sft_data(4),
        batch_size=2,
        num_train_steps=1,  # stops inside the epoch: its loader is left mid-iteration
        accelerator=acc,
        progress=False,
    )
    trainer.train()
    assert len(acc._optimizers) == 2 and acc._dataloaders
    assert acc.gradient_state.active_dataloader is not None
    with trainer:  # the context manager releases on exit
        pass
    assert acc._optimizers == [other] and acc._dataloaders == [] and acc._models == []
    assert acc.gradient_state.active_dataloader is None
    trainer.release()  # twice is harmless
    with pytest.raises(RuntimeError, match="was released.*create a new trainer"):
        trainer.train()
    # the model and the trainer's non-training methods still work
    out = trainer.save_checkpoint(tmp_path / "ckpt")
    load_checkpoint(tiny_lm(seed=5), out)
    assert model(torch.tensor([[1, 2, 3]])).shape == (1, 3, VOCAB)


def test_dpo_trainer_ipo_uses_each_pair_response_lengths():
    """The trainer hands IPO the response token counts: the logged loss of the first step
    is the length-normalised IPO loss of the starting policy vs the given reference."""
    g = torch.Generator().manual_seed(4)
    pairs = [  # chosen and rejected responses of different lengths
        PreferenceExample(rand_ids(g, 3), rand_ids(g, 2 + i % 4), rand_ids(g, 7 - i % 3))
        for i in range(6)
    ]
    policy, ref = tiny_lm(seed=0), tiny_lm(seed=1)
    start = copy.deepcopy(policy)
    beta = 0.5
    trainer = DPOTrainer(
        policy,
        train_dataset=pairs,
        ref_model=ref,
        loss_type="ipo",
        beta=beta,
        batch_size=6,
        num_train_steps=1,
        accelerate_kwargs=CPU,
        progress=False,
    )
    trainer.train()
    batch = collate_preference(pairs)
    ids, rm = batch["input_ids"], batch["response_mask"]
    with torch.no_grad():
        lp = sequence_logprobs(start(ids), ids, rm)
        lp_ref = sequence_logprobs(ref(ids), ids, rm)
    n = rm.sum(dim=1)
    h = (lp[:6] - lp_ref[:6]) / n[:6] - (lp[6:] - lp_ref[6:]) / n[6:]
    want = ((h - 1 / (2 * beta)) ** 2).mean().item()
    assert trainer.history[0]["pref_loss"] == pytest.approx(want, rel=1e-5)
    summed = (lp[:6] - lp_ref[:6]) - (lp[6:] - lp_ref[6:])  # the unnormalised form differs
    assert ((summed - 1 / (2 * beta)) ** 2).mean().item() != pytest.approx(want, rel=1e-2)


def _ddp_release_rank(rank: int, port: int, errors) -> None:
    """One of two gloo ranks (forked from the test process, so nothing is imported
    again): SFT then DPO on one shared accelerator, each trainer released."""
    import os
    import traceback
    import weakref

    try:
        os.environ.update(
            MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank),
            LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
        )  # fmt: skip
        torch.set_num_threads(1)
        from accelerate import Accelerator
        from accelerate.state import AcceleratorState, GradientState, PartialState

        AcceleratorState._reset_state(True)  # the parent's single-process state
        GradientState._reset_state()
        PartialState._reset_state()

        acc = Accelerator(cpu=True)
        assert acc.num_processes == 2
        model = tiny_lm()
        for cls, data in ((SFTTrainer, sft_data(4)), (DPOTrainer, pref_data(4))):
            trainer = cls(model, train_dataset=data, batch_size=2, accelerator=acc,
                          progress=False, start_learning_rate=1e-3)  # fmt: skip
            assert type(trainer.model).__name__ == "DistributedDataParallel"
            wrapper = weakref.ref(trainer.model)
            with trainer:
                trainer.train()
            assert wrapper() is None  # release() dropped the DDP wrapper (and its hooks)
            assert (acc._models, acc._optimizers, acc._dataloaders) == ([], [], [])
        flat = torch.cat([p.detach().flatten() for p in model.parameters()])
        both = acc.gather(flat[None])
        assert torch.equal(both[0], both[1])  # the ranks stayed in sync through both stages
        torch.distributed.destroy_process_group()
    except BaseException:
        errors.put(f"rank {rank}: {traceback.format_exc()}")
        raise


def test_release_under_ddp_drops_the_wrapper_and_the_accelerator_lists():
    """Two real CPU ranks: accelerate lists the bare module (not the DDP wrapper) as its
    model, and release() must remove both, so that wrappers do not pile up over stages."""
    import multiprocessing as mp
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    import accelerate.data_loader  # noqa: F401  (imported once here, not in each rank)

    with contextlib.suppress(ImportError):
        import datasets  # noqa: F401  (accelerate imports it when preparing a loader)
    ctx = mp.get_context("fork")
    errors = ctx.Queue()
    procs = [ctx.Process(target=_ddp_release_rank, args=(r, port, errors)) for r in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
    msgs = [errors.get(timeout=1) for _ in range(errors.qsize())] if not errors.empty() else []
    for p in procs:
        if p.is_alive():
            p.kill()
    assert [p.exitcode for p in procs] == [0, 0], "\n".join(msgs)
