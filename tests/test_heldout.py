"""Held-out splits: validation questions never appear in training, whatever the family, process or
size; reference answers score 1.0 through the training scorer; scorer failures are loud."""

import json
import os
import subprocess
import sys
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from core.errors import MuskError
from pipeline.rewards import SCORER_ERRORS, check_references, score
from core.heldout import normalize_question
from pipeline.tasks import TaskConfig, build_prompts, in_val_partition, split_overlap
from tests.helpers import ROOT, quiet_train


def _overlap(ps) -> int:
    train = {normalize_question(p.text) for p in ps if p.split == "train"}
    return sum(normalize_question(p.text) in train for p in ps if p.split != "train")


@pytest.mark.slow
def test_reasoning_gym_seeds_one_and_two_are_one_stream_shifted():
    """Why musk does not hand reasoning-gym the split seeds as they are: seed 2's item i is seed 1's i+1."""
    import reasoning_gym

    a = [e["question"] for e in reasoning_gym.create_dataset("chain_sum", size=30, seed=1)]
    b = [e["question"] for e in reasoning_gym.create_dataset("chain_sum", size=30, seed=2)]
    assert sum(q in set(a) for q in b) >= 25


# Sizes: today's shifted splits would have put all but one validation question into training.
@pytest.mark.parametrize("family,train,val", [("arithmetic", 120, 40), ("algorithmic", 80, 30), ("logic", 60, 25),
                                              ("easy-arithmetic", 256, 64), ("letter-counting", 120, 40),
                                              ("secret-digit", 200, 50)])
@pytest.mark.slow
def test_validation_never_in_training(family, train, val):
    ps = build_prompts(TaskConfig(family=family, train_size=train, val_size=val))
    assert sum(p.split == "train" for p in ps) == train and sum(p.split == "val" for p in ps) == val
    assert _overlap(ps) == 0 and split_overlap(ps) == 0


@pytest.mark.slow
def test_probe_preset_balanced_split_held_out():
    ps = build_prompts(TaskConfig(family="letter-counting", train_size=200, val_size=60, balance_answers=True))
    assert split_overlap(ps) == 0


@pytest.mark.slow
def test_small_family_partitions_the_question_space():
    """easy-arithmetic has ~200 distinct questions: validation draws only from its hashed share."""
    cfg = TaskConfig(family="easy-arithmetic", train_size=256, val_size=64)
    assert cfg.partition() == 0.25
    ps = build_prompts(cfg)
    assert all(in_val_partition(p.text, 0.25) == (p.split == "val") for p in ps)
    # the partition is a function of the text alone: hand-checked bounds
    assert in_val_partition("x", 0.0) is False and in_val_partition("x", 0.999999) is True
    with pytest.raises(MuskError, match="only .* of 500 prompts"):  # a split too large for its share says so
        build_prompts(TaskConfig(family="easy-arithmetic", train_size=8, val_size=500, val_partition=0.01))


def test_equal_seeds_refused():
    from core.config import from_dict

    with pytest.raises(MuskError, match="train_seed and task.val_seed are both 3"):
        from_dict(TaskConfig, {"train_seed": 3, "val_seed": 3})


def _texts_under_hashseed(seed: str) -> list[str]:
    code = ("import json; from pipeline.tasks import TaskConfig, build_prompts; "
            "cfg = TaskConfig(family='arithmetic', train_size=40, val_size=10, "
            "datasets={'polynomial_multiplication': {'weight': 1.0, 'config': {}}}); "
            "print(json.dumps([p.text + '|' + p.answer for p in build_prompts(cfg)]))")
    env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_prompts_do_not_depend_on_pythonhashseed():
    assert _texts_under_hashseed("1") == _texts_under_hashseed("2") == _texts_under_hashseed("0")


@pytest.mark.slow
def test_raw_polynomial_multiplication_does_depend_on_it():
    """The generator itself orders terms through a set: the guard above is what makes prompts stable."""
    code = ("import reasoning_gym, json; print(json.dumps([e['question'] for e in "
            "reasoning_gym.create_dataset('polynomial_multiplication', size=40, seed=5)]))")
    runs = [subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": s},
                           capture_output=True, text=True, check=True).stdout for s in ("1", "2", "3")]
    assert len(set(runs)) > 1


@pytest.mark.slow
def test_logic_family_references_score_one():
    """propositional_logic entries have answer None; its example_answer is the reference."""
    ps = build_prompts(TaskConfig(family="logic", train_size=40, val_size=10,
                                  datasets={"propositional_logic": {"weight": 1.0, "config": {}}}))
    assert all(p.answer not in ("None", "") for p in ps)
    check_references([p.entry for p in ps], [p.answer for p in ps], [p.task for p in ps])
    assert all(json.loads(p.entry)["answer"] == p.answer for p in ps)


def test_entry_without_a_verifiable_reference_is_dropped():
    """reasoning-gym's example answer for tautological premises is not entailed: no known answer."""
    from pipeline.tasks import has_reference

    meta = {"source_dataset": "propositional_logic", "variables": ["P", "Q"], "example_answer": "P",
            "premises": ["(Q ↔ Q)", "((P → Q) ↔ (P → Q))"]}
    assert has_reference({"question": "q", "answer": None, "metadata": meta}) is False
    ok = {**meta, "premises": ["P", "Q"], "example_answer": "(P ∧ Q)"}
    assert has_reference({"question": "q", "answer": None, "metadata": ok}) is True
    assert has_reference({"question": "q", "answer": "7", "metadata": {"source_dataset": "chain_sum"}}) is True


def test_check_references_names_the_failing_dataset():
    good = json.dumps({"question": "1+1", "answer": "2", "metadata": {"source_dataset": "chain_sum"}})
    with pytest.raises(MuskError, match=r"chain_sum: 1 of 2 prompts fail.*'3' scored 0.0"):
        check_references([good, good], ["2", "3"], ["chain_sum", "chain_sum"])
    unknown = json.dumps({"question": "q", "answer": "a", "metadata": {"source_dataset": "no_such_dataset"}})
    with pytest.raises(MuskError, match="no_such_dataset: 1 of 1 prompts fail.*no reasoning-gym scorer"):
        check_references([unknown], ["a"], ["no_such_dataset"])


def test_unknown_dataset_is_an_error_not_a_zero():
    unknown = json.dumps({"question": "q", "answer": "a", "metadata": {"source_dataset": "no_such_dataset"}})
    with pytest.raises(MuskError, match="no reasoning-gym scorer for dataset 'no_such_dataset'"):
        score(unknown, "<answer>a</answer>")


def test_scorer_exception_is_counted_and_shown(monkeypatch):
    import pipeline.rewards as rewards

    def broken(answer, entry):
        raise KeyError("metadata")

    monkeypatch.setattr(rewards, "_rg_scorer", lambda name: broken)
    monkeypatch.setattr(rewards, "SCORER_ERRORS", rewards.ScorerErrors())
    entry = json.dumps({"question": "What is 2+2?", "answer": "4", "metadata": {"source_dataset": "chain_sum"}})
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        assert rewards.score(entry, "<answer>4</answer>") == 0.0
        assert rewards.score(entry, "<answer>5</answer>") == 0.0
    assert rewards.SCORER_ERRORS.take() == 2 and rewards.SCORER_ERRORS.take() == 0
    shown = [str(x.message) for x in w]
    assert len(shown) == 1 and "KeyError" in shown[0] and "What is 2+2?" in shown[0]
    assert SCORER_ERRORS is not rewards.SCORER_ERRORS  # the module's own tally was left alone


@pytest.mark.slow
def test_training_counts_scorer_errors_per_step(tiny_cache, tiny_policy, tmp_path, monkeypatch):
    from pipeline.rewards import SCORER_ERRORS as tally
    from tests.helpers import tiny_train_overrides
    from train.config import load_train_config
    from train.loop import run_train

    def failing(entry, text, mode):
        tally.record("chain_sum", text, "q", ValueError("bad entry"))
        return 0.0

    cfg = load_train_config(None, tiny_train_overrides(tiny_policy, method="single", total_training_steps=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_train(cfg, cache_path=tiny_cache, out=tmp_path / "run", resume=False, **quiet_train(failing))
    steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward/scorer_errors"] for r in steps] == [16, 16]  # 2 micro-batches x 2 prompts x 4 rollouts


def _old_cache_refused(tiny_cache, tiny_policy, tmp_path, schema: int, rewrite, attrs: dict) -> None:
    """Copy the tiny cache as an older `schema`, set `attrs`, rewrite its prompt texts with
    rewrite(texts, splits) -> texts, and check training refuses it with one overlapping prompt and
    writes no run folder."""
    import shutil

    import h5py

    from tests.helpers import tiny_train_overrides
    from train.config import load_train_config
    from train.loop import run_train

    old = tmp_path / f"v{schema}.h5"
    shutil.copyfile(tiny_cache, old)
    with h5py.File(old, "a") as f:
        f.attrs["musk_schema"] = schema
        for k, v in attrs.items():
            if v is None:
                del f.attrs[k]
            else:
                f.attrs[k] = v
        text = rewrite(f["prompts/text"].asstr()[()], list(f["prompts/split"].asstr()[()]))
        del f["prompts/text"]
        f.create_dataset("prompts/text", data=text.astype(object), dtype=h5py.string_dtype("utf-8"))
    cfg = load_train_config(None, tiny_train_overrides(tiny_policy, method="single"))
    with pytest.raises(MuskError, match="1 of its held-out prompts are also in its training split"):
        run_train(cfg, cache_path=old, out=tmp_path / "run", resume=False, **quiet_train(score))
    assert not (tmp_path / "run").exists()


def test_old_cache_with_overlapping_splits_is_refused_for_training(tiny_cache, tiny_policy, tmp_path):
    def same_text(text, split):  # a schema-2 cache whose validation question is a training one
        text[-1] = text[0]
        return text

    _old_cache_refused(tiny_cache, tiny_policy, tmp_path, 2, same_text, {"split_overlap": None})


def test_schema_3_cache_with_a_commutative_twin_is_refused_for_training(tiny_cache, tiny_policy, tmp_path):
    """Schema 3 stored an overlap of 0 counted on texts alone: the twin `b + a` of a training `a + b`
    passed. The count is redone by problem for caches older than schema 4."""
    import re

    def twin(text, split):
        first_train, last_val = split.index("train"), len(split) - 1 - split[::-1].index("val")
        m = re.search(r"(-?\d+) \+ (-?\d+) =$", text[first_train])
        assert m, text[first_train]
        text[last_val] = text[first_train][: m.start()] + f"{m[2]} + {m[1]} ="  # the commutative twin
        assert text[last_val] != text[first_train]
        return text

    # what schema 3 stored: texts compared, twins missed
    _old_cache_refused(tiny_cache, tiny_policy, tmp_path, 3, twin, {"split_overlap": 0})


# -- held-out composition: problems, not texts; each dataset's share exact; GSM8K read once


def _chain(terms: list[tuple[str, str]]) -> str:
    expr = terms[0][1] + "".join(f" {op} {lit}" for op, lit in terms[1:])
    return f"State the final answer to the following arithmetic problem: {expr} ="


_term = st.tuples(st.sampled_from("+-"), st.integers(-99, 999).map(str))


@settings(max_examples=200, deadline=None)
@given(st.lists(_term, min_size=2, max_size=6), st.randoms(use_true_random=False))
def test_chain_sum_reorderings_are_one_problem(terms, rnd):
    from core.heldout import problem_key

    terms = [("+", terms[0][1])] + terms[1:]
    other = list(terms)
    rnd.shuffle(other)
    if other[0][0] != "+":  # written as a chain, the first term carries no operator: swap a "+" term in front
        i = next(k for k, t in enumerate(other) if t[0] == "+")
        other[0], other[i] = other[i], other[0]
    assert problem_key(_chain(terms)) == problem_key(_chain(other))
    assert problem_key("  " + _chain(terms).replace(" ", "  ")) == problem_key(_chain(terms))


def test_problem_key_keeps_different_problems_apart():
    from core.heldout import problem_key

    c = _chain
    assert problem_key(c([("+", "5"), ("-", "9")])) != problem_key(c([("+", "9"), ("-", "5")]))  # 5 - 9, 9 - 5
    assert problem_key(c([("+", "5"), ("-", "-3")])) != problem_key(c([("+", "5"), ("+", "3")]))  # 5 - -3, 5 + 3
    assert problem_key(c([("+", "-3"), ("+", "8")])) != problem_key(c([("+", "8"), ("-", "3")]))  # -3 + 8, 8 - 3
    assert problem_key(c([("+", "4"), ("-", "3"), ("+", "8")])) == problem_key(c([("+", "8"), ("+", "4"), ("-", "3")]))
    # only a whole chain of + and - is reordered: precedence and other wordings are left alone
    assert problem_key("Calculate 2 + 3 * 4.") == "Calculate 2 + 3 * 4."
    assert problem_key("Compute: 3 * 8 + 1 =") == "Compute: 3 * 8 + 1 ="
    assert problem_key("What is 3 + 8?") != problem_key("What is 8 + 3?")


@pytest.mark.slow
def test_commutative_twins_never_straddle_the_split():
    """The embedded one-digit sums: `3 + 8` held out while `8 + 3` is trained on (11 of 64 before)."""
    import re

    ps = build_prompts(TaskConfig(family="easy-arithmetic", train_size=256, val_size=64))
    train = {p.text for p in ps if p.split == "train"}
    twins = []
    for p in ps:
        m = re.search(r": (\d+) \+ (\d+) =$", p.text)
        if p.split == "val" and m and m[1] != m[2]:
            twins += [p.text] if p.text.replace(f"{m[1]} + {m[2]}", f"{m[2]} + {m[1]}") in train else []
    assert twins == []
    assert sum(bool(re.search(r"\d \+ \d", p.text)) for p in ps if p.split == "val") >= 10  # sums to see


@pytest.mark.slow
def test_each_dataset_keeps_its_share_of_each_split():
    """aiw has a small question space: it used to lose validation candidates to the overlap filter."""
    datasets = {"aiw": {"weight": 1.0, "config": {}}, "syllogism": {"weight": 2.0, "config": {}},
                "chain_sum": {"weight": 4.0, "config": {"min_terms": 2, "max_terms": 2, "max_digits": 1}}}
    ps = build_prompts(TaskConfig(family="logic", train_size=140, val_size=70, datasets=datasets))
    for split, n in (("train", 140), ("val", 70)):
        got = {t: sum(p.task == t and p.split == split for p in ps) for t in datasets}
        assert got == {"aiw": n // 7, "syllogism": 2 * n // 7, "chain_sum": 4 * n // 7}
    assert split_overlap(ps) == 0
    assert all(in_val_partition(p.text, 0.25) == (p.split == "val") for p in ps)
    from pipeline.tasks import allocate

    # largest remainder: within one of size x share, summing to size, ties to the first listed
    assert allocate({"a": 1 / 3, "b": 1 / 3, "c": 1 / 3}, 10) == {"a": 4, "b": 3, "c": 3}
    assert allocate({"a": 0.5, "b": 0.25, "c": 0.25}, 7) == {"a": 3, "b": 2, "c": 2}  # remainders .5 .75 .75


@settings(max_examples=100, deadline=None)
@given(st.lists(st.floats(0.01, 10.0), min_size=1, max_size=12), st.integers(0, 5000))
def test_allocate_is_within_one_of_the_mix(weights, size):
    from pipeline.tasks import allocate

    shares = {f"d{i}": w / sum(weights) for i, w in enumerate(weights)}
    counts = allocate(shares, size)
    assert sum(counts.values()) == size
    assert all(abs(counts[k] - size * shares[k]) < 1 for k in shares)


def test_every_reasoning_gym_family_partitions_by_default():
    assert TaskConfig(family="logic").partition() == 0.25 and TaskConfig(family="arithmetic").partition() == 0.25
    assert TaskConfig(family="gsm8k").partition() == 0.0 and TaskConfig(family="secret-digit").partition() == 0.0


def test_cache_records_and_extract_prints_the_shares(tiny_cache, tmp_path):
    from cache.reader import Cache
    from pipeline.extract import format_shares, load_extract_config, run_extract

    with Cache(tiny_cache) as c:
        shares = c.split_shares()
        tasks, splits = c.prompts()["task"], c.prompts()["split"]
    assert shares["mix"] == {"chain_sum": 1.0}
    assert shares["train"] == {"chain_sum": {"prompts": splits.count("train"), "share": 1.0}}
    assert shares["val"]["chain_sum"]["prompts"] == splits.count("val") and set(tasks) == {"chain_sum"}
    lines = []
    cfg = load_extract_config(str(tiny_cache.parent / "extract.yaml"))
    run_extract(cfg, progress=False, log=lines.append)  # up to date: says so, and shows the shares
    assert "nothing to do" in lines[0] and lines[1] == format_shares(shares)
    assert lines[1].splitlines()[1] == f"  chain_sum: 100.0% | 100.0% ({splits.count('train')}) | " \
                                       f"100.0% ({splits.count('val')})"


def test_older_cache_shares_are_counted_from_its_prompts(tiny_cache, tmp_path):
    import shutil

    import h5py

    from cache.reader import Cache

    old = tmp_path / "v3.h5"
    shutil.copyfile(tiny_cache, old)
    with h5py.File(old, "a") as f:
        del f.attrs["split_shares"]
        f.attrs["musk_schema"] = 3
    with Cache(old) as c:
        assert c.schema == 3 and "mix" not in c.split_shares()
        assert c.split_shares()["train"]["chain_sum"]["share"] == 1.0


def test_gsm8k_split_read_twice_is_refused(tmp_path):
    import polars as pl

    rows = [{"question": f"q{i}?", "answer": f"#### {i}"} for i in range(4)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pl.DataFrame(rows).write_parquet(tmp_path / "train-00000-of-00001.parquet")
    (tmp_path / "test.jsonl").write_text(json.dumps({"question": "t?", "answer": "#### 1"}))
    with pytest.raises(MuskError, match=r"train split is in 2 formats: \['train-00000-of-00001.parquet', "
                                        r"'train.jsonl'\]"):
        build_prompts(TaskConfig(family="gsm8k", gsm8k_path=str(tmp_path)))
    (tmp_path / "train-00000-of-00001.parquet").unlink()
    (tmp_path / "train_copy.jsonl").write_text("\n".join(json.dumps(r) for r in reversed(rows)))
    with pytest.raises(MuskError, match="'train.jsonl' and 'train_copy.jsonl' .* hold the same train questions"):
        build_prompts(TaskConfig(family="gsm8k", gsm8k_path=str(tmp_path)))
    (tmp_path / "train_copy.jsonl").write_text(json.dumps({"question": "other?", "answer": "#### 2"}))  # shards: fine
    ps = build_prompts(TaskConfig(family="gsm8k", train_size=10, gsm8k_path=str(tmp_path)))
    assert sum(p.split == "train" for p in ps) == 5
