"""Held-out splits: validation questions never appear in training, whatever the family, process or
size; reference answers score 1.0 through the training scorer; scorer failures are loud."""

import json
import os
import subprocess
import sys
import warnings

import pytest

from core.errors import MuskError
from pipeline.rewards import SCORER_ERRORS, check_references, score
from core.heldout import normalize_question
from pipeline.tasks import TaskConfig, build_prompts, in_val_partition, split_overlap
from tests.helpers import ROOT


def _overlap(ps) -> int:
    train = {normalize_question(p.text) for p in ps if p.split == "train"}
    return sum(normalize_question(p.text) in train for p in ps if p.split != "train")


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
def test_validation_never_in_training(family, train, val):
    ps = build_prompts(TaskConfig(family=family, train_size=train, val_size=val))
    assert sum(p.split == "train" for p in ps) == train and sum(p.split == "val" for p in ps) == val
    assert _overlap(ps) == 0 and split_overlap(ps) == 0


def test_probe_preset_balanced_split_held_out():
    ps = build_prompts(TaskConfig(family="letter-counting", train_size=200, val_size=60, balance_answers=True))
    assert split_overlap(ps) == 0


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


def test_prompts_do_not_depend_on_pythonhashseed():
    assert _texts_under_hashseed("1") == _texts_under_hashseed("2") == _texts_under_hashseed("0")


def test_raw_polynomial_multiplication_does_depend_on_it():
    """The generator itself orders terms through a set: the guard above is what makes prompts stable."""
    code = ("import reasoning_gym, json; print(json.dumps([e['question'] for e in "
            "reasoning_gym.create_dataset('polynomial_multiplication', size=40, seed=5)]))")
    runs = [subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": s},
                           capture_output=True, text=True, check=True).stdout for s in ("1", "2", "3")]
    assert len(set(runs)) > 1


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


def test_training_counts_scorer_errors_per_step(tiny_cache, tiny_policy, tmp_path, monkeypatch):
    import train.loop
    from pipeline.rewards import SCORER_ERRORS as tally
    from tests.helpers import tiny_train_overrides
    from train.config import load_train_config
    from train.loop import run_train

    def failing(entry, text, mode):
        tally.record("chain_sum", text, "q", ValueError("bad entry"))
        return 0.0

    monkeypatch.setattr(train.loop, "score", failing)
    cfg = load_train_config(None, tiny_train_overrides(tiny_policy, method="single", total_training_steps=2))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        run_train(cfg, cache_path=tiny_cache, out=tmp_path / "run", resume=False, progress=False, log=lambda *a: None)
    steps = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["reward/scorer_errors"] for r in steps] == [16, 16]  # 2 micro-batches x 2 prompts x 4 rollouts


def test_old_cache_with_overlapping_splits_is_refused_for_training(tiny_cache, tiny_policy, tmp_path):
    import shutil

    import h5py

    from tests.helpers import tiny_train_overrides
    from train.config import load_train_config
    from train.loop import run_train

    old = tmp_path / "old.h5"
    shutil.copyfile(tiny_cache, old)
    with h5py.File(old, "a") as f:  # a schema-2 cache whose validation question is a training one
        del f.attrs["split_overlap"]
        f.attrs["musk_schema"] = 2
        text = f["prompts/text"].asstr()[()]
        text[-1] = text[0]
        del f["prompts/text"]
        f.create_dataset("prompts/text", data=text.astype(object), dtype=h5py.string_dtype("utf-8"))
    cfg = load_train_config(None, tiny_train_overrides(tiny_policy, method="single"))
    with pytest.raises(MuskError, match="1 of its held-out prompts are also in its training split"):
        run_train(cfg, cache_path=old, out=tmp_path / "run", resume=False, progress=False, log=lambda *a: None)
    assert not (tmp_path / "run").exists()
