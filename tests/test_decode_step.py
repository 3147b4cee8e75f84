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
    from train.policy import splice

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


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("context", [0, 3])
def test_greedy_tokens_equal_the_loop(family, context):
    model = _tiny(family)
    emb, mask = _prompts(model, context=context)
    ref = sample(model, emb, mask, 14, [], 0, greedy=True, step="loop")
    new = sample(model, emb, mask, 14, [], 0, greedy=True, step="fused")
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
        out[step] = sample(model, emb, mask, 20, [5, 17], 0, temperature=1.3, min_new_tokens=2, group=3,
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
    a = sample(model, emb, mask, 12, [7], 0, greedy=True, step="fused")
    b = sample(model, emb, mask, 12, [7], 0, greedy=True, step="fused", static=True, check_every=4)
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.live, b.live)


def test_all_done_checked_every_k_tokens_cuts_the_trailing_pad_columns():
    model = _tiny("llama")
    emb, mask = _prompts(model)
    free = sample(model, emb, mask, 12, [], 0, greedy=True, step="fused")
    eos = sorted({int(free.tokens[i, 1]) for i in range(3)})  # every row stops by its second token
    ref = sample(model, emb, mask, 12, eos, 0, greedy=True, step="loop")
    got = sample(model, emb, mask, 12, eos, 0, greedy=True, step="fused", check_every=5)
    assert ref.tokens.shape[1] <= 2
    assert torch.equal(got.tokens, ref.tokens) and torch.equal(got.live, ref.live)


def _peft(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(3)
    cfg = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                                        "up_proj", "down_proj"], init_lora_weights=False)
    return get_peft_model(model, cfg, autocast_adapter_dtype=True)


@pytest.mark.parametrize("family", ["qwen2", "gemma3"])
def test_lora_branch_fused_and_merged_give_the_loops_tokens(family):
    from train.policy import merged_lora

    peft = _peft(_tiny(family))
    for m in peft.modules():  # make the LoRA branch large enough to change the tokens
        if hasattr(m, "lora_B"):
            m.lora_B["default"].weight.data.mul_(30)
    lm = peft.get_base_model()
    emb, mask = _prompts(lm, context=2)
    ref = sample(lm, emb, mask, 12, [], 0, greedy=True, step="loop")
    with peft.disable_adapter():
        base = sample(lm, emb, mask, 12, [], 0, greedy=True, step="fused")
    assert not torch.equal(base.tokens, ref.tokens)  # the adapter matters
    assert torch.equal(sample(lm, emb, mask, 12, [], 0, greedy=True, step="fused").tokens, ref.tokens)
    with merged_lora(peft):
        assert torch.equal(sample(lm, emb, mask, 12, [], 0, greedy=True, step="fused").tokens, ref.tokens)
    # an optimizer-like in-place update is seen (the fused weights are rebuilt)
    for m in peft.modules():
        if hasattr(m, "lora_B"):
            m.lora_B["default"].weight.data.mul_(-1)
    ref2 = sample(lm, emb, mask, 12, [], 0, greedy=True, step="loop")
    assert torch.equal(sample(lm, emb, mask, 12, [], 0, greedy=True, step="fused").tokens, ref2.tokens)


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_sampler_logprobs_equal_the_trainers(family):
    """log-probs the fused sampler reports equal completion_logprobs (the training forward) in fp32."""
    from train.policy import completion_logprobs

    model = _tiny(family)
    emb, mask = _prompts(model, context=2)
    torch.manual_seed(1)
    out = sample(model, emb, mask, 10, [9], 0, temperature=0.8, logprobs=True, step="fused")
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
    new = sample(model, emb, mask, 10, [], 0, logprobs=True, step="fused")
    with torch.no_grad():
        ref = completion_logprobs(model, emb, mask, new.tokens, new.live)
    gap = (new.logprobs - ref).abs()
    assert gap.mean() < 0.05 and gap.max() < 0.3


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
        a = sample(model, emb, mask, 6, [], 0, greedy=True)
    assert "transformers loop" in caplog.text
    assert torch.equal(a.tokens, sample(model, emb, mask, 6, [], 0, greedy=True, step="loop").tokens)
    with pytest.raises(decode_step.Unsupported):
        sample(model, emb, mask, 6, [], 0, greedy=True, step="fused")


def test_fused_weights_are_reused_then_released_with_the_model():
    import gc

    from pipeline import decode_step

    model = _tiny("llama")
    emb, mask = _prompts(model)
    sample(model, emb, mask, 3, [], 0, greedy=True, step="fused")
    w = decode_step._CACHE[model][-1]
    sample(model, emb, mask, 40, [], 0, greedy=True, step="fused")  # longer: rotary tables grow, weights stay
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
    a, _ = generate(model, emb, mask, 5, [], 0, greedy=True)
    monkeypatch.setenv("MUSK_DECODE_STEP", "loop")
    monkeypatch.setattr(decode_step, "fused_weights", lambda *a: pytest.fail("the fused step ran"))
    b, _ = generate(model, emb, mask, 5, [], 0, greedy=True)
    assert torch.equal(a, b)


def test_auto_decodes_bfloat16_through_the_loop(caplog, monkeypatch):
    """The fused step reproduces the loop's tokens only in float32: under step auto a bf16 model decodes
    through the loop (said in the log), unless MUSK_DECODE_STEP=fused asks for the step."""
    import pipeline.generation
    from pipeline.generation import _fused_weights

    monkeypatch.setattr(pipeline.generation, "_said", set())
    model = _tiny("llama", torch.bfloat16)
    with caplog.at_level(logging.INFO, logger="pipeline.generation"):
        assert _fused_weights(model, 32, "auto") is None
    assert "matches the loop only in float32" in caplog.text
    assert _fused_weights(model, 32, "fused") is not None
    monkeypatch.setenv("MUSK_DECODE_STEP", "fused")
    assert _fused_weights(model, 32, "auto") is not None
    monkeypatch.delenv("MUSK_DECODE_STEP")
    assert _fused_weights(_tiny("llama"), 32, "auto") is not None  # float32: a covered family fuses
