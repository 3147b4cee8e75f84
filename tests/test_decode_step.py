"""The fused decode step against today's transformers loop: same greedy tokens on tiny models of each
covered family (left padding, context rows C, shared-prompt groups, LoRA merged and unmerged), same
sampled tokens under the same seed, the fixed-shape (CUDA-graph) path equal to the eager one, and
the sampler's log-probs equal to the trainer's."""

import logging

import pytest
import torch

from pipeline.generation import sample

V = 96


def _tiny(family: str, dtype=torch.float32):
    import transformers

    common = {"vocab_size": V, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
              "intermediate_size": 96, "initializer_range": 0.2, "pad_token_id": 0, "max_position_embeddings": 256}
    if family == "llama":
        cfg = transformers.LlamaConfig(num_key_value_heads=2, **common)
    elif family == "qwen2":  # q/k/v bias
        cfg = transformers.Qwen2Config(num_key_value_heads=2, **common)
    elif family == "mistral":
        cfg = transformers.MistralConfig(num_key_value_heads=1, sliding_window=None, **common)
    elif family == "mistral-window":  # a window shorter than the prompt, every layer
        cfg = transformers.MistralConfig(num_key_value_heads=1, sliding_window=5, **common)
    elif family == "gemma3":  # local layer with a window shorter than the prompt; sandwich norms; q/k norms
        common["initializer_range"] = 0.02  # embeddings are scaled by sqrt(d): larger ones repeat one token
        cfg = transformers.Gemma3TextConfig(num_key_value_heads=2, head_dim=16, sliding_window=5,
                                            layer_types=["sliding_attention", "full_attention"],
                                            query_pre_attn_scalar=16, **common)
    else:
        raise ValueError(family)
    torch.manual_seed(11)
    model = transformers.AutoModelForCausalLM.from_config(cfg, dtype=torch.float32).to(dtype).eval()
    if family == "qwen2":
        for L in model.model.layers:  # random init leaves biases at zero: make them matter
            for p in (L.self_attn.q_proj.bias, L.self_attn.k_proj.bias, L.self_attn.v_proj.bias):
                p.data.normal_(0, 0.5)
    return model


def _prompts(model, lengths=(9, 4, 7), context: int = 0, seed: int = 0):
    """Left-padded random prompts [N, P, d] with their mask; context > 0 appends that many rows of C
    (continuous vectors, not token embeddings) after each prompt, as splice(..., 'suffix') does."""
    from train.inputs import splice

    g = torch.Generator().manual_seed(seed)
    P = max(lengths)
    ids = torch.randint(1, V, (len(lengths), P), generator=g)
    mask = torch.zeros(len(lengths), P, dtype=torch.long)
    for i, n in enumerate(lengths):
        mask[i, P - n:] = 1
    ids = ids * mask  # pad id 0
    emb = model.get_input_embeddings()(ids)
    C = torch.randn(len(lengths), context, emb.shape[-1], generator=g).to(emb.dtype) if context else None
    return splice(emb, mask, C, "suffix")


FAMILIES = ["llama", "qwen2", "mistral", "mistral-window", "gemma3"]


@pytest.mark.slow
@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("context", [0, 3])
def test_greedy_tokens_equal_the_loop(family, context):
    model = _tiny(family)
    emb, mask = _prompts(model, context=context)
    ref = sample(model, emb, mask, 14, eos=[], pad_id=0, greedy=True, step="loop")
    new = sample(model, emb, mask, 14, eos=[], pad_id=0, greedy=True, step="fused")
    assert ref.tokens.shape == (3, 14)
    assert torch.equal(new.tokens, ref.tokens) and torch.equal(new.live, ref.live)
    assert len(set(ref.tokens.flatten().tolist())) > 3  # the test model does not emit one token forever


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_sampled_tokens_equal_the_loop_under_one_seed_with_groups_and_eos(family):
    """Same seed, same tokens; rows stop at their EOS (after 2 forced steps); G=3 rows per prompt
    share one prefill; the RNG ends in the same state (the same number of draws)."""
    model = _tiny(family)
    emb, mask = _prompts(model, context=2)
    emb, mask = emb.repeat_interleave(3, 0), mask.repeat_interleave(3, 0)  # [9, P]
    out, state = {}, {}
    for step in ("loop", "fused"):
        torch.manual_seed(4)
        out[step] = sample(model, emb, mask, 20, eos=[5, 17], pad_id=0, temperature=1.3, min_new_tokens=2, group=3,
                           step=step, logprobs=True)
        state[step] = torch.rand(())
    assert torch.equal(out["fused"].tokens, out["loop"].tokens)
    assert torch.equal(out["fused"].live, out["loop"].live)
    assert torch.allclose(out["fused"].logprobs, out["loop"].logprobs, atol=1e-5)
    assert out["loop"].live.sum() < out["loop"].live.numel()  # some row stopped at an EOS
    assert not torch.isin(out["loop"].tokens[:, :2], torch.tensor([5, 17])).any()  # suppressed
    assert state["loop"] == state["fused"]


@pytest.mark.parametrize("family", ["llama", "gemma3", "mistral-window"])
def test_fixed_shape_step_equals_the_eager_step(family):
    """The CUDA-graph path's step (all cache columns under a mask, column as a tensor, all-done
    checked every 4 tokens) gives the eager step's tokens; here it runs without a graph."""
    model = _tiny(family)
    emb, mask = _prompts(model, context=2)
    a = sample(model, emb, mask, 12, eos=[7], pad_id=0, greedy=True, step="fused")
    b = sample(model, emb, mask, 12, eos=[7], pad_id=0, greedy=True, step="fused", static=True, check_every=4)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.live, b.live)


def test_all_done_checked_every_k_tokens_cuts_the_trailing_pad_columns():
    model = _tiny("llama")
    emb, mask = _prompts(model)
    free = sample(model, emb, mask, 12, eos=[], pad_id=0, greedy=True, step="fused")
    eos = sorted({int(free.tokens[i, 1]) for i in range(3)})  # every row stops by its second token
    ref = sample(model, emb, mask, 12, eos=eos, pad_id=0, greedy=True, step="loop")
    got = sample(model, emb, mask, 12, eos=eos, pad_id=0, greedy=True, step="fused", check_every=5)
    assert ref.tokens.shape[1] <= 2
    assert torch.equal(got.tokens, ref.tokens) and torch.equal(got.live, ref.live)


def _peft(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"], init_lora_weights=False)
    return get_peft_model(model, cfg, autocast_adapter_dtype=True)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_lora_branch_fused_and_merged_give_the_loops_tokens(family):
    from train.policy import merged_lora

    peft = _peft(_tiny(family))
    for m in peft.modules():  # make the LoRA branch large enough to change the tokens
        if hasattr(m, "lora_B"):
            m.lora_B["default"].weight.data.mul_(30)
    lm = peft.get_base_model()
    emb, mask = _prompts(lm, context=2)
    ref = sample(lm, emb, mask, 12, eos=[], pad_id=0, greedy=True, step="loop")
    with peft.disable_adapter():
        base = sample(lm, emb, mask, 12, eos=[], pad_id=0, greedy=True, step="fused")
    assert not torch.equal(base.tokens, ref.tokens)  # the adapter matters
    assert torch.equal(sample(lm, emb, mask, 12, eos=[], pad_id=0, greedy=True, step="fused").tokens, ref.tokens)
    with merged_lora(peft):
        assert torch.equal(sample(lm, emb, mask, 12, eos=[], pad_id=0, greedy=True, step="fused").tokens, ref.tokens)
    # an optimizer-like in-place update is seen (the fused weights are rebuilt)
    for m in peft.modules():
        if hasattr(m, "lora_B"):
            m.lora_B["default"].weight.data.mul_(-1)
    ref2 = sample(lm, emb, mask, 12, eos=[], pad_id=0, greedy=True, step="loop")
    assert torch.equal(sample(lm, emb, mask, 12, eos=[], pad_id=0, greedy=True, step="fused").tokens, ref2.tokens)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_sampler_logprobs_equal_the_trainers(family):
    """log-probs the fused sampler reports equal completion_logprobs (the training forward) in fp32."""
    from train.policy import completion_logprobs

    model = _tiny(family)
    emb, mask = _prompts(model, context=2)
    torch.manual_seed(1)
    out = sample(model, emb, mask, 10, eos=[9], pad_id=0, temperature=0.8, logprobs=True, step="fused")
    with torch.no_grad():
        trainer = completion_logprobs(model, emb, mask, out.tokens, out.live, temperature=0.8)
    live = out.live.bool()
    assert torch.allclose(out.logprobs[live], trainer[live], atol=1e-4)
    assert (out.logprobs[~live] == 0).all()


def test_bfloat16_logprobs_agree_within_rounding():
    """bf16: F.rms_norm rounds once where Llama's norm rounds twice, so logits differ by bf16
    rounding; under the loop's own tokens (teacher forcing) the per-token log-prob gap stays small."""
    from train.policy import completion_logprobs

    model = _tiny("llama", torch.bfloat16)
    emb, mask = _prompts(model, context=2)
    torch.manual_seed(2)
    new = sample(model, emb, mask, 10, eos=[], pad_id=0, logprobs=True, step="fused")
    with torch.no_grad():
        ref = completion_logprobs(model, emb, mask, new.tokens, new.live)
    gap = (new.logprobs - ref).abs()
    assert gap.mean() < 0.05 and gap.max() < 0.3


@pytest.mark.slow
def test_uncovered_family_falls_back_to_the_loop_and_says_so(caplog, monkeypatch):
    import transformers

    import pipeline.generation
    from pipeline import decode_step

    monkeypatch.setattr(pipeline.generation, "_said", set())  # said once per process: earlier tests may have
    torch.manual_seed(0)
    model = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=V, n_embd=32, n_layer=2, n_head=2)).eval()
    emb = model.get_input_embeddings()(torch.randint(1, V, (2, 5)))
    mask = torch.ones(2, 5, dtype=torch.long)
    with caplog.at_level(logging.INFO, logger="pipeline.generation"):
        a = sample(model, emb, mask, 6, eos=[], pad_id=0, greedy=True)
    assert "transformers loop" in caplog.text
    assert torch.equal(a.tokens, sample(model, emb, mask, 6, eos=[], pad_id=0, greedy=True, step="loop").tokens)
    with pytest.raises(decode_step.Unsupported):
        sample(model, emb, mask, 6, eos=[], pad_id=0, greedy=True, step="fused")


@pytest.mark.slow
def test_fused_weights_are_reused_then_released_with_the_model():
    import gc

    from pipeline import decode_step

    model = _tiny("llama")
    emb, mask = _prompts(model)
    sample(model, emb, mask, 3, eos=[], pad_id=0, greedy=True, step="fused")
    w = decode_step._CACHE[model][-1]
    sample(model, emb, mask, 40, eos=[], pad_id=0, greedy=True,
           step="fused")  # longer: rotary tables grow, weights stay
    assert decode_step._CACHE[model][-1] is w
    n = len(decode_step._CACHE)
    del model, w
    gc.collect()
    assert len(decode_step._CACHE) == n - 1


def test_environment_switch_forces_the_loop(monkeypatch):
    from pipeline import decode_step
    from pipeline.generation import generate

    model = _tiny("llama")
    emb, mask = _prompts(model)
    a, _ = generate(model, emb, mask, 5, eos=[], pad_id=0, greedy=True)
    monkeypatch.setenv("MUSK_DECODE_STEP", "loop")
    monkeypatch.setattr(decode_step, "fused_weights", lambda *a: pytest.fail("the fused step ran"))
    b, _ = generate(model, emb, mask, 5, eos=[], pad_id=0, greedy=True)
    assert torch.equal(a, b)


def test_auto_decodes_every_covered_dtype_through_the_fused_step(monkeypatch):
    """step auto takes the fused step in float32 and in bf16 (it is as close to float32 as the loop:
    test_bfloat16_fused_step_is_as_close_to_float32_as_the_loop); MUSK_DECODE_STEP=loop opts out."""
    from pipeline.generation import fused_step_weights

    for dtype in (torch.float32, torch.bfloat16):
        assert fused_step_weights(_tiny("llama", dtype), 32, "auto") is not None
    monkeypatch.setenv("MUSK_DECODE_STEP", "loop")
    assert fused_step_weights(_tiny("llama", torch.bfloat16), 32, "auto") is None
    assert fused_step_weights(_tiny("llama", torch.bfloat16), 32, "fused") is not None


def _packs(dtype) -> bool:
    from pipeline.packed import can_pack

    return can_pack(torch.zeros(1, dtype=dtype))


@pytest.mark.skipif(not _packs(torch.bfloat16), reason="oneDNN has no bf16 kernels for this CPU")
def test_packed_bfloat16_linear_is_bit_identical_to_f_linear():
    """bf16 (what `dtype: auto` picks where packing pays): oneDNN's blocked weights give F.linear's
    exact bits for every row count the decoders use (1 token, a batch, a prefill, 3-D inputs), with
    and without a bias."""
    from hypothesis import given, settings
    from hypothesis import strategies as st

    from pipeline.packed import pack, packed_linear

    @settings(max_examples=25, deadline=None)
    @given(st.lists(st.integers(1, 40), min_size=1, max_size=2), st.integers(1, 200), st.integers(1, 96),
           st.booleans(), st.integers(0, 2**16))
    def check(lead, n_out, n_in, with_bias, seed):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(n_out, n_in, generator=g).bfloat16()
        b = torch.randn(n_out, generator=g).bfloat16() if with_bias else None
        x = torch.randn(*lead, n_in, generator=g).bfloat16()
        assert torch.equal(packed_linear(x, pack(w), b), torch.nn.functional.linear(x, w, b))
    check()


@pytest.mark.skipif(not _packs(torch.float32), reason="no oneDNN in this torch build")
def test_packed_float32_linear_agrees_to_rounding():
    from pipeline.packed import pack, packed_linear

    g = torch.Generator().manual_seed(0)
    w, x = torch.randn(300, 64, generator=g), torch.randn(5, 64, generator=g)
    ref = torch.nn.functional.linear(x.double(), w.double())
    assert torch.allclose(packed_linear(x, pack(w), None).double(), ref, rtol=0, atol=1e-4)  # |y| ~ 8


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_and_plain_weights_decode_the_same_tokens(dtype, monkeypatch):
    """MUSK_DECODE_PACK=0 turns packing off (no packed copy is made); the tokens stay the same."""
    from pipeline import decode_step

    model = _peft(_tiny("llama", dtype)).get_base_model()
    emb, mask = _prompts(model, context=2)
    packed = sample(model, emb, mask, 12, eos=[], pad_id=0, greedy=True, step="fused")
    W = decode_step._CACHE[model][-1]
    assert all((f.packed is not None) == _packs(dtype) for f in (W.head, W.layers[0].qkv, W.layers[1].down))
    monkeypatch.setenv("MUSK_DECODE_PACK", "0")
    plain = sample(model, emb, mask, 12, eos=[], pad_id=0, greedy=True, step="fused")
    W = decode_step._CACHE[model][-1]
    assert W.head.packed is None and W.layers[0].qkv.packed is None
    assert torch.equal(packed.tokens, plain.tokens)


@pytest.mark.skipif(not _packs(torch.float32), reason="no oneDNN in this torch build")
def test_a_lora_update_reuses_the_packed_base_weights_and_a_base_update_repacks():
    """A training step changes the adapters only: the rebuilt step keeps the base weights' fused,
    packed copies (packing ~all parameters every step would cost more than it saves) and takes the
    new LoRA matrices; an update of a base weight repacks it."""
    from pipeline import decode_step

    peft = _peft(_tiny("llama"))
    lm = peft.get_base_model()
    emb, mask = _prompts(lm)
    sample(lm, emb, mask, 4, eos=[], pad_id=0, greedy=True, step="fused")
    W1 = decode_step._CACHE[lm][-1]
    with torch.no_grad():
        lm.model.layers[0].self_attn.q_proj.lora_B["default"].weight.add_(0.5)  # what an optimizer step does
    sample(lm, emb, mask, 4, eos=[], pad_id=0, greedy=True, step="fused")
    W2 = decode_step._CACHE[lm][-1]
    assert W2 is not W1
    assert W2.layers[0].qkv.packed is W1.layers[0].qkv.packed and W2.head.packed is W1.head.packed
    assert not torch.equal(W2.layers[0].qkv.lora_b, W1.layers[0].qkv.lora_b)
    ref = sample(lm, emb, mask, 8, eos=[], pad_id=0, greedy=True, step="loop")
    assert torch.equal(sample(lm, emb, mask, 8, eos=[], pad_id=0, greedy=True, step="fused").tokens, ref.tokens)
    with torch.no_grad():
        lm.model.layers[0].mlp.down_proj.base_layer.weight.mul_(1.5)
    sample(lm, emb, mask, 4, eos=[], pad_id=0, greedy=True, step="fused")
    W3 = decode_step._CACHE[lm][-1]
    assert W3.layers[0].down.packed is not W2.layers[0].down.packed
    assert W3.layers[0].qkv.packed is W2.layers[0].qkv.packed
    ref = sample(lm, emb, mask, 8, eos=[], pad_id=0, greedy=True, step="loop")
    assert torch.equal(sample(lm, emb, mask, 8, eos=[], pad_id=0, greedy=True, step="fused").tokens, ref.tokens)


def _forced_logprobs(lm, emb, mask, toks, step: str) -> torch.Tensor:
    """log-softmax of the logits [N, T, V] a decoder computes along given tokens [N, T] (teacher
    forcing): the prefill's last position, then one decode step per token, as `sample` runs them."""
    from pipeline import decode_step as ds
    from pipeline.generation import lm_logits, positions, prefill

    N, P, _ = emb.shape
    T = toks.shape[1]
    pos = positions(mask)
    out = []
    with torch.inference_mode():
        if step == "loop":
            h, cache = prefill(lm.base_model, emb, mask)
            out.append(lm_logits(lm, h[:, -1]))
            for t in range(T - 1):
                mask = torch.cat([mask, torch.ones(N, 1, dtype=mask.dtype)], 1)
                o = lm.base_model(input_ids=toks[:, t:t + 1], attention_mask=mask,
                                  position_ids=(pos[:, -1] + t + 1)[:, None], cache=cache, use_cache=True)
                cache = o.cache
                out.append(lm_logits(lm, o.last_hidden_state[:, -1]))
        else:
            W = ds.build_weights(lm, 256)
            cache = ds.KVCache(W, N, P + T, ds.cache_dtype(W.embed.dtype, "cpu"), "cpu")
            valid = torch.cat([mask.bool(), torch.ones(N, T, dtype=torch.bool)], 1)
            h = ds.forward(W, cache, emb.to(W.embed.dtype), pos, col0=0, masks=ds.attn_masks(W, valid, torch.arange(P),
                                                                                             P), L=P)
            out.append(lm_logits(lm, h[:, -1], W.head))
            for t in range(T - 1):
                c = P + t
                masks = ds.attn_masks(W, valid, torch.tensor([c]), c + 1)
                h = ds.forward(W, cache, ds.embed(W, toks[:, t:t + 1]), (pos[:, -1] + t + 1)[:, None], col0=c,
                               masks=masks, L=c + 1)
                out.append(lm_logits(lm, h[:, 0], W.head))
    return torch.log_softmax(torch.stack(out, 1).float(), -1)


@pytest.mark.slow
@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_bfloat16_fused_step_is_as_close_to_float32_as_the_loop(family):
    """bf16 rounds differently in the fused step (fused matmuls, attention in float32) than in the
    loop, so greedy tokens may part ways; what matters is that it is no further from the float32
    model than the loop is. Along the float32 model's greedy tokens, the KL from float32's next-token
    distribution to the fused step's is at most the loop's (x 1.25) at every prompt and on average."""
    from train.inputs import splice

    peft = _peft(_tiny(family))
    for m in peft.modules():  # a LoRA branch that matters, as after training
        if hasattr(m, "lora_B"):
            m.lora_B["default"].weight.data.mul_(10)
    lm32 = peft.get_base_model()
    g = torch.Generator().manual_seed(5)
    n, P = 12, 10
    ids = torch.randint(1, V, (n, P), generator=g)
    mask = torch.ones(n, P, dtype=torch.long)
    for i in range(n):
        mask[i, : i % 4] = 0
    C = torch.randn(n, 2, 64, generator=g)  # context rows, as g_phi's C
    emb32, mk = splice(lm32.get_input_embeddings()(ids * mask).detach(), mask, C, "suffix")
    toks = sample(lm32, emb32, mk, 16, eos=[], pad_id=0, greedy=True, min_new_tokens=16, step="loop").tokens
    ref = _forced_logprobs(lm32, emb32, mk, toks, "loop")
    lm16 = peft.get_base_model().to(torch.bfloat16)
    for m in peft.modules():  # PEFT keeps the adapters in float32 (autocast_adapter_dtype)
        if hasattr(m, "lora_A"):
            m.lora_A.float(), m.lora_B.float()
    emb16 = emb32.bfloat16()
    kl = {s: (ref.exp() * (ref - _forced_logprobs(lm16, emb16, mk, toks, s))).sum(-1) for s in ("loop", "fused")}
    assert kl["loop"].mean() > 1e-7  # bf16 does round: the comparison is not between zeros
    assert kl["fused"].mean() <= 1.25 * kl["loop"].mean()
    assert (kl["fused"].mean(1) <= 1.25 * kl["loop"].mean(1) + 1e-4).all()


@pytest.mark.parametrize("step", ["loop", "fused"])
@pytest.mark.parametrize("greedy", [True, False])
def test_decoder_entropy_equals_the_training_forwards(step, greedy):
    """The token entropy the decoder reports (softmax(logits / T_H) at each generated position, from
    its own logits) equals what completion_logprobs computes in a second forward pass (fp32), and is
    0 past each row's EOS. Greedy decoding at T_H = 0.7 and sampling at T = 1.3 with T_H = 1.3."""
    from train.policy import completion_logprobs

    model = _tiny("llama")
    emb, mask = _prompts(model, context=2)
    torch.manual_seed(4)
    t_h = 0.7 if greedy else 1.3
    out = sample(model, emb, mask, 12, eos=[7, 9], pad_id=0, temperature=1.3, greedy=greedy, step=step,
                 entropy_temperature=t_h)
    assert out.entropy.shape == out.tokens.shape
    ent = []
    with torch.no_grad():
        completion_logprobs(model, emb, mask, out.tokens, out.live, temperature=t_h, entropy=ent)
    live = out.live.bool()
    assert torch.allclose(out.entropy[live], ent[0][live], atol=1e-4)
    assert (out.entropy[~live] == 0).all() and (out.entropy[live] > 0).all()
    assert sample(model, emb, mask, 4, eos=[], pad_id=0, greedy=True, step=step).entropy is None  # only when asked


def test_base_weights_are_reused_where_packing_is_unavailable(monkeypatch):
    """Where no packed copy can be made (a GPU, fp16, a torch without oneDNN), a LoRA update still
    reuses the base weights' fused copies: the cache keys on packing asked, not on a copy existing."""
    from pipeline import decode_step

    monkeypatch.setattr(decode_step, "pack", lambda w: None)
    peft = _peft(_tiny("llama"))
    lm = peft.get_base_model()
    emb, mask = _prompts(lm)
    sample(lm, emb, mask, 4, eos=[], pad_id=0, greedy=True, step="fused")
    W1 = decode_step._CACHE[lm][-1]
    with torch.no_grad():
        lm.model.layers[0].self_attn.q_proj.lora_B["default"].weight.add_(0.5)
    sample(lm, emb, mask, 4, eos=[], pad_id=0, greedy=True, step="fused")
    W2 = decode_step._CACHE[lm][-1]
    assert W2 is not W1 and W2.layers[0].qkv.packed is None
    assert W2.layers[0].qkv.weight is W1.layers[0].qkv.weight  # the concatenated q/k/v, not made again


# On a GPU: the CUDA-graph capture itself (the fixed-shape step above runs without a graph on a CPU).
# Marked `gpu` (benchmarks/gpu.sh runs them); skipped without CUDA.
gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


def _cuda(model, emb, mask):
    return model.to("cuda"), emb.to("cuda"), mask.to("cuda")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("family", ["llama", "qwen2", "mistral-window", "gemma3"])
def test_cuda_graph_replays_give_the_eager_steps_and_the_loops_tokens(family):
    """float32, greedy, rows stopping at an EOS: the step replayed as a CUDA graph (the default on
    CUDA, all-done checked every 8 tokens) gives the eager fused step's and the loop's tokens."""
    model = _tiny(family)
    emb, mask = _prompts(model, context=2)
    with torch.no_grad():
        model, emb, mask = _cuda(model, emb, mask)
    ref = sample(model, emb, mask, 14, eos=[7], pad_id=0, greedy=True, step="loop")
    eager = sample(model, emb, mask, 14, eos=[7], pad_id=0, greedy=True, step="fused", static=False)
    graph = sample(model, emb, mask, 14, eos=[7], pad_id=0, greedy=True, step="fused")
    assert graph.tokens.device.type == "cuda"
    for out in (eager, graph):
        assert torch.equal(out.tokens, ref.tokens) and torch.equal(out.live, ref.live)


@pytest.mark.gpu
@gpu
def test_cuda_graph_sampling_with_lora_groups_and_eos_equals_the_eager_step():
    """Sampled under one seed with the LoRA branch fused, G=3 rollouts sharing a prefill, EOS stops
    and min_new_tokens: the graph's tokens and log-probs are the eager step's; a second call (a new
    capture) leaves the first call's results untouched (they are not the graph's own tensors)."""
    peft = _peft(_tiny("llama"))
    lm = peft.get_base_model()
    emb, mask = _prompts(lm, context=2)
    emb, mask = emb.repeat_interleave(3, 0), mask.repeat_interleave(3, 0)
    with torch.no_grad():
        peft, emb, mask = _cuda(peft, emb, mask)
    out = {}
    for name, static in (("eager", False), ("graph", True)):
        torch.manual_seed(4)
        out[name] = sample(lm, emb, mask, 20, eos=[5, 17], pad_id=0, temperature=1.3, min_new_tokens=2, group=3,
                           step="fused",
                           static=static, logprobs=True)
    kept = out["graph"].tokens.clone()
    sample(lm, emb, mask, 20, eos=[5, 17], pad_id=0, temperature=1.3, group=3, step="fused")
    assert torch.equal(out["graph"].tokens, kept)
    assert torch.equal(out["graph"].tokens, out["eager"].tokens) and torch.equal(out["graph"].live, out["eager"].live)
    assert torch.allclose(out["graph"].logprobs, out["eager"].logprobs, atol=1e-5)
    assert out["eager"].live.sum() < out["eager"].live.numel()  # some row stopped at an EOS


@pytest.mark.gpu
@gpu
def test_bfloat16_cuda_graph_logprobs_agree_with_the_trainer_within_rounding():
    """bf16 on CUDA (what `dtype: auto` picks there): the graph sampler's log-probs against the
    training forward's under its own tokens, the CPU test's bound."""
    from train.policy import completion_logprobs

    model = _tiny("llama", torch.bfloat16)
    emb, mask = _prompts(model, context=2)
    with torch.no_grad():
        model, emb, mask = _cuda(model, emb, mask)
    torch.manual_seed(2)
    new = sample(model, emb, mask, 10, eos=[], pad_id=0, logprobs=True, step="fused")
    with torch.no_grad():
        ref = completion_logprobs(model, emb, mask, new.tokens, new.live)
    gap = (new.logprobs - ref).abs()
    assert torch.isfinite(new.logprobs).all()
    assert gap.mean() < 0.05 and gap.max() < 0.3


@pytest.mark.slow
def test_compiled_layers_give_the_loops_tokens_and_are_off_by_default(monkeypatch):
    """MUSK_DECODE_COMPILE=1: every decode-step layer through one torch.compile'd function (float32:
    the loop's tokens, eager and fixed-shape paths, LoRA branch and q/k/v biases, the cache rounded
    up to 64 columns). Unset, nothing is compiled and the cache has exactly P + T columns."""
    from pipeline import decode_step

    calls = []
    monkeypatch.setattr(decode_step, "_compiled_layers",
                        lambda *a, _f=decode_step._compiled_layers, **k: calls.append(1) or _f(*a, **k))
    model = _tiny("qwen2")
    emb, mask = _prompts(model, context=2)
    ref = sample(model, emb, mask, 10, eos=[], pad_id=0, greedy=True, step="loop")
    sample(model, emb, mask, 10, eos=[], pad_id=0, greedy=True, step="fused")
    assert not calls and decode_step.KVCache(decode_step.fused_weights(model, 32), 2, 21, torch.float32,
                                             "cpu").k[0].shape[2] == 21
    monkeypatch.setenv("MUSK_DECODE_COMPILE", "1")
    assert decode_step.KVCache(decode_step.fused_weights(model, 32), 2, 21, torch.float32, "cpu").k[0].shape[2] == 64
    for static in (False, True):
        new = sample(model, emb, mask, 10, eos=[], pad_id=0, greedy=True, step="fused", static=static)
        assert torch.equal(new.tokens, ref.tokens)
    assert len(calls) == 2 * 9 and "failed" not in decode_step._COMPILED  # 9 decode steps a call, compiled
    peft = _peft(_tiny("llama"))
    for m in peft.modules():  # a LoRA branch large enough to change the tokens
        if hasattr(m, "lora_B"):
            for p in m.lora_B.values():
                p.weight.data *= 5
    lm = peft.get_base_model()
    emb, mask = _prompts(lm, context=2)
    ref = sample(lm, emb, mask, 10, eos=[], pad_id=0, greedy=True, step="loop")
    assert torch.equal(sample(lm, emb, mask, 10, eos=[], pad_id=0, greedy=True, step="fused").tokens, ref.tokens)
    monkeypatch.delenv("MUSK_DECODE_COMPILE")
    assert not torch.equal(sample(peft.get_base_model(), emb, mask, 10, eos=[], pad_id=0, greedy=True,
                                  step="loop").tokens,
                           sample(_tiny("llama"), emb, mask, 10, eos=[], pad_id=0, greedy=True, step="loop").tokens)


def test_compiled_layers_fall_back_to_the_eager_layer_where_compiling_fails(monkeypatch, caplog):
    """No C++ compiler (or any compile error): the eager layer runs, the tokens are the same, it is said once."""
    from pipeline import decode_step

    def broken(fn, **kw):
        def f(*a, **k):
            raise RuntimeError("no C++ compiler")
        return f
    monkeypatch.setattr(decode_step, "_COMPILED", {})
    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setenv("MUSK_DECODE_COMPILE", "1")
    model = _tiny("llama")
    emb, mask = _prompts(model)
    ref = sample(model, emb, mask, 8, eos=[], pad_id=0, greedy=True, step="loop")
    with caplog.at_level(logging.WARNING):
        out = sample(model, emb, mask, 8, eos=[], pad_id=0, greedy=True, step="fused")
        sample(model, emb, mask, 8, eos=[], pad_id=0, greedy=True, step="fused")
    assert torch.equal(out.tokens, ref.tokens)
    assert "no C++ compiler" in decode_step._COMPILED["failed"]
    assert sum("torch.compile failed" in r.message for r in caplog.records) == 1
