"""The shared KV-cached decoder: same tokens as transformers' generate, EOS handling, min_new_tokens."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline.experts import ExpertSpec, load_expert
from pipeline.feature_pass import pad_ids
from pipeline.generation import generate
from tests.helpers import TINY_LLAMA


def _model():
    model, tok = load_expert(ExpertSpec("t", "random", "llama", config=TINY_LLAMA, tokenizer="bytes", seed=5),
                             torch.float32)
    ids, mask = pad_ids([tok(t)["input_ids"] for t in ["12 + 7 =", "a"]], tok.pad_token_id, "left")
    return model, tok, ids, mask


def test_greedy_matches_transformers_generate():
    model, tok, ids, mask = _model()
    emb = model.get_input_embeddings()(ids)
    with torch.inference_mode():
        ours, live = generate(model, emb, mask, 12, eos=[], pad_id=tok.pad_token_id, greedy=True)
        ref = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, min_new_tokens=12,
                             do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=None)
    assert torch.equal(ours, ref[:, ids.shape[1]:])
    assert live.all()


def test_eos_stops_a_row_and_min_new_tokens_suppresses_it():
    model, tok, ids, mask = _model()
    emb = model.get_input_embeddings()(ids)
    with torch.inference_mode():
        free, _ = generate(model, emb, mask, 8, eos=[], pad_id=tok.pad_token_id, greedy=True)
        eos = [int(free[0, 2])]  # make row 0's third greedy token the EOS
        stopped, live = generate(model, emb, mask, 8, eos=eos, pad_id=tok.pad_token_id, greedy=True)
        forced, flive = generate(model, emb, mask, 8, eos=eos, pad_id=tok.pad_token_id, greedy=True, min_new_tokens=8)
    first = int((free[0] == eos[0]).nonzero()[0])
    assert live[0].tolist() == [1] * (first + 1) + [0] * (live.shape[1] - first - 1)
    assert (stopped[0, first + 1:] == tok.pad_token_id).all()
    assert forced.shape == (2, 8) and flive.all()
    assert not (forced == eos[0]).any()  # EOS never sampled while suppressed


@pytest.mark.parametrize("arch", ["llama", "gemma3"])
def test_group_shared_prompt_gives_the_same_logprobs_and_gradients(arch):
    """completion_logprobs(group=G) runs each prompt once and shares its KV cache with the G
    completions: log-probs and LoRA gradients equal the per-rollout forward's (fp32)."""
    from peft import LoraConfig, get_peft_model

    from tests.helpers import TINY
    from train.policy import completion_logprobs

    base, tok = load_expert(ExpertSpec("t", "random", arch, config=TINY[arch], tokenizer="bytes", seed=2),
                            torch.float32)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj",
                                                                               "o_proj"], init_lora_weights=False))
    lm = model.get_base_model()
    G = 3
    ids, mask = pad_ids([tok(t)["input_ids"] for t in ["What is 12 + 7? Think.", "a b"]], tok.pad_token_id, "left")
    ids, mask = ids.repeat_interleave(G, 0), mask.repeat_interleave(G, 0)  # [6, P]
    torch.manual_seed(0)
    comp = torch.randint(0, 200, (6, 9))
    cmask = torch.ones(6, 9, dtype=torch.long)
    cmask[1, 4:] = 0  # a rollout that stopped early
    comp[1, 4:] = tok.pad_token_id
    out = {}
    for group in (1, G):
        model.zero_grad()
        emb = lm.get_input_embeddings()(ids)
        logp = completion_logprobs(lm, emb, mask, comp, cmask, group=group)  # [6, 9]
        (logp * cmask).sum().backward()
        grads = torch.cat([p.grad.flatten() for p in model.parameters() if p.requires_grad])
        out[group] = (logp.detach(), grads)
    assert torch.allclose(out[1][0][cmask.bool()], out[G][0][cmask.bool()], atol=1e-5)
    assert torch.allclose(out[1][1], out[G][1], rtol=1e-4, atol=1e-6)
    assert out[1][1].abs().max() > 0


@settings(max_examples=25, deadline=None)
@given(st.lists(st.floats(0.0, 1.0), min_size=2, max_size=12).filter(lambda w: sum(w) > 0.1), st.integers(0, 10**6))
def test_sample_rows_follows_probs_and_never_draws_zero(weights, seed):
    from pipeline.generation import sample_rows

    p = torch.tensor(weights, dtype=torch.float64)
    p = (p / p.sum()).float()
    torch.manual_seed(seed)
    draws = sample_rows(p.expand(20000, -1))  # [20000]
    freq = torch.bincount(draws, minlength=len(weights)).double() / 20000
    assert (freq[p == 0] == 0).all()
    assert torch.allclose(freq, p.double(), atol=0.015)  # ~4.5 binomial std at p = 0.5


# --- top_k / top_p / min_p sampling ---------------------------------------------------------------


def test_filter_logits_hand_worked():
    from pipeline.generation import filter_logits

    logits = torch.log(torch.tensor([[0.05, 0.5, 0.15, 0.3]]))
    kept = lambda **kw: torch.isfinite(filter_logits(logits, **kw))[0].tolist()  # noqa: E731
    assert kept() == [True] * 4
    assert kept(top_k=2) == [False, True, False, True]
    # top_p .75: masses above each token (sorted .5, .3, .15, .05) are 0, .5, .8, .95 -> the first two stay
    assert kept(top_p=0.75) == [False, True, False, True]
    assert kept(top_p=0.81) == [False, True, True, True]
    # min_p .2: threshold .2 x .5 = .1 -> only .05 goes
    assert kept(min_p=0.2) == [False, True, True, True]
    assert kept(top_k=3, min_p=0.5) == [False, True, False, True]  # .3 >= .25 stays, .15 goes
    assert kept(top_p=0.01) == [False, True, False, False]  # the top token always stays
    assert torch.equal(filter_logits(logits, top_k=2)[0, [1, 3]], logits[0, [1, 3]])  # kept logits untouched


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 2**31 - 1), st.integers(0, 40), st.floats(0.05, 1.0), st.floats(0.0, 0.9))
def test_filter_logits_matches_transformers_warpers(seed, top_k, top_p, min_p):
    from transformers.generation.logits_process import MinPLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    from pipeline.generation import filter_logits

    logits = torch.randn(5, 32, generator=torch.Generator().manual_seed(seed)) * 3
    ref = logits
    if top_k:
        ref = TopKLogitsWarper(top_k)(None, ref)
    if top_p < 1.0:
        ref = TopPLogitsWarper(top_p)(None, ref)
    if min_p > 0.0:
        ref = MinPLogitsWarper(min_p)(None, ref)
    assert torch.equal(torch.isfinite(filter_logits(logits, top_k, top_p, min_p)), torch.isfinite(ref))


def test_sample_tokens_with_filters_off_is_the_plain_draw():
    from pipeline.generation import sample_rows, sample_tokens

    logits = torch.randn(64, 50, generator=torch.Generator().manual_seed(3))
    torch.manual_seed(11)
    plain = sample_rows(torch.softmax(logits / 0.7, dim=-1))
    torch.manual_seed(11)
    assert torch.equal(sample_tokens(logits, 0.7), plain)


def test_sample_tokens_draws_only_from_the_kept_set():
    from pipeline.generation import sample_tokens

    logits = torch.log(torch.tensor([0.05, 0.5, 0.15, 0.3])).expand(4000, -1)
    torch.manual_seed(0)
    assert set(sample_tokens(logits, top_k=2).tolist()) == {1, 3}
    assert set(sample_tokens(logits, top_p=0.75).tolist()) == {1, 3}
    assert set(sample_tokens(logits, min_p=0.2).tolist()) == {1, 2, 3}
    assert set(sample_tokens(logits, top_k=1).tolist()) == {1}
    freq = torch.bincount(sample_tokens(logits, top_k=2), minlength=4).double() / 4000
    assert freq[[1, 3]].tolist() == pytest.approx([0.5 / 0.8, 0.3 / 0.8], abs=0.03)  # renormalised over the kept


def test_generate_with_top_k_one_is_greedy():
    model, tok, ids, mask = _model()
    emb = model.get_input_embeddings()(ids)
    greedy, _ = generate(model, emb, mask, 6, eos=[], pad_id=tok.pad_token_id, greedy=True)
    torch.manual_seed(0)
    sampled, _ = generate(model, emb, mask, 6, eos=[], pad_id=tok.pad_token_id, temperature=1.5, top_k=1)
    assert torch.equal(sampled, greedy)
