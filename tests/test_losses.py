"""Tests for ``self_rewarding_lm_pytorch.losses``.

Every loss is compared with an independent float64 computation written straight from the
paper's formula with Python loops and ``math`` (no torch ops in the reference path).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from self_rewarding_lm_pytorch import losses
from self_rewarding_lm_pytorch.losses import (
    PreferenceLossOutput,
    dpo_loss,
    kto_loss,
    nll_loss,
    sequence_logprobs,
    spin_loss,
    token_logprobs,
)

VOCAB = 11


# --------------------------------------------------------------------------- fixtures
def ragged_batch(
    seed: int,
    *,
    batch: int = 4,
    seq: int = 12,
    vocab: int = VOCAB,
    dtype: torch.dtype = torch.float64,
    pad_ids: str = "random",
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[int, int]]]:
    """Right-padded batch: per row a prompt of length p >= 1, response of length r >= 1.

    Returns logits, input_ids, response_mask, and the (p, r) of each row.  The pad region
    holds garbage ids (``pad_ids="random"``: in-vocabulary; ``"invalid"``: out of range).
    """
    g = torch.Generator().manual_seed(seed)
    logits = (3.0 * torch.randn(batch, seq, vocab, generator=g)).to(dtype)
    input_ids = torch.randint(0, vocab, (batch, seq), generator=g)
    mask = torch.zeros(batch, seq, dtype=torch.bool)
    spans = []
    for b in range(batch):
        p = int(torch.randint(1, seq // 2, (1,), generator=g))
        r = int(torch.randint(1, seq - p + 1, (1,), generator=g))
        mask[b, p : p + r] = True
        spans.append((p, r))
        if pad_ids == "invalid":
            input_ids[b, p + r :] = -100 if b % 2 else vocab + 7
    return logits, input_ids, mask, spans


def ref_logprob(row_logits: list[float], target: int) -> float:
    """log softmax(row_logits)[target], computed by hand in float64."""
    m = max(row_logits)
    z = sum(math.exp(v - m) for v in row_logits)
    return row_logits[target] - m - math.log(z)


def ref_sequence_logprobs(logits, input_ids, spans, average=False) -> list[float]:
    out = []
    for b, (p, r) in enumerate(spans):
        total = 0.0
        for t in range(p, p + r):
            total += ref_logprob(logits[b, t - 1].tolist(), int(input_ids[b, t]))
        out.append(total / r if average else total)
    return out


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


def random_logps(seed: int, batch: int = 6, dtype=torch.float64) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(-20.0 + 5.0 * torch.randn(batch, generator=g)).to(dtype) for _ in range(4)]


# --------------------------------------------------------------------------- token/sequence
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_token_logprobs_matches_hand_softmax(seed: int) -> None:
    logits, input_ids, _, _ = ragged_batch(seed)
    out = token_logprobs(logits, input_ids)
    assert out.shape == input_ids.shape and out.dtype == torch.float64
    assert torch.all(out[:, 0] == 0)
    for b in range(input_ids.shape[0]):
        for t in range(1, input_ids.shape[1]):
            want = ref_logprob(logits[b, t - 1].tolist(), int(input_ids[b, t]))
            assert abs(float(out[b, t]) - want) < 1e-9


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("average", [False, True])
def test_sequence_logprobs_ragged_matches_reference(seed: int, average: bool) -> None:
    logits, input_ids, mask, spans = ragged_batch(seed, batch=5)
    got = sequence_logprobs(logits, input_ids, mask, average=average)
    want = ref_sequence_logprobs(logits, input_ids, spans, average=average)
    assert got.shape == (5,) and got.dtype == torch.float64
    for g_, w in zip(got.tolist(), want):
        assert abs(g_ - w) < 1e-6


def test_padding_garbage_does_not_change_result() -> None:
    logits, input_ids, mask, spans = ragged_batch(7, batch=5)
    base = sequence_logprobs(logits, input_ids, mask)
    g = torch.Generator().manual_seed(99)
    logits2, ids2 = logits.clone(), input_ids.clone()
    for b, (p, r) in enumerate(spans):
        end = p + r
        # every id after the response, and every logit row that predicts nothing in the
        # response (index >= end - 1), is garbage
        ids2[b, end:] = torch.randint(0, VOCAB, (ids2.shape[1] - end,), generator=g)
        logits2[b, end - 1 :] = 1e4 * torch.randn(logits2.shape[1] - end + 1, VOCAB, generator=g)
        # -inf logits there give -inf token log-probs that must not leak in (as NaN)
        logits2[b, end - 1 :, : VOCAB // 2] = -math.inf
        # prompt ids also change what nothing reads: position p-1's id is context only
    changed = bool((ids2 != input_ids).any()) and bool((logits2 != logits).any())
    assert changed
    assert torch.equal(sequence_logprobs(logits2, ids2, mask), base)
    logits2.requires_grad_(True)
    nll_loss(logits2, ids2, mask).backward()
    assert torch.isfinite(logits2.grad).all()
    # out-of-vocabulary pad ids (-100 labels, pad id = vocab size) are fine too
    ids3 = input_ids.clone()
    for b, (p, r) in enumerate(spans):
        ids3[b, p + r :] = -100
    assert torch.equal(sequence_logprobs(logits, ids3, mask), base)
    assert torch.equal(nll_loss(logits, ids3, mask), nll_loss(logits, input_ids, mask))


def test_invalid_pad_ids_fixture_matches_reference() -> None:
    logits, input_ids, mask, spans = ragged_batch(3, batch=4, pad_ids="invalid")
    got = sequence_logprobs(logits, input_ids, mask)
    want = ref_sequence_logprobs(logits, input_ids, spans)
    assert max(abs(a - b) for a, b in zip(got.tolist(), want)) < 1e-6


def _peaked_logits(input_ids: torch.Tensor, vocab: int, shift: int) -> torch.Tensor:
    """Logits with +50 on input_ids[:, t + shift] at position t (0 elsewhere)."""
    batch, seq = input_ids.shape
    logits = torch.zeros(batch, seq, vocab, dtype=torch.float64)
    for b in range(batch):
        for t in range(seq):
            if 0 <= t + shift < seq:
                logits[b, t, int(input_ids[b, t + shift])] = 50.0
    return logits


def test_next_token_shift_is_right() -> None:
    g = torch.Generator().manual_seed(5)
    batch, seq = 3, 10
    # no two consecutive ids equal, so "predict the current token" is always wrong
    ids = torch.zeros(batch, seq, dtype=torch.long)
    for b in range(batch):
        for t in range(seq):
            choices = [v for v in range(VOCAB) if t == 0 or v != int(ids[b, t - 1])]
            ids[b, t] = choices[int(torch.randint(len(choices), (1,), generator=g))]
    mask = torch.zeros(batch, seq, dtype=torch.bool)
    mask[:, 3:] = True
    right = sequence_logprobs(_peaked_logits(ids, VOCAB, shift=1), ids, mask)
    off_by_one = sequence_logprobs(_peaked_logits(ids, VOCAB, shift=0), ids, mask)
    assert torch.all(right > -1e-4), right
    assert torch.all(off_by_one < -100.0), off_by_one


def test_nll_loss_is_token_weighted_mean() -> None:
    logits, input_ids, mask, spans = ragged_batch(11, batch=4)
    got = nll_loss(logits, input_ids, mask)
    total, count = 0.0, 0
    for b, (p, r) in enumerate(spans):
        for t in range(p, p + r):
            total -= ref_logprob(logits[b, t - 1].tolist(), int(input_ids[b, t]))
            count += 1
    assert got.ndim == 0
    assert abs(float(got) - total / count) < 1e-6
    # differs from a mean of per-row means whenever lengths differ
    assert len({r for _, r in spans}) > 1


def test_token_logprobs_gradient_matches_autograd_reference() -> None:
    logits, input_ids, mask, _ = ragged_batch(4, batch=3, seq=7, vocab=5)
    logits.requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda x: sequence_logprobs(x, input_ids, mask), (logits,), eps=1e-6, atol=1e-6
    )
    # and equals the gradient of the plain log_softmax + gather formulation
    weights = torch.randn(3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    (sequence_logprobs(logits, input_ids, mask) * weights).sum().backward()
    ours = logits.grad.clone()
    logits.grad = None
    lp = F.log_softmax(logits[:, :-1], dim=-1).gather(-1, input_ids[:, 1:, None]).squeeze(-1)
    ((lp * mask[:, 1:]).sum(1) * weights).sum().backward()
    torch.testing.assert_close(ours, logits.grad, rtol=0, atol=1e-12)


def test_chunked_path_matches_unchunked(monkeypatch: pytest.MonkeyPatch) -> None:
    logits, input_ids, mask, _ = ragged_batch(8, batch=3, seq=9)
    logits.requires_grad_(True)
    full = sequence_logprobs(logits, input_ids, mask)
    (g_full,) = torch.autograd.grad(full.sum(), logits)
    # force chunks of 2 positions (and uneven last chunk) through forward and backward
    monkeypatch.setattr(losses.logprobs, "_CHUNK_ELEMENTS", 2 * VOCAB)
    assert len(losses.logprobs._chunks(27, VOCAB)) == 14
    chunked = sequence_logprobs(logits, input_ids, mask)
    (g_chunked,) = torch.autograd.grad(chunked.sum(), logits)
    torch.testing.assert_close(chunked, full, rtol=0, atol=1e-12)
    torch.testing.assert_close(g_chunked, g_full, rtol=0, atol=1e-12)


def test_bf16_logits_upcast_and_close_to_float32() -> None:
    logits, input_ids, mask, _ = ragged_batch(6, batch=4, dtype=torch.float32)
    ref32 = sequence_logprobs(logits, input_ids, mask)
    bf = logits.bfloat16().requires_grad_(True)
    got = sequence_logprobs(bf, input_ids, mask)
    assert got.dtype == torch.float32
    # loose: bf16 rounding of the logits themselves
    torch.testing.assert_close(got, ref32, rtol=2e-2, atol=0.1)
    # tight: the arithmetic runs in float32 on the bf16 values (bf16 arithmetic would be
    # off by ~1e-2 here)
    exact = sequence_logprobs(bf.detach().float(), input_ids, mask)
    torch.testing.assert_close(got, exact, rtol=0, atol=1e-5)
    got.sum().backward()
    assert bf.grad is not None and bf.grad.dtype == torch.bfloat16
    lf = logits.clone().requires_grad_(True)
    sequence_logprobs(lf, input_ids, mask).sum().backward()
    torch.testing.assert_close(bf.grad.float(), lf.grad, rtol=0, atol=3e-2)
    # fp16 too
    torch.testing.assert_close(
        sequence_logprobs(logits.half(), input_ids, mask), ref32, rtol=2e-2, atol=0.05
    )


def test_integer_mask_accepted_and_single_token_sequence() -> None:
    logits, input_ids, mask, _ = ragged_batch(9, batch=2)
    torch.testing.assert_close(
        sequence_logprobs(logits, input_ids, mask.long()),
        sequence_logprobs(logits, input_ids, mask),
    )
    assert token_logprobs(logits[:, :1], input_ids[:, :1]).tolist() == [[0.0], [0.0]]
    # non-contiguous logits (a transposed buffer) give the same values
    strided = logits.transpose(0, 1).contiguous().transpose(0, 1)
    assert not strided.is_contiguous()
    torch.testing.assert_close(
        token_logprobs(strided, input_ids), token_logprobs(logits, input_ids), rtol=0, atol=0
    )


# --------------------------------------------------------------------------- DPO
@pytest.mark.parametrize("seed", [0, 1])
@pytest.mark.parametrize("beta", [0.1, 0.5])
@pytest.mark.parametrize("label_smoothing", [0.0, 0.2])
def test_dpo_sigmoid_matches_reference(seed: int, beta: float, label_smoothing: float) -> None:
    pc, pr, rc, rr = random_logps(seed)
    out = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=label_smoothing)
    assert isinstance(out, PreferenceLossOutput)
    for i in range(len(pc)):
        h = (float(pc[i]) - float(rc[i])) - (float(pr[i]) - float(rr[i]))
        eps = label_smoothing
        want = -(1 - eps) * log_sigmoid(beta * h) - eps * log_sigmoid(-beta * h)
        assert abs(float(out.losses[i]) - want) < 1e-6
        assert abs(float(out.chosen_rewards[i]) - beta * (float(pc[i]) - float(rc[i]))) < 1e-9
        assert abs(float(out.rejected_rewards[i]) - beta * (float(pr[i]) - float(rr[i]))) < 1e-9
    want_margin = out.chosen_rewards - out.rejected_rewards
    torch.testing.assert_close(out.reward_margins, want_margin)
    torch.testing.assert_close(out.reward_accuracies, (want_margin > 0).double())


def test_dpo_sigmoid_equals_minus_logsigmoid() -> None:
    pc, pr, rc, rr = random_logps(3)
    beta = 0.1
    out = dpo_loss(pc, pr, rc, rr, beta=beta)
    torch.testing.assert_close(out.losses, -F.logsigmoid(beta * ((pc - rc) - (pr - rr))))


@pytest.mark.parametrize("beta", [0.1, 2.0])
def test_dpo_ipo_and_hinge_match_reference(beta: float) -> None:
    pc, pr, rc, rr = random_logps(4, batch=8)
    ones = torch.ones(8)  # one response token each: per-token = summed log-ratios
    ipo = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo", chosen_lengths=ones,
                   rejected_lengths=ones).losses  # fmt: skip
    hinge = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="hinge").losses
    active = 0
    for i in range(len(pc)):
        h = (float(pc[i]) - float(rc[i])) - (float(pr[i]) - float(rr[i]))
        assert abs(float(ipo[i]) - (h - 1 / (2 * beta)) ** 2) < 1e-6
        assert abs(float(hinge[i]) - max(0.0, 1 - beta * h)) < 1e-6
        active += 1 - beta * h > 0
    if beta == 2.0:  # both hinge regimes (active and clipped at 0) are exercised
        assert 0 < active < len(pc)


def test_dpo_gradient_signs_increase_margin() -> None:
    pc, pr, rc, rr = random_logps(5)
    for loss_type in ("sigmoid", "robust", "ipo", "hinge"):
        # choose policy values so the margin h is small (hinge active, IPO below target)
        c = (rc + 0.1).clone().requires_grad_(True)
        r = (rr + 0.2).clone().requires_grad_(True)
        n = torch.full((len(c),), 2)
        out = dpo_loss(c, r, rc, rr, beta=0.5, loss_type=loss_type, chosen_lengths=n,
                       rejected_lengths=n)  # fmt: skip
        out.losses.sum().backward()
        assert torch.all(c.grad < 0), (loss_type, c.grad)  # raising pi_c lowers the loss
        assert torch.all(r.grad > 0), (loss_type, r.grad)  # raising pi_r raises it
        assert not out.chosen_rewards.requires_grad
        assert not out.rejected_rewards.requires_grad
    # reference log-probs are constants for the trainer but still differentiable inputs
    c = pc.clone().requires_grad_(True)
    dpo_loss(c, pr, rc, rr).losses.sum().backward()
    h = (pc - rc) - (pr - rr)
    torch.testing.assert_close(c.grad, -0.1 * torch.sigmoid(-0.1 * h))


def test_dpo_low_precision_inputs_computed_in_float32() -> None:
    pc, pr, rc, rr = random_logps(6, dtype=torch.float32)
    out = dpo_loss(pc.bfloat16(), pr.bfloat16(), rc, rr)
    assert out.losses.dtype == torch.float32
    ref = dpo_loss(pc.bfloat16().float(), pr.bfloat16().float(), rc, rr)
    torch.testing.assert_close(out.losses, ref.losses)


def random_lengths(seed: int, batch: int = 6) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(1, 40, (batch,), generator=g) for _ in range(2)]


@pytest.mark.parametrize("beta", [0.1, 1.0])
def test_dpo_ipo_divides_each_log_ratio_by_its_length(beta: float) -> None:
    """IPO (Azar et al. 2023, Eq. 17) on per-token log-ratios, as TRL computes it."""
    pc, pr, rc, rr = random_logps(11, batch=8)
    lc, lr = random_lengths(12, batch=8)
    out = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo", chosen_lengths=lc,
                   rejected_lengths=lr)  # fmt: skip
    for i in range(8):
        h = (float(pc[i]) - float(rc[i])) / int(lc[i]) - (float(pr[i]) - float(rr[i])) / int(lr[i])
        assert abs(float(out.losses[i]) - (h - 1 / (2 * beta)) ** 2) < 1e-9
        # the implicit rewards stay the summed log-ratios (as in TRL)
        assert abs(float(out.chosen_rewards[i]) - beta * (float(pc[i]) - float(rc[i]))) < 1e-9
    # float lengths (e.g. counts from a float mask) give the same result
    same = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo", chosen_lengths=lc.double(),
                    rejected_lengths=lr.double())  # fmt: skip
    torch.testing.assert_close(same.losses, out.losses)


def test_dpo_ipo_needs_lengths() -> None:
    pc, pr, rc, rr = random_logps(0)
    lc, lr = random_lengths(0)
    with pytest.raises(ValueError, match="loss_type='ipo'.*pass chosen_lengths and rejected_len"):
        dpo_loss(pc, pr, rc, rr, loss_type="ipo")
    with pytest.raises(ValueError, match="chosen_lengths must be > 0"):
        dpo_loss(pc, pr, rc, rr, loss_type="ipo", chosen_lengths=lc * 0, rejected_lengths=lr)
    with pytest.raises(ValueError, match=r"rejected_lengths must have shape \(6,\)"):
        dpo_loss(pc, pr, rc, rr, loss_type="ipo", chosen_lengths=lc, rejected_lengths=lr[:3])


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.3])
def test_dpo_robust_is_rdpo(eps: float) -> None:
    """rDPO (Chowdhury et al. 2024): unbiased under label flips with rate eps."""
    pc, pr, rc, rr = random_logps(13)
    beta = 0.5
    out = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="robust", label_smoothing=eps)
    for i in range(len(pc)):
        h = (float(pc[i]) - float(rc[i])) - (float(pr[i]) - float(rr[i]))
        want = (-(1 - eps) * log_sigmoid(beta * h) + eps * log_sigmoid(-beta * h)) / (1 - 2 * eps)
        assert abs(float(out.losses[i]) - want) < 1e-9
    # its expectation over a flip with probability eps is the clean DPO loss
    flipped = dpo_loss(pr, pc, rr, rc, beta=beta, loss_type="robust", label_smoothing=eps)
    clean = dpo_loss(pc, pr, rc, rr, beta=beta)
    torch.testing.assert_close((1 - eps) * out.losses + eps * flipped.losses, clean.losses)


# --------------------------------------------------------------------------- TRL
# Independent re-implementation of TRL 1.16.0's formulas (the PyPI release, checked against
# its source): trl/trainer/dpo_trainer.py, DPOTrainer's loss block (loss_type "sigmoid",
# "hinge", "ipo" with its per-token normalisation clamp(min=1), "robust"), and
# trl/trainer/kto_trainer.py KTOTrainer._compute_loss (loss_type "kto": batch-mean KL, then
# clamp at 0). TRL 1.16's "sigmoid" no longer applies label_smoothing; our cDPO is the form
# TRL's "sigmoid" had with label_smoothing before its DPO refactor (DPOTrainer.dpo_loss,
# trl/trainer/dpo_trainer.py at e3b7897c8^). The same formulas are in TRL main at f2cd577.
def _trl_dpo(pc, pr, rc, rr, beta, loss_type, label_smoothing=0.0, lc=None, lr=None):
    chosen_scores = pc - rc
    rejected_scores = pr - rr
    delta = chosen_scores - rejected_scores
    if loss_type == "sigmoid":  # pre-refactor: label smoothing = cDPO
        return (
            -F.logsigmoid(beta * delta) * (1 - label_smoothing)
            - F.logsigmoid(-beta * delta) * label_smoothing
        )
    if loss_type == "hinge":
        return torch.relu(1 - beta * delta)
    if loss_type == "ipo":
        ipo_delta = chosen_scores / lc.clamp(min=1.0) - rejected_scores / lr.clamp(min=1.0)
        return (ipo_delta - 1 / (2 * beta)) ** 2
    if loss_type == "robust":
        clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta)
        flipped = -label_smoothing * F.logsigmoid(-beta * delta)
        return (clean - flipped) / (1 - 2 * label_smoothing)
    raise AssertionError(loss_type)


def _trl_kto(policy, ref, desirable, kl_policy, kl_ref, beta, wd, wu):
    kl = (kl_policy - kl_ref).mean().detach().clamp(min=0)
    chosen = 1 - F.sigmoid(beta * ((policy - ref)[desirable] - kl))
    rejected = 1 - F.sigmoid(beta * (kl - (policy - ref)[~desirable]))
    return wd * chosen, wu * rejected


@pytest.mark.parametrize("seed", [0, 1])
def test_losses_match_trl_formulas(seed: int) -> None:
    pc, pr, rc, rr = random_logps(20 + seed, batch=16)
    lc, lr = (x.double() for x in random_lengths(30 + seed, batch=16))
    for beta in (0.1, 0.5):
        for loss_type, eps in (("sigmoid", 0.0), ("sigmoid", 0.2), ("hinge", 0.0),
                               ("ipo", 0.0), ("robust", 0.2)):  # fmt: skip
            ours = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type=loss_type,
                            label_smoothing=eps, chosen_lengths=lc, rejected_lengths=lr)  # fmt: skip
            trl = _trl_dpo(pc, pr, rc, rr, beta, loss_type, eps, lc, lr)
            torch.testing.assert_close(ours.losses, trl, rtol=1e-12, atol=1e-12)
    # KTO: the reference point is the batch mean of the mismatched-pair log-ratios
    g = torch.Generator().manual_seed(40 + seed)
    policy, ref, kl_p, kl_r = (-10 + 3 * torch.randn(16, generator=g, dtype=torch.float64)
                               for _ in range(4))  # fmt: skip
    kl_r = kl_r - 1.0 if seed else kl_r + 1.0  # a negative mean (clamped) and a positive one
    desirable = torch.arange(16) % 3 != 0
    ours = kto_loss(policy, ref, desirable, kl_p - kl_r, beta=0.2, desirable_weight=1.3,
                    undesirable_weight=0.8)  # fmt: skip
    want_d, want_u = _trl_kto(policy, ref, desirable, kl_p, kl_r, 0.2, 1.3, 0.8)
    torch.testing.assert_close(ours[desirable], want_d, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ours[~desirable], want_u, rtol=1e-12, atol=1e-12)


# --------------------------------------------------------------------------- SPIN
@pytest.mark.parametrize("lam", [0.1, 1.0])
def test_spin_matches_eq_4_7(lam: float) -> None:
    p_real, p_gen, r_real, r_gen = random_logps(7)
    sig = spin_loss(p_real, p_gen, r_real, r_gen, lam=lam)
    hinge = spin_loss(p_real, p_gen, r_real, r_gen, lam=lam, loss_type="hinge")
    for i in range(len(p_real)):
        h = (float(p_real[i]) - float(r_real[i])) - (float(p_gen[i]) - float(r_gen[i]))
        t = lam * h
        want = math.log1p(math.exp(-t)) if t > -30 else -t  # l(t) = log(1 + exp(-t))
        assert abs(float(sig.losses[i]) - want) < 1e-6
        assert abs(float(hinge.losses[i]) - max(0.0, 1 - t)) < 1e-6
        assert (
            abs(float(sig.chosen_rewards[i]) - lam * (float(p_real[i]) - float(r_real[i]))) < 1e-9
        )
        assert (
            abs(float(sig.rejected_rewards[i]) - lam * (float(p_gen[i]) - float(r_gen[i]))) < 1e-9
        )


def test_spin_equals_dpo_with_real_as_chosen() -> None:
    a, b, c, d = random_logps(8)
    s = spin_loss(a, b, c, d, lam=0.3)
    o = dpo_loss(a, b, c, d, beta=0.3)
    assert torch.equal(s.losses, o.losses)
    r = a.clone().requires_grad_(True)
    spin_loss(r, b, c, d).losses.sum().backward()
    assert torch.all(r.grad < 0)


# --------------------------------------------------------------------------- KTO
@pytest.mark.parametrize("kl", [0.7, -0.5])
def test_kto_matches_eq_8(kl: float) -> None:
    g = torch.Generator().manual_seed(10)
    policy = -10 + 3 * torch.randn(8, dtype=torch.float64, generator=g)
    ref = -10 + 3 * torch.randn(8, dtype=torch.float64, generator=g)
    desirable = torch.tensor([1, 0, 1, 1, 0, 0, 1, 0], dtype=torch.bool)
    beta, wd, wu = 0.3, 1.5, 0.7
    got = kto_loss(policy, ref, desirable, torch.tensor(kl, dtype=torch.float64), beta=beta,
                   desirable_weight=wd, undesirable_weight=wu)  # fmt: skip
    z0 = max(kl, 0.0)
    for i in range(8):
        r = float(policy[i]) - float(ref[i])
        if bool(desirable[i]):
            want = wd * (1 - sigmoid(beta * (r - z0)))
        else:
            want = wu * (1 - sigmoid(beta * (z0 - r)))
        assert abs(float(got[i]) - want) < 1e-6
    # a plain number and a per-example tensor give the same result
    torch.testing.assert_close(
        kto_loss(policy, ref, desirable, kl, beta=beta, desirable_weight=wd, undesirable_weight=wu),
        got,
    )
    torch.testing.assert_close(
        kto_loss(
            policy,
            ref,
            desirable.long(),
            torch.full((8,), kl, dtype=torch.float64),
            beta=beta,
            desirable_weight=wd,
            undesirable_weight=wu,
        ),  # fmt: skip
        got,
    )


def test_kto_averages_per_example_kl_before_clamping() -> None:
    """A (batch,) KL estimate is averaged over the batch, then clamped at 0 (as TRL)."""
    policy = torch.tensor([-5.0, -7.0, -6.0], dtype=torch.float64)
    ref = torch.tensor([-6.0, -6.0, -6.0], dtype=torch.float64)
    desirable = torch.tensor([True, False, True])
    kl = torch.tensor([3.0, -1.0, 1.0], dtype=torch.float64)  # mean 1.0
    torch.testing.assert_close(
        kto_loss(policy, ref, desirable, kl), kto_loss(policy, ref, desirable, 1.0)
    )
    negative = torch.tensor([2.0, -4.0, -1.0], dtype=torch.float64)  # mean -1.0 -> z0 = 0
    torch.testing.assert_close(
        kto_loss(policy, ref, desirable, negative), kto_loss(policy, ref, desirable, 0.0)
    )


def test_kto_kl_detached_and_gradient_signs() -> None:
    policy = torch.tensor([-5.0, -5.0], dtype=torch.float64, requires_grad=True)
    ref = torch.tensor([-6.0, -6.0], dtype=torch.float64)
    kl = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    out = kto_loss(policy, ref, torch.tensor([True, False]), kl)
    out.sum().backward()
    assert kl.grad is None  # z0 carries no gradient
    assert policy.grad[0] < 0  # desirable: raise its likelihood
    assert policy.grad[1] > 0  # undesirable: lower it


# --------------------------------------------------------------------------- errors
def _good():
    logits, input_ids, mask, _ = ragged_batch(0, batch=2, seq=6, dtype=torch.float32)
    return logits, input_ids, mask


@pytest.mark.parametrize(
    ("make", "exc", "match"),
    [
        (lambda x, i, m: (x[0], i, m), ValueError, "batch, seq, vocab"),
        (lambda x, i, m: (x, i[0], m), ValueError, r"input_ids must have shape \(batch, seq\)"),
        (lambda x, i, m: (x, i.float(), m), TypeError, "integer token ids"),
        (lambda x, i, m: (x.long(), i, m), TypeError, "floating point"),
        (lambda x, i, m: (x[:1], i, m), ValueError, "disagree"),
        (lambda x, i, m: (x, i, m[:, :-1]), ValueError, "response_mask must have the shape"),
        (lambda x, i, m: (x, i, m.float()), TypeError, "bool"),
        (lambda x, i, m: (x, i, m.long() * 2), ValueError, "0/1"),
        (lambda x, i, m: (x, i, m.index_fill(1, torch.tensor([0]), True)), ValueError, r"rows \[0, 1\].*first token"),
        (lambda x, i, m: (x, i, m.index_fill(0, torch.tensor([1]), False)), ValueError, r"rows \[1\].*no response token"),
        (lambda x, i, m: (x, i.masked_fill(m, VOCAB), m), ValueError, "outside the vocabulary"),
        (lambda x, i, m: (x.numpy(), i, m), TypeError, "logits must be a torch.Tensor"),
    ],
)  # fmt: skip
def test_logprob_argument_errors(make, exc, match) -> None:
    args = make(*_good())
    with pytest.raises(exc, match=match):
        sequence_logprobs(*args)
    with pytest.raises(exc, match=match):
        nll_loss(*args)


def test_token_logprobs_errors() -> None:
    logits, input_ids, _ = _good()
    ids = input_ids.clone()
    ids[1, 3] = -1
    with pytest.raises(ValueError, match=r"input_ids\[1, 3\] = -1 is outside"):
        token_logprobs(logits, ids)
    with pytest.raises(ValueError, match="vocab = 0"):
        token_logprobs(logits[..., :0], input_ids)
    with pytest.raises(ValueError, match="batch is empty"):
        nll_loss(logits[:0], input_ids[:0], torch.zeros(0, 6, dtype=torch.bool))


@pytest.mark.parametrize(
    ("kwargs", "exc", "match"),
    [
        (dict(loss_type="kto"), ValueError, "valid: sigmoid, robust, ipo, hinge"),
        (dict(beta=0.0), ValueError, "beta must be a finite number > 0"),
        (dict(beta=-1.0), ValueError, "beta"),
        (dict(beta=float("nan")), ValueError, "beta"),
        (dict(beta="0.1"), TypeError, "beta must be a number"),
        (dict(label_smoothing=0.5), ValueError, r"\[0, 0.5\)"),
        (dict(label_smoothing=-0.1), ValueError, r"\[0, 0.5\)"),
        (dict(label_smoothing=0.1, loss_type="ipo", chosen_lengths=torch.ones(6), rejected_lengths=torch.ones(6)), ValueError, "only defined for loss_type='sigmoid' .cDPO. and 'robust'"),
        (dict(label_smoothing=0.5, loss_type="robust"), ValueError, r"\[0, 0.5\)"),
        (dict(label_smoothing=0.1, loss_type="hinge"), ValueError, "only defined"),
    ],
)  # fmt: skip
def test_dpo_argument_errors(kwargs, exc, match) -> None:
    with pytest.raises(exc, match=match):
        dpo_loss(*random_logps(0), **kwargs)


def test_preference_tensor_errors() -> None:
    pc, pr, rc, rr = random_logps(0)
    with pytest.raises(
        ValueError, match="ref_rejected_logps has batch size 5 but policy_chosen_logps has 6"
    ):
        dpo_loss(pc, pr, rc, rr[:5])
    with pytest.raises(ValueError, match=r"must have shape \(batch,\).*sequence_logprobs"):
        dpo_loss(pc[:, None], pr, rc, rr)
    with pytest.raises(TypeError, match="policy_rejected_logps must be floating"):
        dpo_loss(pc, pr.long(), rc, rr)
    with pytest.raises(TypeError, match="ref_chosen_logps must be a torch.Tensor"):
        dpo_loss(pc, pr, rc.tolist(), rr)
    with pytest.raises(ValueError, match="valid: sigmoid, hinge"):
        spin_loss(pc, pr, rc, rr, loss_type="ipo")
    with pytest.raises(ValueError, match="lam must be a finite number > 0"):
        spin_loss(pc, pr, rc, rr, lam=0)
    with pytest.raises(ValueError, match="ref_generated_logps has batch size 3"):
        spin_loss(pc, pr, rc, rr[:3])


def test_kto_errors() -> None:
    pc, pr, _, _ = random_logps(0)
    d = torch.ones(6, dtype=torch.bool)
    with pytest.raises(ValueError, match="desirable must have shape"):
        kto_loss(pc, pr, d[:5], 0.0)
    with pytest.raises(TypeError, match="use .bool()"):
        kto_loss(pc, pr, d.float(), 0.0)
    with pytest.raises(ValueError, match="kl_ref must be a scalar or have shape"):
        kto_loss(pc, pr, d, torch.zeros(3))
    with pytest.raises(TypeError, match="kl_ref must be a tensor or a number"):
        kto_loss(pc, pr, d, None)
    with pytest.raises(ValueError, match="undesirable_weight must be a finite number >= 0"):
        kto_loss(pc, pr, d, 0.0, undesirable_weight=-1.0)
    with pytest.raises(ValueError, match="beta"):
        kto_loss(pc, pr, d, 0.0, beta=0.0)
    with pytest.raises(ValueError, match="ref_logps has batch size 4"):
        kto_loss(pc, pr[:4], d, 0.0)


def test_kto_is_a_building_block_not_a_public_training_option() -> None:
    """No trainer or stage trains with KTO, so it is not offered next to the losses that do."""
    import self_rewarding_lm_pytorch as srlm
    from self_rewarding_lm_pytorch import trainers

    assert "kto_loss" not in srlm.__all__ and not hasattr(srlm, "kto_loss")
    assert "kto_loss" not in losses.__all__
    assert "kto" not in losses.DPO_LOSS_TYPES
    assert not [name for name in trainers.__all__ if "kto" in name.lower()]
    assert callable(losses.kto_loss)  # still importable from the module, and tested above
