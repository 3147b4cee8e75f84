"""The decodability probe (`musk probe`): a variant that carries the label is decoded, one that does
not sits at chance; the command end to end on a tiny cache."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from analyze.probe import first_token_labels, linear_probe
from core.errors import MuskError


def _synthetic(seed: int, n_train=400, n_val=200, k=5, d=16):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, k, n_train + n_val)
    centers = rng.normal(size=(k, d)) * 3.0
    informative = centers[y] + rng.normal(size=(len(y), d))  # the label, linearly
    noise = rng.normal(size=(len(y), d))  # nothing
    return y, informative, noise, n_train


@pytest.mark.slow
def test_probe_decodes_the_informative_variant_only():
    y, informative, noise, n = _synthetic(0)
    r = linear_probe(informative[:n], y[:n], informative[n:], y[n:])
    assert r.accuracy > 0.95 and r.n_train == 400 and r.n_val == 200 and r.classes == 5
    assert r.shuffled < 0.35  # shuffled labels: no information learned (chance 0.2)
    m = np.mean(y[n:] == np.bincount(y[:n]).argmax())
    assert r.majority == pytest.approx(m, abs=1e-12)
    z = linear_probe(noise[:n], y[:n], noise[n:], y[n:])
    assert z.accuracy < 0.35 and z.shuffled < 0.35


def test_probe_on_noise_is_calibrated():
    """Null simulation: on uninformative features the probe beats the majority rate by more than a
    binomial 2.5-sigma margin in at most 2 of 20 draws."""
    wins = 0
    for s in range(20):
        y, _, noise, n = _synthetic(100 + s, n_train=200, n_val=200, k=4, d=8)
        r = linear_probe(noise[:n], y[:n], noise[n:], y[n:])
        p = max(r.majority, 0.25)
        wins += r.accuracy > p + 2.5 * np.sqrt(p * (1 - p) / r.n_val)
    assert wins <= 2


def test_probe_edge_cases():
    x = np.zeros((4, 3))
    r = linear_probe(x, np.array([7, 7, 7, 7]), x[:2], np.array([7, 1]))  # one training class
    assert r.accuracy == 0.5 and r.shuffled == 0.5 and r.majority == 0.5
    with pytest.raises(MuskError, match="training and held-out"):
        linear_probe(x[:0], np.array([], dtype=int), x, np.zeros(4, dtype=int))
    bad = x.copy()
    bad[0, 0] = np.nan
    with pytest.raises(MuskError, match="non-finite"):
        linear_probe(bad, np.arange(4), x, np.arange(4))


def test_first_token_labels(tiny_policy):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny_policy))
    got = first_token_labels(tok, ["12", "7"])
    assert got.tolist() == [tok("12", add_special_tokens=False)["input_ids"][0], tok("7", add_special_tokens=False)["input_ids"][0]]
    with pytest.raises(MuskError, match="no tokens"):
        first_token_labels(tok, ["3", ""])


def test_probe_cli_end_to_end(tiny_cache, tiny_policy, tmp_path):
    from cache.reader import Cache
    from cli import app

    res = CliRunner().invoke(app, ["probe", str(tiny_cache), "--policy", str(tiny_policy), "--out",
                                   str(tmp_path / "probe")])
    assert res.exit_code == 0, res.output
    with Cache(tiny_cache) as c:
        for e in c.experts:
            for v in c.variants:
                assert f"| {e} | {v} |" in res.output
        n_val, n_rows = len(c.split_indices("val")), len(c.experts) * len(c.variants)
    assert f"of {n_val} val prompts" in res.output
    assert (tmp_path / "probe.md").read_text().startswith("### Decodability probe")
    assert (tmp_path / "probe.csv").read_text().strip().count("\n") == n_rows  # a header and one line per probe
    bad = CliRunner().invoke(app, ["probe", str(tmp_path / "nope.h5"), "--policy", str(tiny_policy)])
    assert bad.exit_code == 2 and "does not exist" in bad.output and "Traceback" not in bad.output
    bad = CliRunner().invoke(app, ["probe", str(tiny_cache), "--policy", str(tiny_policy), "--max-train", "0"])
    assert bad.exit_code == 2 and "--max-train" in bad.output
