"""Pure loss functions over tensors: log-probabilities, SFT/NLL, DPO, SPIN and KTO.

The preference losses follow TRL's conventions (checked against a re-implementation of
TRL's formulas in ``tests/test_losses.py``); see ``docs/losses.md``.  ``kto_loss`` is a
building block only: no trainer or pipeline stage of this library uses it.

Nothing here touches a model, an optimizer or accelerate: every function maps tensors to
tensors, so each one can be checked against the paper's equation on hand-made inputs.

Conventions (see ``docs/architecture.md``):

* ``logits`` are ``(batch, seq, vocab)`` and ``input_ids`` ``(batch, seq)``, right-padded.
* ``response_mask[b, t]`` is true when ``input_ids[b, t]`` is a response token; its
  log-probability ``log p(input_ids[b, t] | input_ids[b, :t])`` is read from
  ``logits[b, t - 1]``.  Position 0 has no context, so it can never be a response token.
* Sequence log-probabilities (the ``*_logps`` arguments of the preference losses) are
  ``(batch,)`` tensors, typically from :func:`sequence_logprobs`.
* All arithmetic runs in float32 or wider: bf16/fp16 inputs are upcast.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "DPO_LOSS_TYPES",
    "SPIN_LOSS_TYPES",
    "PreferenceLossOutput",
    "dpo_loss",
    "nll_loss",
    "sequence_logprobs",
    "spin_loss",
    "token_logprobs",
]

DPO_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "robust", "ipo", "hinge")
# loss types that take label_smoothing (sigmoid: cDPO, robust: rDPO)
_SMOOTHED_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "robust")
SPIN_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "hinge")

# Upper bound on the number of logits upcast at once (per chunk of positions): 2**22
# elements is 16 MiB in float32, so the float32 working set stays small whatever the
# vocabulary or batch size.
_CHUNK_ELEMENTS = 1 << 22


# --------------------------------------------------------------------------- helpers
def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float32 for half types, the input dtype for float32/float64."""
    return torch.promote_types(dtype, torch.float32)


def _chunks(n_rows: int, vocab: int) -> list[tuple[int, int]]:
    """``(start, stop)`` row ranges holding at most ``_CHUNK_ELEMENTS`` logits (>= 1 row)."""
    step = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    return [(start, min(start + step, n_rows)) for start in range(0, n_rows, step)]


class _TargetLogprobs(torch.autograd.Function):
    """``out[n] = log_softmax(logits[n])[targets[n]]`` for flat ``(N, V)`` logits.

    Computed chunk by chunk with the fused ``log_softmax(..., dtype=float32)`` kernel (the
    upcast happens inside the kernel).  The backward pass recomputes the softmax from the
    saved low-precision logits, so autograd keeps no float32 copy of the ``(N, V)``
    logits alive (the plain ``logits.float().log_softmax(-1)`` path keeps one).
    """

    @staticmethod
    def forward(ctx, logits: Tensor, targets: Tensor) -> Tensor:  # type: ignore[override]
        cdtype = _compute_dtype(logits.dtype)
        n_rows, vocab = logits.shape
        out = torch.empty(n_rows, dtype=cdtype, device=logits.device)
        for start, stop in _chunks(n_rows, vocab):
            logp = torch.log_softmax(logits[start:stop], dim=-1, dtype=cdtype)
            out[start:stop] = logp.gather(-1, targets[start:stop, None]).squeeze(-1)
        ctx.save_for_backward(logits, targets)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, None]:  # type: ignore[override]
        if not ctx.needs_input_grad[0]:
            return None, None
        logits, targets = ctx.saved_tensors
        cdtype = _compute_dtype(logits.dtype)
        n_rows, vocab = logits.shape
        grad_logits = torch.empty_like(logits)
        grad_out = grad_out.to(cdtype)
        for start, stop in _chunks(n_rows, vocab):
            g = grad_out[start:stop, None]
            # d/dx log_softmax(x)[y] = onehot(y) - softmax(x)
            grad = torch.softmax(logits[start:stop], dim=-1, dtype=cdtype).mul_(-g)
            grad.scatter_add_(-1, targets[start:stop, None], g)
            grad_logits[start:stop] = grad
        return grad_logits, None


def _check_logits_and_ids(logits: Tensor, input_ids: Tensor) -> None:
    if not isinstance(logits, Tensor):
        raise TypeError(f"logits must be a torch.Tensor, got {type(logits).__name__}")
    if not isinstance(input_ids, Tensor):
        raise TypeError(f"input_ids must be a torch.Tensor, got {type(input_ids).__name__}")
    if logits.ndim != 3:
        raise ValueError(
            f"logits must have shape (batch, seq, vocab), got {tuple(logits.shape)}; "
            "pass the model's full output, adding a batch dimension with [None] if needed"
        )
    if not logits.is_floating_point():
        raise TypeError(f"logits must be floating point, got {logits.dtype}")
    if input_ids.ndim != 2:
        raise ValueError(
            f"input_ids must have shape (batch, seq), got {tuple(input_ids.shape)}; "
            "add a batch dimension with input_ids[None] for a single sequence"
        )
    if input_ids.dtype == torch.bool or input_ids.is_floating_point() or input_ids.is_complex():
        raise TypeError(f"input_ids must be integer token ids, got {input_ids.dtype}; use .long()")
    if logits.shape[:2] != input_ids.shape:
        raise ValueError(
            f"logits {tuple(logits.shape)} and input_ids {tuple(input_ids.shape)} disagree on "
            "(batch, seq); compute the logits from these exact input_ids"
        )
    if logits.shape[2] == 0:
        raise ValueError("logits have an empty vocabulary dimension (vocab = 0)")


def _token_logprobs_unchecked(
    logits: Tensor, input_ids: Tensor, targets_valid: Tensor | None
) -> Tensor:
    """Core of :func:`token_logprobs`; ``targets_valid`` (B, T) marks positions to check."""
    batch, seq, vocab = logits.shape
    cdtype = _compute_dtype(logits.dtype)
    if seq == 0 or batch == 0:
        return logits.new_zeros((batch, seq), dtype=cdtype)
    # targets[b, t] = input_ids[b, t + 1]: the token predicted by logits[b, t].  The last
    # position predicts nothing; it gets target 0 and its value is dropped below.
    targets = input_ids.new_zeros((batch, seq), dtype=torch.long)
    targets[:, :-1] = input_ids[:, 1:]
    if targets_valid is not None:
        # positions the caller does not read may hold any garbage id (e.g. -100 labels)
        targets[:, :-1].masked_fill_(~targets_valid[:, 1:], 0)
    if targets.numel():
        bad = (targets < 0) | (targets >= vocab)
        if bool(bad.any()):
            b, t = (int(i) for i in bad.nonzero()[0])
            raise ValueError(
                f"input_ids[{b}, {t + 1}] = {int(input_ids[b, t + 1])} is outside the "
                f"vocabulary [0, {vocab}); fix the tokenizer/model vocabulary mismatch or "
                "replace padding ids with a valid id such as 0"
            )
    flat_logits = logits.reshape(batch * seq, vocab)
    lp = _TargetLogprobs.apply(flat_logits, targets.reshape(-1)).view(batch, seq)
    return torch.cat([lp.new_zeros(batch, 1), lp[:, :-1]], dim=1)


def _as_bool_mask(response_mask: Tensor, shape: torch.Size) -> Tensor:
    if not isinstance(response_mask, Tensor):
        raise TypeError(f"response_mask must be a torch.Tensor, got {type(response_mask).__name__}")
    if response_mask.shape != shape:
        raise ValueError(
            f"response_mask must have the shape of input_ids {tuple(shape)}, got "
            f"{tuple(response_mask.shape)}"
        )
    if response_mask.dtype == torch.bool:
        return response_mask
    if response_mask.is_floating_point() or response_mask.is_complex():
        raise TypeError(
            f"response_mask must be a bool tensor, got {response_mask.dtype}; use mask.bool()"
        )
    if bool(((response_mask != 0) & (response_mask != 1)).any()):
        raise ValueError("response_mask must hold only 0/1 (or True/False) values")
    return response_mask.bool()


def _masked_token_logprobs(
    logits: Tensor, input_ids: Tensor, response_mask: Tensor
) -> tuple[Tensor, Tensor]:
    """Validated token log-probs with zeros outside the mask, and the bool mask."""
    _check_logits_and_ids(logits, input_ids)
    mask = _as_bool_mask(response_mask, input_ids.shape)
    if mask.shape[0] == 0:
        raise ValueError("the batch is empty (batch size 0); pass at least one sequence")
    if mask.shape[1] and bool(mask[:, 0].any()):
        rows = mask[:, 0].nonzero().flatten().tolist()
        raise ValueError(
            f"response_mask[:, 0] is True in rows {rows}: the first token has no context, so "
            "it cannot be a response token; every sequence must start with a prompt token "
            "(e.g. BOS)"
        )
    empty = ~mask.any(dim=1)
    if bool(empty.any()):
        rows = empty.nonzero().flatten().tolist()
        raise ValueError(
            f"rows {rows} of response_mask have no response token; drop those examples or "
            "check that the response was not truncated away by max_seq_len"
        )
    tok = _token_logprobs_unchecked(logits, input_ids, mask)
    # where (not multiply): a -inf log-prob outside the mask must not turn into NaN
    return torch.where(mask, tok, torch.zeros((), dtype=tok.dtype, device=tok.device)), mask


# --------------------------------------------------------------------------- log-probs
def token_logprobs(logits: Tensor, input_ids: Tensor) -> Tensor:
    """Per-token log-probabilities of ``input_ids`` under ``logits``.

    ``out[b, t] = log softmax(logits[b, t - 1])[input_ids[b, t]]``, i.e.
    ``log p(x_t | x_<t)``, for ``t >= 1``; ``out[:, 0] = 0`` (no context).

    Computed with ``log_softmax`` + ``gather`` in float32 (float64 for float64 input), in
    chunks so that bf16/fp16 logits are never upcast all at once; the backward pass
    recomputes the softmax instead of storing a float32 copy of the logits.

    Args:
        logits: ``(batch, seq, vocab)`` floating logits.
        input_ids: ``(batch, seq)`` integer token ids in ``[0, vocab)`` (the id at
            position 0 is not read).

    Returns:
        ``(batch, seq)`` log-probabilities in float32 (or float64).
    """
    _check_logits_and_ids(logits, input_ids)
    return _token_logprobs_unchecked(logits, input_ids, None)


def sequence_logprobs(
    logits: Tensor, input_ids: Tensor, response_mask: Tensor, *, average: bool = False
) -> Tensor:
    """Log-probability of each row's response: ``sum_t log p(y_t | x, y_<t)``.

    This is ``log pi(y | x)`` of the DPO objective (Rafailov et al. 2023, Eq. 7), summed
    over positions where ``response_mask`` is true (``average=True`` divides by the
    number of response tokens, as in IPO/SimPO-style length normalisation).

    Token ids outside ``response_mask`` (prompt, padding) are never used as targets, so
    padding may hold any id, including ones outside the vocabulary.

    Args:
        logits: ``(batch, seq, vocab)``.
        input_ids: ``(batch, seq)`` integer ids.
        response_mask: ``(batch, seq)`` bool; ``response_mask[:, 0]`` must be False and
            every row needs at least one response token.
        average: mean instead of sum over response tokens.

    Returns:
        ``(batch,)`` float32 (or float64) tensor.
    """
    tok, mask = _masked_token_logprobs(logits, input_ids, response_mask)
    total = tok.sum(dim=1)
    if average:
        total = total / mask.sum(dim=1).to(total.dtype)
    return total


def nll_loss(logits: Tensor, input_ids: Tensor, response_mask: Tensor) -> Tensor:
    """Supervised fine-tuning loss: mean negative log-likelihood per response token.

    ``L = -(1 / sum_b |y_b|) * sum_b sum_{t in y_b} log p(x_{b,t} | x_{b,<t})`` — every
    response token in the batch weighs the same (the SFT loss, and the NLL term of
    iterative RPO, Pang et al. 2024, Eq. 3).

    Returns:
        scalar float32 (or float64) tensor.
    """
    tok, mask = _masked_token_logprobs(logits, input_ids, response_mask)
    return -tok.sum() / mask.sum().to(tok.dtype)


# --------------------------------------------------------------------------- preference
@dataclass
class PreferenceLossOutput:
    """Per-example preference losses and the implicit rewards (detached).

    Attributes:
        losses: ``(batch,)`` per-pair loss; the training loss is ``losses.mean()``.
        chosen_rewards: ``(batch,)`` ``beta * (log pi(y_c|x) - log pi_ref(y_c|x))``.
        rejected_rewards: ``(batch,)`` same for the rejected response.
    """

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor

    @property
    def reward_margins(self) -> Tensor:
        """``chosen_rewards - rejected_rewards`` (detached)."""
        return self.chosen_rewards - self.rejected_rewards

    @property
    def reward_accuracies(self) -> Tensor:
        """1.0 where the chosen reward is strictly larger, else 0.0."""
        return (self.chosen_rewards > self.rejected_rewards).to(self.chosen_rewards.dtype)


def _check_positive(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")
    return float(value)


def _check_logps(tensors: dict[str, Tensor]) -> tuple[Tensor, ...]:
    """Check that sequence log-prob tensors are floating ``(batch,)`` of one shape."""
    shape = None
    first = ""
    for name, t in tensors.items():
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point log-probabilities, got {t.dtype}")
        if t.ndim != 1:
            raise ValueError(
                f"{name} must have shape (batch,), got {tuple(t.shape)}; pass per-sequence "
                "log-probs from sequence_logprobs(), not per-token values"
            )
        if shape is None:
            shape, first = t.shape, name
        elif t.shape != shape:
            raise ValueError(
                f"{name} has batch size {t.shape[0]} but {first} has {shape[0]}; all "
                "log-prob tensors must describe the same pairs"
            )
    dtype = torch.float32
    for t in tensors.values():
        dtype = torch.promote_types(dtype, t.dtype)
    return tuple(t.to(dtype) for t in tensors.values())


def _check_lengths(name: str, lengths: Tensor | None, like: Tensor) -> Tensor:
    """Response token counts ``(batch,)`` > 0, as a tensor of ``like``'s dtype."""
    if not isinstance(lengths, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(lengths).__name__}")
    if lengths.shape != like.shape:
        raise ValueError(
            f"{name} must have shape {tuple(like.shape)} (one response length per pair), got "
            f"{tuple(lengths.shape)}"
        )
    if lengths.dtype == torch.bool or lengths.is_complex():
        raise TypeError(f"{name} must hold token counts, got {lengths.dtype}")
    lengths = lengths.to(device=like.device, dtype=like.dtype)
    if bool((lengths <= 0).any()) or not bool(torch.isfinite(lengths).all()):
        raise ValueError(
            f"{name} must be > 0 (the number of response tokens of each sequence); "
            "compute them as response_mask.sum(dim=1)"
        )
    return lengths


def _pairwise_preference_loss(
    policy_pos: Tensor,
    policy_neg: Tensor,
    ref_pos: Tensor,
    ref_neg: Tensor,
    *,
    beta: float,
    loss_type: str,
    label_smoothing: float,
    pos_lengths: Tensor | None = None,
    neg_lengths: Tensor | None = None,
) -> PreferenceLossOutput:
    """Shared core of DPO and SPIN on the log-ratio margin ``h``.

    ``h = (pi_pos - ref_pos) - (pi_neg - ref_neg)``;
    sigmoid: ``-(1 - eps) logsigmoid(beta h) - eps logsigmoid(-beta h)``;
    robust: ``(-(1 - eps) logsigmoid(beta h) + eps logsigmoid(-beta h)) / (1 - 2 eps)``;
    ipo: ``(h_len - 1 / (2 beta))^2`` with each log-ratio divided by its length;
    hinge: ``relu(1 - beta h)``.
    """
    pos_ratio = policy_pos - ref_pos
    neg_ratio = policy_neg - ref_neg
    h = pos_ratio - neg_ratio
    eps = label_smoothing
    if loss_type == "sigmoid":
        losses = -F.logsigmoid(beta * h)
        if eps:
            losses = (1.0 - eps) * losses - eps * F.logsigmoid(-beta * h)
    elif loss_type == "robust":
        losses = (-(1.0 - eps) * F.logsigmoid(beta * h) + eps * F.logsigmoid(-beta * h)) / (
            1.0 - 2.0 * eps
        )
    elif loss_type == "ipo":
        assert pos_lengths is not None and neg_lengths is not None
        h_per_token = pos_ratio / pos_lengths - neg_ratio / neg_lengths
        losses = (h_per_token - 1.0 / (2.0 * beta)) ** 2
    elif loss_type == "hinge":
        losses = torch.relu(1.0 - beta * h)
    else:  # callers validate; kept as a guard
        raise ValueError(f"unknown loss_type {loss_type!r}")
    return PreferenceLossOutput(
        losses=losses,
        chosen_rewards=(beta * pos_ratio).detach(),
        rejected_rewards=(beta * neg_ratio).detach(),
    )


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    loss_type: str = "sigmoid",
    label_smoothing: float = 0.0,
    chosen_lengths: Tensor | None = None,
    rejected_lengths: Tensor | None = None,
) -> PreferenceLossOutput:
    """Direct Preference Optimization loss per pair.

    With ``r_c = log pi(y_c|x) - log pi_ref(y_c|x)``, ``r_r`` the same for ``y_r`` and
    ``h = r_c - r_r``:

    * ``"sigmoid"`` — DPO, Rafailov et al. 2023, Eq. 7: ``-log sigmoid(beta h)``; with
      ``label_smoothing = eps > 0`` it is conservative DPO (cDPO, Mitchell 2023; TRL's
      former ``"sigmoid"`` with ``label_smoothing``):
      ``-(1-eps) log sigmoid(beta h) - eps log sigmoid(-beta h)``.
    * ``"robust"`` — robust DPO (rDPO, Chowdhury et al. 2024; TRL's ``"robust"``),
      unbiased when labels are flipped with probability ``eps = label_smoothing``:
      ``(-(1-eps) log sigmoid(beta h) + eps log sigmoid(-beta h)) / (1 - 2 eps)``.
    * ``"ipo"`` — IPO, Azar et al. 2023, Eq. 17, with TRL's length normalisation (each
      log-ratio divided by its response length, the form the IPO authors confirmed):
      ``(r_c / |y_c| - r_r / |y_r| - 1 / (2 beta))^2``; ``beta`` is the paper's ``tau``.
      Needs ``chosen_lengths`` and ``rejected_lengths``.
    * ``"hinge"`` — SLiC-HF calibration loss, Zhao et al. 2023: ``max(0, 1 - beta h)``.

    Args:
        policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps:
            ``(batch,)`` summed sequence log-probs (:func:`sequence_logprobs`).
        beta: KL-penalty strength, > 0 (paper of Yuan et al. 2024: 0.1).
        loss_type: one of :data:`DPO_LOSS_TYPES`.
        label_smoothing: assumed label-noise rate in ``[0, 0.5)``; sigmoid and robust only.
        chosen_lengths, rejected_lengths: ``(batch,)`` response token counts (> 0), e.g.
            ``response_mask.sum(dim=1)``; needed by ``"ipo"``, ignored otherwise.

    Returns:
        :class:`PreferenceLossOutput` (losses in float32 or wider).
    """
    if loss_type not in DPO_LOSS_TYPES:
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; valid: {', '.join(DPO_LOSS_TYPES)}")
    beta = _check_positive("beta", beta)
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, (int, float)):
        raise TypeError(f"label_smoothing must be a number, got {type(label_smoothing).__name__}")
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(
            f"label_smoothing must lie in [0, 0.5), got {label_smoothing}; it is the assumed "
            "probability that a preference label is flipped"
        )
    if label_smoothing and loss_type not in _SMOOTHED_LOSS_TYPES:
        raise ValueError(
            f"label_smoothing is only defined for loss_type='sigmoid' (cDPO) and 'robust' "
            f"(rDPO), got loss_type={loss_type!r}; set label_smoothing=0.0"
        )
    pc, pr, rc, rr = _check_logps(
        {
            "policy_chosen_logps": policy_chosen_logps,
            "policy_rejected_logps": policy_rejected_logps,
            "ref_chosen_logps": ref_chosen_logps,
            "ref_rejected_logps": ref_rejected_logps,
        }
    )
    lc = lr = None
    if loss_type == "ipo":
        if chosen_lengths is None or rejected_lengths is None:
            raise ValueError(
                "loss_type='ipo' divides each log-ratio by its response length: pass "
                "chosen_lengths and rejected_lengths (response token counts, e.g. "
                "response_mask.sum(dim=1))"
            )
        lc = _check_lengths("chosen_lengths", chosen_lengths, pc)
        lr = _check_lengths("rejected_lengths", rejected_lengths, pc)
    return _pairwise_preference_loss(
        pc,
        pr,
        rc,
        rr,
        beta=beta,
        loss_type=loss_type,
        label_smoothing=float(label_smoothing),
        pos_lengths=lc,
        neg_lengths=lr,
    )


def spin_loss(
    policy_real_logps: Tensor,
    policy_generated_logps: Tensor,
    ref_real_logps: Tensor,
    ref_generated_logps: Tensor,
    *,
    lam: float = 0.1,
    loss_type: str = "sigmoid",
) -> PreferenceLossOutput:
    """Self-Play fIne-tuNing loss per example (Chen et al. 2024, Eq. 4.7).

    ``l(lam * ((log p(y|x) - log p_t(y|x)) - (log p(y'|x) - log p_t(y'|x))))`` where ``y``
    is the real (SFT) response, ``y'`` the opponent's (previous iterate's) generation and
    ``p_t`` that previous iterate (the reference).  ``"sigmoid"`` uses the logistic loss
    ``l(t) = log(1 + exp(-t))``; ``"hinge"`` is ``relu(1 - lam * h)`` as in the official
    SPIN code.  It is DPO with real as chosen and generated as rejected, so the returned
    ``chosen_rewards`` are the real ones and ``rejected_rewards`` the generated ones.

    Args:
        lam: the regularisation parameter lambda, > 0.
        loss_type: one of :data:`SPIN_LOSS_TYPES`.
    """
    if loss_type not in SPIN_LOSS_TYPES:
        raise ValueError(
            f"unknown SPIN loss_type {loss_type!r}; valid: {', '.join(SPIN_LOSS_TYPES)}"
        )
    lam = _check_positive("lam", lam)
    p_real, p_gen, r_real, r_gen = _check_logps(
        {
            "policy_real_logps": policy_real_logps,
            "policy_generated_logps": policy_generated_logps,
            "ref_real_logps": ref_real_logps,
            "ref_generated_logps": ref_generated_logps,
        }
    )
    return _pairwise_preference_loss(
        p_real, p_gen, r_real, r_gen, beta=lam, loss_type=loss_type, label_smoothing=0.0
    )


def kto_loss(
    policy_logps: Tensor,
    ref_logps: Tensor,
    desirable: Tensor,
    kl_ref: Tensor | float,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> Tensor:
    """Kahneman-Tversky Optimization loss per example (Ethayarajh et al. 2024, Eq. 8).

    A building block: no trainer or pipeline stage of this library trains with it.

    With ``r = log pi(y|x) - log pi_ref(y|x)`` and reference point
    ``z0 = max(mean(kl_ref), 0)`` (detached, no gradient; as in TRL's ``KTOTrainer``, the
    batch mean of the mismatched-pair log-ratios, clamped after averaging):

    * desirable ``y``:   ``w_d * (1 - sigmoid(beta * (r - z0)))``
    * undesirable ``y``: ``w_u * (1 - sigmoid(beta * (z0 - r)))``

    Args:
        policy_logps, ref_logps: ``(batch,)`` sequence log-probs.
        desirable: ``(batch,)`` bool (or 0/1 integers), True for desirable outputs.
        kl_ref: the KL estimate: a scalar (tensor or number), or a ``(batch,)`` tensor of
            per-example log-ratios ``log pi(y'|x) - log pi_ref(y'|x)`` on mismatched
            pairs, averaged over the batch before clamping.
        beta: > 0.  desirable_weight, undesirable_weight: ``lambda_D``, ``lambda_U`` >= 0.

    Returns:
        ``(batch,)`` per-example losses (float32 or wider).
    """
    beta = _check_positive("beta", beta)
    for name, w in (
        ("desirable_weight", desirable_weight),
        ("undesirable_weight", undesirable_weight),
    ):
        if isinstance(w, bool) or not isinstance(w, (int, float)):
            raise TypeError(f"{name} must be a number, got {type(w).__name__}")
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {w}")
    policy, ref = _check_logps({"policy_logps": policy_logps, "ref_logps": ref_logps})
    if not isinstance(desirable, Tensor):
        raise TypeError(f"desirable must be a bool torch.Tensor, got {type(desirable).__name__}")
    if desirable.shape != policy.shape:
        raise ValueError(
            f"desirable must have shape {tuple(policy.shape)} like policy_logps, got "
            f"{tuple(desirable.shape)}"
        )
    if desirable.dtype != torch.bool:
        if desirable.is_floating_point() or desirable.is_complex():
            raise TypeError(f"desirable must be a bool tensor, got {desirable.dtype}; use .bool()")
        if bool(((desirable != 0) & (desirable != 1)).any()):
            raise ValueError("desirable must hold only 0/1 (or True/False) values")
        desirable = desirable.bool()
    if isinstance(kl_ref, Tensor):
        if not kl_ref.is_floating_point():
            raise TypeError(f"kl_ref must be floating point, got {kl_ref.dtype}")
        if kl_ref.numel() == 1:
            z0 = kl_ref.detach().reshape(())
        elif kl_ref.shape == policy.shape:
            z0 = kl_ref.detach().mean()
        else:
            raise ValueError(
                f"kl_ref must be a scalar or have shape {tuple(policy.shape)}, got "
                f"{tuple(kl_ref.shape)}"
            )
        z0 = z0.to(device=policy.device, dtype=policy.dtype)
    elif isinstance(kl_ref, (int, float)) and not isinstance(kl_ref, bool):
        z0 = torch.tensor(float(kl_ref), dtype=policy.dtype, device=policy.device)
    else:
        raise TypeError(f"kl_ref must be a tensor or a number, got {type(kl_ref).__name__}")
    z0 = z0.clamp(min=0)
    logratio = policy - ref
    desirable_losses = desirable_weight * (1.0 - torch.sigmoid(beta * (logratio - z0)))
    undesirable_losses = undesirable_weight * (1.0 - torch.sigmoid(beta * (z0 - logratio)))
    return torch.where(desirable, desirable_losses, undesirable_losses)
