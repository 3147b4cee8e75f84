"""Context-token operators: shapes, near-zero C at init, straight-through Gumbel router."""

import math

import pytest
import torch

from train.adapters import AdapterSpec, build_adapter, load_adapter, save_adapter
from train.gphi import ExpertProjections, FFNOnly, HardRouter, Perceiver, TanhFFN


def _feats(B=3, dims=(32, 24, 40)):
    torch.manual_seed(0)
    return [torch.randn(B, d) * 5 for d in dims]


@pytest.mark.slow
def test_perceiver_shapes_attention_and_near_zero_init():
    torch.manual_seed(0)
    p = Perceiver([32, 24, 40], d=64, d_out=48, num_latents=8, num_heads=8, init_std=1e-4)
    out = p(_feats())
    assert out.context.shape == (3, 8, 48)
    assert out.attention.shape == (3, 8, 3)
    torch.testing.assert_close(out.attention.sum(-1), torch.ones(3, 8))
    # |C| <= |b_out| + |FFN| * sum|W_out| ~ 64 * 1e-4 * 4 sigma: near zero so KL ~ 0 at step 0
    assert float(out.context.detach().abs().max()) < 0.05


def test_tanh_ffn_matches_eq16():
    f = TanhFFN(4)
    x = torch.randn(2, 4)
    ref = torch.tanh(torch.tanh(x @ f.w1.weight.T) @ f.w2.weight.T)
    torch.testing.assert_close(f(x), ref)
    assert f.w1.weight.shape == (2, 4)  # d -> d/2


def test_ffn_only_one_token_per_expert():
    out = FFNOnly([32, 24, 40], d=64, d_out=48, init_std=1e-4)(_feats())
    assert out.context.shape == (3, 3, 48) and out.attention is None


def test_hard_router_forward_and_straight_through_gradient():
    torch.manual_seed(0)
    r = HardRouter([32, 24, 40], d=64, d_out=48, router_dim=16, init_std=1e-2, tau=1.0)
    emb = torch.randn(5, 16)
    feats = _feats(B=5)
    r.train()
    logits = r.router(emb)
    onehot = r.route(logits)
    assert torch.all(onehot.sum(-1) == 1) and set(onehot.unique().tolist()) <= {0.0, 1.0}
    out = r(feats, emb)
    assert out.context.shape == (5, 1, 48) and out.attention.shape == (5, 1, 3)
    out.context.sum().backward()
    # straight-through: the hard one-hot forward still sends gradient into the router head
    assert r.router.weight.grad is not None and float(r.router.weight.grad.abs().sum()) > 0
    # eval: deterministic argmax
    r.eval()
    with torch.no_grad():
        logits = r.router(emb)
        assert torch.equal(r.route(logits).argmax(-1), logits.argmax(-1))
        a, b = r(feats, emb).context, r(feats, emb).context
    torch.testing.assert_close(a, b)


def test_hard_router_selects_only_chosen_expert():
    torch.manual_seed(0)
    r = HardRouter([4, 4], d=8, d_out=6, router_dim=2, init_std=1.0, tau=1.0).eval()
    with torch.no_grad():
        r.router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        r.router.bias.zero_()
    f0, f1 = torch.randn(1, 4), torch.randn(1, 4)
    emb = torch.tensor([[5.0, 0.0]])  # picks expert 0
    a = r([f0, f1], emb).context
    b = r([f0, f1 * 100], emb).context  # expert 1 changes: no effect
    torch.testing.assert_close(a, b)


def test_adapter_save_load_roundtrip(tmp_path):
    spec = AdapterSpec("perceiver", (32, 24, 40), ("a", "b", "c"), 64, 48, 8, 8, 0, 1e-4, 1.0, "last_token", 1.0)
    torch.manual_seed(1)
    m = build_adapter(spec)
    save_adapter(m, spec, tmp_path)
    m2, spec2 = load_adapter(tmp_path)
    assert spec2 == spec
    f = _feats()
    torch.testing.assert_close(m(f).context, m2(f).context)


def test_rms_gate_starts_silent_and_never_outgrows_the_embeddings():
    torch.manual_seed(0)
    s = 0.25  # the policy's token-embedding RMS
    p = Perceiver([32, 24, 40], d=64, d_out=48, num_latents=8, num_heads=8, init_std=1e-4, gate="rms", embed_rms=s)
    f = _feats()
    assert torch.equal(p(f).context, torch.zeros(3, 8, 48))  # tanh(0) = 0: C is exactly zero at init
    with torch.no_grad():
        p.out.gate.fill_(0.5)
        p.out.proj.weight.mul_(1e4)  # whatever W_out's scale, C's RMS per example is tanh(gamma) * s
    c = p(f).context
    rms = c.pow(2).mean(dim=(1, 2)).sqrt()
    torch.testing.assert_close(rms, torch.full((3,), math.tanh(0.5) * s), rtol=1e-5, atol=0)
    with torch.no_grad():
        p.out.gate.fill_(50.0)
    assert float(p(f).context.detach().pow(2).mean(dim=(1, 2)).sqrt().max()) <= s * (1 + 1e-5)


def test_rms_gate_gets_the_first_gradient():
    """At gamma = 0 only the gate's gradient is non-zero (C = tanh(gamma) * ...): W_out learns once
    the gate has moved."""
    torch.manual_seed(0)
    p = FFNOnly([32, 24, 40], d=64, d_out=48, init_std=1e-4, gate="rms", embed_rms=1.0)
    target = torch.randn(3, 3, 48)
    (p(_feats()).context * target).sum().backward()
    assert float(p.out.gate.grad.abs()) > 0
    assert float(p.out.proj.weight.grad.abs().max()) == 0.0


def test_standardized_features_hand_worked():
    ep = ExpertProjections([2, 1], d=3, norm="standardize")
    train = [torch.tensor([[1.0, 5.0], [3.0, 5.0]]), torch.tensor([[10.0], [30.0]])]
    ep.set_feature_stats(train)
    # expert 0: mean [2, 5], std [1, 0] (a constant dimension maps to 0); expert 1: mean 20, std 10
    torch.testing.assert_close(ep.mean_0, torch.tensor([2.0, 5.0]))
    torch.testing.assert_close(ep.inv_std_0, torch.tensor([1.0, 0.0]))
    with torch.no_grad():
        ep.proj[0].weight.copy_(torch.tensor([[1.0, 1.0], [0.0, 1.0], [1.0, 0.0]]))
        ep.proj[1].weight.copy_(torch.tensor([[1.0], [2.0], [3.0]]))
    V = ep([torch.tensor([[4.0, 9.0]]), torch.tensor([[0.0]])])
    torch.testing.assert_close(V, torch.tensor([[[2.0, 0.0, 2.0], [-2.0, -4.0, -6.0]]]))
    sd = ep.state_dict()
    assert "mean_0" in sd and "inv_std_1" in sd  # saved with the weights: a reloaded g_phi is the same map


def test_method_and_expert_registries_refuse_duplicates():
    from core.registry import registry
    from pipeline.experts import ExpertSpec
    from train.adapters import METHODS

    with pytest.raises(ValueError, match="registered twice"):
        registry([METHODS["single"], METHODS["perceiver"], METHODS["single"]], "method")
    with pytest.raises(ValueError, match="registered twice"):
        registry([ExpertSpec("a"), ExpertSpec("b"), ExpertSpec("a")], "expert")
    assert list(registry([ExpertSpec("b"), ExpertSpec("a")], "expert")) == ["b", "a"]  # kept in order


def test_cost_rules_hand_worked():
    import numpy as np

    from train.adapters import METHODS

    prompt = np.array([[10, 20], [30, 40], [50, 60]])  # [n=3 experts, b=2 prompts]
    hint = np.array([[1, 2], [3, 4], [5, 6]])
    assert METHODS["single"].cost(prompt, hint, None)["cost/expert_forward_passes"] == 0
    assert METHODS["perceiver"].cost(prompt, hint, None) == {
        "cost/expert_forward_passes": 6, "cost/expert_prompt_tokens": 210, "cost/expert_generated_tokens": 0}
    assert METHODS["hard-routing"].cost(prompt, hint, np.array([2, 0])) == {
        "cost/expert_forward_passes": 2, "cost/expert_prompt_tokens": 50 + 20, "cost/expert_generated_tokens": 0}
    assert METHODS["output-collab"].cost(prompt, hint, None)["cost/expert_generated_tokens"] == 21


@pytest.mark.parametrize("method", ["single", "perceiver", "ffn", "hard-routing", "prefix", "output-collab"])
def test_capabilities_say_what_each_g_phi_has(method):
    """A module's declared `caps` agree with its parts (callers read caps and never probe attributes) and
    with the registry's entry: reading experts, a C behind an output projection, expert attention, a
    router (its choice), one C for every prompt."""
    from train.adapters import method_info
    from train.gphi import ExpertProjections, OutputProjection

    info = method_info(method)
    spec = AdapterSpec(method=method, expert_dims=(8, 6), expert_names=("a", "b"), d_latent=8, d_out=6, num_latents=2,
                       num_heads=2, router_dim=5 if info.needs_router else 0, init_std=0.1, gumbel_tau=1.0,
                       pooling="last_token", context_scale=1.0, context_gate="rms", context_anchor="mean-embedding")
    g = build_adapter(spec).eval()
    caps = g.caps
    assert caps is type(g).caps and info.module is type(g)
    assert caps.reads_experts == isinstance(getattr(g, "experts", None), ExpertProjections) == info.needs_features
    assert caps.context == isinstance(getattr(g, "out", None), OutputProjection) == info.has_context
    assert caps.hard_routing == info.needs_router
    torch.manual_seed(0)
    feats = [torch.randn(3, 8), torch.randn(3, 6)] if caps.reads_experts else []
    out = g(feats, torch.randn(3, 5) if caps.hard_routing else None)
    assert (out.attention is not None) == caps.attention
    assert (out.choice is not None) == caps.hard_routing
    assert (out.context is not None) == caps.context
    if caps.context:
        assert out.context.shape[0] == (1 if caps.prompt_independent else 3)
