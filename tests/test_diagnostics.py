"""Diagnostics that show what they name: clip_frac and the other per-update statistics over every
update of a step, over the tokens the loss counts; the sampler gap over one support when top_k /
top_p / min_p filter the sampling; beta 0 never runs the reference."""

import json
import math

import pytest
import torch

from tests.helpers import quiet_train, tiny_train_overrides


def _train(tiny_cache, tiny_policy, tmp_path, monkeypatch, name="run", **extra) -> list[dict]:
    from train.config import load_train_config
    from train.loop import run_train

    cfg = load_train_config(None, tiny_train_overrides(tiny_policy, method="single", **extra))
    run = run_train(cfg, tiny_cache, tmp_path / name, **quiet_train())
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]


def test_update_record_hand_worked():
    """Two updates of one micro-batch each; 12 live tokens, 10 in the loss (2 in a truncated row).
    The first pass clips nothing (ratio 1); the second clips 4 tokens: 4 / 20 over every update."""
    from train.records import update_record

    cfg = type("Cfg", (), {"beta": 0.04})()
    u1 = [{"clip": 0.0, "loss_tokens": 10.0, "tokens": 12, "entropy": 6.0, "loss": 0.5, "kl": 0.0}]
    u2 = [{"clip": 4.0, "loss_tokens": 10.0, "tokens": 12, "entropy": 12.0, "loss": 0.3, "kl": 0.02}]
    rec = update_record(cfg, [u1, u2], [(1.0, {"lora": 1.0}), (3.0, {"lora": 3.0})])
    assert rec["clip_frac"] == pytest.approx(0.2)  # not 4 / 12 (live tokens) nor 0 (first pass alone)
    assert rec["policy/entropy"] == pytest.approx(18.0 / 24)
    assert rec["kl"] == pytest.approx(0.01)
    assert rec["updates/loss_mean"] == pytest.approx(0.4) and rec["updates/grad_norm_mean"] == 2.0
    assert "loss" not in rec and "grad_norm" not in rec  # the first update's, as one pass reports them
    one = update_record(cfg, [u1], [(1.0, {"lora": 1.0})])
    assert one == {"clip_frac": 0.0, "policy/entropy": 0.5, "kl": 0.0}


@pytest.mark.slow
def test_clip_frac_counts_the_later_passes(tiny_cache, tiny_policy, tmp_path, monkeypatch):
    """num_iterations 2 with a clip range the first update's step leaves: the clip acts on pass 2.
    Taken from the first pass alone (ratio exactly 1) clip_frac read 0 on every step."""
    recs = _train(tiny_cache, tiny_policy, tmp_path, monkeypatch, num_iterations=2, clip_eps=1e-4,
                  total_training_steps=2)
    assert all(0.0 < r["clip_frac"] <= 0.5 for r in recs)  # pass 1 clips nothing: at most half of all tokens
    one = _train(tiny_cache, tiny_policy, tmp_path, monkeypatch, "one", clip_eps=1e-4, total_training_steps=2)
    assert all(r["clip_frac"] == 0.0 for r in one)  # one pass: the ratio is 1, nothing to clip


# -- the sampler's log-probs over the training forward's support


def _tiny_lm():
    import transformers

    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=61, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=96, initializer_range=0.2,
                                   pad_token_id=0, max_position_embeddings=128)
    return transformers.LlamaForCausalLM(cfg).eval()


@pytest.mark.parametrize("step", ["fused", "loop"])
@pytest.mark.parametrize("filters,min_new", [((2, 1.0, 0.0), 0), ((0, 0.6, 0.0), 0), ((0, 1.0, 0.3), 0),
                                             ((0, 1.0, 0.0), 4)])
def test_filtered_sampler_logprobs_are_the_trainers(step, filters, min_new):
    """With top_k / top_p / min_p (or EOS suppressed) the sampler draws from a renormalised kept set;
    the log-probs it records are over the whole vocabulary, as the training forward's are, so two
    identical samplers differ by rounding only (over the kept set they differed by log kept mass)."""
    from pipeline.generation import sample
    from train.grpo import sampler_gap
    from train.policy import completion_logprobs

    lm = _tiny_lm()
    emb = lm.get_input_embeddings().weight[torch.randint(1, 61, (6, 5))].detach()
    mask = torch.ones(6, 5, dtype=torch.long)
    torch.manual_seed(3)
    out = sample(lm, emb, mask, 8, eos=[9], pad_id=0, temperature=0.9, logprobs=True, step=step, filters=filters,
                 min_new_tokens=min_new)
    with torch.no_grad():
        trainer = completion_logprobs(lm, emb, mask, out.tokens, out.live, temperature=0.9)
    live = out.live.bool()
    assert torch.allclose(out.logprobs[live], trainer[live], atol=1e-4)
    g = sampler_gap(trainer, out.logprobs, out.live, cap=2.0)
    assert abs(g.gap) < 1e-5 and g.max_abs_gap < 1e-4 and g.truncated == 0.0
    assert torch.allclose(g.weights[live], torch.ones(int(live.sum())), atol=1e-4)


@pytest.mark.slow
def test_training_with_top_k_logs_no_gap(tiny_cache, tiny_policy, tmp_path, monkeypatch):
    recs = _train(tiny_cache, tiny_policy, tmp_path, monkeypatch, top_k=3, tis_cap=2.0, total_training_steps=1)
    assert abs(recs[0]["sampler/logprob_gap"]) < 1e-4 and recs[0]["sampler/logprob_max_abs_gap"] < 1e-3


# -- beta 0: no reference


@pytest.mark.slow
def test_beta_zero_never_runs_the_reference(tiny_cache, tiny_policy, tmp_path, monkeypatch):
    import train.policy

    calls = {"n": 0}
    real = train.policy.completion_logprobs  # what Policy.logprobs and Policy.reference_logprobs call

    def counted(*a, **k):
        calls["n"] += 1
        return real(*a, **k)

    monkeypatch.setattr(train.policy, "completion_logprobs", counted)
    with_ref = _train(tiny_cache, tiny_policy, tmp_path, monkeypatch, "ref", beta=0.04, total_training_steps=2)
    n_ref, calls["n"] = calls["n"], 0
    without = _train(tiny_cache, tiny_policy, tmp_path, monkeypatch, "noref", beta=0.0, total_training_steps=2)
    assert n_ref == 2 * calls["n"] > 0  # policy and reference forwards, then the policy's alone
    assert all(r["time/reference"] == 0.0 and "kl" not in r for r in without)
    assert all(r["time/reference"] > 0.0 and math.isfinite(r["kl"]) for r in with_ref)


def test_grpo_loss_without_reference_is_the_beta_zero_loss():
    from train.grpo import grpo_loss

    torch.manual_seed(0)
    logp = torch.randn(4, 5, requires_grad=True)
    old, ref = logp.detach() + 0.1 * torch.randn(4, 5), torch.randn(4, 5)
    adv, mask = torch.randn(4), (torch.rand(4, 5) > 0.3).float()
    a = grpo_loss(logp, old, ref, adv, mask, 0.0)
    b = grpo_loss(logp, old, None, adv, mask, 0.0)
    assert float(a.loss) == float(b.loss) and float(a.clip_frac) == float(b.clip_frac) and float(b.kl) == 0.0
    with pytest.raises(ValueError, match="beta 0.04 needs the reference"):
        grpo_loss(logp, old, None, adv, mask, 0.04)
