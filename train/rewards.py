"""Verifiable rewards: the task's own verifier on the answer inside <answer> tags.

strict (the paper's): the last closed <answer>...</answer> match; no match scores 0.
lenient (for small models that rarely close the tag in a short budget): the last closed match,
else the text after the last unclosed <answer>, else the last number in the completion.
"""

from __future__ import annotations

import json
import re
from functools import lru_cache

from core.errors import MuskError

ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
MODES = ("strict", "lenient")
NUMERIC_SOURCES = ("gsm8k", "secret-digit")  # scored by numeric equality, not by a reasoning-gym verifier


def extract_answer(text: str, mode: str = "strict") -> str | None:
    if mode not in MODES:
        raise MuskError(f"unknown answer_extraction {mode!r}; choices: {list(MODES)}")
    matches = ANSWER_RE.findall(text)
    if matches:
        return matches[-1].strip()
    if mode == "strict":
        return None
    if "<answer>" in text:
        tail = text.rsplit("<answer>", 1)[1].strip()
        if tail:
            return tail
    nums = NUMBER_RE.findall(text)
    return nums[-1].replace(",", "") if nums else None


def _to_number(s: str) -> float | None:
    s = s.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        return float(s)
    except ValueError:
        m = NUMBER_RE.findall(s)
        return float(m[-1].replace(",", "")) if m else None


def gsm8k_score(answer: str | None, reference: str) -> float:
    if answer is None:
        return 0.0
    a, r = _to_number(answer), _to_number(reference)
    return float(a is not None and r is not None and abs(a - r) < 1e-6)


@lru_cache(maxsize=None)
def _rg_scorer(name: str):
    import reasoning_gym

    try:
        return reasoning_gym.get_score_answer_fn(name)
    except Exception as e:
        raise MuskError(f"no reasoning-gym scorer for dataset {name!r}: {e}") from None


def score(entry_json: str, completion: str, mode: str = "strict") -> float:
    """Reward in [0, 1] of one completion for the prompt whose scorer entry is `entry_json`."""
    entry = json.loads(entry_json)
    answer = extract_answer(completion, mode)
    source = entry.get("metadata", {}).get("source_dataset", "")
    if source in NUMERIC_SOURCES:
        return gsm8k_score(answer, str(entry["answer"]))
    if answer is None:
        return 0.0
    try:
        return float(_rg_scorer(source)(answer, entry))
    except Exception:  # a verifier that chokes on a malformed answer scores it 0
        return 0.0
