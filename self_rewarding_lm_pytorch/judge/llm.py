"""The LLM judge: a language model prompted to score responses (Yuan et al. 2024, §2.3, Fig. 2).

The self-rewarding loop scores each candidate response ``y`` to a prompt ``x`` with the
model itself: the judge prompt (Figure 2, an additive 5-point rubric) is rendered from a
template, the model writes a short justification that ends in ``Score: N``, and the
number is parsed out.  Two scoring modes:

* ``mode="mean"`` (the paper): ``k`` sampled judgements per candidate, score = mean of
  the parsable ones, ``r(x, y) = (1/|K|) sum_{j in K} s_j``.
* ``mode="expected"``: one greedy judgement; at the position where its score number
  starts, the model's next-token distribution restricted to the score values ``V``
  gives ``r(x, y) = sum_v p(v) v / sum_v p(v)`` (a continuous score with far fewer ties).

Judgements are sampled through a :class:`~self_rewarding_lm_pytorch.generation.GenerationBackend`
(a model is wrapped in the torch engine's :class:`TorchBackend`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..generation import GenerationBackend, GenerationConfig, as_backend, response_budget
from ..generation.backend import is_backend
from ..models import CausalLM, Tokenizer, encode_response, wrap_tokenizer
from ..utils import chunks, make_generator, with_overrides
from .base import JudgeBase, JudgeResult
from .config import CONFIG_FIELDS, ENGINE_OPTIONS, JudgeConfig
from .templates import DEFAULT_REWARD_CONFIG, RewardConfig

__all__ = ["LLMJudge", "SampledJudge"]


def _plain_token_ids(tokenizer: Tokenizer, text: str) -> list[int]:
    """Token ids of ``text`` without BOS/special tokens or a sentencepiece prefix-space piece."""
    ids = encode_response(tokenizer, text)
    if text and not text[0].isspace():
        while len(ids) > 1 and tokenizer.decode(ids[:1]).strip() == "":
            ids = ids[1:]
    return ids


def _single_token_ids(tokenizer: Tokenizer, gap: str, words: Sequence[str]) -> list[int] | None:
    """The token id of each of ``words`` written after ``gap``, or None if one of them is
    not a single token there."""
    out = []
    for word in words:
        ids = _plain_token_ids(tokenizer, gap + word)
        if len(ids) != 1:
            return None
        out.append(ids[0])
    return out


class SampledJudge:
    """What the LLM judges share: the sampling settings (a :class:`JudgeConfig`), the
    backend they sample from, and the chunked ``generate`` loop (``batch_size`` prompts and
    ``token_budget`` tokens per call at most)."""

    def _setup(
        self,
        model_or_backend: nn.Module | CausalLM | GenerationBackend,
        tokenizer: Any,
        config: JudgeConfig | None,
        overrides: dict[str, Any],
        *,
        owner: str,
    ) -> None:
        settings = with_overrides(JudgeConfig, config, overrides, owner=owner)
        settings.generation_kwargs = dict(settings.generation_kwargs or {})
        settings.validate(owner)
        extra = settings.generation_kwargs
        self._config_kwargs = {k: v for k, v in extra.items() if k in CONFIG_FIELDS}
        self._generate_kwargs = {
            k: v for k, v in extra.items() if k not in CONFIG_FIELDS and k not in ENGINE_OPTIONS
        }
        engine_kwargs = {k: v for k, v in extra.items() if k in ENGINE_OPTIONS}
        # a model gets a torch engine that micro-batches to the judge's token budget itself;
        # a backend is sampled in chunks of at most token_budget tokens
        self._chunk_budget = settings.token_budget
        if is_backend(model_or_backend):
            if engine_kwargs:
                raise ValueError(
                    f"{owner}: generation_kwargs {sorted(engine_kwargs)} are options of the "
                    "torch engine, but the judge was given a generation backend; configure "
                    "them on the backend (e.g. TorchBackend(model, use_cache=...)) instead"
                )
            self.backend: GenerationBackend = model_or_backend
        else:
            if settings.token_budget is not None and "token_budget" in ENGINE_OPTIONS:
                engine_kwargs["token_budget"], self._chunk_budget = settings.token_budget, None
            self.backend = as_backend(model_or_backend, **engine_kwargs)
        #: the wrapped model of a torch backend (None for other backends)
        self.lm: CausalLM | None = getattr(self.backend, "lm", None)
        self.tokenizer: Tokenizer = wrap_tokenizer(tokenizer)
        self.settings = settings

    @property
    def max_seq_len(self) -> int | None:
        """The judge's context: prompt + ``max_new_tokens`` must fit it, per judgement."""
        return self.backend.max_seq_len

    def _device(self) -> torch.device:
        return self.lm.device if self.lm is not None else torch.device("cpu")

    def _prompt_limit(self) -> int | None:
        """The most tokens a judge prompt may have (None: no limit)."""
        max_len = self.max_seq_len
        limit = None if max_len is None else max_len - self.settings.max_new_tokens
        if limit is not None and limit < 1:
            raise ValueError(
                f"max_new_tokens={self.settings.max_new_tokens} leaves no room for the judge prompt in "
                f"the model's context of {max_len} tokens; lower max_new_tokens"
            )
        return limit

    def _align(self, gen: list[int], text: str, start: int) -> tuple[int, str] | None:
        """Largest ``n`` whose decoded prefix ends at or before character ``start``."""
        decode = self.tokenizer.decode
        lo, hi = 0, len(gen)
        while lo < hi:  # bounded binary search: largest n with len(decode(gen[:n])) <= start
            mid = (lo + hi + 1) // 2
            if len(decode(gen[:mid])) <= start:
                lo = mid
            else:
                hi = mid - 1
        prefix = decode(gen[:lo])
        if lo >= len(gen) or not text.startswith(prefix):
            return None
        return lo, text[len(prefix) : start]

    def _next_token_logprobs(
        self, sequences: list[list[int]], token_ids: list[list[int]]
    ) -> list[list[float]]:
        """``backend.next_token_logprobs`` in chunks of ``batch_size`` rows and
        ``token_budget`` tokens."""
        out: list[list[float]] = []
        costs = [len(x) for x in sequences]
        for chunk in chunks(costs, self.settings.batch_size, self.settings.token_budget):
            out.extend(
                self.backend.next_token_logprobs(
                    [sequences[j] for j in chunk], [token_ids[j] for j in chunk]
                )
            )
        return out

    def _gen_config(self, **overrides: Any) -> GenerationConfig:
        s = self.settings
        kwargs = dict(
            max_new_tokens=s.max_new_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            eos_token_id=self.tokenizer.eos_id,
        )
        kwargs.update(self._config_kwargs)
        kwargs.update(overrides)
        return GenerationConfig(**kwargs)

    def _generate(
        self, ids: list[list[int]], config: GenerationConfig, generator
    ) -> list[list[int]]:
        k = config.num_return_sequences
        costs = [(len(x) + self.settings.max_new_tokens) * k for x in ids]
        seqs: list[list[int]] = []
        for chunk in chunks(costs, self.settings.batch_size, self._chunk_budget):
            out = self.backend.generate(
                [ids[i] for i in chunk],
                config,
                generator=generator,
                decode=self.tokenizer.decode,
                **self._generate_kwargs,
            )
            if len(out.sequences) != len(chunk) * k:
                raise RuntimeError(
                    f"generate returned {len(out.sequences)} sequences for {len(chunk)} prompts "
                    f"x {k} samples"
                )
            seqs.extend(out.sequences)
        return seqs


class LLMJudge(JudgeBase, SampledJudge):
    """Score responses with a language model prompted as a judge (paper section 2.3).

    Args:
        model_or_backend: any causal LM (see
            :func:`~self_rewarding_lm_pytorch.models.wrap_model`), sampled with the torch
            engine, or a :class:`~self_rewarding_lm_pytorch.generation.GenerationBackend`.
        tokenizer: a :class:`~self_rewarding_lm_pytorch.models.Tokenizer` (or anything
            :func:`wrap_tokenizer` accepts). Judge prompts go through
            ``tokenizer.format_prompt`` (the chat template) before encoding.
        reward_config: the judge prompt and the score parser (also ``judge.config``).
        config: the sampling settings, a :class:`~.config.JudgeConfig` (``judge.settings``);
            ``**overrides`` replace its fields (``num_samples=3``, ``mode="expected"``, ...):
            ``num_samples`` judgements per candidate in ``"mean"`` mode (paper: 3);
            ``mode`` (see the module docstring); ``temperature``, ``top_p``,
            ``max_new_tokens`` of the judgements (``"expected"`` mode decodes greedily);
            ``batch_size`` candidates and ``token_budget`` tokens (prompt + new tokens,
            times samples) per ``generate`` call at most; ``on_too_long``: what to do when
            a judge prompt plus ``max_new_tokens`` exceeds the context: ``"error"`` (a
            ValueError naming the candidate and the lengths), ``"truncate_response"`` (cut
            the response's tail until it fits; the result has ``truncated=True``) or
            ``"truncate_left"`` (keep the last tokens of the judge prompt: only sensible
            for toy models with tiny contexts); ``generation_kwargs``: extra
            :class:`GenerationConfig` fields (``top_k``, ``stop_strings``, ...) or keyword
            options of ``generate`` (engine options such as ``use_cache`` only when a
            model, not a backend, is given).
    """

    def __init__(
        self,
        model_or_backend: nn.Module | CausalLM | GenerationBackend,
        tokenizer: Any,
        reward_config: RewardConfig = DEFAULT_REWARD_CONFIG,
        *,
        config: JudgeConfig | None = None,
        **overrides: Any,
    ) -> None:
        if not isinstance(reward_config, RewardConfig):
            raise TypeError(
                f"reward_config must be a RewardConfig, got {type(reward_config).__name__}"
            )
        self._setup(model_or_backend, tokenizer, config, overrides, owner="LLMJudge")
        self.reward_config = reward_config
        self.config = reward_config  # the name the seed and the pipeline read
        if self.settings.mode == "expected":
            self._check_expected_mode()

    # ------------------------------------------------------------------ checks
    def _check_expected_mode(self) -> None:
        if self.reward_config.score_values is None:
            raise ValueError(
                "mode='expected' needs reward_config.score_values (the integer scores to "
                "weigh, e.g. (0, 1, 2, 3, 4, 5)); set it or use mode='mean'"
            )
        if self.reward_config._reward_regex is None:
            raise ValueError(
                "mode='expected' needs reward_config.reward_regex_template to locate the score "
                "in the judgement (a parse_reward callable cannot say where it is); use mode='mean'"
            )
        for v in self.reward_config.score_values:
            ids = _plain_token_ids(self.tokenizer, str(v))
            if len(ids) != 1:
                raise ValueError(
                    f"score value {v} encodes to {len(ids)} tokens {ids} in the judge's "
                    "tokenizer; expected-score mode needs every score value to be a single "
                    "token: use mode='mean' or single-token score_values"
                )

    def check_prompts(self, prompts: Sequence[str], *, where: str = "") -> None:
        """Refuse, before any candidate is sampled, a prompt whose judge prompt cannot fit the
        context whatever the response: the template rendered with the prompt and an empty
        response, plus ``max_new_tokens`` (``on_too_long='truncate_left'`` always fits)."""
        if self.max_seq_len is None or self.settings.on_too_long == "truncate_left":
            return
        tok = self.tokenizer
        for i, p in enumerate(prompts):
            n = len(tok.encode(tok.format_prompt(self.reward_config.render(p, ""))))
            response_budget(
                n,
                self.settings.max_new_tokens,
                self.max_seq_len,
                where=f"{where}prompt {i}: the judge prompt (template and prompt, before any "
                "response)",
                context_name="the judge model's context",
                fix="shorten the judge template or the prompt, lower the judge's "
                "max_new_tokens, judge with a model of longer context, or truncate from the "
                "left (on_too_long='truncate_left'; in a stage: judge_settings.on_too_long)",
            )

    def _encode_judge_prompts(
        self, prompts: Sequence[str], responses: Sequence[str]
    ) -> tuple[list[list[int]], list[bool]]:
        tok = self.tokenizer
        max_len = self.max_seq_len
        limit = self._prompt_limit()
        all_ids, truncated = [], []
        for i, (p, r) in enumerate(zip(prompts, responses)):
            ids = tok.encode(tok.format_prompt(self.reward_config.render(p, r)))
            cut = False
            if limit is not None and len(ids) > limit:
                if self.settings.on_too_long == "error":
                    response_budget(  # raises: the one context rule, and its message
                        len(ids),
                        self.settings.max_new_tokens,
                        max_len,
                        where=f"candidate {i}: the judge prompt",
                        context_name="the model's context",
                        fix="shorten the response, lower max_new_tokens, or pass "
                        "on_too_long='truncate_response'",
                    )
                if self.settings.on_too_long == "truncate_left":
                    ids = ids[-limit:]
                else:
                    ids = self._truncate_response(i, p, r, ids, limit)
                cut = True
            all_ids.append(ids)
            truncated.append(cut)
        return all_ids, truncated

    def _truncate_response(self, i: int, prompt: str, response: str, ids: list[int], limit: int):
        tok = self.tokenizer
        resp_ids = _plain_token_ids(tok, response)
        for _ in range(16):  # bounded: each round removes at least one response token
            excess = len(ids) - limit
            if excess <= 0:
                return ids
            if not resp_ids:
                break
            resp_ids = resp_ids[: max(0, len(resp_ids) - excess)]
            ids = tok.encode(
                tok.format_prompt(self.reward_config.render(prompt, tok.decode(resp_ids)))
            )
        if len(ids) <= limit:
            return ids
        raise ValueError(
            f"candidate {i}: even with the response truncated the judge prompt is {len(ids)} "
            f"tokens, more than the {limit} that fit the model's context of "
            f"{self.max_seq_len} with max_new_tokens={self.settings.max_new_tokens}; shorten the "
            "prompt or the judge template, or lower max_new_tokens"
        )

    # ------------------------------------------------------------------ scoring
    def _score(
        self, prompts: list[str], responses: list[str], generator: torch.Generator | int | None
    ) -> list[JudgeResult]:
        generator = make_generator(generator, self._device())
        ids, truncated = self._encode_judge_prompts(prompts, responses)
        if self.settings.mode == "mean":
            results = self._score_mean(ids, generator)
        else:
            results = self._score_expected(ids, generator)
        for res, cut in zip(results, truncated):
            res.truncated = cut
        return results

    def _score_mean(self, ids: list[list[int]], generator) -> list[JudgeResult]:
        k = self.settings.num_samples
        seqs = self._generate(ids, self._gen_config(num_return_sequences=k), generator)
        results = []
        for i in range(len(ids)):
            samples = [self.tokenizer.decode(s) for s in seqs[i * k : (i + 1) * k]]
            parsed = [self.reward_config.parse_with_reason(t) for t in samples]
            scores = [s for s, _ in parsed]
            ok = [s for s in scores if s is not None]
            results.append(
                JudgeResult(
                    score=sum(ok) / len(ok) if ok else None,
                    samples=samples,
                    sample_scores=scores,
                    failures=[reason for _, reason in parsed],
                )
            )
        return results

    def _score_expected(self, ids: list[list[int]], generator) -> list[JudgeResult]:
        seqs = self._generate(
            ids, self._gen_config(temperature=0.0, num_return_sequences=1), generator
        )
        results: list[JudgeResult] = []
        pending: list[tuple[int, list[int], dict[int, int]]] = []  # (result idx, input, value->id)
        candidate_cache: dict[str, dict[int, int] | None] = {}
        for i, gen in enumerate(seqs):
            text = self.tokenizer.decode(gen)
            res = JudgeResult(score=None, samples=[text], sample_scores=[None], failures=[None])
            results.append(res)
            greedy, reason = self.reward_config.parse_with_reason(text)
            res.sample_scores[0] = greedy
            if greedy is None:
                res.failures[0] = reason
                continue
            m = self.reward_config.find_reward(text)
            aligned = self._align(gen, text, m.start(1)) if m is not None else None
            if aligned is None:
                res.sample_scores[0] = None
                res.failures[0] = "could not align the score with the judgement's tokens"
                continue
            n, gap = aligned
            if gap not in candidate_cache:
                candidate_cache[gap] = self._score_token_ids(gap)
            cand = candidate_cache[gap]
            if cand is None or gen[n] not in cand.values():
                res.sample_scores[0] = None
                res.failures[0] = (
                    "the score token does not match the single-token score_values; "
                    "use mode='mean' for this tokenizer"
                )
                continue
            pending.append((i, ids[i] + gen[:n], cand))
        self._fill_expected(results, pending)
        return results

    def _score_token_ids(self, gap: str) -> dict[int, int] | None:
        values = self.reward_config.score_values or ()
        ids = _single_token_ids(self.tokenizer, gap, [str(v) for v in values])
        return None if ids is None else dict(zip(values, ids))

    def _fill_expected(
        self, results: list[JudgeResult], pending: list[tuple[int, list[int], dict[int, int]]]
    ) -> None:
        logprobs = self._next_token_logprobs(
            [x for _, x, _ in pending], [list(cand.values()) for _, _, cand in pending]
        )
        for (i, _, cand), row in zip(pending, logprobs):
            values = list(cand)
            lp = torch.tensor(row, dtype=torch.float32)
            mass = float(lp.exp().sum())
            probs = torch.softmax(lp, dim=-1)  # p(v) / sum_v p(v)
            dist = {v: float(p) for v, p in zip(values, probs)}
            res = results[i]
            res.score = float(sum(p * v for v, p in dist.items()))
            res.score_distribution = dist
            res.score_mass = mass
