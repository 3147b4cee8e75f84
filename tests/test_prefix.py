"""The prefix baseline (m trainable context tokens, no experts) and the ramp gate of the context path."""

import json
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from cache.reader import Cache
from core.errors import MuskError
from train.adapters import load_adapter, method_info
from train.gphi import OutputProjection, Perceiver, Prefix
from train.config import load_train_config
from evaluate.run import EvalRequest, run_eval
from train.loop import run_train
from train.setup import build_models, load_data
from tests.helpers import parity_score, quiet_train, tiny_train_overrides

QUIET = quiet_train(parity_score)
STABLE = dict(context_position="after-question", context_rms=3.0, gate_lr=3e-3, feature_norm="standardize",
              context_anchor="mean-embedding", grad_clip_scope="per-group")


def _metrics(run):
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


# --- the ramp gate -------------------------------------------------------------------------------


@pytest.mark.parametrize("step,warmup,want", [(1, 10, 0.0), (2, 10, 0.1), (6, 10, 0.5), (11, 10, 1.0), (500, 10, 1.0),
                                              (1, 1, 0.0), (2, 1, 1.0)])
def test_ramp_schedule_hand_worked(step, warmup, want):
    out = OutputProjection(8, 6, 1e-4, gate="ramp")
    out.set_step(step, warmup)
    assert float(out.ramp) == pytest.approx(want, abs=1e-7)
    assert out.gate_value() == pytest.approx(want * 0.5, abs=1e-7)  # sigmoid(0) = 1/2


def test_ramp_gate_is_exactly_silent_on_the_first_step_whatever_gamma():
    torch.manual_seed(0)
    p = Perceiver([32, 24], d=64, d_out=48, num_latents=4, num_heads=4, init_std=1e-4, gate="ramp", embed_rms=0.25)
    with torch.no_grad():
        p.out.gate.fill_(3.0)
        p.out.proj.weight.mul_(1e4)
    p.out.set_step(1, 10)
    f = [torch.randn(3, 32), torch.randn(3, 24)]
    assert torch.equal(p(f).context, torch.zeros(3, 4, 48))


@settings(max_examples=40, deadline=None)
@given(gamma=st.floats(-30, 30), step=st.integers(2, 40), seed=st.integers(0, 2**16))
def test_ramp_gate_never_flips_and_never_outgrows_the_bound(gamma, step, seed):
    """C = r_t sigmoid(gamma) k s C_raw / rms(C_raw): for every gamma the sign of C is that of C_raw
    (cosine exactly 1), and its RMS is r_t sigmoid(gamma) k s <= k s."""
    torch.manual_seed(seed)
    s, k = 0.25, 3.0
    out = OutputProjection(16, 12, 1e-2, gate="ramp", embed_rms=s, context_rms=k)
    out.set_step(step, 10)
    with torch.no_grad():
        out.gate.fill_(gamma)
    x = torch.randn(2, 4, 16)
    c, raw = out(x), out.proj(x)
    g = min(1.0, (step - 1) / 10) / (1 + math.exp(-gamma))
    rms = c.pow(2).mean(dim=(1, 2)).sqrt()
    torch.testing.assert_close(rms, torch.full((2,), g * k * s), rtol=1e-4, atol=1e-30)
    assert float(rms.detach().max()) <= k * s * (1 + 1e-5)
    if g > 1e-30:  # the cosine written out in float64 (cosine_similarity's eps would clamp a tiny C)
        a, b = c.detach().double().flatten(1), raw.detach().double().flatten(1)
        cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
        torch.testing.assert_close(cos, torch.ones(2, dtype=torch.float64), rtol=0, atol=1e-4)


# --- the prefix method ---------------------------------------------------------------------------


def test_prefix_is_registered_reads_nothing_and_has_a_context():
    info = method_info("prefix")
    assert not info.needs_features and not info.needs_router and not info.needs_hints and info.has_context
    assert [method_info(n).has_context for n in ("single", "output-collab", "perceiver", "ffn", "hard-routing")] == \
        [False, False, True, True, True]


def test_prefix_tokens_receive_gradient_once_the_gate_is_open():
    torch.manual_seed(0)
    p = Prefix(d=16, d_out=12, num_latents=4, init_std=1e-2, gate="ramp", embed_rms=0.5, context_rms=2.0)
    p.out.set_step(1, 4)
    assert torch.equal(p([]).context, torch.zeros(1, 4, 12))  # r_1 = 0: no C at the first step
    p.out.set_step(3, 4)
    c = p([]).context  # [1, m, d_out], one C for every prompt
    assert c.shape == (1, 4, 12)
    (c * torch.randn(1, 4, 12)).sum().backward()
    assert float(p.latents.grad.abs().max()) > 0 and float(p.out.proj.weight.grad.abs().max()) > 0
    with pytest.raises(Exception, match="reads no experts"):
        p([], keep=torch.ones(2, dtype=torch.bool))


@pytest.mark.slow
@pytest.mark.parametrize("gate", ["rms", "ramp"])
def test_prefix_trains_without_expert_features_and_final_reloads(tiny_cache, tiny_policy, tmp_path, monkeypatch, gate):
    """KL exactly 0 at step 0; the cache's expert features are never read (a cache without experts
    would do); the m tokens move; final/ rebuilds the same C."""
    def no_features(*a, **k):
        raise AssertionError("the prefix method read expert features")

    monkeypatch.setattr(Cache, "features", no_features)
    cfg = load_train_config(None, tiny_train_overrides(tiny_policy, method="prefix", total_training_steps=3,
                                                       context_gate=gate, gate_warmup_steps=1, **STABLE))
    run = run_train(cfg, tiny_cache, tmp_path / "run", **QUIET)
    m = _metrics(run)
    assert m[0]["kl"] == 0.0
    assert {"grad_norm/lora", "grad_norm/router", "grad_norm/gate", "context/gate"} <= set(m[0])
    assert json.loads((run / "summary.json").read_text())["final_val_accuracy"] is not None

    data = load_data(cfg, tiny_cache)
    assert data.experts == [] and data.features is None
    fresh = build_models(cfg, data, "cpu", torch.float32).adapter  # the same seed: the initial weights
    adapter, spec = load_adapter(run / "final")
    assert spec.method == "prefix" and spec.expert_dims == () and isinstance(adapter, Prefix)
    assert not torch.equal(adapter.latents, fresh.latents)  # the context tokens were trained
    adapter.eval()
    with torch.no_grad():
        c = adapter([]).context
    assert c.shape == (1, 4, fresh.out.anchor.shape[0])
    assert float((c - adapter.out.anchor).abs().max()) > 0  # the gate is open: C is not its anchor

    # musk eval reloads final/: C removed and null are conditions of a prefix run, an expert ablation is refused
    run_eval(EvalRequest(run=run, contexts=("with", "without", "null"), out=tmp_path / "ev"), scorer=parity_score, progress=False,
             log=lambda *a: None)
    conds = json.loads((tmp_path / "ev" / "summary.json").read_text())["conditions"]
    assert list(conds) == ["with", "without", "null"] and all(v["n"] == 4 for v in conds.values())
    with pytest.raises(MuskError, match="reads no experts"):
        run_eval(EvalRequest(run=run, ablations=("shuffle:tiny-llama",), out=tmp_path / "ev2"), progress=False)


def test_report_pairs_perceiver_against_prefix(tmp_path):
    """A prefix run is a method row: perceiver [1,1,1,0] vs prefix [1,0,1,0] gives d = [0,1,0,0], +25
    [-24, +74] (hand-worked as "perceiver − single" in test_report); prefix itself is compared with
    single, and with C removed, but never with itself."""
    from analyze.records import paired_tables
    from analyze.runs import load_runs
    from tests.test_report import write_eval_records, make_run

    root = tmp_path / "pr"
    write_eval_records(make_run(root, "p", acc=0.75), [1, 1, 1, 0])
    x = make_run(root, "x", method="prefix", acc=0.5)
    write_eval_records(x, [1, 0, 1, 0])
    write_eval_records(x, [0, 0, 1, 0], condition="without")
    write_eval_records(make_run(root, "s", method="single", acc=0.5), [0, 1, 1, 0])
    fam, _ = paired_tables(load_runs([root]))
    rows = dict(fam.rows)
    assert rows["perceiver − prefix"] == ["+25.0 [-24.0, +74.0]† (1 v 1 seed, 4 distinct questions)"]
    # d = [1,-1,0,0]: var 2/3, half-width 1.96 sqrt(1/6) = 0.80
    assert rows["prefix − single"] == ["+0.0 [-80.0, +80.0]† (1 v 1 seed, 4 distinct questions)"]
    assert rows["prefix: with C − without C"] == ["+25.0 [-24.0, +74.0]† (1 seed, 4 distinct questions; a bound is "
                                                  "past what the scores allow, [+0.0, +100.0])"]
    assert [r[0] for r in fam.rows] == ["prefix − single", "prefix: with C − without C", "perceiver − single",
                                        "perceiver − prefix"]
