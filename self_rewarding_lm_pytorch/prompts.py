"""New-prompt generation for self-instruction creation (Yuan et al. 2024, section 2.2).

A model is few-shot prompted with existing instructions (paper: 8 shots, 6 from the IFT
seed prompts and 2 from previously generated ones) and asked for one new task. Its
answers are parsed and passed through Self-Instruct style filters (Wang et al. 2023):
length bounds (more than three words), banned keywords, a banned start ("Write a
program"), a leading-punctuation and a leading non-ASCII check, exact duplicates, and
ROUGE-L similarity against every existing and already accepted prompt (:mod:`.rouge`).
"""

from __future__ import annotations

import re
import string
import warnings
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from .generation import GenerationBackend, GenerationConfig, as_backend
from .models import CausalLM, wrap_tokenizer
from .rouge import _Index, lcs_length, rouge_l, rouge_tokens
from .utils import make_generator

__all__ = [
    "BEGIN",
    "DEFAULT_BANNED_KEYWORDS",
    "DEFAULT_BANNED_PREFIXES",
    "DEFAULT_HEADER",
    "DEFAULT_INSTRUCTION",
    "END",
    "FilteredPrompts",
    "PromptFilter",
    "PromptGenerationResult",
    "build_fewshot_prompt",
    "filter_prompts",
    "generate_prompts",
    "lcs_length",
    "parse_generated_prompt",
    "rouge_l",
    "rouge_tokens",
]

BEGIN, END = "<begin>", "</end>"
DEFAULT_HEADER = "Below are sample tasks from user."
DEFAULT_INSTRUCTION = f"Come up with one new task, wrapped with {BEGIN} and {END}"

#: Self-Instruct's keyword blacklist (tasks a text-only model cannot do)
DEFAULT_BANNED_KEYWORDS: tuple[str, ...] = (
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files",
    "map", "maps", "draw", "plot", "go to", "video", "audio", "music", "flowchart",
    "diagram",
)  # fmt: skip

#: Self-Instruct drops tasks that start like this (case-insensitive): models tend to turn
#: any task into one, and whether to write the program or give its output is unclear
DEFAULT_BANNED_PREFIXES: tuple[str, ...] = ("write a program",)


# ---------------------------------------------------------------------------- few-shot


def build_fewshot_prompt(
    examples: Sequence[str],
    *,
    instruction: str = DEFAULT_INSTRUCTION,
    header: str = DEFAULT_HEADER,
) -> str:
    """The few-shot prompt asking for a new task (paper section 2.2)::

    Below are sample tasks from user.
    1. <begin>first example</end>
    ...
    8. <begin>eighth example</end>
    Come up with one new task, wrapped with <begin> and </end>
    """
    if isinstance(examples, str):
        raise TypeError("examples must be a list of prompts, not a single string")
    if not examples:
        raise ValueError("build_fewshot_prompt needs at least one example prompt")
    lines = [header] if header else []
    for i, ex in enumerate(examples):
        if not isinstance(ex, str):
            raise TypeError(f"example {i} must be a string, got {type(ex).__name__}")
        if BEGIN in ex or END in ex:
            raise ValueError(
                f"example {i} contains the marker {BEGIN!r} or {END!r}, which would break "
                "parsing of the answer; remove such prompts from the examples"
            )
        lines.append(f"{i + 1}. {BEGIN}{ex.strip()}{END}")
    lines.append(instruction)
    return "\n".join(lines)


def parse_generated_prompt(text: str) -> str | None:
    """The new task in a model's answer: the text between the first ``<begin>`` and the
    next ``</end>`` (or, when the answer was primed with ``<begin>``, the text before the
    first ``</end>``). ``None`` when there is no complete, non-empty task."""
    if not isinstance(text, str):
        raise TypeError(f"expected the generated text (str), got {type(text).__name__}")
    start = text.find(BEGIN)
    if start >= 0:
        body_start = start + len(BEGIN)
        stop = text.find(END, body_start)
        body = text[body_start:stop] if stop >= 0 else None
    else:
        stop = text.find(END)
        body = text[:stop] if stop >= 0 else None
    if body is None:
        return None
    body = body.strip()
    return body or None


# ---------------------------------------------------------------------------- filters


class FilteredPrompts(list):
    """The accepted prompts (a ``list[str]``) plus ``reasons``: rejections counted by reason."""

    def __init__(self, prompts: Iterable[str] = (), reasons: dict[str, int] | None = None):
        super().__init__(prompts)
        self.reasons: dict[str, int] = dict(reasons or {})


class PromptFilter:
    """Self-Instruct filters with memory: accepted prompts join the comparison pool.

    Reasons: ``"empty"``, ``"too_short"`` (fewer than ``min_words`` whitespace-separated
    words; the default 4 drops Self-Instruct's "three words or fewer"), ``"too_long"``
    (more than ``max_words``), ``"banned_keyword"`` (whole word or phrase,
    case-insensitive), ``"banned_prefix"`` (starts with one of ``banned_prefixes``, case
    and spacing ignored), ``"starts_with_punctuation"``, ``"starts_with_non_ascii"`` (with
    ``ascii_start``: Self-Instruct keeps English tasks), ``"duplicate"`` (same words up to
    case, punctuation and whitespace) and ``"too_similar"`` (ROUGE-L > ``max_rouge_l`` with
    an existing or previously accepted prompt).
    """

    def __init__(
        self,
        existing: Iterable[str] = (),
        *,
        min_words: int = 4,
        max_words: int = 150,
        max_rouge_l: float = 0.7,
        banned_keywords: Sequence[str] = DEFAULT_BANNED_KEYWORDS,
        banned_prefixes: Sequence[str] = DEFAULT_BANNED_PREFIXES,
        ascii_start: bool = True,
    ) -> None:
        if not isinstance(min_words, int) or not isinstance(max_words, int) or min_words < 0:
            raise ValueError(f"min_words/max_words must be ints >= 0, got {min_words}, {max_words}")
        if max_words < min_words:
            raise ValueError(f"max_words ({max_words}) must be >= min_words ({min_words})")
        if not 0 <= max_rouge_l <= 1:
            raise ValueError(f"max_rouge_l must lie in [0, 1], got {max_rouge_l}")
        if isinstance(banned_keywords, str):
            raise TypeError("banned_keywords must be a list of words, not a single string")
        if isinstance(banned_prefixes, str):
            raise TypeError("banned_prefixes must be a list of phrases, not a single string")
        self.min_words, self.max_words, self.max_rouge_l = min_words, max_words, max_rouge_l
        self._banned = (
            re.compile(
                r"\b(?:" + "|".join(re.escape(k) for k in banned_keywords) + r")\b", re.IGNORECASE
            )
            if banned_keywords
            else None
        )
        self._prefixes = tuple(" ".join(p.lower().split()) for p in banned_prefixes if p.strip())
        self.ascii_start = ascii_start
        self._seen: set[str] = set()
        self._index = _Index()
        self.reasons: Counter[str] = Counter()
        for p in existing:
            self.add(p)

    @staticmethod
    def _key(text: str) -> str:
        return " ".join(rouge_tokens(text)) or " ".join(text.split())

    def add(self, prompt: str) -> None:
        """Add ``prompt`` to the comparison pool without checking it."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompts must be strings, got {type(prompt).__name__}")
        self._seen.add(self._key(prompt))
        self._index.add(rouge_tokens(prompt))

    def reject_reason(self, prompt: str) -> str | None:
        """Why ``prompt`` would be rejected now, or ``None``; does not add it."""
        if not isinstance(prompt, str):
            raise TypeError(f"candidate prompts must be strings, got {type(prompt).__name__}")
        text = prompt.strip()
        if not text:
            return "empty"
        n_words = len(text.split())
        if n_words < self.min_words:
            return "too_short"
        if n_words > self.max_words:
            return "too_long"
        if self._banned is not None and self._banned.search(text):
            return "banned_keyword"
        if self._prefixes and " ".join(text.lower().split()).startswith(self._prefixes):
            return "banned_prefix"
        if text[0] in string.punctuation:
            return "starts_with_punctuation"
        if self.ascii_start and not text[0].isascii():
            return "starts_with_non_ascii"
        if self._key(text) in self._seen:
            return "duplicate"
        if self.max_rouge_l < 1 and self._index.max_rouge_exceeds(
            rouge_tokens(text), self.max_rouge_l
        ):
            return "too_similar"
        return None

    def __call__(self, prompt: str) -> bool:
        """Check ``prompt``; accept it (adding it to the pool) or count the reason."""
        reason = self.reject_reason(prompt)
        if reason is None:
            self.add(prompt.strip())
            return True
        self.reasons[reason] += 1
        return False


def filter_prompts(
    candidates: Sequence[str], existing: Sequence[str] = (), **settings: Any
) -> FilteredPrompts:
    """Candidates that pass the Self-Instruct filters against ``existing`` and each other
    (in order: an accepted candidate joins the pool). ``settings`` are those of
    :class:`PromptFilter` (``min_words``, ``max_words``, ``max_rouge_l``, ``banned_keywords``,
    ``banned_prefixes``, ``ascii_start``). Returns a list of the accepted, stripped prompts
    with ``.reasons``, the rejections counted by reason."""
    if isinstance(candidates, str) or isinstance(existing, str):
        raise TypeError("candidates and existing must be lists of strings, not a single string")
    f = PromptFilter(existing, **settings)
    accepted = [c.strip() for c in candidates if f(c)]
    return FilteredPrompts(accepted, dict(f.reasons))


# ---------------------------------------------------------------------------- generation


@dataclass
class PromptGenerationResult:
    """New prompts and how they were obtained: ``attempts`` generations, ``parse_failures``
    answers without a complete task, ``filtered`` rejections by reason, ``surplus`` parsed
    answers left unchecked because enough prompts were already accepted, ``shots_dropped``
    examples left out so that a few-shot prompt fits the context. Every attempt is counted
    once: ``attempts == parse_failures + len(prompts) + sum(filtered) + surplus``."""

    prompts: list[str]
    attempts: int = 0
    parse_failures: int = 0
    filtered: dict[str, int] = field(default_factory=dict)
    surplus: int = 0
    shots_dropped: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _randperm(n: int, generator: torch.Generator | None) -> list[int]:
    if generator is None:
        return torch.randperm(n).tolist()
    return torch.randperm(n, generator=generator, device=generator.device).tolist()


def generate_prompts(
    model_or_backend: nn.Module | CausalLM | GenerationBackend,
    tokenizer: Any,
    seed_prompts: list[str],
    num_prompts: int,
    *,
    num_shots: int = 8,
    num_seed_shots: int = 6,
    temperature: float = 0.6,
    top_p: float = 0.9,
    max_new_tokens: int = 128,
    max_attempts: int | None = None,
    batch_size: int = 16,
    generator: torch.Generator | int | None = None,
    progress: bool = False,
    filter_kwargs: dict[str, Any] | None = None,
    instruction: str = DEFAULT_INSTRUCTION,
    generated_prompts: Sequence[str] = (),
) -> PromptGenerationResult:
    """Generate ``num_prompts`` new, filtered prompts by few-shot prompting a model (sampled
    with the torch engine) or a :class:`~.generation.GenerationBackend`.

    Each attempt shows ``num_shots`` examples: ``num_seed_shots`` random seed prompts
    plus ``num_shots - num_seed_shots`` random previously generated ones (seed prompts
    fill in while too few have been generated). ``generated_prompts`` are prompts made
    earlier (e.g. by an earlier prompt-generation stage): they count as generated ones for
    the shots, and like the seeds they are in the pool new prompts must not duplicate or
    resemble (ROUGE-L). Prompts go through
    ``tokenizer.format_prompt``. Generation is batched (``batch_size`` attempts per call)
    and bounded: after ``max_attempts`` generations (default ``10 * num_prompts``) it
    returns what it has, with a warning. Shots that do not fit the model's context are
    dropped (counted in ``shots_dropped``). ``filter_kwargs`` go to :class:`PromptFilter`.
    """
    if isinstance(seed_prompts, str):
        raise TypeError("seed_prompts must be a list of prompts, not a single string")
    if not isinstance(num_prompts, int) or num_prompts < 0:
        raise ValueError(f"num_prompts must be an int >= 0, got {num_prompts!r}")
    if not isinstance(num_shots, int) or num_shots < 1:
        raise ValueError(f"num_shots must be a positive int, got {num_shots!r}")
    if not 0 <= num_seed_shots <= num_shots:
        raise ValueError(
            f"num_seed_shots must lie in [0, num_shots={num_shots}], got {num_seed_shots}"
        )
    if max_attempts is None:
        max_attempts = 10 * num_prompts
    if not isinstance(max_attempts, int) or max_attempts < 0:
        raise ValueError(f"max_attempts must be an int >= 0, got {max_attempts!r}")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    usable = [p.strip() for p in seed_prompts if isinstance(p, str) and p.strip()]
    usable = [p for p in usable if BEGIN not in p and END not in p]
    if isinstance(generated_prompts, str):
        raise TypeError("generated_prompts must be a list of prompts, not a single string")
    earlier = [p.strip() for p in generated_prompts if isinstance(p, str) and p.strip()]
    earlier = [p for p in earlier if BEGIN not in p and END not in p]
    if not usable:
        raise ValueError(
            "generate_prompts needs at least one non-empty seed prompt (without the "
            f"{BEGIN}/{END} markers) to show as an example"
        )
    backend = as_backend(model_or_backend)
    tok = wrap_tokenizer(tokenizer)
    lm = getattr(backend, "lm", None)
    generator = make_generator(generator, lm.device if lm is not None else "cpu")
    context = backend.max_seq_len
    limit = None if context is None else context - max_new_tokens
    if limit is not None and limit < 1:
        raise ValueError(
            f"max_new_tokens={max_new_tokens} leaves no room for the few-shot prompt in the "
            f"model's context of {context}; lower max_new_tokens"
        )
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        eos_token_id=tok.eos_id,
        stop_strings=(END,),
    )
    filt = PromptFilter(usable + earlier, **(filter_kwargs or {}))
    result = PromptGenerationResult(prompts=[])
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=num_prompts, desc="new prompts")

    def encode_shots() -> list[int]:
        seeds = [usable[i] for i in _randperm(len(usable), generator)[:num_seed_shots]]
        made = earlier + result.prompts
        extra = [made[i] for i in _randperm(len(made), generator)[: num_shots - len(seeds)]]
        pool = [usable[i] for i in _randperm(len(usable), generator) if usable[i] not in seeds]
        shots = seeds + extra + pool[: max(0, num_shots - len(seeds) - len(extra))]
        order = _randperm(len(shots), generator)
        shots = [shots[i] for i in order]
        while True:  # bounded: each round drops one shot; zero shots is an error
            ids = tok.encode(
                tok.format_prompt(build_fewshot_prompt(shots, instruction=instruction))
            )
            if limit is None or len(ids) <= limit:
                return ids
            if len(shots) == 1:
                raise ValueError(
                    f"even a one-shot prompt is {len(ids)} tokens, more than the {limit} that fit "
                    f"the model's context of {context} with max_new_tokens={max_new_tokens}; "
                    "use shorter seed prompts or lower max_new_tokens"
                )
            shots = shots[:-1]
            result.shots_dropped += 1

    try:
        while len(result.prompts) < num_prompts and result.attempts < max_attempts:
            n = min(batch_size, max_attempts - result.attempts)
            batch = [encode_shots() for _ in range(n)]
            out = backend.generate(batch, config, generator=generator, decode=tok.decode)
            result.attempts += n
            for seq, reason in zip(out.sequences, out.finish_reasons):
                text = tok.decode(seq)
                if reason == "stop" and END not in text:
                    text += END  # the stop string is excluded from the returned tokens
                parsed = parse_generated_prompt(text)
                if parsed is None:
                    result.parse_failures += 1
                    continue
                if len(result.prompts) >= num_prompts:
                    result.surplus += 1
                elif filt(parsed):
                    result.prompts.append(parsed.strip())
                    if bar is not None:
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    result.filtered = dict(filt.reasons)
    if len(result.prompts) < num_prompts:
        warnings.warn(
            f"generate_prompts made {len(result.prompts)} of {num_prompts} prompts in "
            f"{result.attempts} attempts ({result.parse_failures} unparsable, filtered: "
            f"{result.filtered}); raise max_attempts or loosen the filters",
            stacklevel=2,
        )
    return result
