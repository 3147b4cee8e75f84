"""filter_groups: DAPO's dynamic sampling. Groups whose rewards are all equal leave the batch, further
prompts are drawn until the micro-batch has its B informative groups (at most
filter_groups_max_rounds rounds), and each step logs groups drawn and kept."""

import json
from pathlib import Path

import pytest
import torch

from tests.helpers import quiet_train, tiny_train_overrides

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_informative_groups_hand_worked():
    from train.grpo import informative_groups

    r = torch.tensor([1.0, 1.0, 1.0, 0.0, 1.0, 0.5, 0.0, 0.0, 0.0, 0.2, 0.2, 0.2])
    assert informative_groups(r, 3).tolist() == [False, True, False, False]
    assert informative_groups(r, 4).tolist() == [True, True, True]
    assert informative_groups(torch.zeros(6), 3).tolist() == [False, False]


def _run(tiny_cache, tiny_policy, tmp_path, monkeypatch, constant: set, **extra):
    """Train with a reward constant (1.0) for the prompts in `constant` and with variance (length
    parity) elsewhere; returns (metrics, [(cache rows, rewards) of every micro-batch trained on])."""
    import train.loop
    from cache.reader import Cache
    from train.config import load_train_config
    from train.loop import run_train

    with Cache(tiny_cache) as c:
        entries = c.prompts()["entry"]
    const_entries = {entries[i] for i in constant}
    seen = []
    real = train.loop.grpo_step

    def spy(cfg, m, ro, timing, old=None):
        if old is None:
            seen.append((list(ro.idx), ro.rewards.clone(), ro.advantages.detach().cpu().clone()))
        return real(cfg, m, ro, timing, old)

    monkeypatch.setattr(train.loop, "grpo_step", spy)
    real_gen = train.loop.generate_trajectory

    def gen_spy(cfg, m, data, idx, **kw):
        drawn.append(list(idx))
        return real_gen(cfg, m, data, idx, **kw)

    drawn = []
    monkeypatch.setattr(train.loop, "generate_trajectory", gen_spy)
    cfg = load_train_config(None, tiny_train_overrides(tiny_policy, method="perceiver", filter_groups=True, **extra))
    run = run_train(cfg, tiny_cache, tmp_path / "run",
                    **quiet_train(lambda entry, text, mode: 1.0 if entry in const_entries else float(len(text) % 2)))
    _run.drawn, _run.seed = drawn, cfg.seed
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()], seen


@pytest.mark.slow
def test_constant_prompts_are_dropped_and_replaced(tiny_cache, tiny_policy, tmp_path, monkeypatch):
    from cache.reader import Cache

    with Cache(tiny_cache) as c:
        train_rows = [int(i) for i in c.split_indices("train")]
    constant = set(train_rows[::2])  # half the training prompts: reward 1.0 on every completion
    recs, seen = _run(tiny_cache, tiny_policy, tmp_path, monkeypatch, constant, total_training_steps=3,
                      max_new_tokens=8, filter_groups_max_rounds=20)
    G = 4
    for idx, rewards, _ in seen:
        assert len(idx) == 2 and rewards.numel() == 2 * G  # B groups, always
        assert not set(idx) & constant  # no constant prompt was trained on
        assert all(len(set(rewards[b * G:(b + 1) * G].tolist())) > 1 for b in range(2))
    for r in recs:
        assert r["filter/groups_kept"] == 4  # gradient_accumulation_steps 2 x train_batch_size 2
        assert r["filter/groups_drawn"] >= r["filter/groups_kept"] and r["filter/groups_drawn"] % 2 == 0
        assert r["frac_reward_zero_std"] == 0.0
    assert sum(r["filter/groups_drawn"] for r in recs) > sum(r["filter/groups_kept"] for r in recs)  # some dropped
    assert any(r["filter/reward_mean_drawn"] > r["reward/mean"] for r in recs)  # the constant 1.0s were drawn


@pytest.mark.slow
def test_cap_fills_with_uninformative_groups(tiny_cache, tiny_policy, tmp_path, monkeypatch):
    from cache.reader import Cache

    with Cache(tiny_cache) as c:
        every = {int(i) for i in c.split_indices("train")}
    recs, seen = _run(tiny_cache, tiny_policy, tmp_path, monkeypatch, every, total_training_steps=2,
                      filter_groups_max_rounds=3)
    for r in recs:
        assert (r["filter/groups_kept"], r["filter/groups_drawn"], r["filter/rounds_max"]) == (0, 12, 3)
        assert r["frac_reward_zero_std"] == 1.0
    assert all(len(idx) == 2 and (adv == 0).all() for idx, _, adv in seen)
    # round r of micro-batch g reads block r*A + g of B prompts; step 2 starts past step 1's 3 rounds
    from train.setup import data_order

    def block(k):
        return [int(train_rows[i]) for i in data_order(_run.seed, len(train_rows), k * 2, 2)]

    train_rows = sorted(every)
    assert _run.drawn[:6] == [block(0), block(2), block(4), block(1), block(3), block(5)]
    assert _run.drawn[6] == block(6) and len(_run.drawn) == 12


@pytest.mark.slow
def test_off_changes_nothing_and_presets_keep_it_off(tiny_cache, tiny_policy, tmp_path, monkeypatch):
    from train.config import load_train_config
    from train.loop import run_train

    cfg = load_train_config(None, tiny_train_overrides(tiny_policy, method="single", total_training_steps=1))
    assert cfg.grpo.filter_groups is False
    run = run_train(cfg, tiny_cache, tmp_path / "off", **quiet_train())
    rec = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert not any(k.startswith("filter/") for k in rec)
    for path in sorted((CONFIGS / "train").glob("*.yaml")):
        assert load_train_config(str(path)).grpo.filter_groups is False, path.name


def test_cat_groups_pads_without_changing_log_probs():
    """Rows of two rounds with other prompt and completion lengths: left-padded prompts, right-padded
    completions give each row the log-probs it had in its own round."""
    import transformers

    from train.rollouts import Rollouts, cat_groups
    from train.policy import completion_logprobs

    torch.manual_seed(0)
    lm = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        vocab_size=50, hidden_size=32, num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
        intermediate_size=48, pad_token_id=0)).eval()
    G = 2

    def ro(P, T, pad):  # 2 groups of G rows; `pad` leading pads on group 0's prompt
        emb = torch.randn(2 * G, P, 32)
        mask = torch.ones(2 * G, P, dtype=torch.long)
        mask[:G, :pad] = 0
        toks = torch.randint(1, 50, (2 * G, T))
        live = torch.ones(2 * G, T, dtype=torch.long)
        return Rollouts(idx=[10 + P, 20 + P], embeds=emb, ref_embeds=emb.clone(), mask=mask, tokens=toks, live=live,
                        texts=["a"] * (2 * G), rewards=torch.arange(2 * G, dtype=torch.float),
                        advantages=torch.zeros(2 * G), frac_zero_std=0.0, attention=None, choice=None,
                        policy_prompt_tokens=int(mask.sum()), sampler_logp=torch.randn(2 * G, T))

    a, b = ro(5, 3, 2), ro(8, 6, 0)
    out = cat_groups([(a, [1]), (b, [0, 1])], G, pad_id=0)
    assert out.idx == [25, 18, 28] and out.embeds.shape == (6, 8, 32) and out.tokens.shape == (6, 6)
    assert out.rewards.tolist() == [2.0, 3.0, 0.0, 1.0, 2.0, 3.0]
    assert out.live[:2, 3:].sum() == 0 and (out.sampler_logp[:2, 3:] == 0).all()
    with torch.no_grad():
        got = completion_logprobs(lm, out.embeds, out.mask, out.tokens, out.live)
        own_a = completion_logprobs(lm, a.embeds[2:], a.mask[2:], a.tokens[2:], a.live[2:])
        own_b = completion_logprobs(lm, b.embeds, b.mask, b.tokens, b.live)
    torch.testing.assert_close(got[:2, :3], own_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(got[2:], own_b, atol=1e-5, rtol=1e-5)


def test_hard_routing_with_several_passes_is_refused():
    from core.errors import MuskError
    from train.config import load_train_config

    with pytest.raises(MuskError, match="filter_groups with num_iterations > 1 is not offered for hard-routing"):
        load_train_config(None, {"method": "hard-routing", "filter_groups": True, "num_iterations": 2})
