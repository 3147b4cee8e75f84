"""Context-token operators: shapes, near-zero C at init, straight-through Gumbel router."""

import torch

from train.adapters import AdapterSpec, FFNOnly, HardRouter, Perceiver, TanhFFN, build_adapter, load_adapter, save_adapter


def _feats(B=3, dims=(32, 24, 40)):
    torch.manual_seed(0)
    return [torch.randn(B, d) * 5 for d in dims]


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
