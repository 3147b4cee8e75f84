"""vLLM against musk's own decoder: the same greedy tokens on the same weights. Runs where vLLM and a
CUDA GPU are present (the optional extra); skipped otherwise, saying which is missing. The CPU checks
(clear errors before any work) run everywhere."""

from __future__ import annotations

import importlib.util

import pytest
import torch

from core.errors import MuskError
from pipeline.extract import load_extract_config
from train.config import load_train_config

HAVE_VLLM = importlib.util.find_spec("vllm") is not None
HAVE_GPU = torch.cuda.is_available()
needs_vllm_gpu = pytest.mark.skipif(not (HAVE_VLLM and HAVE_GPU), reason=(
    "needs vllm and a CUDA GPU: " + ", ".join(w for w, ok in (("vllm is not installed", HAVE_VLLM),
                                                            ("no CUDA GPU", HAVE_GPU)) if not ok)))


def test_unknown_engines_list_the_choices(tiny_policy):
    with pytest.raises(MuskError, match="rollout_engine.*choices"):
        load_train_config(None, {"policy": str(tiny_policy), "rollout_engine": "sglang"})
    with pytest.raises(MuskError, match="hint_engine.*choices"):
        load_extract_config(None, {"hint_engine": "tgi"})


@pytest.mark.skipif(HAVE_VLLM and HAVE_GPU, reason="vllm and a GPU are present: the engine would start")
def test_vllm_engine_stops_before_work_where_it_cannot_run(tiny_policy):
    from pipeline.vllm_engine import require_vllm

    with pytest.raises(MuskError, match="vllm"):
        require_vllm("rollout_engine vllm")


@needs_vllm_gpu
def test_vllm_greedy_tokens_match_musk_decoder_from_prompt_embeds(tiny_policy):
    from pipeline.generation import eos_ids, generate
    from pipeline.vllm_engine import make_llm, release, sample_from_embeds, sync_weights
    from train.policy import merged_lora_weights
    from train.inputs import build_prompt_parts, encode_prompts
    from train.policy import load_policy

    cfg = load_train_config(None, {"policy": str(tiny_policy), "dtype": "float32", "device": "cuda"})
    peft_model, tok, _ = load_policy(cfg, torch.float32, "cuda")
    with torch.no_grad():  # a LoRA that is not zero, so the merged weights differ from the folder's
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.02)
    lm = peft_model.get_base_model()
    pb = encode_prompts(tok, [build_prompt_parts(tok, "", q) for q in ("2+3=", "what is 7+1?")], "cuda")
    emb = lm.get_input_embeddings()(pb.ids)
    ours, live = generate(lm, emb, pb.mask, 12, eos=eos_ids(lm, tok), pad_id=tok.pad_token_id, greedy=True)
    llm = make_llm(tiny_policy, torch.float32, 0.3, prompt_embeds=True)
    sync_weights(llm, merged_lora_weights(peft_model))
    theirs, live_v = sample_from_embeds(llm, emb.cpu(), pb.mask.cpu(), 1, max_new_tokens=12, eos=eos_ids(lm, tok),
                                        pad_id=tok.pad_token_id,
                                        temperature=1.0, greedy=True, seed=0)
    release(llm)
    T = min(ours.shape[1], theirs.shape[1])
    assert torch.equal((ours * live)[:, :T].cpu(), (theirs * live_v)[:, :T].cpu())


def test_hint_engine_is_in_the_fingerprint_only_when_not_musk():
    """Caches made by musk's decoder keep their fingerprint; vLLM hints are told apart (the two
    engines' greedy texts may differ by float rounding)."""
    musk = load_extract_config(None).content_settings(torch.float32)
    vllm = load_extract_config(None, {"hint_engine": "vllm"}).content_settings(torch.float32)
    assert "hint_engine" not in musk and vllm == {**musk, "hint_engine": "vllm"}
