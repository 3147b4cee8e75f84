"""Baseline rows from the experts' solo answers: each expert alone, best expert (chosen on train),
any-expert-correct and majority vote on a hand-built case; Table 1 gains them and marks a method
below its best expert."""

from __future__ import annotations

import json
import shutil

import h5py
import numpy as np
import polars as pl
import pytest

from analyze.baselines import (BELOW, canonical_answer, extend_table1, majority_vote, paired_best_expert, solo_cost_table,
                               team_baselines)
from analyze.runs import Run
from analyze.tables import table1
from cache.reader import Cache
from core.errors import MuskError


def test_majority_vote_hand_built():
    answers = [["7", "1", None, None, "5", " 4"],
               ["7", "2", None, "9", "5", "4 "],
               ["8", "3", "6", None, "6", "3"]]
    scores = np.array([[1, 1, 0, 0, 0, 1],
                       [1, 0, 0, 0, 0, 1],
                       [0, 0, 0, 0, 1, 0]], dtype=float)
    v = majority_vote(answers, scores)
    # 2 of 3 right; three-way tie (one right): 1/3; one voter, wrong; one voter, wrong; 2 agree wrong; stripped
    np.testing.assert_allclose(v.scores, [1.0, 1 / 3, 0.0, 0.0, 0.0, 1.0], rtol=0, atol=1e-12)
    assert v.ties == 1
    assert majority_vote([[None], [None]], np.zeros((2, 1))).scores.tolist() == [0.0]  # nobody answers: 0


def test_vote_counts_answers_the_scorer_reads_alike_as_one():
    """'18' and '18.00' are one answer wherever the scorer reads numbers; '$18' too on a numeric dataset
    (gsm8k strips '$'), not on chain_sum (its verifier gives '$11' partial credit)."""
    assert canonical_answer(" 18.00 ") == canonical_answer("18") == canonical_answer("18.0") == "18"
    assert canonical_answer("$18", "gsm8k") == canonical_answer("18.00", "gsm8k") == "18"
    assert canonical_answer("$18", "chain_sum") == "$18" and canonical_answer("111") != canonical_answer("11")
    assert canonical_answer("a  b") == "a b"
    answers = [["18"], ["18.00"], ["19"]]
    scores = np.array([[1.0], [1.0], [0.0]])
    v = majority_vote(answers, scores)
    assert v.scores.tolist() == [1.0] and v.ties == 0  # two votes for 18 beat one for 19 (was a three-way tie)
    v = majority_vote([["$18"], ["18"], ["19"], ["19"]], np.array([[1.0], [1.0], [0.0], [0.0]]), ["gsm8k"])
    assert v.scores.tolist() == [0.5] and v.ties == 1  # 18 (2 votes) ties 19 (2 votes)


def test_partial_credit_counts_as_wrong_in_every_baseline(tiny_cache, tmp_path):
    """Solo rewards of 0.667 (chain_sum's score for "111" when the answer is 11) are wrong answers, as a
    method's are (reward >= 1.0): they pick no best expert, make no oracle hit and win no vote."""
    with Cache(tiny_cache) as c:
        train, val = c.split_indices("train"), c.split_indices("val")
        n = len(c)
    sc = {"tiny-llama": np.zeros(n), "tiny-gpt2": np.zeros(n)}
    sc["tiny-llama"][train[:3]] = 1.0  # train accuracy 3/12; reward mean 0.25
    sc["tiny-gpt2"][train] = 0.667  # train accuracy 0; reward mean 0.667 (the partial-credit pick)
    sc["tiny-llama"][val[[0, 1]]] = [1.0, 0.667]
    sc["tiny-gpt2"][val[[0, 1, 2]]] = [1.0, 0.667, 0.667]
    ans = {k: ["<answer>0</answer>"] * n for k in sc}
    for k, row in (("tiny-llama", ["11", "111", "5", None]), ("tiny-gpt2", ["11.00", "111", "7", None])):
        for i, a in zip(val, row):
            ans[k][i] = f"<answer>{a}</answer>" if a else "no tags"
    path = _with_solo(tiny_cache, tmp_path / "pc.h5", ans, {k: v.tolist() for k, v in sc.items()})
    b = team_baselines(path, ("tiny-llama", "tiny-gpt2"))
    assert b.best == "tiny-llama" and b.train_means == pytest.approx({"tiny-llama": 0.25, "tiny-gpt2": 0.0})
    assert b.solo["tiny-llama"].tolist() == [1, 0, 0, 0] and b.solo["tiny-gpt2"].tolist() == [1, 0, 0, 0]
    assert b.oracle.tolist() == [1, 0, 0, 0]
    # val 0: "11" and "11.00" one vote (right); val 1: "111" twice, 0.667: wrong; val 2: a tie of wrongs
    assert b.vote.scores.tolist() == [1.0, 0.0, 0.0, 0.0] and b.vote.ties == 1


def _with_solo(src, dst, answers: dict[str, list[str]], scores: dict[str, list[float]]):
    shutil.copyfile(src, dst)
    with h5py.File(dst, "a") as f:
        for n, a in answers.items():
            g = f["experts"][n]
            g.create_dataset("solo", data=np.array(a, dtype=object), dtype=h5py.string_dtype("utf-8"))
            g.create_dataset("solo_score", data=np.array(scores[n], dtype=np.float32))
            g.create_dataset("solo_n_tokens", data=np.full(len(a), 3, dtype=np.int64))
            g.attrs.update({"solo_source": "decode", "solo_answer_extraction": "strict", "solo_seconds": 1.5,
                            "solo_machine": "test host"})
    return dst


def _hand_built(tiny_cache, tmp_path):
    """tiny cache (12 train then 4 val prompts): tiny-llama is best on train and worst on val."""
    with Cache(tiny_cache) as c:
        train, val = c.split_indices("train"), c.split_indices("val")
        n = len(c)
    assert len(train) == 12 and len(val) == 4
    s = {"tiny-llama": np.zeros(n), "tiny-gpt2": np.zeros(n)}
    s["tiny-llama"][train[:6]] = 1  # train: 6/12 vs 2/12
    s["tiny-gpt2"][train[:2]] = 1
    s["tiny-llama"][val[0]] = 1  # val: llama right on prompt 0 only, gpt2 on prompts 1 and 2
    s["tiny-gpt2"][val[[1, 2]]] = 1
    ans = {k: [f"<answer>{'R' if v[i] else 'W' + k}</answer>" for i in range(n)] for k, v in s.items()}
    ans["tiny-gpt2"][val[3]] = "no tags"
    return _with_solo(tiny_cache, tmp_path / "b.h5", ans, {k: v.tolist() for k, v in s.items()}), val


def test_team_baselines_hand_built(tiny_cache, tmp_path):
    path, val = _hand_built(tiny_cache, tmp_path)
    b = team_baselines(path, ("tiny-llama", "tiny-gpt2"), "easy-arithmetic")
    assert b.split == "val" and b.n == 4
    assert b.train_means == pytest.approx({"tiny-llama": 0.5, "tiny-gpt2": 2 / 12}, abs=1e-12)
    assert b.best == "tiny-llama"  # chosen on train, though gpt2 is better on val
    assert b.solo["tiny-llama"].mean() == 0.25 and b.solo["tiny-gpt2"].mean() == 0.5
    np.testing.assert_array_equal(b.oracle, [1, 1, 1, 0])
    # prompt 0: R vs Wgpt2 tie -> 1/2; 1, 2: Wllama vs R tie -> 1/2; 3: llama alone (gpt2 abstains), wrong -> 0
    np.testing.assert_allclose(b.vote.scores, [0.5, 0.5, 0.5, 0.0], atol=1e-12)
    assert b.vote.ties == 3
    with pytest.raises(MuskError, match="no solo answers"):
        team_baselines(tiny_cache, ("tiny-llama",))


def _run(tmp_path, name, cache, method, acc, records=None, experts=("tiny-llama", "tiny-gpt2")):
    d = tmp_path / name
    d.mkdir()
    if records is not None:
        (d / "eval_records.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    with Cache(cache) as c:
        fp = c.fingerprint
    cfg = {"method": method, "seed": 0, "cache": str(cache), "cache_fingerprint": fp, "task_family": "easy-arithmetic",
           "experts": list(experts) if experts else None}
    return Run(name, d, cfg, {"final_val_accuracy": acc, "steps": 3}, pl.DataFrame(), pl.DataFrame())


def test_table1_gains_baselines_and_marks_below(tiny_cache, tmp_path):
    import hashlib

    path, val = _hand_built(tiny_cache, tmp_path)
    with Cache(path) as c:
        texts = c.prompts()["text"]
    recs = [{"step": 3, "kind": "full", "condition": "with", "task": "t", "prompt": int(i), "correct": float(k == 1),
             "question_sha": hashlib.sha256(texts[i].encode()).hexdigest()[:16]} for k, i in enumerate(val)]
    runs = [_run(tmp_path, "p", path, "perceiver", 0.10, recs), _run(tmp_path, "s", path, "single", 0.30)]
    t = extend_table1(table1(runs), runs)
    rows = dict(t.rows)
    assert rows["best expert alone (tiny-llama, chosen on train)"] == ["25.00 (n=4 prompts)"]
    assert rows["any expert correct (oracle)"] == ["75.00 (n=4 prompts)"]
    assert rows["experts' majority vote"] == ["37.50 (n=4 prompts)"]
    assert rows["expert alone: tiny-gpt2"] == ["50.00 (n=4 prompts)"]
    assert rows["perceiver"][0].endswith(BELOW) and not rows["single"][0].endswith(BELOW)  # 10% < 25% <= 30%
    assert "prompts" in t.note and "chosen on the training split" in t.note
    p = paired_best_expert(runs)
    # perceiver right on val prompt 1 only, best expert (llama) on prompt 0 only: mean difference 0
    assert p.rows[0][0] == "perceiver (auto, unresolved) − best expert (tiny-llama)" and p.rows[0][1][0].startswith("+0.0")
    assert p.raw[0]["n"] == 4
    cost = solo_cost_table(runs)
    assert [r[1][:4] for r in cost.rows] == [["3.0", "48", "1.5", "decode"]] * 2


def test_runs_without_experts_share_the_caches_team_rows(tiny_cache, tmp_path):
    """single and prefix read no experts: their cache's team gives the baselines once (no second set of
    rows under an empty team), and single is paired with that team's best expert."""
    import hashlib

    path, val = _hand_built(tiny_cache, tmp_path)
    with Cache(path) as c:
        texts = c.prompts()["text"]
    recs = [{"step": 3, "kind": "full", "condition": "with", "task": "t", "prompt": int(i), "correct": 1.0,
             "question_sha": hashlib.sha256(texts[i].encode()).hexdigest()[:16]} for i in val]
    runs = [_run(tmp_path, "p", path, "perceiver", 0.10, recs), _run(tmp_path, "s", path, "single", 0.30, recs, None)]
    labels = [label for label, _ in extend_table1(table1(runs), runs).rows]
    assert sum(lbl.startswith("best expert alone") for lbl in labels) == 1 and not any("[team" in x for x in labels)
    paired = [label for label, _ in paired_best_expert(runs).rows]
    assert any(lbl.startswith("single (") and lbl.endswith("best expert (tiny-llama)") for lbl in paired), paired


def test_missing_cache_is_missing_not_zero(tiny_cache, tmp_path):
    runs = [_run(tmp_path, "p", tiny_cache, "perceiver", 0.10)]  # the tiny cache has no solo answers
    t = extend_table1(table1(runs), runs)
    assert "Baselines missing" in t.note and not any(label.startswith("best expert") for label, _ in t.rows)


def test_report_counts_one_problem_once(tiny_cache, tmp_path):
    """Two held-out questions that are one problem for the held-out split ("2 + 9" and "9 + 2") are one
    cluster in the report's intervals: n counts 3 problems over 4 questions (cache texts, keyed by the
    records' question digest)."""
    import hashlib

    from analyze.records import question_clusters, seeds_cell

    path = tmp_path / "twins.h5"
    shutil.copyfile(tiny_cache, path)
    with Cache(path) as c:
        val = c.split_indices("val")
    texts = ["Calculate: 2 + 9 =", "Calculate: 9 + 2 =", "Calculate: 5 - 1 =", "Calculate: 1 - 5 ="]
    with h5py.File(path, "a") as f:
        d = f["prompts/text"]
        for i, t in zip(val, texts):
            d[i] = t
    run = Run("r", tmp_path, {"cache": str(path), "method": "perceiver"}, {}, pl.DataFrame(), pl.DataFrame())
    keys = question_clusters([run])
    sha = [hashlib.sha256(t.encode()).hexdigest()[:16] for t in texts]
    assert keys[sha[0]] == keys[sha[1]] and len({keys[s] for s in sha}) == 3
    a = [dict(zip(sha, x)) for x in ([1, 1, 0, 1], [1, 0, 0, 1], [1, 1, 1, 0])]
    b = [dict(zip(sha, [0, 0, 0, 1]))]
    txt, fields = seeds_cell(a, b, fixed_b=True, clusters=keys)
    assert fields["n"] == 3 and fields["questions"] == 4 and fields["unit"] == "problems"
    assert "(3 seeds v fixed answers, 3 problems, 4 distinct questions" in txt, txt


def test_best_expert_rows_leave_ablation_runs_out(tiny_cache, tmp_path):
    """Three main perceiver runs against the best expert give the same row whether an m sweep and a
    pooling ablation sit in the same folder or not (they never pool as seeds)."""
    import hashlib

    path, val = _hand_built(tiny_cache, tmp_path)
    with Cache(path) as c:
        texts = c.prompts()["text"]

    def run(name, seed, rows, **cfg):
        recs = [{"step": 3, "kind": "full", "condition": "with", "task": "t", "prompt": int(i), "correct": float(c_),
                 "question_sha": hashlib.sha256(texts[i].encode()).hexdigest()[:16]} for c_, i in zip(rows, val)]
        r = _run(tmp_path, name, path, "perceiver", 0.5, recs)
        r.config.update({"seed": seed, "num_latents": 8, "pooling": "last_token", **cfg})
        return r

    main = [run(f"p{s}", s, rows) for s, rows in enumerate(([1, 1, 0, 0], [1, 1, 1, 0], [1, 0, 0, 0]))]
    sweep = [run(f"m4-{s}", s, [0, 0, 0, 0], num_latents=4) for s in range(3)]
    pool = [run(f"ft-{s}", s, [0, 0, 0, 0], pooling="first_token") for s in range(3)]
    alone, mixed = paired_best_expert(main), paired_best_expert(main + sweep + pool)
    assert mixed.rows == alone.rows and len(alone.rows) == 1
    assert alone.rows[0][1][0].startswith("+25.0 ") and "(3 seeds v fixed answers" in alone.rows[0][1][0]
    assert [x["seeds_a"] for x in mixed.raw] == [3]
