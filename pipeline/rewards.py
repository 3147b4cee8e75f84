"""Verifiable rewards: the task's own verifier on the answer inside <answer> tags.

strict (the paper's): the last closed <answer>...</answer> match; no match scores 0.
lenient (for small models that rarely close the tag in a short budget): the last closed match,
else the text after the last unclosed <answer>, else the last number in the completion.

Failures are loud. A prompt whose dataset has no scorer raises MuskError. A verifier that raises on
a completion's answer scores it 0 (a malformed answer is a wrong answer) but is counted in
`SCORER_ERRORS`, which training reports per step (`reward/scorer_errors`) and whose first
occurrence is shown with its prompt. `check_references` proves at extraction that every prompt's own
reference answer scores 1.0 through exactly this path.
"""

from __future__ import annotations

import json
import re
import warnings
from dataclasses import dataclass, field
from functools import lru_cache

from core.errors import MuskError

ANSWER_RE = re.compile(r"<answer>(.*?)</answer>", re.DOTALL)
NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
MODES = ("strict", "lenient")
NUMERIC_SOURCES = ("gsm8k", "secret-digit", "secret-label")  # scored by numeric equality, not by a reasoning-gym verifier


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


def to_number(s: str) -> float | None:
    s = s.strip().replace(",", "").replace("$", "").rstrip(".")
    try:
        return float(s)
    except ValueError:
        m = NUMBER_RE.findall(s)
        return float(m[-1].replace(",", "")) if m else None


def gsm8k_score(answer: str | None, reference: str) -> float:
    if answer is None:
        return 0.0
    a, r = to_number(answer), to_number(reference)
    return float(a is not None and r is not None and abs(a - r) < 1e-6)


@lru_cache(maxsize=None)
def _rg_scorer(name: str):
    import reasoning_gym

    try:
        return reasoning_gym.get_score_answer_fn(name)
    except Exception as e:
        raise MuskError(f"no reasoning-gym scorer for dataset {name!r}: {e}") from None


@dataclass
class ScorerErrors:
    """Verifier exceptions since the last `take()`: how many, and the first one ever (shown once)."""

    count: int = 0
    first: str | None = None
    shown: bool = False
    _pending: list = field(default_factory=list)

    def record(self, source: str, answer: str, question: str, error: Exception) -> None:
        self.count += 1
        if self.first is None:
            self.first = (f"the {source!r} verifier raised {type(error).__name__}: {error} on answer "
                          f"{answer[:120]!r} for the prompt {question[:200]!r}; scored 0")
        if not self.shown:
            self.shown = True
            warnings.warn(f"musk: {self.first} (further verifier errors are counted in reward/scorer_errors)",
                          RuntimeWarning, stacklevel=3)

    def take(self) -> int:
        """The count since the last take (and reset it)."""
        n, self.count = self.count, 0
        return n


SCORER_ERRORS = ScorerErrors()


def score(entry_json: str, completion: str, mode: str = "strict") -> float:
    """Reward in [0, 1] of one completion for the prompt whose scorer entry is `entry_json`.

    Raises MuskError when the entry's dataset has no verifier; a verifier exception on this answer
    scores 0 and is counted in SCORER_ERRORS.
    """
    entry = json.loads(entry_json)
    answer = extract_answer(completion, mode)
    source = entry.get("metadata", {}).get("source_dataset", "")
    if source in NUMERIC_SOURCES:
        return gsm8k_score(answer, str(entry["answer"]))
    scorer = _rg_scorer(source)  # raises on an unknown dataset, whatever the answer
    if answer is None:
        return 0.0
    try:
        return float(scorer(answer, entry))
    except Exception as e:  # a verifier that chokes on a malformed answer scores it 0, counted
        SCORER_ERRORS.record(source, answer, str(entry.get("question", "")), e)
        return 0.0


def check_references(entries: list[str], answers: list[str], tasks: list[str], mode: str = "strict") -> None:
    """Every prompt's own reference answer, wrapped in <answer> tags, must score 1.0 through `score`
    (the entry's JSON round trip included). Raises MuskError naming each dataset that fails, with
    how many of its prompts fail and one example."""
    bad: dict[str, list[str]] = {}
    for entry, answer, task in zip(entries, answers, tasks):
        before = SCORER_ERRORS.count
        try:
            r = score(entry, f"<answer>{answer}</answer>", mode)
        except MuskError as e:
            bad.setdefault(task, []).append(str(e))
            continue
        if r != 1.0:
            why = "the verifier raised" if SCORER_ERRORS.count > before else f"scored {r}"
            bad.setdefault(task, []).append(f"reference {answer[:80]!r} {why}")
    if bad:
        SCORER_ERRORS.take()
        lines = "; ".join(f"{t}: {len(v)} of {tasks.count(t)} prompts fail (e.g. {v[0]})" for t, v in sorted(bad.items()))
        raise MuskError(f"reference answers that do not score 1.0 through the training scorer: {lines}. "
                        "Training on these datasets would reward nothing; fix or remove them from the family.")
