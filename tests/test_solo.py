"""Solo answers in the cache: scoring, the extract step, and completing an older cache without
touching its features."""

from __future__ import annotations

import json

import h5py
import numpy as np
import pytest

from cache.reader import Cache
from core.errors import MuskError
from pipeline import solo
from pipeline.tasks import Prompt, TaskConfig, build_prompts
from tests.helpers import tiny_extract_config, write_yaml


def _numeric(answer: str) -> Prompt:
    entry = json.dumps({"question": "q", "answer": answer, "metadata": {"source_dataset": "gsm8k"}})
    return Prompt(text="q", answer=answer, task="gsm8k", split="validation", entry=entry)


@pytest.mark.slow
def test_score_solo_right_wrong_unparseable():
    rg = build_prompts(TaskConfig(family="easy-arithmetic", train_size=2, val_size=1), None)[0]  # reasoning-gym scorer
    prompts = [_numeric("12"), _numeric("12"), _numeric("12"), _numeric("1,200"), rg, rg, rg]
    texts = ["so <answer>12</answer>", "<answer>13</answer>", "the answer is 12",  # right, wrong, no tags
             "<answer>1200</answer>", f"<answer>{rg.answer}</answer>", "<answer>x</answer>", f"{rg.answer}"]
    got = solo.score_solo(prompts, texts, "strict")
    assert got.dtype == np.float32
    assert got.tolist() == [1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 0.0]
    # lenient reads the last number of an untagged completion
    assert solo.score_solo(prompts[2:3], texts[2:3], "lenient").tolist() == [1.0]
    with pytest.raises(ValueError):
        solo.score_solo(prompts, texts[:2])


def test_solo_prompt_is_the_policy_prompt_without_hints():
    from pipeline.experts import byte_tokenizer

    tok = byte_tokenizer()
    text = solo.solo_prompt_text(tok, "SYSTEM <answer>", "What is 2+2?")
    assert "SYSTEM <answer>" in text and "What is 2+2?" in text
    assert text.index("SYSTEM") < text.index("What is 2+2?")


def test_reuses_hint_only_when_the_decode_is_the_same():
    ids = [[1, 2, 3], [4, 5]]
    assert solo.reuses_hint(ids, [list(x) for x in ids], 8, 8, "musk")
    assert not solo.reuses_hint(None, ids, 8, 8, "musk")  # hints off
    assert not solo.reuses_hint(ids, [[1, 2, 3], [4, 6]], 8, 8, "musk")  # other prompt
    assert not solo.reuses_hint(ids, ids, 8, 16, "musk")  # other budget
    assert not solo.reuses_hint(ids, ids, 8, 8, "vllm")  # other decoder


def _extract(tmp_path, name, **extra):
    from pipeline.extract import load_extract_config, run_extract

    cfg = tiny_extract_config(tmp_path / name, router=False, **extra)
    path = write_yaml(tmp_path / f"{name}.yaml", cfg)
    logs = []
    run_extract(load_extract_config(str(path)), progress=False, log=logs.append)
    return tmp_path / name, logs


@pytest.mark.slow
def test_extract_stores_scored_solo_answers(tmp_path):
    out, _ = _extract(tmp_path, "s.h5", solo=True, solo_max_new_tokens=5)
    with Cache(out) as c:
        assert c.schema == 5
        prompts = c.prompts()
        for n in c.experts:
            a = c.expert_attrs(n)
            assert a["solo_source"] == "decode"  # hints read the bare question: not the answer format
            assert a["solo_max_new_tokens"] == 5 and a["solo_answer_extraction"] == "strict"
            assert a["solo_seconds"] > 0 and a["solo_machine"]
            texts = c.solo_answers(n)
            n_tok = c.column(n, "solo_n_tokens")
            assert len(texts) == len(c) and n_tok.shape == (len(c),)
            assert ((n_tok >= 1) & (n_tok <= 5)).all()
            ps = [Prompt(**{k: prompts[k][i] for k in prompts}) for i in range(len(c))]
            np.testing.assert_array_equal(c.solo_scores(n), solo.score_solo(ps, texts, "strict"))


@pytest.mark.slow
def test_older_cache_completed_without_recomputing_features(tmp_path, monkeypatch):
    import pipeline.extract as ex
    import pipeline.extract_expert

    out, _ = _extract(tmp_path, "old.h5", solo=False)
    with h5py.File(out, "a") as f:  # what a schema-4 musk wrote: no solo answers, schema 4
        f.attrs["musk_schema"] = 4
        assert "solo" not in f["experts/tiny-llama"]
    with Cache(out) as c:
        before = {n: {v: c.features(v, [n])[n].tobytes() for v in c.variants} for n in c.experts}
        hints = {n: c.hints(n) for n in c.experts}
        fps = {n: c.expert_fingerprint(n) for n in c.experts}
        root = c.fingerprint
        assert c.schema == 4

    def no_features(*a, **k):
        raise AssertionError("features recomputed")

    monkeypatch.setattr(pipeline.extract_expert, "feature_batches", no_features)
    cfg = tiny_extract_config(out, router=False, solo=True, solo_max_new_tokens=4)
    cfg_path = write_yaml(tmp_path / "again.yaml", cfg)
    logs = []
    ex.run_extract(ex.load_extract_config(str(cfg_path)), progress=False, log=logs.append)
    assert "solo answers of ['tiny-llama', 'tiny-gpt2']" in logs[-1]
    with Cache(out) as c:
        assert c.schema == 5 and c.fingerprint == root
        for n in c.experts:
            assert c.expert_fingerprint(n) == fps[n] and c.hints(n) == hints[n]
            assert {v: c.features(v, [n])[n].tobytes() for v in c.variants} == before[n]
            assert c.solo_scores(n).shape == (len(c),) and len(c.solo_answers(n)) == len(c)
            assert c.expert_attrs(n)["solo_max_new_tokens"] == 4
    logs.clear()  # a third run: nothing left to do
    ex.run_extract(ex.load_extract_config(str(cfg_path)), progress=False, log=logs.append)
    assert any("nothing to do" in line for line in logs)


def test_solo_config_checked():
    from pipeline.extract import load_extract_config

    with pytest.raises(MuskError, match="solo_answer_extraction"):
        load_extract_config(None, {"solo_answer_extraction": "loose"}).validate()
    assert load_extract_config(None).solo is True  # the embedded default scores its experts alone


@pytest.mark.slow
def test_hint_decode_reused_when_it_is_the_solo_decode(tmp_path, monkeypatch):
    """Where the hint decode is the solo decode, its text is stored and scored, not decoded twice."""
    monkeypatch.setattr(solo, "reuses_hint", lambda *a: True)
    monkeypatch.setattr(solo, "solo_batches", lambda *a, **k: (_ for _ in ()).throw(AssertionError("decoded twice")))
    out, _ = _extract(tmp_path, "r.h5", solo=True, solo_max_new_tokens=6)
    with Cache(out) as c:
        for n in c.experts:
            a = c.expert_attrs(n)
            assert a["solo_source"] == "hint" and np.isnan(a["solo_seconds"])
            assert c.solo_answers(n) == c.hints(n)
            np.testing.assert_array_equal(c.column(n, "solo_n_tokens"), c.column(n, "hint_n_tokens"))
