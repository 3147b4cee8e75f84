"""What "held out" means, shared by prompt generation, the cache and training: a held-out (val or
test) prompt is one whose whitespace-normalised question text is not in the training split."""

from __future__ import annotations


def normalize_question(text: str) -> str:
    """Whitespace-normalised question text: what "the same question" means for held-out checks."""
    return " ".join(str(text).split())


def count_overlap(texts: list[str], splits: list[str]) -> int:
    """How many held-out prompts (split != "train") have a question that is in the training split."""
    train = {normalize_question(t) for t, s in zip(texts, splits) if s == "train"}
    return sum(normalize_question(t) in train for t, s in zip(texts, splits) if s != "train")
