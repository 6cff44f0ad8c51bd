"""A character-level tokenizer for the demo task (the ``Tokenizer`` protocol of ``models.py``).

Id 0 is padding, id 1 is end-of-sequence; ids 2.. are the printable ASCII characters
(space, letters, digits, punctuation) and newline.  That covers every character of the
task's prompts, responses, judge prompts and judgements.
"""

from __future__ import annotations

import string
from collections.abc import Sequence

import torch

__all__ = ["VOCAB_CHARS", "DemoTokenizer"]

VOCAB_CHARS = (
    " \n" + string.ascii_lowercase + string.ascii_uppercase + string.digits + string.punctuation
)
"""The characters of the vocabulary, in id order from id 2."""


class DemoTokenizer:
    """Characters to ids and back; ``pad_id = 0``, ``eos_id = 1``, no BOS.

    ``format_prompt`` is the identity: the task's prompts end with ``>`` and the judge
    template ends with ``|``, so every prompt already marks where the answer begins.
    """

    pad_id: int | None = 0
    eos_id: int | None = 1
    num_special = 2

    def __init__(self) -> None:
        self.chars = VOCAB_CHARS
        self._to_id = {c: i + self.num_special for i, c in enumerate(self.chars)}

    @property
    def vocab_size(self) -> int:
        """Number of ids, specials included (the model's ``num_tokens``)."""
        return len(self.chars) + self.num_special

    def encode(self, text: str) -> list[int]:
        """Ids of the characters of ``text`` (no EOS appended)."""
        if not isinstance(text, str):
            raise TypeError(f"encode expects a str, got {type(text).__name__}")
        try:
            return [self._to_id[c] for c in text]
        except KeyError:
            bad = next(c for c in text if c not in self._to_id)
            raise ValueError(
                f"character {bad!r} at position {text.index(bad)} is not in the demo vocabulary "
                "(printable ASCII and newline); remove or replace it"
            ) from None

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """The text of ``ids``; padding and EOS ids are skipped."""
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        out = []
        for raw in ids:
            i = int(raw)
            if i != raw:
                raise TypeError(f"token ids must be integers, got {raw!r}")
            if not 0 <= i < self.vocab_size:
                raise ValueError(
                    f"token id {i} is outside the demo vocabulary [0, {self.vocab_size}); "
                    "the model and tokenizer vocabularies do not match"
                )
            if i >= self.num_special:
                out.append(self.chars[i - self.num_special])
        return "".join(out)

    def format_prompt(self, prompt: str) -> str:
        """The prompt unchanged (it already ends with its answer marker)."""
        return prompt
