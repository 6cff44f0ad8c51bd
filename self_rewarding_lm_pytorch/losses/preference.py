"""The pairwise preference losses: DPO and its variants, SPIN, and their output type.

* DPO (Rafailov et al. 2023, Eq. 7), cDPO (Mitchell 2023), robust DPO (Chowdhury et al.
  2024), length-normalised IPO (Azar et al. 2023, Eq. 17), SLiC-HF hinge (Zhao et al. 2023);
* SPIN (Chen et al. 2024, Eq. 4.7): DPO with the real response as chosen and the model's
  own generation as rejected.

They follow TRL's conventions (``docs/losses.md``) and share one core on the log-ratio
margin; the inputs are ``(batch,)`` sequence log-probs from
:func:`~self_rewarding_lm_pytorch.losses.sequence_logprobs`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["DPO_LOSS_TYPES", "SPIN_LOSS_TYPES", "PreferenceLossOutput", "dpo_loss", "spin_loss"]

DPO_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "robust", "ipo", "hinge")
# loss types that take label_smoothing (sigmoid: cDPO, robust: rDPO)
_SMOOTHED_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "robust")
SPIN_LOSS_TYPES: tuple[str, ...] = ("sigmoid", "hinge")


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
