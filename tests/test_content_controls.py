"""Content controls: `musk eval`'s default conditions, and shuffle:all (every expert read from another prompt)."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

import train.loop
from cli import app
from evaluate.run import EvalRequest, parse_conditions, shuffled
from train.inputs import expert_features
from train.data import CachedFeatures
from tests.helpers import parity_score, quiet_train, tiny_train_overrides

TEAM = ["a", "b", "c"]


def _data(experts=TEAM, features=True):
    feats = CachedFeatures([torch.arange(8.0)[:, None] * 10 + e for e in range(len(experts))]) if features else None
    return SimpleNamespace(experts=list(experts), features=feats)


def _names(method, experts=TEAM, has_gate=True, **req):
    cfg = SimpleNamespace(method=method)
    data = _data(experts, features=method not in ("single", "prefix", "output-collab"))
    return [c.name for c in parse_conditions(EvalRequest(run=".", **req), cfg, data, has_gate)]


def test_default_conditions_per_method():
    controls = ["shuffle:a", "shuffle:b", "shuffle:c", "shuffle:all"]
    for method in ("perceiver", "ffn", "hard-routing"):
        assert _names(method) == ["with", "without", "null"] + controls
    assert _names("prefix", experts=[]) == ["with", "without", "null"]
    assert _names("single", experts=[], has_gate=False) == ["with"]
    assert _names("output-collab", has_gate=False) == ["with"] + controls  # its hints, shuffled
    # anything asked replaces the defaults
    assert _names("perceiver", contexts=("with", "without")) == ["with", "without"]
    assert _names("perceiver", ablations=("drop:a",)) == ["with", "drop:a"]


def test_shuffle_all_reads_every_expert_from_one_other_prompt():
    """rows 2..7 (each its own question), seed 3: every expert of prompt rows[j] reads rows[perm[j]],
    perm = derangement(6, default_rng([3, n = 3])), the same for all experts and with no fixed point;
    shuffle:b alone keeps its own key."""
    from evaluate.shuffle import derangement

    cfg, data = SimpleNamespace(method="perceiver"), _data()
    rows = np.arange(2, 8)
    all_ = parse_conditions(EvalRequest(run=".", ablations=("shuffle:all",)), cfg, data, True)[-1]
    cond = shuffled(all_, rows, 3)
    perm = derangement(6, np.random.default_rng([3, 3]))
    want = {int(rows[j]): int(rows[p]) for j, p in enumerate(perm)}
    assert cond.view.source == {0: want, 1: want, 2: want}
    assert all(want[r] != r for r in want)
    idx = [int(r) for r in rows]
    feats = expert_features(data, idx, cond.view)  # expert e of row r holds 10 r + e
    for e in range(3):
        assert feats[e][:, 0].tolist() == [10.0 * want[r] + e for r in idx]
    one = parse_conditions(EvalRequest(run=".", ablations=("shuffle:b",)), cfg, data, True)[-1]
    perm_b = derangement(6, np.random.default_rng([3, 1]))
    assert shuffled(one, rows, 3).view.source == {1: {int(rows[j]): int(rows[p]) for j, p in enumerate(perm_b)}}


def test_shuffle_all_refused_without_experts():
    from core.errors import MuskError

    with pytest.raises(MuskError, match="reads no experts"):
        _names("prefix", experts=[], ablations=("shuffle:all",))


@pytest.mark.slow
def test_musk_eval_defaults_end_to_end(tiny_cache, tiny_policy, tmp_path, monkeypatch):
    """`musk eval RUN` with no --context and no --ablate evaluates the content controls too."""
    from train.config import load_train_config

    cfg = load_train_config(None, tiny_train_overrides(tiny_policy, method="perceiver", total_training_steps=1))
    run = train.loop.run_train(cfg, tiny_cache, tmp_path / "p", **quiet_train())
    res = CliRunner().invoke(app, ["eval", str(run), "--limit", "3", "--no-progress"], obj={"scorer": parity_score})
    assert res.exit_code == 0, res.output
    s = json.loads((run / "eval" / "final-val" / "summary.json").read_text())
    assert list(s["conditions"]) == ["with", "without", "null", "shuffle:tiny-llama", "shuffle:tiny-gpt2",
                                     "shuffle:all"]
    assert all(c["n"] == 3 for c in s["conditions"].values())
    # each shuffle's partners: inside the task, and same-answer pairs only where none avoids them
    from cache.reader import Cache

    with Cache(tiny_cache) as c:
        answers = [c.prompts()["answer"][int(r)].strip() for r in c.split_indices("val")[:3]]
    m = max(answers.count(a) for a in answers)
    fewest = 1.0 if m == 3 else max(0, 2 * m - 3) / 3
    cc = s["content_controls"]
    assert list(cc) == ["shuffle:tiny-llama", "shuffle:tiny-gpt2", "shuffle:all"]
    assert all(x["cross_dataset_share"] == 0.0 and x["rows"] == 3 and x["left_out"] == 0 for x in cc.values())
    assert all(x["same_answer_share"] == pytest.approx(fewest) for x in cc.values())


def test_collaboration_table_leads_with_the_shuffled_control(tmp_path):
    """with [1,1,1,0] vs shuffle:all [0,1,0,0] on the same prompts: d = [1,0,1,0], the interval of
    "with C − without C" in test_report ([-6.6, +106.6], past the per-question differences' [0, 1], said);
    the note says what each control removes."""
    from analyze.records import shuffled_all_cell
    from analyze.runs import load_runs
    from analyze.tables import collaboration_table
    from tests.test_report import write_eval_records, make_run

    root = tmp_path / "r"
    p = make_run(root, "p", acc=0.75)
    ev = p / "eval" / "final-val"
    ev.mkdir(parents=True)
    (ev / "summary.json").write_text(json.dumps({"split": "val", "checkpoint": "final", "samples": 1}))
    write_eval_records(ev, [1, 1, 1, 0], name="records.jsonl")
    write_eval_records(ev, [0, 1, 0, 0], condition="shuffle:all", name="records.jsonl")
    t = collaboration_table(load_runs([root]), content=shuffled_all_cell)
    assert t.columns[:3] == ["seeds", "with C − all experts shuffled (points)", "val acc % (with C)"]
    assert t.rows[0][1][:2] == ["1", "+50.0 [-6.6, +106.6]† (1 seed, 4 distinct questions; a bound is past what the "
                                     "scores allow, [+0.0, +100.0])"]
    assert t.raw[0]["with_minus_shuffled_all_diff"] == pytest.approx(0.5)
    assert t.note.startswith("What each control removes: all experts shuffled")
    bare = collaboration_table(load_runs([root]))  # no musk eval reader: the table as before
    assert bare.columns[1] == "val acc % (with C)"


# -- partners inside the task ------------------------------------------------------------------------

def _all_cond(n=3):
    from evaluate.records import Condition
    from train.inputs import ExpertView

    return Condition("shuffle:all", "with", ExpertView(source={e: {} for e in range(n)}))


def _mixture(datasets=9, per=12, seed=0):
    """A paper-like validation split: `datasets` datasets interleaved row by row (as the task mixer
    orders them), `per` questions each, answers drawn from a few values per dataset."""
    rng = np.random.default_rng(seed)
    tasks = [f"ds{i}" for _ in range(per) for i in range(datasets)]
    questions = [f"{t} question {k}" for k, t in enumerate(tasks)]
    answers = [str(rng.integers(0, 6)) for _ in tasks]
    return np.arange(500, 500 + len(tasks)), questions, tasks, answers


def test_shuffle_partner_comes_from_the_rows_own_dataset():
    """On a 9-dataset mixture every partner's dataset is the row's own (a shuffle across the whole
    split sends 8 in 9 rows to another dataset), for every seed; a dataset with a single question is
    left out of the condition and counted, and its rows are not evaluated."""
    from evaluate.shuffle import partnered, shuffle_stats, shuffled

    rows, qs, tasks, answers = _mixture()
    rows, qs, tasks, answers = (np.append(rows, 900), qs + ["lonely"], tasks + ["solo_ds"], answers + ["1"])
    ds = dict(zip(rows.tolist(), tasks))
    said = []
    for seed in range(30):
        cond = shuffled(_all_cond(), rows, seed, qs, datasets=tasks, answers=answers, log=said.append)
        src = cond.view.source[0]
        assert all(ds[r] == ds[s] and r != s for r, s in src.items())
        assert 900 not in src and partnered(cond, rows).tolist() == rows[:-1].tolist()
        st = shuffle_stats(cond, rows, tasks, answers)
        assert st["cross_dataset_share"] == 0.0 and st["left_out"] == 1 and st["rows"] == len(rows) - 1
    assert any("solo_ds" in m and "left out" in m for m in said)


def test_shuffle_refused_when_no_dataset_has_two_questions():
    from core.errors import MuskError
    from evaluate.shuffle import shuffled

    with pytest.raises(MuskError, match="no dataset of the evaluated prompts holds two distinct questions"):
        shuffled(_all_cond(), np.arange(3), 0, ["a", "b", "c"], datasets=["x", "y", "z"], answers=["1", "2", "3"])


def test_no_row_reads_its_own_answer_back_over_many_seeds():
    """A probe-like split: 64 one-digit sums whose answers repeat (an oracle expert's state depends on
    the answer alone). Over 200 seeds no partner's reference answer equals the row's own; the
    summary share is 0. A plain derangement of questions leaves such pairs at most seeds."""
    from evaluate.shuffle import derangement, shuffle_stats, shuffled

    rng = np.random.default_rng(7)
    terms = rng.integers(0, 10, size=(64, 2))
    qs = [f"{a} + {b} =" for a, b in terms.tolist()]
    answers = [str(a + b) for a, b in terms.tolist()]
    rows = np.arange(64)
    plain = 0
    for seed in range(200):
        cond = shuffled(_all_cond(), rows, seed, qs, datasets=["chain_sum"] * 64, answers=answers)
        src = cond.view.source[0]
        assert sorted(src) == list(range(64)) and all(answers[r] != answers[s] for r, s in src.items())
        assert shuffle_stats(cond, rows, ["chain_sum"] * 64, answers)["same_answer_share"] == 0.0
        perm = derangement(64, np.random.default_rng([seed, 3]))
        plain += any(answers[j] == answers[p] for j, p in enumerate(perm))
    assert plain > 100


def test_same_answer_fallback_keeps_the_fewest_pairs_and_counts_them():
    """6 questions of answer "7" among 8: no derangement avoids every same-answer partner (Hall), the
    fewest possible remain: 2 * 6 − 8 = 4 rows, share 4/8, the dataset named in the log and the stats."""
    from evaluate.shuffle import shuffle_stats, shuffled

    answers = ["7"] * 6 + ["1", "2"]
    qs = [f"q{i}" for i in range(8)]
    said = []
    for seed in range(20):
        cond = shuffled(_all_cond(), np.arange(8), seed, qs, datasets=["d"] * 8, answers=answers, log=said.append)
        st = shuffle_stats(cond, np.arange(8), ["d"] * 8, answers)
        assert st["same_answer_share"] == pytest.approx(4 / 8) and st["same_answer_datasets"] == ["d"]
        assert all(r != s for r, s in cond.view.source[0].items())
    assert any("same-answer partners remain" in m for m in said)


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 4), min_size=2, max_size=25), st.integers(0, 10_000))
def test_avoiding_permutation_reaches_the_minimum(classes, seed):
    """A permutation with no fixed point and max(0, 2m − k) same-class pairs (k when one class holds
    every element), m the largest class's size."""
    from collections import Counter

    from evaluate.shuffle import avoiding_permutation

    c = np.array(classes)
    perm = avoiding_permutation(c, np.random.default_rng(seed))
    k, m = len(c), max(Counter(classes).values())
    assert sorted(perm.tolist()) == list(range(k)) and not np.any(perm == np.arange(k))
    assert int(np.sum(c[perm] == c)) == (k if m == k else max(0, 2 * m - k))
