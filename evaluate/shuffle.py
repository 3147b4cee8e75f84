"""The content control of `musk eval` (shuffle:NAME, shuffle:all): each evaluated row reads the shuffled
experts' features (or hints) of another row, its *partner*.

A partner is drawn so that the control removes the question's content and nothing else:

- it comes from the row's own dataset (the prompt's `task`), so "with − shuffled" does not mix task
  identity with question content;
- it poses another question (a derangement of the distinct questions, so repeated questions never
  land on a twin);
- where the reference answers are given, its answer differs from the row's own (an expert whose state
  depends on the answer alone, as the probe oracle's does, would otherwise hand the row its own
  answer back).

Within a dataset, questions are grouped by answer; a derangement that avoids every same-answer partner
exists exactly when no answer is shared by more than half of the dataset's distinct questions (Hall's
condition). Otherwise the fewest possible same-answer pairs are kept (2m − k of them, m questions of
the most common answer among k) and the dataset is named in the log and counted in the statistics. A
dataset with a single distinct question among the evaluated prompts cannot be deranged within itself:
its rows are left out of the shuffle condition (not evaluated under it) and counted.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from core.errors import MuskError
from evaluate.records import Condition
from train.inputs import ExpertView

REJECTION_TRIES = 100  # uniform draws tried before the construction (a plain derangement: ~e needed)
MIX_SWEEPS = 20  # random swaps per question that mix the constructed assignment


def derangement(k: int, rng: np.random.Generator) -> np.ndarray:
    """A uniformly drawn permutation of range(k) with no fixed point (k >= 2), by rejection: about e
    draws on average."""
    while True:
        perm = rng.permutation(k)
        if not np.any(perm == np.arange(k)):
            return perm


def _conflicts(classes: np.ndarray, perm: np.ndarray) -> int:
    return int(np.sum(classes[perm] == classes))


def avoiding_permutation(classes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """[k] permutation of range(k) (k >= 2, every element its own question) with no fixed point and the
    fewest i with classes[perm[i]] == classes[i]: none when no class holds more than k/2 elements,
    else 2m − k (m the largest class's size; m = k leaves k).

    Uniform draws are tried first (uniform over the valid permutations when one is accepted; with all
    classes distinct this is `derangement`, draw for draw). Failing that, the elements are sorted by
    class, largest class first, and each is sent m places on (a cyclic shift by m leaves a block of at
    most m elements in k − m >= m positions outside it), then mixed by MIX_SWEEPS * k random swaps that
    keep the permutation fixed-point free and do not add a same-class pair."""
    k = len(classes)
    for _ in range(REJECTION_TRIES):
        perm = rng.permutation(k)
        if not np.any(perm == np.arange(k)) and _conflicts(classes, perm) == 0:
            return perm
    counts = Counter(classes.tolist())
    rank = {c: r for r, c in enumerate(rng.permutation(sorted(counts)).tolist())}
    big = max(counts, key=lambda c: (counts[c], -rank[c]))
    order = sorted(rng.permutation(k).tolist(), key=lambda i: (classes[i] != big, rank[classes[i]]))
    shift = counts[big] if counts[big] < k else 1  # one class: any fixed-point-free shift
    perm = np.empty(k, dtype=np.int64)
    for p, i in enumerate(order):
        perm[i] = order[(p + shift) % k]
    for i, j in rng.integers(0, k, size=(MIX_SWEEPS * k, 2)).tolist():
        a, b = perm[j], perm[i]  # the swapped targets of i and j
        if i == j or a == i or b == j:
            continue
        before = (classes[perm[i]] == classes[i]) + (classes[perm[j]] == classes[j])
        if (classes[a] == classes[i]) + (classes[b] == classes[j]) <= before:
            perm[i], perm[j] = a, b
    return perm


def shuffled(cond: Condition, rows: np.ndarray, seed: int, questions: list | None = None, *,
             datasets: list | None = None, answers: list | None = None, log=None) -> Condition:
    """A shuffle condition with its source rows (module docstring): within each dataset, the shuffled
    experts of every row of question q read a row of question perm[q], perm = avoiding_permutation over
    the dataset's distinct questions (classes: the answer of each question's first row, or the question
    itself without answers), drawn from default_rng([seed, key]) shared by the datasets in order of first
    appearance; key the expert's index for shuffle:NAME and the team size n for shuffle:all (every
    expert moved together). Rows of a dataset with one distinct question get no partner and are absent
    from the source mapping (`partnered`).

    rows [k] cache rows; questions, datasets, answers: one per row (defaults: each row its own question,
    one dataset, answers unknown). log: told which datasets were left out or kept same-answer pairs.
    Raises MuskError when no dataset holds two distinct questions."""
    if not cond.view.source:
        return cond
    es = list(cond.view.source)
    rows = [int(r) for r in rows]
    questions = list(rows) if questions is None else list(questions)
    datasets = [""] * len(rows) if datasets is None else list(datasets)
    by_dataset: dict = {}  # dataset -> question -> its rows, in order
    for row, q, d in zip(rows, questions, datasets):
        by_dataset.setdefault(d, {}).setdefault(q, []).append(row)
    if all(len(qs) < 2 for qs in by_dataset.values()):
        raise MuskError(f"--ablate {cond.name}: no dataset of the evaluated prompts holds two distinct questions "
                        f"({len(set(questions))} distinct question(s) in {len(by_dataset)} dataset(s)); a shuffle "
                        "within a dataset needs two or more (raise --limit)")
    answer_of = dict(zip(rows, answers)) if answers is not None else None
    rng = np.random.default_rng([seed, es[0] if len(es) == 1 else len(es)])
    src: dict[int, int] = {}
    alone, kept = [], []
    for d, members in by_dataset.items():
        distinct = list(members)
        if len(distinct) < 2:
            alone.append(d)
            continue
        if answer_of is None:
            classes = np.arange(len(distinct))
        else:
            labels = [str(answer_of[members[q][0]]).strip() for q in distinct]
            classes = np.unique(labels, return_inverse=True)[1]
        perm = avoiding_permutation(classes, rng)
        if _conflicts(classes, perm):
            kept.append(d)
        for qi, q in enumerate(distinct):
            other = members[distinct[perm[qi]]]
            for j, row in enumerate(members[q]):
                src[row] = other[j % len(other)]
    if log is not None and alone:
        log(f"--ablate {cond.name}: {sum(len(r) for d in alone for r in by_dataset[d].values())} prompt(s) of "
            f"{len(alone)} dataset(s) with one distinct question ({', '.join(map(str, alone))}) have no partner in "
            "their dataset and are left out of this condition")
    if log is not None and kept:
        log(f"--ablate {cond.name}: in {', '.join(map(str, kept))} one answer is shared by more than half of the "
            "distinct questions, so some same-answer partners remain (the fewest possible; counted in summary.json)")
    return cond._replace(view=ExpertView(source={e: src for e in es}))


def partnered(cond: Condition, rows: np.ndarray) -> np.ndarray:
    """The rows of `rows` that `cond` evaluates: a shuffle's rows with a partner; every row otherwise."""
    if not cond.view.source:
        return rows
    src = next(iter(cond.view.source.values()))
    return np.array([r for r in rows if int(r) in src], dtype=np.asarray(rows).dtype)


def shuffle_stats(cond: Condition, rows: np.ndarray, datasets: list, answers: list) -> dict:
    """What a shuffle condition's partners share with their rows, for summary.json: rows (evaluated
    rows, with a partner), left_out (rows without one), same_answer_share and cross_dataset_share
    (shares of the evaluated rows whose partner's reference answer, or dataset, equals / differs from
    their own; None with no row), and same_answer_datasets (those keeping same-answer pairs)."""
    src = next(iter(cond.view.source.values()))
    at = {int(r): i for i, r in enumerate(rows)}
    same = [r for r, s in src.items() if str(answers[at[r]]).strip() == str(answers[at[s]]).strip()]
    cross = [r for r, s in src.items() if datasets[at[r]] != datasets[at[s]]]
    n = len(src)
    return {"rows": n, "left_out": len(rows) - n,
            "same_answer_share": len(same) / n if n else None,
            "cross_dataset_share": len(cross) / n if n else None,
            "same_answer_datasets": sorted({str(datasets[at[r]]) for r in same})}
