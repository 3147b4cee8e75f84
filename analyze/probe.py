"""`musk probe CACHE`: is the answer in an expert's cached state, beyond what the question shows?

For every expert and pooling variant, a linear classifier (scikit-learn's multinomial logistic
regression on standardised features) is trained on the training split's cached features to predict a
target, and scored on the held-out split (validation; GSM8K: test). Targets:

- `answer` (default): the whole reference answer (whitespace-stripped string), one class per distinct
  training answer. A held-out answer that no training prompt has cannot be predicted; its share is
  reported.
- `first-token`: the first token of the reference answer in the policy's tokenizer. It shows whether
  the state tells apart the answers' first tokens, which the question alone often does (the leading
  digit of a sum follows from the leading digits of its terms), so it is no evidence that the answer
  is carried; a tokenizer that splits a leading "▁" from every answer gives it one class (refused).

Beside each probe: a question-only control, the same classifier on a one-hot encoding of the question
in the policy's tokenizer (what reading the question alone gives; each expert row's "− control" is
the paired difference on the same held-out prompts, Newcombe's hybrid score interval); the majority
class (the training split's most frequent label, scored on the held-out prompts); chance 1/K (K
distinct training labels); and the same classifier trained on P >= 20 permutations of the training
labels (mean and 95th percentile: what a probe reaches with no information). Accuracies carry Wilson
95% intervals over held-out prompts (not distinct questions). Reads only the cache (and the policy's
tokenizer); random_token / random_layer read draw 0 of their seeded draws.
"""

from __future__ import annotations

import time
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from cache.reader import Cache
from core.errors import MuskError

TARGETS = ("answer", "first-token")
MIN_PERMUTATIONS = 20
Z95 = 1.959963984540054  # standard normal 97.5% quantile
CONTROL = "question-only control"


class ProbeResult(NamedTuple):
    """One probe: accuracies are shares of the n_val held-out prompts, in [0, 1]; _lo/_hi their Wilson
    95% bounds."""

    accuracy: float
    accuracy_lo: float
    accuracy_hi: float
    shuffled: float
    """Mean accuracy of the classifier trained on `permutations` permutations of the training labels."""
    shuffled_p95: float
    """Their 95th percentile (numpy's linear interpolation)."""
    permutations: int
    majority: float
    """Held-out share of the training split's most frequent label."""
    majority_lo: float
    majority_hi: float
    chance: float
    """1 / classes."""
    unseen: float
    """Held-out share whose label no training prompt has (no probe predicts it)."""
    n_train: int
    n_val: int
    classes: int
    """Distinct labels in the training split."""
    unconverged: int = 0
    """Fits (of the 1 + permutations) whose lbfgs stopped at max_iter before converging."""


@dataclass(frozen=True)
class ProbeConfig:
    C: float = 1.0
    """Inverse L2 strength of the logistic regression (scikit-learn's C)."""
    max_iter: int = 500
    """lbfgs iterations."""
    seed: int = 0
    """Seed of the label permutations."""
    permutations: int = MIN_PERMUTATIONS
    """Shuffled-label fits per probe (at least MIN_PERMUTATIONS)."""
    max_train: int | None = None
    """Keep only the first max_train training prompts (large caches); None keeps all."""
    target: str = "answer"
    """What is predicted: one of TARGETS (module docstring)."""
    variants: tuple[str, ...] | None = None
    """Pooling variants to probe (in the cache's order); None probes every variant the cache holds."""


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials (Wilson 1927): (lo, hi) in [0, 1]. n >= 1."""
    p = k / n
    den = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / den
    half = z * np.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return float(max(0.0, centre - half)), float(min(1.0, centre + half))


def paired_difference(a: np.ndarray, b: np.ndarray, z: float = Z95) -> tuple[float, float, float]:
    """mean(a) − mean(b) for paired 0/1 outcomes a, b [n], with Newcombe's hybrid score interval
    (Newcombe 1998, Stat Med 17:2635, method 10: Wilson intervals of each share combined with the
    phi correlation of the pairs). Returns (difference, lo, hi), in [-1, 1]."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    n = len(a)
    both, a_only, b_only = int(np.sum(a & b)), int(np.sum(a & ~b)), int(np.sum(~a & b))
    neither = n - both - a_only - b_only
    p1, p2 = (both + a_only) / n, (both + b_only) / n
    l1, u1 = wilson(both + a_only, n, z)
    l2, u2 = wilson(both + b_only, n, z)
    margins = (both + a_only) * (b_only + neither) * (both + b_only) * (a_only + neither)
    phi = (both * neither - a_only * b_only) / np.sqrt(margins) if margins else 0.0
    lo = np.sqrt(max(0.0, (p1 - l1) ** 2 - 2 * phi * (p1 - l1) * (u2 - p2) + (u2 - p2) ** 2))
    hi = np.sqrt(max(0.0, (u1 - p1) ** 2 - 2 * phi * (u1 - p1) * (p2 - l2) + (p2 - l2) ** 2))
    return p1 - p2, float(max(-1.0, p1 - p2 - lo)), float(min(1.0, p1 - p2 + hi))


def fit_probe(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
              cfg: ProbeConfig = ProbeConfig()) -> tuple[ProbeResult, np.ndarray]:
    """Probe one feature matrix: x_train [n, d], y_train [n] int labels; x_val [m, d], y_val [m].
    Returns the result and [m] bool hits (the classifier right on each held-out prompt).

    Standardised per dimension with the training split's mean and std (a constant dimension is left
    at 0). Raises MuskError on empty splits, non-finite features, fewer than MIN_PERMUTATIONS
    permutations, or one training class (every classifier is then the majority rule: nothing to probe)."""
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    if len(x_train) == 0 or len(x_val) == 0:
        raise MuskError(f"the probe needs training and held-out prompts; got {len(x_train)} and {len(x_val)}")
    if not (np.isfinite(x_train).all() and np.isfinite(x_val).all()):
        raise MuskError("non-finite features; the cache is damaged (rebuild it with `musk extract`)")
    if cfg.permutations < MIN_PERMUTATIONS:
        raise MuskError(f"the shuffled-label level needs at least {MIN_PERMUTATIONS} permutations, got {cfg.permutations}")
    values, counts = np.unique(y_train, return_counts=True)
    if len(values) < 2:
        raise MuskError(f"the target has one class in the {len(y_train)} training prompts: a probe of it says nothing")
    scaler = StandardScaler().fit(x_train)
    xt, xv = scaler.transform(x_train), scaler.transform(x_val)

    stopped = []  # one entry per fit whose lbfgs ran out of iterations (counted, not printed per fit)

    def hits(labels: np.ndarray) -> np.ndarray:
        if len(np.unique(labels)) < 2:  # a permutation keeps the classes, so this cannot happen; kept safe
            return y_val == labels[0]
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            clf = LogisticRegression(C=cfg.C, max_iter=cfg.max_iter).fit(xt, labels)
        stopped.extend(w for w in caught if issubclass(w.category, ConvergenceWarning))
        return clf.predict(xv) == y_val

    rng = np.random.default_rng(cfg.seed)
    shuffled = np.array([hits(rng.permutation(y_train)).mean() for _ in range(cfg.permutations)])
    got = hits(y_train)
    n, k_maj = len(y_val), int(np.sum(y_val == values[np.argmax(counts)]))
    res = ProbeResult(float(got.mean()), *wilson(int(got.sum()), n), float(shuffled.mean()),
                      float(np.percentile(shuffled, 95)), cfg.permutations, k_maj / n, *wilson(k_maj, n),
                      1 / len(values), float(np.mean(~np.isin(y_val, values))), len(y_train), n, len(values),
                      len(stopped))
    return res, got


def linear_probe(x_train, y_train, x_val, y_val, cfg: ProbeConfig = ProbeConfig()) -> ProbeResult:
    """fit_probe without the per-prompt hits."""
    return fit_probe(x_train, y_train, x_val, y_val, cfg)[0]


def first_token_labels(tok, answers: list[str]) -> np.ndarray:
    """[N] int64: the first token id of each reference answer in `tok` (no special tokens)."""
    ids = [tok(a, add_special_tokens=False)["input_ids"] for a in answers]
    empty = [a for a, x in zip(answers, ids) if not x]
    if empty:
        raise MuskError(f"{len(empty)} reference answers have no tokens in the policy's tokenizer, e.g. {empty[0]!r}")
    return np.array([x[0] for x in ids], dtype=np.int64)


def target_labels(target: str, answers: list[str], tok, train: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """[N] int64 labels of `target` (TARGETS) and each label's name (label i is names[i]). Raises
    MuskError on an unknown target, or one with a single class on the training rows `train` (naming it)."""
    if target not in TARGETS:
        raise MuskError(f"unknown probe target {target!r}; choices: {list(TARGETS)}")
    if target == "answer":
        names, y = np.unique([str(a).strip() for a in answers], return_inverse=True)
        names = names.tolist()
    else:
        ids = first_token_labels(tok, answers)
        vocab, y = np.unique(ids, return_inverse=True)
        names = [str(t) for t in tok.convert_ids_to_tokens(vocab.tolist())]
    y = y.astype(np.int64)
    seen = np.unique(y[train])
    if len(seen) < 2:
        raise MuskError(f"the {target} target has one class on the {len(train)} training prompts (every label is "
                        f"{names[int(seen[0])]!r}): the probe would score 100% for every expert and say nothing"
                        + (" (use --target answer)" if target == "first-token" else ""))
    return y, names


def question_features(tok, texts: list[str], train: np.ndarray, tail: int = 16, max_columns: int = 4096) -> np.ndarray:
    """[N, V] float64: the question-only control's encoding of each question in `tok` (no special tokens):
    counts of each token (a bag of tokens) and a one-hot of each of the last `tail` tokens at its
    position from the end; columns are the features seen in the training rows `train`, the
    `max_columns` most frequent (ties by first appearance)."""
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    keys = [[("bag", i) for i in row] + [(p, i) for p, i in enumerate(reversed(row[-tail:]))] for row in ids]
    freq = Counter(k for r in train for k in set(keys[r]))
    col = {k: j for j, (k, _) in enumerate(freq.most_common(max_columns))}
    x = np.zeros((len(texts), len(col)))
    for r, row in enumerate(keys):
        for k in row:
            if k in col:
                x[r, col[k]] += 1.0
    return x


def held_out_split(c: Cache) -> str:
    """The split the probe scores on: val, or test where the cache has no val (GSM8K)."""
    return "val" if len(c.split_indices("val")) else "test"


def probe_rows(features, texts: list[str], y: np.ndarray, train: np.ndarray, *, val: np.ndarray, tok,
               cfg: ProbeConfig = ProbeConfig()) -> list[dict]:
    """The control row, then one row per (expert, variant, x [N, d]) of the iterable `features`:
    {expert, variant, dim, seconds, **ProbeResult, minus_control, minus_control_lo, minus_control_hi}
    (expert minus control in shares, paired on the held-out prompts; None on the control row)."""
    t0 = time.perf_counter()
    xq = question_features(tok, texts, train)
    ctrl, ctrl_hits = fit_probe(xq[train], y[train], xq[val], y[val], cfg)
    rows = [{"expert": CONTROL, "variant": "question tokens", "dim": int(xq.shape[1]),
             "seconds": time.perf_counter() - t0, **ctrl._asdict(),
             "minus_control": None, "minus_control_lo": None, "minus_control_hi": None}]
    for expert, variant, x in features:
        t0 = time.perf_counter()
        r, got = fit_probe(x[train], y[train], x[val], y[val], cfg)
        diff, lo, hi = paired_difference(got, ctrl_hits)
        rows.append({"expert": expert, "variant": variant, "dim": int(x.shape[1]), "seconds": time.perf_counter() - t0,
                     **r._asdict(), "minus_control": diff, "minus_control_lo": lo, "minus_control_hi": hi})
    return rows


def probe_cache(path: Path, tok, cfg: ProbeConfig = ProbeConfig()) -> list[dict]:
    """probe_rows for every (expert, variant) of the cache at `path`, each row with the held-out split's
    name and the target. `tok`: the policy's tokenizer. Raises MuskError on a missing or foreign
    cache, an unknown target, a target with one class or a variant the cache lacks."""
    with Cache(path) as c:
        prompts = c.prompts()
        train, split = c.split_indices("train"), held_out_split(c)
        val = c.split_indices(split)
        if cfg.max_train is not None:
            train = train[: cfg.max_train]
        y, _ = target_labels(cfg.target, prompts["answer"], tok, train)
        variants = [v for v in c.variants if cfg.variants is None or v in cfg.variants]
        missing = sorted(set(cfg.variants or ()) - set(c.variants))
        if missing:
            raise MuskError(f"{path}: no pooling variant(s) {missing} in this cache; it holds {list(c.variants)}")
        feats = ((e, v, c.features(v, [e])[e].astype(np.float64)) for e in c.experts for v in variants)
        rows = probe_rows(feats, prompts["text"], y, train, val=val, tok=tok, cfg=cfg)
    return [{**r, "split": split, "target": cfg.target} for r in rows]


def _pct(r: dict, key: str) -> str:
    return f"{100 * r[key]:.1f} [{100 * r[key + '_lo']:.1f}, {100 * r[key + '_hi']:.1f}]"


def _unconverged(rows: list[dict]) -> str:
    n = sum(r.get("unconverged", 0) for r in rows)
    fits = sum(1 + r["permutations"] for r in rows)
    return (f" lbfgs stopped at its iteration limit before converging in {n} of {fits} fits (scikit-learn's "
            "ConvergenceWarning, counted here instead of printed per fit)." if n else "")


def probe_markdown(rows: list[dict], title: str) -> str:
    """The probe table as Markdown: accuracies in % of held-out prompts with Wilson 95% intervals."""
    if len(rows) < 2:
        return f"### {title}\n\nNo expert.\n"
    r0 = rows[0]
    head = ("| expert | variant | d | probe % [95% CI] | − control (points) [95% CI] | shuffled labels: mean, 95th pct |\n"
            "|---|---|---|---|---|---|\n")
    body = "".join(
        f"| {r['expert']} | {r['variant']} | {r['dim']} | {_pct(r, 'accuracy')} | "
        + ("—" if r["minus_control"] is None else
           f"{100 * r['minus_control']:+.1f} [{100 * r['minus_control_lo']:+.1f}, {100 * r['minus_control_hi']:+.1f}]")
        + f" | {100 * r['shuffled']:.1f}, {100 * r['shuffled_p95']:.1f} |\n" for r in rows)
    what = ("the whole reference answer" if r0["target"] == "answer" else
            "the first token of the reference answer in the policy's tokenizer (this shows whether the state tells "
            "the answers' first tokens apart, which the question alone often does; compare with the control row, "
            "and use the whole-answer target for whether the answer is carried)")
    note = (f"\nTarget: {what}. Logistic regression on standardised features, trained on {r0['n_train']} training "
            f"prompts ({r0['classes']} classes: chance 1/{r0['classes']} = {100 * r0['chance']:.1f}%); majority class "
            f"{_pct(r0, 'majority')}; {100 * r0['unseen']:.1f}% of the held-out prompts have a label no training "
            f"prompt has. Accuracy in % of {r0['n_val']} {r0['split']} prompts (prompts, not distinct questions), "
            f"Wilson 95% intervals. {CONTROL}: the same classifier on the question's tokens alone (a bag of tokens "
            f"and the last 16 tokens by position); − control: expert minus control, paired on the same prompts "
            f"(Newcombe's hybrid score interval): the claim is what an expert's state adds to the question. Shuffled "
            f"labels: {r0['permutations']} permutations of the training labels. random_token / random_layer: draw 0. "
            f"{sum(r['seconds'] for r in rows):.1f} s in all.{_unconverged(rows)}\n")
    return f"### {title}\n\n{head}{body}{note}"


def write_probe(rows: list[dict], out: Path, title: str) -> Path:
    """Write `out`.md and `out`.csv (one row per probe, the control first). Returns the Markdown path."""
    import csv
    import io

    from core.atomic import atomic_write_bytes

    out.parent.mkdir(parents=True, exist_ok=True)
    md = out.with_suffix(".md")
    atomic_write_bytes(md, probe_markdown(rows, title).encode())
    if rows:
        buf = io.StringIO()
        w = csv.DictWriter(buf, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
        atomic_write_bytes(out.with_suffix(".csv"), buf.getvalue().encode())
    return md
