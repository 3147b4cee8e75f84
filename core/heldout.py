"""What "held out" means, shared by prompt generation, the cache and training: a held-out (val or
test) prompt is one whose problem (`problem_key`) is not a problem of the training split.

Two texts are one problem when they differ only in whitespace, or when they are the same chain of
sums and differences with its terms in another order (`3 + 8 =` and `8 + 3 =`; `4 - 3 + 8 =` and
`8 + 4 - 3 =`): reasoning-gym's chain_sum and decimal_chain_sum word every such reordering as a
separate question, and a model trained on one has seen the other. Only that whole-expression form
is reordered: each term keeps its own operator and written literal (`5 - 9` and `9 - 5` stay two
problems, `5 - -3` and `5 + 3` too), and an expression with any other operator or bracket is left
as it is, since reordering it could change its value.
"""

from __future__ import annotations

import re

_NUM = r"-?\d+(?:\.\d+)?"
# reasoning-gym's chain_sum / decimal_chain_sum template: "<instruction>: a op b op c ... ="
_CHAIN_SUM = re.compile(rf"^(?P<head>.*: )(?P<expr>{_NUM}(?: [+-] {_NUM})+)(?P<tail> =)$")


def normalize_question(text: str) -> str:
    """Whitespace-normalised question text: what "the same text" means for held-out checks."""
    return " ".join(str(text).split())


def _sorted_terms(expr: str) -> str:
    """A chain of `+`/`-` terms with its signed terms sorted: `8 - 3 + 1` -> `1 + 8 - 3`.

    Each term is (operator, literal), the first term's operator `+`; the sort is over those pairs, so
    only reorderings that leave every term's sign and spelling alone map to one string."""
    tokens = expr.split(" ")  # normalised: "a op b op c"
    terms = [("+", tokens[0])] + [(tokens[i], tokens[i + 1]) for i in range(1, len(tokens), 2)]
    terms.sort(key=lambda t: (t[0] != "+", t[1]))  # "+" terms first: the first term is one, written unsigned
    return terms[0][1] + "".join(f" {op} {lit}" for op, lit in terms[1:])


def problem_key(text: str) -> str:
    """The problem a question poses, for held-out checks and the validation partition: the
    whitespace-normalised text, with a chain sum's terms in a canonical order (module docstring)."""
    norm = normalize_question(text)
    m = _CHAIN_SUM.match(norm)
    if m is None:
        return norm
    return m["head"] + _sorted_terms(m["expr"]) + m["tail"]


def count_overlap(texts: list[str], splits: list[str]) -> int:
    """How many held-out prompts (split != "train") pose a problem that is in the training split."""
    train = {problem_key(t) for t, s in zip(texts, splits) if s == "train"}
    return sum(problem_key(t) in train for t, s in zip(texts, splits) if s != "train")


def composition(tasks: list[str], splits: list[str]) -> dict[str, dict[str, dict]]:
    """Each dataset's part of each split: {split: {task: {"prompts": n, "share": n / split size}}},
    splits and tasks in order of first appearance. Shares count prompts, not distinct questions."""
    counts: dict[str, dict[str, int]] = {}
    for t, s in zip(tasks, splits):
        counts.setdefault(s, {}).setdefault(t, 0)
        counts[s][t] += 1
    return {s: {t: {"prompts": n, "share": n / sum(c.values())} for t, n in c.items()} for s, c in counts.items()}
