"""Content controls: `musk eval`'s default conditions, and shuffle:all (every expert read from another prompt)."""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import train.evaluate
import train.loop
from cli import app
from train.evaluate_run import EvalRequest, parse_conditions, shuffled
from train.inputs import expert_features
from train.setup import CachedFeatures
from tests.helpers import parity_score, tiny_train_overrides

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
    from train.evaluate_run import derangement

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

    monkeypatch.setattr(train.loop, "score", parity_score)
    monkeypatch.setattr(train.evaluate, "score", parity_score)
    cfg = load_train_config(None, tiny_train_overrides(tiny_policy, method="perceiver", total_training_steps=1))
    run = train.loop.run_train(cfg, tiny_cache, tmp_path / "p", progress=False, log=lambda *a: None)
    res = CliRunner().invoke(app, ["eval", str(run), "--limit", "3", "--no-progress"])
    assert res.exit_code == 0, res.output
    s = json.loads((run / "eval" / "final-val" / "summary.json").read_text())
    assert list(s["conditions"]) == ["with", "without", "null", "shuffle:tiny-llama", "shuffle:tiny-gpt2",
                                     "shuffle:all"]
    assert all(c["n"] == 3 for c in s["conditions"].values())


def test_collaboration_table_leads_with_the_shuffled_control(tmp_path):
    """with [1,1,1,0] vs shuffle:all [0,1,0,0] on the same prompts: d = [1,0,1,0], the interval of
    "with C − without C" in test_report ([-6.6, +106.6], past the per-question differences' [0, 1], said);
    the note says what each control removes."""
    from analyze.records import shuffled_all_cell
    from analyze.runs import load_runs
    from analyze.tables import collaboration_table
    from tests.test_report import _records, make_run

    root = tmp_path / "r"
    p = make_run(root, "p", acc=0.75)
    ev = p / "eval" / "final-val"
    ev.mkdir(parents=True)
    (ev / "summary.json").write_text(json.dumps({"split": "val", "checkpoint": "final", "samples": 1}))
    _records(ev, [1, 1, 1, 0], name="records.jsonl")
    _records(ev, [0, 1, 0, 0], condition="shuffle:all", name="records.jsonl")
    t = collaboration_table(load_runs([root]), content=shuffled_all_cell)
    assert t.columns[:3] == ["seeds", "with C − all experts shuffled (points)", "val acc % (with C)"]
    assert t.rows[0][1][:2] == ["1", "+50.0 [-6.6, +106.6]† (1 seed, 4 distinct questions; a bound is past what the "
                                     "scores allow, [+0.0, +100.0])"]
    assert t.raw[0]["with_minus_shuffled_all_diff"] == pytest.approx(0.5)
    assert t.note.startswith("What each control removes: all experts shuffled")
    bare = collaboration_table(load_runs([root]))  # no musk eval reader: the table as before
    assert bare.columns[1] == "val acc % (with C)"
