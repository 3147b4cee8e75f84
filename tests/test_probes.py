"""Probe experts: the oracle encodes the answer (and nothing else), the noise expert encodes nothing;
both are deterministic per seed and land in the cache like any expert."""

import numpy as np
import pytest
import torch

from cache.reader import Cache
from core.errors import MuskError
from pipeline.extract import load_extract_config, run_extract
from pipeline.probes import ProbeConfig, answer_token_embeddings, noise_features, oracle_features
from tests.helpers import TINY_LLAMA, tiny_extract_config, write_yaml

QUIET = dict(progress=False, log=lambda *a: None)


class CharTok:
    """One token per character: '0'..'9' -> 0..9, '-' -> 10."""

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": [10 if c == "-" else int(c) for c in text]}


E = torch.arange(11 * 2, dtype=torch.float32).view(11, 2)  # token t has embedding [2t, 2t+1]


def test_answer_token_embeddings_hand_worked():
    out = answer_token_embeddings(["12", "-3", "4567"], CharTok(), E, slots=3)
    assert out.shape == (3, 6)
    np.testing.assert_array_equal(out[0], [2, 3, 4, 5, 0, 0])  # '1', '2', then a zero slot
    np.testing.assert_array_equal(out[1], [20, 21, 6, 7, 0, 0])  # '-', '3'
    np.testing.assert_array_equal(out[2], [8, 9, 10, 11, 12, 13])  # the first 3 tokens only


def test_oracle_depends_only_on_the_answer_and_the_seed():
    cfg = ProbeConfig(slots=3, noise=0.1)
    a = oracle_features(["7", "12", "7"], CharTok(), E, cfg, seed=0)
    b = oracle_features(["7", "12", "7"], CharTok(), E, cfg, seed=0)
    np.testing.assert_array_equal(a, b)  # deterministic
    np.testing.assert_array_equal(a[0], a[2])  # same answer, same vector (the noise is seeded by the answer)
    assert not np.allclose(a[0], a[1])
    c = oracle_features(["7"], CharTok(), E, cfg, seed=1)
    assert not np.allclose(a[0], c[0])  # another seed, other noise
    # the noise is small: the clean embedding is the nearest of all answers' clean embeddings
    clean = answer_token_embeddings(["7", "12"], CharTok(), E, 3)
    rms = float(E.pow(2).mean().sqrt())
    assert np.abs(a[0] - clean[0]).std() == pytest.approx(0.1 * rms, rel=0.8)
    assert np.linalg.norm(a[0] - clean[0]) < np.linalg.norm(a[0] - clean[1])


def test_random_code_is_a_table_of_answers():
    cfg = ProbeConfig(encoding="random-code", slots=2)
    a = oracle_features(["1", "1", "2"], CharTok(), E, cfg, seed=0)
    assert a.shape == (3, 4)
    np.testing.assert_array_equal(a[0], a[1])
    assert not np.allclose(a[0], a[2])
    assert abs(float(np.corrcoef(a[0], answer_token_embeddings(["1"], CharTok(), E, 2)[0])[0, 1])) < 1.0


def test_noise_matches_shape_and_scale_and_carries_nothing():
    rng = np.random.default_rng(0)
    like = rng.normal(3.0, 2.0, size=(4000, 5)).astype(np.float32)
    texts = [f"q{i}" for i in range(4000)]
    n = noise_features(texts, like, seed=0)
    assert n.shape == like.shape and n.dtype == np.float32
    np.testing.assert_allclose(n.mean(0), like.mean(0), atol=0.15)
    np.testing.assert_allclose(n.std(0), like.std(0), rtol=0.05)
    np.testing.assert_array_equal(n, noise_features(texts, like, seed=0))  # deterministic per seed
    assert not np.allclose(n, noise_features(texts, like, seed=1))
    # seeded per prompt, not by position: the same prompt gets the same vector anywhere in the cache
    np.testing.assert_array_equal(noise_features(["q7"], like, 0)[0], n[7])
    assert abs(np.corrcoef(n[:, 0], like[:, 0])[0, 1]) < 0.1  # unrelated to the oracle's values


def test_probe_config_is_checked():
    with pytest.raises(MuskError, match="encoding 'onehot' unknown"):
        load_extract_config(None, {"experts": [{"name": "p", "kind": "probe-oracle", "model": "x",
                                                "config": {"encoding": "onehot"}}]})
    with pytest.raises(MuskError, match="unknown key"):
        load_extract_config(None, {"experts": [{"name": "p", "kind": "probe-noise", "model": "x",
                                                "config": {"size": 3}}]})


@pytest.mark.slow
def test_probe_experts_in_a_cache(tmp_path, tiny_policy):
    """A probe team in a real cache: every variant holds the oracle vector; the reference LM's token
    embeddings of the answer are what it encodes; the noise expert's vectors differ per prompt."""
    from pipeline.experts import load_expert, ExpertSpec

    experts = [
        {"name": "oracle", "kind": "probe-oracle", "model": str(tiny_policy), "config": {"slots": 2, "noise": 0.0}},
        {"name": "noise", "kind": "probe-noise", "model": str(tiny_policy), "config": {"slots": 2}, "seed": 3},
        {"name": "tiny-llama", "kind": "random", "model": "llama", "config": TINY_LLAMA, "seed": 1},
    ]
    cfg = write_yaml(tmp_path / "p.yaml", tiny_extract_config(tmp_path / "p.h5", experts=experts, router=False,
                                                             pooling_draws=2))
    path = run_extract(load_extract_config(str(cfg)), **QUIET)
    model, tok = load_expert(ExpertSpec("ref", "hf", str(tiny_policy)), torch.float32)
    with Cache(path) as c:
        answers = c.prompts()["answer"]
        last = c.features("last_token")
        want = answer_token_embeddings(answers, tok, model.get_input_embeddings().weight, 2)
        np.testing.assert_allclose(last["oracle"], want, rtol=0, atol=1e-6)  # noise 0: exactly the embeddings
        for v in c.variants:
            for draw in (0, 1):
                np.testing.assert_array_equal(c.features(v, ["oracle"], draw=draw)["oracle"], last["oracle"])
        assert c.expert_attrs("oracle")["hidden_size"] == 2 * model.config.hidden_size
        assert last["noise"].shape == last["oracle"].shape
        texts = c.prompts()["text"]
        # seeded per prompt text: one vector per distinct prompt, the same vector for a repeated one
        assert len({tuple(r) for r in last["noise"]}) == len(set(texts))
        first = {t: tuple(r) for t, r in zip(texts, last["noise"])}
        assert all(first[t] == tuple(r) for t, r in zip(texts, last["noise"]))
        assert c.hints("oracle") == [""] * len(answers)  # a probe says nothing as text
        assert (c.column("oracle", "n_tokens") > 0).all()
