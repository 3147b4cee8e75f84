"""Pooling indices by hand, seeded indices as properties, and batch/padding invariance of the cache."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.pooling import mean_pool_normalized, pool_hidden_states, real_token_span, seeded_indices


def _layered(B, T, L, d=3):
    # hidden_states[l][b, t, :] = 100*l + 10*b + t : every entry says where it came from
    return tuple(
        (100 * l + 10 * torch.arange(B)[:, None, None] + torch.arange(T)[None, :, None]).float().expand(B, T, d)
        for l in range(L + 1)
    )


def test_real_token_span_hand_worked():
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    first, last = real_token_span(mask)
    assert first.tolist() == [0, 2, 0]
    assert last.tolist() == [2, 4, 4]


def test_pool_hidden_states_hand_worked():
    hs = _layered(B=2, T=5, L=3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])  # row 0 right-padded, row 1 left-padded
    out = pool_hidden_states(hs, mask, torch.tensor([1, 2]), torch.tensor([0, 2]))
    col = {k: v[:, 0].tolist() for k, v in out.items()}
    assert col["last_token"] == [300 + 0 + 2, 300 + 10 + 4]
    assert col["first_token"] == [300 + 0 + 0, 300 + 10 + 2]
    assert col["random_token"] == [300 + 0 + 1, 300 + 10 + 4]  # first real + index
    assert col["first_layer"] == [0 + 0 + 2, 0 + 10 + 4]
    assert col["random_layer"] == [0 + 0 + 2, 200 + 10 + 4]
    assert col["first_block"] == [100 + 0 + 2, 100 + 10 + 4]
    assert all(v.dtype == torch.float32 and v.shape == (2, 3) for v in out.values())


def test_pool_hidden_states_several_draws_hand_worked():
    hs = _layered(B=2, T=5, L=3)
    mask = torch.tensor([[1, 1, 1, 0, 0], [0, 0, 1, 1, 1]])
    out = pool_hidden_states(hs, mask, torch.tensor([[1, 0], [2, 1]]), torch.tensor([[0, 3], [2, 1]]))
    assert out["random_token"].shape == out["random_layer"].shape == (2, 2, 3)
    assert out["random_token"][..., 0].tolist() == [[301, 300], [314, 313]]
    assert out["random_layer"][..., 0].tolist() == [[2, 302], [214, 114]]
    assert out["last_token"].shape == (2, 3)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(1, 50), min_size=1, max_size=40), st.integers(1, 40), st.integers(0, 10**6))
def test_seeded_indices_in_range_and_deterministic(n_tokens, L, seed):
    n = np.array(n_tokens)
    t, l = seeded_indices(seed, "e", n, L)
    assert ((t >= 0) & (t < n)).all()
    assert ((l >= 0) & (l <= L)).all()
    t2, l2 = seeded_indices(seed, "e", n, L)
    assert (t == t2).all() and (l == l2).all()


def test_seeded_indices_differ_by_expert():
    n = np.full(200, 1000)
    a, _ = seeded_indices(0, "a", n, 30)
    b, _ = seeded_indices(0, "b", n, 30)
    assert (a != b).mean() > 0.9


def test_mean_pool_ignores_padding():
    h = torch.tensor([[[1.0, 0.0], [3.0, 0.0], [100.0, 100.0]]])
    v = mean_pool_normalized(h, torch.tensor([[1, 1, 0]]))
    assert torch.allclose(v, torch.tensor([[1.0, 0.0]]))


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("padding_side", ["right", "left"])
@pytest.mark.parametrize("arch,shared", [("llama", False), ("gpt2", False), ("llama", True), ("gpt2", True),
                                         ("gemma3", False), ("gemma3", True)])
def test_batched_equals_single_unpadded_forward(arch, shared, padding_side, dtype, tol):
    """Every variant, for every prompt, equals a single-prompt unpadded forward of the same model:
    with the batch padded either side, and with the prompts' shared prefix run once and cached."""
    from pipeline.experts import ExpertSpec, load_expert
    from pipeline.feature_pass import pad_ids, common_prefix_length, expert_forward_pool, run_prefix
    from tests.helpers import TINY

    spec = ExpertSpec("t", "random", arch, config=TINY[arch], tokenizer="bytes")
    model, tok = load_expert(spec, dtype)
    texts = ["1 + 2 =", "What is the sum of 17 and 25, please?", "x", "A much longer prompt " * 4]
    if shared:
        texts = ["System: answer briefly. Q: " + t for t in texts]
    ids = [tok(t)["input_ids"] for t in texts]
    n = np.array([len(x) for x in ids])
    L = model.config.num_hidden_layers
    rti, rli = seeded_indices(3, "t", n, L)
    P, prefix = 0, None
    if shared:
        P = common_prefix_length(ids)
        assert P == len("System: answer briefly. Q: ")  # byte tokenizer: one token per character
        rti[0] = 2  # a random token inside the prefix
        prefix = run_prefix(model.base_model, ids[0][:P], "cpu")
    bid, mask = pad_ids([x[P:] for x in ids], tok.pad_token_id, padding_side)
    if shared and padding_side == "left":  # refused: pads between prefix and prompt
        with pytest.raises(ValueError, match="right"):
            expert_forward_pool(model.base_model, bid, mask, torch.from_numpy(rti), rli=torch.from_numpy(rli),
                                prefix=prefix)
        return
    batched = expert_forward_pool(model.base_model, bid, mask, torch.from_numpy(rti), rli=torch.from_numpy(rli),
                                  prefix=prefix)
    with torch.inference_mode():
        for i, x in enumerate(ids):
            hs = model.base_model(input_ids=torch.tensor([x]), output_hidden_states=True).hidden_states
            ref = {
                "last_token": hs[L][0, -1], "first_token": hs[L][0, 0], "random_token": hs[L][0, rti[i]],
                "first_layer": hs[0][0, -1], "first_block": hs[1][0, -1], "random_layer": hs[rli[i]][0, -1],
            }
            for k, v in ref.items():
                scale = max(1.0, float(v.float().abs().max()))
                err = float((batched[k][i] - v.float()).abs().max()) / scale
                assert err < tol, (k, i, err)
