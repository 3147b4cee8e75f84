"""benchmarks/probe_gradient.py: the draws-for-a-cosine formula, and the benchmark end to end on a tiny
probe cache (GRPO draws and the supervised gradient on W_oracle, finite cosines, a JSON record)."""

import json
import math
import sys

import pytest
from hypothesis import given, strategies as st

from pipeline.extract import load_extract_config, run_extract
from tests.helpers import ROOT, TINY_LLAMA, tiny_extract_config, tiny_train_overrides, write_yaml

sys.path.insert(0, str(ROOT))
from benchmarks import probe_gradient  # noqa: E402
from benchmarks.probe_gradient import n_for  # noqa: E402


def test_draws_for_a_cosine_hand_worked():
    # n = t^2 (1 - rho) / (rho (1 - t^2)); rho 0.5, t 0.9: 0.81 * 0.5 / (0.5 * 0.19) = 4.263...
    assert math.isclose(n_for(0.5), 0.81 / 0.19, rel_tol=1e-12)
    assert n_for(1.0) == 0.0  # identical draws: one is enough (and fewer)
    assert n_for(0.0) == math.inf and n_for(-0.1) == math.inf  # no common direction: no number of draws


@given(st.floats(0.001, 0.999))
def test_the_mean_of_n_draws_reaches_the_cosine(rho):
    """Draws g_k = mu + e_k with independent noise: cos(g, g') = rho means |mu|^2 = rho (|mu|^2 + s^2), and
    the mean of n draws has cos^2 with mu of n rho / (1 + (n - 1) rho); at n = n_for(rho) that is 0.9^2."""
    assert math.isclose(probe_gradient.mean_cos(n_for(rho), rho), 0.9, rel_tol=1e-9)
    assert math.isclose(probe_gradient.mean_cos(1, rho), math.sqrt(rho))  # one draw: its own cosine with mu


def test_mean_of_draws_cosine_by_simulation():
    """Simulated draws mu + noise in 4000 dimensions: the mean of n draws' cosine with mu is mean_cos(n, rho)."""
    import numpy as np

    rng = np.random.default_rng(0)
    mu = rng.standard_normal(4000)
    draws = mu + 2.0 * rng.standard_normal((6, 4000))  # |noise|^2 = 4 |mu|^2: rho = 1/5
    rho = np.mean([d1 @ d2 / np.linalg.norm(d1) / np.linalg.norm(d2) for i, d1 in enumerate(draws) for d2 in draws[i + 1:]])
    assert abs(rho - 0.2) < 0.03
    m = draws.mean(0)
    assert abs(m @ mu / np.linalg.norm(m) / np.linalg.norm(mu) - probe_gradient.mean_cos(6, 0.2)) < 0.03


@pytest.mark.slow
def test_benchmark_end_to_end_on_a_tiny_probe_cache(tmp_path, tiny_policy, monkeypatch, capsys):
    experts = [
        {"name": "probe-oracle", "kind": "probe-oracle", "model": str(tiny_policy), "config": {"slots": 2}},
        {"name": "probe-noise", "kind": "probe-noise", "model": str(tiny_policy), "config": {"slots": 2}},
        {"name": "tiny-llama", "kind": "random", "model": "llama", "config": TINY_LLAMA, "seed": 1},
    ]
    cache = run_extract(load_extract_config(str(write_yaml(tmp_path / "x.yaml", tiny_extract_config(
        tmp_path / "p.h5", experts=experts, router=False, hints=False)))), progress=False, log=lambda *a: None)
    cfg = write_yaml(tmp_path / "t.yaml", tiny_train_overrides(tiny_policy, context_gate="ramp",
                                                               context_position="after-question"))
    out = tmp_path / "g.json"
    # a tiny random policy is never right: score each completion by its text's parity, so groups disagree
    monkeypatch.setattr(sys, "argv", ["probe_gradient.py", "--cache", str(cache), "--config", str(cfg), "--batches", "1",
                                      "--draws", "3", "--threads", "1", "--json", str(out)])
    probe_gradient.main(scorer=lambda entry, text, mode: float(len(text) % 2))
    assert "RESULT initial weights" in capsys.readouterr().out
    res = json.loads(out.read_text())
    for k in ("cos_draw_sup", "cos_draw_draw", "cos_mean_sup"):  # every draw had signal: no NaN
        assert -1.0 <= res[k] <= 1.0, (k, res[k])
    assert 0.0 <= res["frac_zero_std"] < 1.0 and res["group_size"] == 4
