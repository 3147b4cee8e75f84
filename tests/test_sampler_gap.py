"""Sampler/trainer log-prob gap and truncated importance sampling (TIS): hand-worked numbers, the
loss weighting, and a tiny training run that logs the gap (and trains with the correction on)."""

import json
import math

import pytest
import torch

from train.grpo import grpo_loss, sampler_gap


def test_sampler_gap_hand_worked():
    L = math.log
    trainer = torch.tensor([[L(.5), L(.25), 0.0], [L(.2), L(.4), L(.1)]])
    sampler = torch.tensor([[L(.25), L(.25), -7.0], [L(.4), L(.1), L(.1)]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    g = sampler_gap(trainer, sampler, mask, cap=2.0)
    # ratios pi_trainer / pi_sampler on live tokens: 2, 1, 0.5, 4, 1; the masked token gets weight 1
    assert torch.allclose(g.weights, torch.tensor([[2.0, 1.0, 1.0], [0.5, 2.0, 1.0]]))
    assert g.truncated == pytest.approx(1 / 5)  # only the ratio 4 exceeds the cap
    assert g.gap == pytest.approx(-math.log(4) / 5)  # mean of sampler - trainer: -(ln2 + ln.5 + ln4) / 5
    assert g.abs_gap == pytest.approx(4 * math.log(2) / 5)
    assert g.max_abs_gap == pytest.approx(math.log(4))
    off = sampler_gap(trainer, sampler, mask, cap=0.0)
    assert (off.weights == 1).all() and off.truncated == 0 and off.gap == g.gap


def test_tis_weights_scale_each_tokens_policy_gradient():
    """N=1, T=2, advantage 1, beta 0, ratio 1: loss = -(w1 + w2) / 2; d loss / d logp_t = -w_t / 2."""
    logp = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    w = torch.tensor([[2.0, 0.5]])
    out = grpo_loss(logp, logp.detach(), logp.detach(), torch.tensor([1.0]), torch.ones(1, 2), 0.0, clip_eps=0.2, is_weights=w)
    assert float(out.loss.detach()) == pytest.approx(-1.25)
    out.loss.backward()
    assert torch.allclose(logp.grad, torch.tensor([[-1.0, -0.25]]))
    plain = grpo_loss(logp, logp.detach(), logp.detach(), torch.tensor([1.0]), torch.ones(1, 2), 0.0)
    assert float(plain.loss) == pytest.approx(-1.0)


@pytest.mark.parametrize("tis_cap", [0.0, 2.0])
def test_training_logs_the_sampler_gap(tiny_cache, tiny_policy, tmp_path, monkeypatch, tis_cap):
    """The tiny float32 Llama policy decodes through the fused step: its log-probs match the
    training forward's to float32 rounding, so the logged gap is tiny and TIS truncates nothing."""
    from tests.helpers import quiet_train, tiny_train_overrides
    from train.config import load_train_config
    from train.loop import run_train

    cfg = load_train_config(None, tiny_train_overrides(tiny_policy, method="perceiver", total_training_steps=2,
                                                       tis_cap=tis_cap))
    run = run_train(cfg, tiny_cache, tmp_path / "run", **quiet_train())
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert len(recs) == 2
    for r in recs:
        assert abs(r["sampler/logprob_gap"]) < 1e-4 and r["sampler/logprob_max_abs_gap"] < 1e-3
        assert r["sampler/tis_truncated"] == 0.0
