"""The demo's miniature instruction-following task, its exact oracle and its data generators.

Prompts are IFEval-style verifiable instructions (Zhou et al., 2023) on short letter
strings, written as a compact string that ends with ``>``::

    len6 start:b novow upper>        ->  BXTRKL

Every prompt asks for a length (``len<n>``) plus 1-3 of the other criteria:

========  ======================================================================
name      satisfied when (``s`` is the response, letters compared case-blind)
========  ======================================================================
len<n>    ``len(s) == n``
start:c   the first character is ``c``
end:c     the last character is ``c``
has:c     ``c`` occurs somewhere in ``s``
novow     no vowel (``aeiou``) occurs in ``s``
upper     ``s.isupper()`` (every cased character is upper case, and there is one)
========  ======================================================================

The oracle scores a response ``round(5 * satisfied / total)`` with halves rounded up,
so a score lies in 0..5 and 5 means fully correct.  The judge of the demo writes one
verdict per criterion, in prompt order (``y`` satisfied, ``n`` not), then ``Score: N``::

    rate len6 start:b novow upper>BXTRKl|yyyn Score: 4

The per-criterion checks are what make judging easier than generating for a tiny model
(feasibility note, round 1, lesson 1): it is the paper's additive rubric (Yuan et al.,
2024, Fig. 2) in miniature.

Data generators (all deterministic given ``seed``; each uses its own
``random.Random`` stream derived from the seed and its purpose):

* :func:`ift_data`: prompt -> response with the round-2 *systematic, fixable* noise:
  when ``upper`` is asked a fraction of responses is lower case, when ``end:c`` is asked
  a fraction stutters the end letter (length off by one), plus random one-criterion
  errors.  The wrong behaviour is the mode, but the right one is in the data too.
* :func:`eft_data`: judge prompt -> per-criterion verdicts and ``Score: N`` from the
  oracle, with responses whose failures cover every criterion evenly.
* :func:`meta_eft_data`, :func:`meta_eval_set`: meta-judge examples, a response and two
  judgements of it (one with a realistic wrong verdict) -> which one is right (:mod:`.meta`).
* :func:`fresh_prompts`, :func:`eval_prompts`, :func:`judge_eval_set`: prompts for each
  self-reward iteration and held-out sets.  Prompts are split by a stable hash into a
  training part and a held-out part, so no held-out prompt ever appears in training data.

Modules: :mod:`.oracle` (prompts, checks, scores, solver, metrics), :mod:`.judgement` (the
judge's prompt and judgement format), :mod:`.prompts` (the prompt distribution and split),
:mod:`.failures` (realistic failures) and :mod:`.data` (the data generators).
"""

from .data import (
    EFTExample,
    EFTMix,
    IFTExample,
    IFTNoise,
    JudgeEvalExample,
    eft_data,
    eval_prompts,
    fresh_prompts,
    ift_data,
    judge_eval_set,
)
from .failures import break_criteria
from .judgement import (
    JUDGE_PROMPT_TEMPLATE,
    JUDGE_REWARD_REGEX_TEMPLATE,
    ParsedJudgement,
    format_judgement,
    judgement_text,
    parse_judgement,
    render_judge_prompt,
    reward_config_kwargs,
)
from .meta import (
    META_LABELS,
    META_PROMPT_TEMPLATE,
    MetaExample,
    max_meta_sequence_length,
    meta_eft_data,
    meta_eval_set,
    meta_template_kwargs,
    parse_meta_verdict,
    render_meta_prompt,
)
from .oracle import (
    CONSONANTS,
    CRITERIA,
    EXTRA_CRITERIA,
    LETTERS,
    MAX_SCORE,
    PROMPT_END,
    VOWELS,
    Spec,
    check,
    fully_correct,
    instruction_metrics,
    parse_prompt,
    score,
    score_from_counts,
    score_from_verdicts,
    solve,
    verdicts,
)
from .prompts import (
    TaskConfig,
    max_prompt_length,
    max_sequence_length,
    prompt_split,
    sample_spec,
)

__all__ = [
    "CONSONANTS",
    "CRITERIA",
    "EXTRA_CRITERIA",
    "JUDGE_PROMPT_TEMPLATE",
    "JUDGE_REWARD_REGEX_TEMPLATE",
    "MAX_SCORE",
    "META_LABELS",
    "META_PROMPT_TEMPLATE",
    "LETTERS",
    "PROMPT_END",
    "VOWELS",
    "EFTExample",
    "EFTMix",
    "IFTExample",
    "IFTNoise",
    "JudgeEvalExample",
    "MetaExample",
    "ParsedJudgement",
    "Spec",
    "TaskConfig",
    "break_criteria",
    "check",
    "eft_data",
    "eval_prompts",
    "format_judgement",
    "fresh_prompts",
    "fully_correct",
    "ift_data",
    "instruction_metrics",
    "judgement_text",
    "judge_eval_set",
    "max_meta_sequence_length",
    "max_prompt_length",
    "meta_eft_data",
    "meta_eval_set",
    "meta_template_kwargs",
    "max_sequence_length",
    "parse_judgement",
    "parse_meta_verdict",
    "parse_prompt",
    "prompt_split",
    "render_judge_prompt",
    "render_meta_prompt",
    "reward_config_kwargs",
    "sample_spec",
    "score",
    "score_from_counts",
    "score_from_verdicts",
    "solve",
    "verdicts",
]
