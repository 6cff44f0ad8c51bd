"""The seed README's standalone SPIN example (smaller), and SPIN's per-cycle semantics."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from tiny import DelegatingBackend
from x_transformers import Decoder, TransformerWrapper

from self_rewarding_lm_pytorch.data import collate_preference, create_mock_dataset
from self_rewarding_lm_pytorch.generation import TorchBackend, generate
from self_rewarding_lm_pytorch.losses import sequence_logprobs
from self_rewarding_lm_pytorch.trainers import SPINTrainer


def test_seed_readme_spin_example_smaller(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default checkpoint_folder is relative
    torch.manual_seed(0)

    # the README's example with depth 1, dim 64 and 8 items; same keyword arguments
    transformer = TransformerWrapper(
        num_tokens=256, max_seq_len=1024, attn_layers=Decoder(dim=64, depth=1, heads=8)
    )
    before = copy.deepcopy(transformer.state_dict())

    sft_dataset = create_mock_dataset(8, lambda: (torch.randint(0, 256, (256,)), torch.tensor(1)))

    spin_trainer = SPINTrainer(
        transformer,
        max_seq_len=16,
        sft_dataset=sft_dataset,
        spin_λ=0.1,
        checkpoint_every=100,
    )

    spin_trainer()

    changed = [k for k, v in transformer.state_dict().items() if not torch.equal(v, before[k])]
    assert changed, "SPIN did not update any parameter"
    losses = [h["loss"] for h in spin_trainer.history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)  # 2 epochs, 1 step each
    # the official schedule: both epochs belong to one iteration (3 epochs per iteration),
    # so the data is generated once; its first step is at the reference (loss log 2)
    assert [h["cycle"] for h in spin_trainer.history if "train_pairs" in h] == [0]
    assert abs(losses[0] - math.log(2)) < 1e-6
    # real response = seq[prompt_len:max_seq_len]; generated = a 15-token sample
    assert all(len(p.prompt_ids) == 1 for p in spin_trainer.pairs)
    assert all(len(p.chosen_ids) == 15 and len(p.rejected_ids) == 15 for p in spin_trainer.pairs)
    assert not (tmp_path / "spin-checkpoints").exists()  # checkpoint_every=100 > 2 steps


def test_spin_generates_once_per_cycle_from_the_cycle_start_model(monkeypatch):
    torch.manual_seed(0)
    model = TransformerWrapper(
        num_tokens=64, max_seq_len=32, attn_layers=Decoder(dim=32, depth=1, heads=2)
    )
    g = torch.Generator().manual_seed(3)
    data = [(torch.randint(0, 64, (12,), generator=g), int(1 + i % 3)) for i in range(8)]

    calls: list[dict] = []
    torch_generate = TorchBackend.generate

    def spy(backend, prompts, config, *, generator=None, **kw):  # the default backend's path
        calls.append(
            {
                "step": trainer.step,
                "state": copy.deepcopy(backend.lm.module.state_dict()),
                "prompts": [list(p) for p in prompts],
                "config": config,
                "rng": generator.get_state() if generator is not None else None,
                "kw": kw,
            }
        )
        return torch_generate(backend, prompts, config, generator=generator, **kw)

    monkeypatch.setattr(TorchBackend, "generate", spy)
    trainer = SPINTrainer(
        model,
        sft_dataset=data,
        max_seq_len=10,
        batch_size=2,
        grad_accum_steps=1,
        epochs=2,
        schedule="per_epoch",  # the former schedule: new generations every epoch
        start_learning_rate=1e-2,
        end_learning_rate=1e-2,
        temperature=1.0,
        top_p=1.0,
        pad_id=None,
        accelerate_kwargs=dict(cpu=True),
        seed=0,
        progress=False,
    )
    trainer.train()

    # one generation call per cycle (8 prompts fit one call), each before the cycle's
    # first optimizer step: at steps 0 and 4 (4 steps per cycle)
    assert [c["step"] for c in calls] == [0, 4]
    assert len(calls[0]["prompts"]) == 8
    s0, s1 = calls[0]["state"], calls[1]["state"]
    assert any(not torch.equal(s0[k], s1[k]) for k in s0)  # the model moved between cycles

    # the second cycle's pairs: replaying generation from the recorded cycle-start state
    # with the same RNG state reproduces the generated responses, and the reference
    # log-probs are that state's log-probs
    start = copy.deepcopy(model)
    start.load_state_dict(s1)
    start.eval()
    rng = torch.Generator().set_state(calls[1]["rng"])
    again = generate(
        start, calls[1]["prompts"], calls[1]["config"], generator=rng, **calls[1]["kw"]
    )
    for pair, seq, prompt in zip(trainer.pairs, again.sequences, calls[1]["prompts"]):
        assert pair.prompt_ids == prompt
        assert pair.rejected_ids == seq[: 10 - len(prompt)]
        assert len(pair.prompt_ids) + len(pair.chosen_ids) <= 10
    batch = collate_preference(trainer.pairs)
    with torch.no_grad():
        lp = sequence_logprobs(
            start(batch["input_ids"]), batch["input_ids"], batch["response_mask"]
        )
    torch.testing.assert_close(trainer.ref_logps[:, 0], lp[:8], atol=1e-4, rtol=0)
    torch.testing.assert_close(trainer.ref_logps[:, 1], lp[8:], atol=1e-4, rtol=0)
    # ... and not the final model's
    with torch.no_grad():
        model.eval()
        lp_end = sequence_logprobs(
            model(batch["input_ids"]), batch["input_ids"], batch["response_mask"]
        )
    assert (lp_end[:8] - trainer.ref_logps[:, 0]).abs().max() > 1e-2


class EOSFirstLM(torch.nn.Module):
    """Always prefers token ``eos`` (logit 30); trainable bias, so SPIN can update it."""

    def __init__(self, vocab: int = 16, eos: int = 3) -> None:
        super().__init__()
        bias = torch.zeros(vocab)
        bias[eos] = 30.0
        self.bias = torch.nn.Parameter(bias)
        self.max_seq_len = 32

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.bias.expand(ids.shape[0], ids.shape[1], -1)


def test_spin_keeps_eos_at_the_end_of_generated_responses():
    data = [([1, 2, 5, 6, 7], 2), ([4, 8, 9], 1)]
    trainer = SPINTrainer(
        EOSFirstLM(),
        sft_dataset=data,
        max_seq_len=8,
        epochs=1,
        eos_id=3,
        pad_id=None,
        accelerate_kwargs=dict(cpu=True),
        seed=0,
        progress=False,
    )
    trainer.train()
    assert [p.rejected_ids for p in trainer.pairs] == [[3], [3]]
    assert [p.chosen_ids for p in trainer.pairs] == [[5, 6, 7], [8, 9]]
    assert trainer.cycle_finish_reasons == ["eos", "eos"]
    cycle_log = [h for h in trainer.history if "generated_eos_fraction" in h]
    assert cycle_log and cycle_log[0]["generated_eos_fraction"] == 1.0


class RecordingSPIN(SPINTrainer):
    """Records, for every micro-batch trained on, the epoch, iteration and its pairs."""

    def _compute_loss(self, batch):
        pairs = [self.pairs[i] for i in batch["index"].tolist()]
        self.seen.append((self.epoch, self.cycle, [tuple(p.rejected_ids) for p in pairs]))
        return super()._compute_loss(batch)


def _small_spin_data(n: int = 6) -> list:
    g = torch.Generator().manual_seed(5)
    return [(torch.randint(0, 64, (12,), generator=g), int(1 + i % 2)) for i in range(n)]


def test_spin_official_schedule_reuses_an_iteration_and_mixes_the_previous_one(monkeypatch):
    torch.manual_seed(0)
    model = TransformerWrapper(
        num_tokens=64, max_seq_len=32, attn_layers=Decoder(dim=32, depth=1, heads=2)
    )
    gen_steps: list[int] = []

    torch_generate = TorchBackend.generate

    def spy(backend, prompts, config, **kw):  # the default backend's path
        gen_steps.append(trainer.step)
        return torch_generate(backend, prompts, config, **kw)

    monkeypatch.setattr(TorchBackend, "generate", spy)
    trainer = RecordingSPIN(
        model,
        sft_dataset=_small_spin_data(),
        max_seq_len=10,
        iterations=2,
        epochs_per_iteration=2,
        batch_size=2,
        grad_accum_steps=1,
        start_learning_rate=1e-2,
        end_learning_rate=1e-2,
        temperature=1.0,
        top_p=1.0,
        pad_id=None,
        accelerate_kwargs=dict(cpu=True),
        seed=0,
        progress=False,
    )
    trainer.seen = []
    trainer.train()

    # one generation per iteration: 6 pairs x 2 epochs = 6 steps, then 12 pairs x 2 epochs
    assert gen_steps == [0, 6] and trainer.step == 18
    by_epoch: dict[int, list] = {}
    for epoch, iteration, rejected in trainer.seen:
        assert iteration == epoch // 2
        by_epoch.setdefault(epoch, []).extend(rejected)
    first, second = trainer.generated_pairs, trainer.pairs[6:]
    assert [p.rejected_ids for p in trainer.pairs[:6]] == [p.rejected_ids for p in first]
    # iteration 0 trains twice on the same generated set, each pair once per epoch
    gen0 = sorted(tuple(p.rejected_ids) for p in second)
    assert sorted(by_epoch[0]) == sorted(by_epoch[1]) == gen0
    # iteration 1: its own new generations plus the previous iteration's, twice
    gen1 = sorted(tuple(p.rejected_ids) for p in first)
    assert gen1 != gen0
    assert sorted(by_epoch[2]) == sorted(by_epoch[3]) == sorted(gen0 + gen1)
    # both sets are scored under the iteration-1 start model: its first loss is log 2
    log = [h for h in trainer.history if "train_pairs" in h]
    assert [(h["cycle"], h["train_pairs"]) for h in log] == [(0, 6), (1, 12)]
    losses = [h["loss"] for h in trainer.history if "loss" in h]
    assert abs(losses[0] - math.log(2)) < 1e-6 and abs(losses[6] - math.log(2)) < 1e-6
    assert abs(losses[5] - math.log(2)) > 1e-4  # within an iteration the model moves on
    assert trainer.ref_logps.shape == (12, 2)


def test_spin_schedule_settings_are_checked():
    kw = dict(sft_dataset=_small_spin_data(2), max_seq_len=10, pad_id=None,
              accelerate_kwargs=dict(cpu=True), progress=False)  # fmt: skip
    model = TransformerWrapper(
        num_tokens=64, max_seq_len=32, attn_layers=Decoder(dim=32, depth=1, heads=2)
    )
    with pytest.raises(ValueError, match="unknown SPIN schedule 'paper'; choose 'official'"):
        SPINTrainer(model, schedule="paper", **kw)
    with pytest.raises(ValueError, match="pass epochs .* or iterations .*not both"):
        SPINTrainer(model, epochs=2, iterations=1, **kw)
    with pytest.raises(ValueError, match="schedule='per_epoch' trains one epoch per iteration"):
        SPINTrainer(model, schedule="per_epoch", epochs_per_iteration=3, **kw)
    with pytest.raises(ValueError, match="epochs_per_iteration must be a positive int"):
        SPINTrainer(model, epochs_per_iteration=0, **kw)
    t = SPINTrainer(model, iterations=2, epochs_per_iteration=4, **kw)
    assert (t.num_epochs, t.epochs_per_iteration, t.mix_previous_iteration) == (8, 4, True)
    t = SPINTrainer(model, schedule="per_epoch", epochs=3, **kw)
    assert (t.num_epochs, t.epochs_per_iteration, t.mix_previous_iteration) == (3, 1, False)


def _spin_stage_metrics(tmp_path, stage) -> dict:
    from self_rewarding_lm_pytorch.pipeline import SelfRewardingTrainer
    from tests.tiny import SFT_DATA, char_tokenizer, tiny_model

    report = SelfRewardingTrainer(
        tiny_model(),
        tokenizer=char_tokenizer(),
        datasets={"sft": SFT_DATA[:4]},
        stages=[stage],
        checkpoints_folder=str(tmp_path),
        accelerate_kwargs=dict(cpu=True),
        progress=False,
    ).run()
    return report["stages"][0]["metrics"]


def test_pipeline_spin_stage_cycles_are_iterations(tmp_path):
    from self_rewarding_lm_pytorch.pipeline import SPINStage

    spin = dict(batch_size=4, grad_accum_steps=1, epochs_per_iteration=1, max_seq_len=24)
    metrics = _spin_stage_metrics(tmp_path, SPINStage(cycles=2, trainer=spin))
    # iteration 0: 4 pairs (1 step); iteration 1: 4 new + 4 previous pairs (2 steps)
    assert metrics["step"] == 3


def test_spin_stage_with_a_total_epoch_count_trains_that_many_epochs(tmp_path):
    """``trainer: {num_epochs: k}`` (passes in all) replaces ``cycles`` as ``epochs`` does."""
    from self_rewarding_lm_pytorch.pipeline import SPINStage

    trainer = dict(batch_size=4, max_seq_len=24, num_epochs=1)
    metrics = _spin_stage_metrics(tmp_path, SPINStage(cycles=3, trainer=trainer))
    assert (metrics["epoch"], metrics["step"]) == (0, 1)  # 4 rows, batch 4: one step per epoch


def test_spin_samples_through_the_backend_it_is_given():
    data = _small_spin_data(4)
    kw = dict(sft_dataset=data, max_seq_len=10, batch_size=2, epochs=1, temperature=1.0,
              top_p=1.0, pad_id=None, accelerate_kwargs=dict(cpu=True), seed=0,
              progress=False)  # fmt: skip

    def model():
        torch.manual_seed(0)
        return TransformerWrapper(
            num_tokens=64, max_seq_len=32, attn_layers=Decoder(dim=32, depth=1, heads=2)
        )

    default = SPINTrainer(model(), **kw)
    default.train()
    policy = model()
    recorder = DelegatingBackend(policy)
    given = SPINTrainer(policy, backend=recorder, **kw)
    assert given.backend is recorder
    given.train()
    assert recorder.calls == ["generate"]  # one iteration, 4 prompts in one call
    assert recorder.requests[0]["prompts"] == [p.prompt_ids for p in given.pairs]
    # the same sampler and seed: the same responses as the default backend's
    assert [p.rejected_ids for p in given.pairs] == [p.rejected_ids for p in default.pairs]
    assert len({tuple(p.rejected_ids) for p in given.pairs}) > 1
