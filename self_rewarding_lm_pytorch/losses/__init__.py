"""Pure loss functions over tensors: log-probabilities, SFT/NLL, DPO, SPIN and KTO.

The preference losses follow TRL's conventions (checked against a re-implementation of
TRL's formulas in ``tests/test_losses.py``); see ``docs/losses.md``.  ``kto_loss`` is a
building block only: no trainer or pipeline stage of this library uses it.

Nothing here touches a model, an optimizer or accelerate: every function maps tensors to
tensors, so each one can be checked against the paper's equation on hand-made inputs.

Modules: :mod:`.logprobs` (token/sequence log-probs, the chunked log-softmax, the NLL
loss), :mod:`.preference` (DPO and its variants, SPIN), :mod:`.kto` (KTO).

Conventions (see ``docs/architecture.md``):

* ``logits`` are ``(batch, seq, vocab)`` and ``input_ids`` ``(batch, seq)``, right-padded.
* ``response_mask[b, t]`` is true when ``input_ids[b, t]`` is a response token; its
  log-probability ``log p(input_ids[b, t] | input_ids[b, :t])`` is read from
  ``logits[b, t - 1]``.  Position 0 has no context, so it can never be a response token.
* Sequence log-probabilities (the ``*_logps`` arguments of the preference losses) are
  ``(batch,)`` tensors, typically from :func:`sequence_logprobs`.
* All arithmetic runs in float32 or wider: bf16/fp16 inputs are upcast.
"""

from .kto import kto_loss as kto_loss  # importable, not exported (a building block)
from .logprobs import nll_loss, sequence_logprobs, token_logprobs
from .preference import (
    DPO_LOSS_TYPES,
    SPIN_LOSS_TYPES,
    PreferenceLossOutput,
    dpo_loss,
    spin_loss,
)

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
