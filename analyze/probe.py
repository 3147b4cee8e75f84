"""`musk probe CACHE`: is the answer in an expert's cached state at all?

For every expert and pooling variant, a linear classifier (scikit-learn's multinomial logistic
regression on standardised features) is trained on the training split's cached features to predict
the first token of the reference answer in the policy's tokenizer, and scored on the held-out split
(validation; GSM8K: test). Beside it: the majority-class rate (the training split's most frequent
first token, scored on the held-out prompts) and the same classifier trained on shuffled training
labels (what a probe learns from no information: it should sit at the majority rate or below).
A variant far above both carries the answer's first token linearly; one at the shuffled rate does
not (before any RL is spent on it). Reads only the cache: seconds on a CPU for the embedded team.

Every number is a share of held-out prompts (not distinct questions); random_token / random_layer
read draw 0 of their seeded draws.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cache.reader import Cache
from core.errors import MuskError


class ProbeResult(NamedTuple):
    """One probe: accuracies are shares of the n_val held-out prompts, in [0, 1]."""

    accuracy: float
    """The classifier's accuracy on the held-out prompts."""
    shuffled: float
    """The same classifier trained on the training labels shuffled (seeded)."""
    majority: float
    """Held-out share of the training split's most frequent label."""
    n_train: int
    n_val: int
    classes: int
    """Distinct labels in the training split."""


@dataclass(frozen=True)
class ProbeConfig:
    C: float = 1.0
    """Inverse L2 strength of the logistic regression (scikit-learn's C)."""
    max_iter: int = 500
    """lbfgs iterations."""
    seed: int = 0
    """Seed of the label shuffle."""
    max_train: int | None = None
    """Keep only the first max_train training prompts (large caches); None keeps all."""


def linear_probe(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                 cfg: ProbeConfig = ProbeConfig()) -> ProbeResult:
    """Probe one feature matrix: x_train [n, d], y_train [n] int labels; x_val [m, d], y_val [m].

    Standardised per dimension with the training split's mean and std (a constant dimension is left
    at 0). Raises MuskError on empty splits or non-finite features."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if len(x_train) == 0 or len(x_val) == 0:
        raise MuskError(f"the probe needs training and held-out prompts; got {len(x_train)} and {len(x_val)}")
    if not (np.isfinite(x_train).all() and np.isfinite(x_val).all()):
        raise MuskError("non-finite features; the cache is damaged (rebuild it with `musk extract`)")
    scaler = StandardScaler().fit(x_train)
    xt, xv = scaler.transform(x_train), scaler.transform(x_val)
    values, counts = np.unique(y_train, return_counts=True)
    majority = float(np.mean(y_val == values[np.argmax(counts)]))

    def fit_score(labels: np.ndarray) -> float:
        if len(np.unique(labels)) < 2:  # one class: the classifier is the majority rule
            return float(np.mean(y_val == labels[0]))
        clf = LogisticRegression(C=cfg.C, max_iter=cfg.max_iter)
        return float(clf.fit(xt, labels).score(xv, y_val))

    shuffled = np.random.default_rng(cfg.seed).permutation(y_train)
    return ProbeResult(fit_score(y_train), fit_score(shuffled), majority, len(y_train), len(y_val), len(values))


def first_token_labels(tok, answers: list[str]) -> np.ndarray:
    """[N] int64: the first token id of each reference answer in `tok` (no special tokens)."""
    ids = [tok(a, add_special_tokens=False)["input_ids"] for a in answers]
    empty = [a for a, x in zip(answers, ids) if not x]
    if empty:
        raise MuskError(f"{len(empty)} reference answers have no tokens in the policy's tokenizer, e.g. {empty[0]!r}")
    return np.array([x[0] for x in ids], dtype=np.int64)


def held_out_split(c: Cache) -> str:
    """The split the probe scores on: val, or test where the cache has no val (GSM8K)."""
    return "val" if len(c.split_indices("val")) else "test"


def probe_cache(path: Path, tok, cfg: ProbeConfig = ProbeConfig()) -> list[dict]:
    """One row per (expert, variant) of the cache at `path`: {expert, variant, dim, seconds, **ProbeResult}.
    `tok`: the policy's tokenizer. Raises MuskError on a missing or foreign cache."""
    with Cache(path) as c:
        answers = c.prompts()["answer"]
        train, split = c.split_indices("train"), held_out_split(c)
        val = c.split_indices(split)
        if cfg.max_train is not None:
            train = train[: cfg.max_train]
        y = first_token_labels(tok, answers)
        rows = []
        for expert in c.experts:
            for variant in c.variants:
                t0 = time.perf_counter()
                x = c.features(variant, [expert])[expert].astype(np.float64)  # [N, d]
                r = linear_probe(x[train], y[train], x[val], y[val], cfg)
                rows.append({"expert": expert, "variant": variant, "dim": int(x.shape[1]), "split": split,
                             "seconds": time.perf_counter() - t0, **r._asdict()})
    return rows


def probe_markdown(rows: list[dict], title: str) -> str:
    """The probe table as Markdown: accuracies in % of held-out prompts."""
    if not rows:
        return f"### {title}\n\nNo expert.\n"
    r0 = rows[0]
    head = ("| expert | variant | d | probe | shuffled labels | majority class |\n"
            "|---|---|---|---|---|---|\n")
    body = "".join(f"| {r['expert']} | {r['variant']} | {r['dim']} | {100 * r['accuracy']:.1f} | "
                   f"{100 * r['shuffled']:.1f} | {100 * r['majority']:.1f} |\n" for r in rows)
    note = (f"\nLinear probe (logistic regression, standardised features) for the first token of the reference "
            f"answer in the policy's tokenizer: trained on {r0['n_train']} training prompts "
            f"({r0['classes']} distinct first tokens), accuracy in % of {r0['n_val']} {r0['split']} prompts "
            f"(prompts, not distinct questions). random_token / random_layer: draw 0. "
            f"{sum(r['seconds'] for r in rows):.1f} s in all.\n")
    return f"### {title}\n\n{head}{body}{note}"


def write_probe(rows: list[dict], out: Path, title: str) -> Path:
    """Write `out`.md and `out`.csv (one row per probe). Returns the Markdown path."""
    import csv

    from core.atomic import atomic_write_bytes

    out.parent.mkdir(parents=True, exist_ok=True)
    md = out.with_suffix(".md")
    atomic_write_bytes(md, probe_markdown(rows, title).encode())
    if rows:
        import io

        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
        atomic_write_bytes(out.with_suffix(".csv"), buf.getvalue().encode())
    return md
