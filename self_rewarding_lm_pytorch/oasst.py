"""Open Assistant message trees -> the paper's IFT and EFT seed data (pure functions).

Yuan et al. (2024), section 3.1, build their seed data from Open Assistant: *IFT* is the
first turn of English conversations with the highest-ranked human answer (3,200
examples); *EFT* starts from prompts with several human-ranked answers, which a model
fine-tuned on IFT then judges (Figure 2 prompt), keeping the judgements whose score order
agrees with the human ranking. This module makes both inputs from the rows of an
oasst1 / oasst2 export: the flat *messages* export (one row per message: ``message_id``,
``parent_id``, ``message_tree_id``, ``role``, ``text``, ``lang``, ``rank``, ``deleted``,
``review_result``, ...) or the nested *trees* export (``{"message_tree_id", "prompt":
{..., "replies": [...]}}``, flattened by :func:`flatten_trees`).

:func:`prepare_oasst` applies the rules (each a function below) and counts every message
or prompt it leaves out under one reason (:data:`REASONS`). Reading files and writing the
outputs is ``srlm prepare oasst`` (:mod:`.cli.prepare`).
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

from .config.core import ConfigError

__all__ = [
    "REASONS",
    "REQUIRED_FIELDS",
    "OasstConfig",
    "OasstData",
    "eft_input",
    "flatten_trees",
    "ift_example",
    "passed_review",
    "prepare_oasst",
    "prompt_problem",
    "reply_problem",
    "reviews_present",
    "split_trees",
    "summary_markdown",
]

#: every reason a message or prompt is left out, in the order the rules test them
REASONS = (
    "duplicate message",  # the same message_id again (e.g. two splits concatenated)
    "not first turn",  # neither a root prompt nor an assistant reply to one
    "wrong language",
    "deleted",
    "failed review",
    "empty text",
    "duplicate prompt",
    "unranked",
    "no valid rank-0 reply",
    "too few ranked replies",
    "over count cap",
)

PROMPT_REASONS = ("wrong language", "deleted", "failed review", "empty text", "duplicate prompt")
REPLY_REASONS = ("deleted", "failed review", "empty text", "unranked")

REQUIRED_FIELDS = ("message_id", "parent_id", "message_tree_id", "role", "text", "lang")


def _help(text: str) -> dict[str, str]:
    return {"help": text}


@dataclass
class OasstConfig:
    """What :func:`prepare_oasst` keeps (defaults: the paper's English seed data)."""

    langs: list[str] = field(
        default_factory=lambda: ["en"], metadata=_help("languages of the prompts kept")
    )
    ift_count: int | None = field(
        default=None, metadata=_help("IFT training examples at most (paper: 3200; None: all)")
    )
    eft_count: int | None = field(
        default=None, metadata=_help("EFT training prompts at most (None: all)")
    )
    heldout_fraction: float = field(
        default=0.1, metadata=_help("fraction of message trees held out (split by tree)")
    )
    min_responses: int = field(
        default=2, metadata=_help("ranked valid replies an EFT prompt needs at least")
    )
    seed: int = field(default=0, metadata=_help("seed of the held-out split and the count caps"))

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ConfigError` naming the key, the problem and the fix."""
        if not self.langs or not all(isinstance(x, str) and x for x in self.langs):
            raise ConfigError(
                f"langs must be a non-empty list of codes such as 'en', got {self.langs!r}"
            )
        for key in ("ift_count", "eft_count"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"{key} must be >= 1 (or None for all), got {value}")
        if not 0 <= self.heldout_fraction < 1:
            raise ConfigError(
                f"heldout_fraction must be in [0, 1), got {self.heldout_fraction}; "
                "give a fraction such as 0.1 (0 holds nothing out)"
            )
        if self.min_responses < 2:
            raise ConfigError(
                f"min_responses must be >= 2 (EFT compares replies), got {self.min_responses}"
            )


@dataclass
class OasstData:
    """The outputs of :func:`prepare_oasst`: row lists for each file and the summary."""

    ift: list[dict[str, Any]]
    ift_heldout: list[dict[str, Any]]
    eft: list[dict[str, Any]]
    eft_heldout: list[dict[str, Any]]
    summary: dict[str, Any]


# ====================================================================== input shapes


def flatten_trees(rows: list[dict]) -> list[dict]:
    """Rows of the *trees* export (nested ``prompt`` / ``replies``) as messages-export
    rows; rows of the messages export are returned as they are."""
    if not rows or "prompt" not in rows[0] or not isinstance(rows[0].get("prompt"), dict):
        return rows
    out: list[dict] = []
    for tree in rows:
        stack = [(tree["prompt"], None)]
        while stack:
            node, parent = stack.pop()
            msg = {k: v for k, v in node.items() if k != "replies"}
            msg.setdefault("parent_id", parent)
            msg.setdefault("message_tree_id", tree.get("message_tree_id"))
            out.append(msg)
            replies = node.get("replies") or []
            stack.extend((r, node.get("message_id")) for r in reversed(replies))
    return out


def _check_fields(rows: list[dict]) -> None:
    for i, row in enumerate(rows):
        missing = [k for k in REQUIRED_FIELDS if k not in row]
        if missing:
            raise ValueError(
                f"oasst row {i} has no field {', '.join(map(repr, missing))} (fields: "
                f"{', '.join(map(str, row))}); give the Open Assistant messages export "
                f"(oasst1 / oasst2 rows with {', '.join(REQUIRED_FIELDS)}) or its trees export"
            )


# ====================================================================== the rules


def reviews_present(messages: list[dict]) -> bool:
    """Whether the export carries review results: then a message must have passed review
    (``review_result`` true); an export without any (all null) is not checked."""
    return any(m.get("review_result") is not None for m in messages)


def passed_review(message: dict, reviewed: bool) -> bool:
    """Section 3.1 uses the human-reviewed Open Assistant data: ``review_result`` true
    (or anything, when the export has no review results, ``reviewed`` false)."""
    return not reviewed or message.get("review_result") is True


def _rank(message: dict) -> int | None:
    rank = message.get("rank")
    if rank is None or rank != rank:  # null, or NaN from a dataframe round trip
        return None
    return int(rank)


def _common_problem(message: dict, reviewed: bool) -> str | None:
    if message.get("deleted"):
        return "deleted"
    if not passed_review(message, reviewed):
        return "failed review"
    if not str(message.get("text") or "").strip():
        return "empty text"
    return None


def prompt_problem(message: dict, langs: list[str], reviewed: bool) -> str | None:
    """Why a root prompter message (``parent_id`` null) is not a prompt (None: it is).
    Section 3.1: first turns of English conversations (``langs``), not deleted, passed
    review, with text."""
    if message.get("lang") not in langs:
        return "wrong language"
    return _common_problem(message, reviewed)


def reply_problem(message: dict, reviewed: bool) -> str | None:
    """Why an assistant reply to a prompt is not usable (None: it is): deleted, failed
    review, empty, or without a human rank (section 3.1 uses the human ranking)."""
    problem = _common_problem(message, reviewed)
    if problem is None and _rank(message) is None:
        return "unranked"
    return problem


def _by_rank(replies: list[dict]) -> list[dict]:
    return sorted(replies, key=lambda m: (_rank(m), str(m["message_id"])))


def ift_example(prompt: dict, replies: list[dict]) -> dict[str, Any] | None:
    """Section 3.1 IFT: the prompt with its highest-ranked human answer, the rank-0 valid
    reply (ties broken by ``message_id``); None without one. ``replies`` are valid."""
    best = [m for m in _by_rank(replies) if _rank(m) == 0]
    if not best:
        return None
    return {
        "messages": [
            {"role": "user", "content": prompt["text"]},
            {"role": "assistant", "content": best[0]["text"]},
        ],
        "tree_id": prompt["message_tree_id"],
    }


def eft_input(prompt: dict, replies: list[dict], min_responses: int) -> dict[str, Any] | None:
    """Section 3.1 EFT input: a prompt with at least ``min_responses`` human-ranked valid
    replies, sorted best first (rank, then ``message_id``), with their ranks and minus
    their ranks (``human_scores``, higher is better, for ``srlm eval``); None with fewer."""
    if len(replies) < min_responses:
        return None
    ranked = _by_rank(replies)
    return {
        "prompt": prompt["text"],
        "responses": [m["text"] for m in ranked],
        "human_ranks": [_rank(m) for m in ranked],
        "human_scores": [-_rank(m) for m in ranked],  # higher is better: srlm eval's gold
        "tree_id": prompt["message_tree_id"],
    }


def split_trees(tree_ids: list[str], fraction: float, seed: int) -> tuple[list[str], set[str]]:
    """The trees in a seeded random order (independent of the input order) and the
    held-out ones: the first ``round(fraction * n)`` of that order. Splitting by tree keeps
    a prompt and all its replies on one side."""
    order = sorted(set(tree_ids))
    random.Random(seed).shuffle(order)
    n_heldout = int(fraction * len(order) + 0.5)
    return order, set(order[:n_heldout])


# ====================================================================== putting it together


def _first_turn(messages: list[dict], summary: dict) -> tuple[list[dict], dict[str, list[dict]]]:
    """Root prompter messages and the assistant replies to them; everything else is
    counted as ``not first turn``."""
    by_id = {m["message_id"]: m for m in messages}
    roots = [m for m in messages if m["parent_id"] is None and m["role"] == "prompter"]
    root_ids = {m["message_id"] for m in roots}
    replies: dict[str, list[dict]] = {m["message_id"]: [] for m in roots}
    for m in messages:
        if m["message_id"] in root_ids:
            continue
        parent = by_id.get(m["parent_id"])
        if m["role"] == "assistant" and parent is not None and parent["message_id"] in root_ids:
            replies[parent["message_id"]].append(m)
        else:
            summary["messages_dropped"]["not first turn"] += 1
    return roots, replies


def _kept_prompts(
    roots: list[dict],
    replies: dict[str, list[dict]],
    langs: list[str],
    reviewed: bool,
    summary: dict,
) -> list[tuple[dict, list[dict]]]:
    """The prompts kept, each with its valid replies, in tree order (the first tree keeps a
    prompt text that several trees share); what is left out is counted in ``summary``."""
    prompts: list[tuple[dict, list[dict]]] = []
    texts: set[str] = set()
    for prompt in sorted(roots, key=lambda m: (str(m["message_tree_id"]), str(m["message_id"]))):
        summary["prompts"]["candidates"] += 1
        problem = prompt_problem(prompt, langs, reviewed)
        key = " ".join(str(prompt["text"]).split())
        if problem is None and key in texts:
            problem = "duplicate prompt"
        if problem is not None:
            summary["prompts"]["dropped"][problem] += 1
            continue
        texts.add(key)
        summary["prompts"]["kept"] += 1
        valid = []
        for reply in replies[prompt["message_id"]]:
            summary["replies"]["candidates"] += 1
            problem = reply_problem(reply, reviewed)
            if problem is None:
                valid.append(reply)
                summary["replies"]["kept"] += 1
            else:
                summary["replies"]["dropped"][problem] += 1
        prompts.append((prompt, valid))
    return prompts


def _capped(rows: list[dict], order: dict[str, int], cap: int | None) -> tuple[list[dict], int]:
    """At most ``cap`` rows, the first trees of the seeded order; returned by tree id."""
    rows = sorted(rows, key=lambda r: order[r["tree_id"]])
    kept = rows if cap is None else rows[:cap]
    return sorted(kept, key=lambda r: str(r["tree_id"])), len(rows) - len(kept)


def prepare_oasst(rows: list[dict], config: OasstConfig | None = None) -> OasstData:
    """IFT examples and EFT inputs from Open Assistant rows (section 3.1), with a held-out
    split by message tree and a count of everything left out per reason."""
    config = config or OasstConfig()
    rows = flatten_trees(rows)
    _check_fields(rows)
    zero = dict.fromkeys
    summary: dict[str, Any] = {
        "input_rows": len(rows),
        "settings": {
            "langs": list(config.langs),
            "ift_count": config.ift_count,
            "eft_count": config.eft_count,
            "heldout_fraction": config.heldout_fraction,
            "min_responses": config.min_responses,
            "seed": config.seed,
        },
        "messages_dropped": zero(("duplicate message", "not first turn"), 0),
        "prompts": {"candidates": 0, "kept": 0, "dropped": zero(PROMPT_REASONS, 0)},
        "replies": {"candidates": 0, "kept": 0, "dropped": zero(REPLY_REASONS, 0)},
    }
    messages, seen = [], set()
    for m in rows:
        if m["message_id"] in seen:
            summary["messages_dropped"]["duplicate message"] += 1
        else:
            seen.add(m["message_id"])
            messages.append(m)
    reviewed = reviews_present(messages)
    summary["review"] = (
        "review_result must be true"
        if reviewed
        else "the export has no review results (all null): review not checked"
    )
    roots, replies = _first_turn(messages, summary)
    prompts = _kept_prompts(roots, replies, config.langs, reviewed, summary)
    order, heldout = split_trees(
        [p["message_tree_id"] for p, _ in prompts], config.heldout_fraction, config.seed
    )
    position = {t: i for i, t in enumerate(order)}
    summary["trees"] = {"kept": len(order), "heldout": len(heldout)}
    out: dict[str, list[dict]] = {}
    for name, make, cap, reason in (
        ("ift", ift_example, config.ift_count, "no valid rank-0 reply"),
        (
            "eft",
            lambda p, r: eft_input(p, r, config.min_responses),
            config.eft_count,
            "too few ranked replies",
        ),
    ):
        made = [(p, make(p, r)) for p, r in prompts]
        rows_ = [row for _, row in made if row is not None]
        train, over = _capped([r for r in rows_ if r["tree_id"] not in heldout], position, cap)
        out[name] = train
        out[f"{name}_heldout"] = sorted(
            (r for r in rows_ if r["tree_id"] in heldout), key=lambda r: str(r["tree_id"])
        )
        summary[name] = {
            "train": len(train),
            "heldout": len(out[f"{name}_heldout"]),
            "dropped": {reason: len(made) - len(rows_), "over count cap": over},
        }
    return OasstData(summary=summary, **out)


# ====================================================================== the report


def summary_markdown(summary: dict[str, Any]) -> str:
    """``summary.md``: what was kept and what was left out, one count per reason."""
    s = summary["settings"]
    lines = [
        "# Open Assistant -> IFT / EFT (Yuan et al. 2024, section 3.1)",
        "",
        f"Input rows: {summary['input_rows']}. Languages: {', '.join(s['langs'])}. "
        f"Review: {summary['review']}. Held out: {s['heldout_fraction']} of the trees "
        f"(seed {s['seed']}): {summary['trees']['heldout']} of {summary['trees']['kept']}. "
        f"EFT needs >= {s['min_responses']} ranked replies. Caps on the training files: "
        f"IFT {s['ift_count'] or 'none'}, EFT {s['eft_count'] or 'none'}.",
        "",
        "Each message or prompt left out is counted once, under the first rule it fails. "
        "Replies are the assistant replies to the prompts kept; ift / eft count those "
        "prompts.",
        "",
        "| stage | unit | kept | reason left out | count |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| messages | message | | {r} | {n} |" for r, n in summary["messages_dropped"].items()
    ]
    for stage, unit in (("prompts", "root prompt"), ("replies", "first-turn reply")):
        part = summary[stage]
        lines += [f"| {stage} | {unit} | {part['kept']} of {part['candidates']} | | |"]
        lines += [f"| {stage} | {unit} | | {r} | {n} |" for r, n in part["dropped"].items()]
    for stage in ("ift", "eft"):
        part = summary[stage]
        kept = f"{part['train']} train + {part['heldout']} held out"
        lines += [f"| {stage} | prompt | {kept} | | |"]
        lines += [f"| {stage} | prompt | | {r} | {n} |" for r, n in part["dropped"].items()]
    return "\n".join(lines) + "\n"
