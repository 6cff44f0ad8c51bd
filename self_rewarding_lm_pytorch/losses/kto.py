"""The Kahneman-Tversky Optimization loss (Ethayarajh et al. 2024, Eq. 8).

A tested building block: no trainer or pipeline stage of this library trains with it, so
it is not exported from the package top level (see ``docs/losses.md``).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .preference import _check_logps, _check_positive

__all__ = ["kto_loss"]


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
