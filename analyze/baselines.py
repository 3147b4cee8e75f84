"""What the experts know on their own: baseline rows from the solo answers in a run's cache.

Per family and team (the cache a run read, path from its config.yaml, and the run's experts), on the
cache's held-out prompts (val; GSM8K: test), the prompts the methods' final evaluation scores:

Every row is scored as the methods are: a solo answer is correct when its reward (pipeline/solo.py:
greedy, the task's answer format, the task's verifier) is at least CORRECT = 1.0, as evaluation
counts a method's answer (evaluate/records.py, `reward >= 1.0`); partial credit (chain_sum scores
"111" for 11 at 0.667) counts as wrong.

- each expert alone: its accuracy;
- best expert alone: the expert with the highest accuracy on the *training* split (ties: the first
  in team order), scored on the held-out prompts, so choosing it uses no held-out label;
- any expert correct: per prompt whether any expert is correct (the team's oracle upper bound: what a
  perfect per-prompt chooser among the experts' own answers would reach);
- majority vote: per prompt the answer that most experts give, answers equal as the scorer compares
  them (`canonical_answer`: "18", "18.00" and, for numeric datasets, "$18" are one vote); experts
  without a parseable answer abstain; a tie between answers scores the mean of the tied answers'
  correctness (a uniform random tie-break, in expectation); no answer: 0.

The unit is prompts (not distinct questions). `extend_table1` adds these rows to Table 1 and marks
a method cell below its best expert; `paired_best_expert` sets each method against the best expert
per prompt; `solo_cost_table` gives each expert's solo decode cost.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter, defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from analyze.records import row_label, setting_rows, last_full_records, per_prompt, question_clusters, seeds_cell
from analyze.runs import Run, dtype_of
from analyze.tables import Table
from cache.reader import Cache
from core.errors import MuskError
from pipeline.rewards import NUMERIC_SOURCES, to_number, extract_answer

BELOW = "▼"  # marks a method cell below its best expert alone
CORRECT = 1.0  # a reward counts as a correct answer from here on (evaluate/records.py: reward >= 1.0)


def canonical_answer(answer: str, source: str = "") -> str:
    """The answer as the scorer compares it, so that answers it scores alike are one vote: for the
    numeric datasets (NUMERIC_SOURCES, scored by pipeline.rewards.gsm8k_score) the number it reads
    ("$1,800.00" -> "1800"); for the others a whitespace-normalised text, or its number when the whole
    text is one ("18.00" -> "18"; "$18" stays "$18": reasoning-gym's chain_sum gives it partial credit)."""
    s = " ".join(answer.split())
    x = to_number(s) if source in NUMERIC_SOURCES else None
    if x is None:
        try:
            x = float(s.replace(",", "")) if s else None
        except ValueError:
            x = None
    return s if x is None else f"{x:.12g}"


class VoteResult(NamedTuple):
    scores: np.ndarray
    """[n] per-prompt score of the majority answer (ties: mean over the tied answers)."""
    ties: int
    """Prompts where two or more answers tied for the most votes."""


def majority_vote(answers: list[list[str | None]], scores: np.ndarray,
                  sources: list[str] | None = None) -> VoteResult:
    """answers: [m experts][n prompts] extracted answers (None: abstains); scores [m, n] correct 0/1;
    sources: [n] each prompt's dataset (how canonical_answer compares; None: not a numeric dataset).
    Answers equal by canonical_answer are one vote, scored by the mean of their experts' scores.
    Returns the vote's per-prompt score [n] and the number of tied prompts."""
    m, n = scores.shape
    out, ties = np.zeros(n, dtype=np.float64), 0
    for j in range(n):
        src = sources[j] if sources else ""
        given = [(canonical_answer(answers[i][j], src), scores[i, j]) for i in range(m) if answers[i][j] is not None]
        if not given:
            continue
        counts = Counter(a for a, _ in given)
        top = max(counts.values())
        tied = [a for a, c in counts.items() if c == top]
        ties += len(tied) > 1
        out[j] = float(np.mean([np.mean([s for a, s in given if a == t]) for t in tied]))
    return VoteResult(out, ties)


@dataclass
class TeamBaselines:
    """The baselines of one team on one cache's held-out prompts (scores per prompt in [0, 1])."""

    family: str
    cache: str
    team: tuple[str, ...]
    split: str
    question_sha: list[str]
    """[n] the held-out prompts' question digests (as eval records key them)."""
    solo: dict[str, np.ndarray]
    """expert -> [n] 0/1: its solo answer on each held-out prompt is correct (reward >= CORRECT)."""
    train_means: dict[str, float]
    """expert -> accuracy on the training split (what picks the best expert)."""
    best: str
    oracle: np.ndarray
    vote: VoteResult

    @property
    def n(self) -> int:
        return len(self.question_sha)


def team_baselines(cache_path: Path, team: tuple[str, ...] | None, family: str = "?") -> TeamBaselines:
    """Baselines of `team` (None: every expert of the cache with solo answers) from the cache at
    `cache_path`. Raises MuskError when the cache or an expert's solo answers are missing."""
    with Cache(cache_path) as c:
        names = list(team) if team else [n for n in c.experts if c.has_solo(n)]
        if not names:
            raise MuskError(f"cache {str(cache_path)!r} holds no solo answers (extract with solo: true)")
        split = "val" if len(c.split_indices("val")) else "test"
        val, train = c.split_indices(split), c.split_indices("train")
        prompts = c.prompts()
        texts = prompts["text"]
        sources = [json.loads(prompts["entry"][i]).get("metadata", {}).get("source_dataset", "") for i in val]
        # correct as evaluation counts a method's answer: the full reward, not partial credit
        scores = {n: (c.solo_scores(n) >= CORRECT).astype(np.float64) for n in names}
        modes = {n: str(c.expert_attrs(n).get("solo_answer_extraction", "strict")) for n in names}
        answers = [[extract_answer(t, modes[n]) for t in np.asarray(c.solo_answers(n), dtype=object)[val]]
                   for n in names]
    train_means = {n: float(scores[n][train].mean()) if len(train) else float("nan") for n in names}
    best = max(names, key=lambda n: (train_means[n], -names.index(n)))  # ties: first in team order
    mat = np.stack([scores[n][val] for n in names])  # [m, n_val]
    return TeamBaselines(family, str(cache_path), tuple(names), split,
                         [hashlib.sha256(texts[i].encode()).hexdigest()[:16] for i in val],
                         {n: mat[i] for i, n in enumerate(names)}, train_means, best, mat.max(0),
                         majority_vote(answers, mat, sources))


def baseline_rows(b: TeamBaselines) -> list[tuple[str, float]]:
    """(row label, held-out accuracy in [0, 1]) of every baseline of one team."""
    rows = [(f"expert alone: {n}", float(v.mean())) for n, v in b.solo.items()]
    rows.append((f"best expert alone ({b.best}, chosen on train)", float(b.solo[b.best].mean())))
    rows.append(("any expert correct (oracle)", float(b.oracle.mean())))
    rows.append(("experts' majority vote", float(b.vote.scores.mean())))
    return rows


def run_baselines(runs: list[Run]) -> tuple[dict[tuple, TeamBaselines], list[str]]:
    """{(family, cache path, team): baselines} of the finished runs' caches, and notes on the ones
    left out (cache moved, rebuilt, or without solo answers: missing, never 0)."""
    out, notes, tried = {}, [], set()
    for r in runs:
        path = r.config.get("cache")
        if not r.finished or not path:
            continue
        key = (r.family, str(path), r.team)
        if key in tried:
            continue
        tried.add(key)
        try:
            with Cache(path) as c:
                fp_ok = c.fingerprint == r.config.get("cache_fingerprint", c.fingerprint)
            if not fp_ok:
                raise MuskError(f"cache {path!r} was rebuilt after run {r.name} read it")
            b = team_baselines(Path(path), r.team or None, r.family)
            # a run without experts (single, prefix) is compared with the cache's team: one object under
            # both keys, so the team's rows are made once
            out[key] = next((v for k, v in out.items() if k[:2] == key[:2] and v.team == b.team), b)
            out.setdefault((r.family, str(path), b.team), out[key])
        except MuskError as e:
            notes.append(f"{r.family} ({r.name}): {e}")
    return out, sorted(set(notes))


def _column_family(head: str) -> str:
    return head.split(" [", 1)[0]


def extend_table1(t1: Table, runs: list[Run]) -> Table:
    """Table 1 with the baseline rows added (one set per team; a column whose family has no cache
    with solo answers reads 'missing') and each method cell below its column's best expert marked."""
    found, notes = run_baselines(runs)
    if not found and not notes:
        return t1
    teams = sorted({(b.team, b.cache) for b in found.values()})
    several = len({b.team for b in found.values()}) > 1
    best_of: dict[str, float] = {}
    for (team, cache) in teams:
        per_col = []
        for head in t1.columns:
            b = next((v for k, v in found.items() if k[0] == _column_family(head) and v.team == team and k[1] == cache),
                     None)
            per_col.append({label: (acc, b) for label, acc in baseline_rows(b)} if b else {})
            if b:
                best_of[head] = max(best_of.get(head, -1.0), float(b.solo[b.best].mean()))
        labels = list(dict.fromkeys(label for col in per_col for label in col))
        for label in labels:
            cells = [f"{100 * col[label][0]:.2f} (n={col[label][1].n} prompts)" if label in col else "missing"
                     for col in per_col]
            full = label + (f" [team {'+'.join(team)}]" if several else "")
            t1.rows.append((full, cells))
            for head, col in zip(t1.columns, per_col):
                if label in col:
                    t1.raw.append({"row": full, "family": head, "mean": col[label][0], "std": None,
                                   "n": col[label][1].n, "unit": "prompts", "cache": cache})
    _mark_below(t1, best_of)
    t1.note += (f" Baseline rows: the experts' own greedy answers from the cache (solo), on the held-out prompts "
                f"the methods are scored on, correct as a method's answer is (reward >= {CORRECT}: partial credit counts "
                f"as wrong); the vote counts answers the scorer reads alike as one. They are "
                f"in % of n prompts (not distinct questions), no seeds; best expert "
                f"chosen on the training split; vote ties score the mean of the tied answers. {BELOW}: a method "
                f"mean below the best expert alone in that column.")
    if notes:
        t1.note += " Baselines missing: " + "; ".join(notes) + "."
    return t1


def _mark_below(t1: Table, best_of: dict[str, float]) -> None:
    """Append BELOW to each method cell whose mean (Table 1's raw rows) is below its column's best expert."""
    means = {(x["row"], x["family"]): x.get("mean") for x in t1.raw}
    for i, (label, cells) in enumerate(t1.rows):
        for j, head in enumerate(t1.columns):
            m = means.get((label, head))
            if head in best_of and m is not None and m < best_of[head] and not label.startswith(
                    ("expert alone", "best expert", "any expert", "experts'")):
                cells[j] = f"{cells[j]} {BELOW}"


def paired_best_expert(runs: list[Run]) -> Table:
    """Each method (its runs' last full evaluation) minus the best expert alone, paired by question digest:
    a seed-and-question interval per family (the method's seeds, then questions; the expert's greedy
    answers are fixed), one row per condition as Table 1 keys them (method and every setting but the
    seed, ablation runs left out) and training dtype, so runs of other settings never pool as seeds."""
    found, notes = run_baselines(runs)
    rows_by_condition = setting_rows(runs)  # finished main-setting runs, by full condition
    families = sorted({k[0] for k in found})
    rows: dict[str, list[str]] = {}
    raw, used = [], []
    for key, condition in sorted(rows_by_condition.items(), key=lambda kv: str(kv[0])):
        label0 = row_label(rows_by_condition, key, condition)
        groups: dict[tuple, list[Run]] = defaultdict(list)
        for r in condition:
            if r.config.get("cache"):
                groups[(r.family, str(r.config["cache"]), r.team, dtype_of(r))].append(r)
        for (family, cache, team, dtype), rs in sorted(groups.items(), key=lambda kv: str(kv[0])):
            b = found.get((family, cache, team))
            recs = [x for x in (last_full_records(r) for r in rs) if x]
            if b is None or not recs:
                continue
            best = dict(zip(b.question_sha, b.solo[b.best].tolist()))  # the expert's greedy answer: no seed
            txt, fields = seeds_cell([per_prompt(x, "with") for x in recs], [best], fixed_b=True,
                                     clusters=question_clusters(rs))
            label = f"{label0} ({dtype}) − best expert ({b.best})"
            rows.setdefault(label, ["—"] * len(families))[families.index(family)] = txt
            raw.append({"comparison": label, "family": family, "runs": ";".join(r.name for r in rs), **fields})
            used += rs
    note = ("Paired over the held-out prompts both scored (question digest): a method's greedy accuracy minus the "
            "best expert's own answer (chosen on the training split; correct at reward >= 1.0 as the method's), in "
            "points over distinct questions, 95% seed-and-question interval (the method's seeds; the expert's "
            "answers are fixed, no seed; † one seed: conditional on its weights). A row is one condition as in "
            "Table 1; ablation runs (pooling variants, the m sweep) are left out.")
    if not rows:
        note = "No finished run with evaluation records and a cache holding solo answers: nothing to pair."
    if notes:
        note += " Missing: " + "; ".join(notes) + "."
    return Table("Paired differences vs the best expert alone (points, 95% interval)", families,
                 list(rows.items()), raw, used, note)


def solo_cost_table(runs: list[Run]) -> Table:
    """Each expert's solo decode, as stored at extraction: tokens per prompt, total tokens, seconds
    and the machine that extracted (the experts' cost beside their value)."""
    seen, rows, raw = set(), [], []
    for r in runs:
        path = r.config.get("cache")
        if not r.finished or not path or str(path) in seen or not Path(str(path)).is_file():
            continue
        seen.add(str(path))
        try:
            with Cache(path) as c:
                for n in c.experts:
                    if not c.has_solo(n):
                        continue
                    a, tok = c.expert_attrs(n), c.column(n, "solo_n_tokens")
                    sec = float(a.get("solo_seconds", float("nan")))
                    rows.append((f"{r.family} / {n}", [f"{tok.mean():.1f}", f"{int(tok.sum())}", f"{sec:.1f}",
                                                       str(a.get("solo_source", "?")), str(a.get("solo_machine", "?"))]))
                    raw.append({"family": r.family, "expert": n, "cache": str(path), "tokens_per_prompt": float(tok.mean()),
                                "tokens": int(tok.sum()), "prompts": len(tok), "seconds": sec,
                                "source": a.get("solo_source"), "machine": a.get("solo_machine")})
        except MuskError:
            continue
    return Table("Cost of each expert alone: its solo decode at extraction",
                 ["tokens / prompt", "tokens (all prompts)", "seconds", "decode", "machine"], rows, raw, [],
                 "Greedy decode of every prompt of the cache (training and held-out), measured at extraction on "
                 "the machine named; seconds: wall time of the decode (nan: reused from the hint decode, not timed).")
