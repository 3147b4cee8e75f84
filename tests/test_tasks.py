"""Task families, GSM8K from local files, rewards and answer extraction."""

import json

import pytest

from core.errors import MuskError
from core.config import from_dict
from pipeline.tasks import FAMILIES, TaskConfig, build_prompts, gsm8k_answer, split_overlap
from pipeline.rewards import extract_answer, score


def test_paper_families_match_listings():
    assert len(FAMILIES["arithmetic"]) == 9
    assert len(FAMILIES["algorithmic"]) == 10
    assert len(FAMILIES["logic"]) == 7
    assert FAMILIES["algorithmic"]["jugs"]["config"] == {"difficulty": 6}
    assert FAMILIES["algorithmic"]["string_manipulation"]["config"] == {"max_string_length": 15, "max_num_rules": 6}


@pytest.mark.slow
@pytest.mark.parametrize("family", ["arithmetic", "algorithmic", "logic"])
def test_paper_families_generate_and_score(family):
    cfg = TaskConfig(family=family, train_size=6, val_size=3)
    ps = build_prompts(cfg)
    assert [p.split for p in ps] == ["train"] * 6 + ["val"] * 3
    assert all(p.task in FAMILIES[family] for p in ps)
    for p in ps:  # the reference answer scores 1 through the task's own verifier
        assert score(p.entry, f"<think>x</think><answer>{p.answer}</answer>") == pytest.approx(1.0)


@pytest.mark.slow
def test_splits_are_seeded_and_distinct():
    a = build_prompts(TaskConfig(train_size=20, val_size=20))
    b = build_prompts(TaskConfig(train_size=20, val_size=20))
    assert [p.text for p in a] == [p.text for p in b]
    train = [p.text for p in a if p.split == "train"]
    val = [p.text for p in a if p.split == "val"]
    assert train != val


def test_unknown_family_and_dataset_list_choices():
    with pytest.raises(MuskError, match="unknown task family 'nope'.*arithmetic"):
        from_dict(TaskConfig, {"family": "nope"})
    with pytest.raises(MuskError, match="unknown reasoning-gym dataset 'nope'"):
        from_dict(TaskConfig, {"family": "arithmetic", "datasets": {"nope": {"weight": 1}}})
    with pytest.raises(MuskError, match="unknown key"):
        from_dict(TaskConfig, {"family": "arithmetic", "sizee": 3})


def test_gsm8k_local_folder(tmp_path):
    rows = [{"question": f"q{i}?", "answer": f"work <<1+1=2>>\n#### {1000 + i:,}"} for i in range(5)]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    test = [{"question": f"t{i}?", "answer": f"#### {i}"} for i in range(2)]
    test.insert(1, {"question": " q1? ", "answer": "#### 1001"})  # a training question (whitespace aside)
    (tmp_path / "test.jsonl").write_text("\n".join(json.dumps(r) for r in test))
    ps = build_prompts(TaskConfig(family="gsm8k", train_size=3, val_size=10, gsm8k_path=str(tmp_path)))
    assert [(p.split, p.answer) for p in ps] == [("train", "1000"), ("train", "1001"), ("train", "1002"),
                                                  ("test", "0"), ("test", "1")]
    assert score(ps[0].entry, "<answer>1,000</answer>") == 1.0
    assert score(ps[0].entry, "<answer>999</answer>") == 0.0


def test_gsm8k_bad_files(tmp_path):
    with pytest.raises(MuskError, match="does not exist"):
        build_prompts(TaskConfig(family="gsm8k", gsm8k_path=str(tmp_path / "missing")))
    (tmp_path / "train.jsonl").write_text("{not json")
    (tmp_path / "test.jsonl").write_text("{}")
    with pytest.raises(MuskError, match="cannot read GSM8K file"):
        build_prompts(TaskConfig(family="gsm8k", gsm8k_path=str(tmp_path)))


def test_gsm8k_answer():
    assert gsm8k_answer("a\nb #### 1,234") == "1234"
    with pytest.raises(MuskError):
        gsm8k_answer("no marker")


@pytest.mark.parametrize("text,strict,lenient", [
    ("<answer>3</answer> then <answer>4</answer>", "4", "4"),
    ("<think>2+2</think><answer> 5 </answer>", "5", "5"),
    ("the answer is <answer>7", None, "7"),
    ("I think it is 12, no 13.", None, "13"),
    ("no digits", None, None),
])
def test_extract_answer(text, strict, lenient):
    assert extract_answer(text, "strict") == strict
    assert extract_answer(text, "lenient") == lenient


def test_balanced_answers_hand_worked():
    from pipeline.tasks import balanced

    entries = [{"answer": a, "i": i} for i, a in enumerate(["1", "1", "1", "1", "2", "3", "2", "1"])]
    out = balanced(entries, 6)
    assert [(e["answer"], e["i"]) for e in out] == [("1", 0), ("2", 4), ("3", 5), ("1", 1), ("2", 6), ("1", 2)]
    assert len(balanced(entries, 100)) == 8  # never more than the pool holds


@pytest.mark.slow
def test_balanced_split_is_flat_and_seeded():
    import collections

    from pipeline.tasks import TaskConfig, build_prompts

    cfg = TaskConfig(family="letter-counting", train_size=60, val_size=30, balance_answers=True)
    a, b = build_prompts(cfg), build_prompts(cfg)
    assert [p.text for p in a] == [p.text for p in b]
    counts = collections.Counter(p.answer for p in a if p.split == "train")
    # answers take turns; a rare answer whose pool runs out leaves its turns to the others: the answers
    # that never ran out (within 1 of the mode) share what is left evenly
    top = max(counts.values())
    never_out = [a for a, c in counts.items() if c >= top - 1]
    assert len(counts) >= 5 and len(never_out) >= 5
    assert top <= -(-(60 - sum(c for a, c in counts.items() if a not in never_out)) // len(never_out))
    plain = collections.Counter(p.answer for p in build_prompts(TaskConfig(family="letter-counting", train_size=60,
                                                                            val_size=30)) if p.split == "train")
    assert plain.most_common(1)[0][1] > max(counts.values())  # unbalanced, the mode dominates


def test_secret_digit_probe_task():
    """The probe task: a seeded uniform digit per prompt that the prompt's text does not reveal."""
    import collections
    import re

    from pipeline.tasks import TaskConfig, build_prompts
    from pipeline.rewards import score

    cfg = TaskConfig(family="secret-digit", train_size=400, val_size=20, developer_prompt="direct")
    ps = build_prompts(cfg)
    assert [p.text for p in ps] == [p.text for p in build_prompts(cfg)]  # seeded
    assert len({p.text for p in ps}) == len(ps)  # every prompt is its own (the card names differ)
    counts = collections.Counter(p.answer for p in ps if p.split == "train")
    assert set(counts) == set("0123456789") and max(counts.values()) < 2 * min(counts.values())
    assert all(not re.search(r"\d(?!\D*from 0 to 9)", p.text.replace("0 to 9", "")) for p in ps)  # no digit but "0 to 9"
    p = ps[0]
    assert score(p.entry, f"The secret digit is {p.answer}.", "lenient") == 1.0
    assert score(p.entry, f"<answer>{(int(p.answer) + 1) % 10}</answer>", "strict") == 0.0


# --- secret-label: the probe only C can answer


@pytest.mark.parametrize("k", [1, 0, 11])
def test_secret_label_refuses_k_outside_one_digit_labels(k):
    with pytest.raises(MuskError, match="task.labels"):
        from_dict(TaskConfig, {"family": "secret-label", "labels": k}, "task")


@pytest.mark.parametrize("k", [2, 4, 10])
def test_secret_label_is_balanced_held_out_and_a_function_of_the_text(k):
    from collections import Counter

    from pipeline.tasks import secret_label

    cfg = TaskConfig(family="secret-label", labels=k, train_size=40, val_size=2 * k, developer_prompt="direct")
    ps = build_prompts(cfg)
    train, val = [p for p in ps if p.split == "train"], [p for p in ps if p.split == "val"]
    # every label equally often (a constant answer scores exactly 1/k on the held-out split)
    assert Counter(p.answer for p in val) == {str(d): 2 for d in range(k)}
    assert set(Counter(p.answer for p in train).values()) <= {40 // k, 40 // k + 1}
    assert split_overlap(ps) == 0 and not {p.text for p in train} & {p.text for p in val}
    # the label is the card's hash: the same card has the same label, whatever the split; the options
    # named in the text are the same for every prompt (no clue in the text but the card)
    for p in ps:
        card = p.text.split()[1]
        assert p.answer == secret_label(card, k, 0)
        assert p.text.replace(card, "CARD") == ps[0].text.replace(ps[0].text.split()[1], "CARD")
    assert score(ps[0].entry, f"The digit is {ps[0].answer}", "lenient") == 1.0
