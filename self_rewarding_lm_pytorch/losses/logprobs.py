"""Token and sequence log-probabilities, and the SFT/NLL loss, computed in chunks.

``token_logprobs`` / ``sequence_logprobs`` give ``log pi(y | x)`` of the DPO objective
(Rafailov et al. 2023, Eq. 7); ``nll_loss`` is the SFT loss and the NLL term of iterative
RPO (Pang et al. 2024, Eq. 3).  The logits are upcast to float32 at most
``_CHUNK_ELEMENTS`` at a time, and the backward pass recomputes the softmax instead of
keeping a float32 copy of the logits.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["nll_loss", "sequence_logprobs", "token_logprobs"]

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
