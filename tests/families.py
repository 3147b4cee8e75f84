"""Tiny random models of the seven families of the paper's teams, each from its own transformers config
class with its distinctive features on, a byte-level tokenizer with the family's special tokens, and
(where the family has one) a minimal chat template of the real one's shape, written for these tests.

| family  | paper model                    | switched on here                                           |
|---------|--------------------------------|------------------------------------------------------------|
| qwen2   | Qwen2.5-Math-1.5B, -Coder-7B   | q/k/v bias, default system turn, pad != eos                |
| llama   | Llama-3.2-3B                   | date-stamping template, no pad token, several stop tokens  |
| phi3    | Phi-3.5-mini                   | fused qkv_proj and gate_up_proj                            |
| gemma2  | gemma-2-2b-it                  | sliding window 6 < prompts, attention and final softcaps,  |
|         |                                | template that refuses a system turn, sqrt(d) embeddings    |
| mistral | Mistral-7B-v0.3                | sliding window 8 < prompts, system text folded into [INST] |
| gpt2    | GPT-2                          | absolute positions, no pad token, no chat template         |
| gpt_oss | gpt-oss-20b                    | 4 routed experts (top 2), attention sinks, sliding window, |
|         |                                | date-stamping template                                     |
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

QWEN2 = (r"{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}{% set rest = messages[1:] %}"
         r"{% else %}{% set sys = 'You are a helpful assistant.' %}{% set rest = messages %}{% endif %}"
         r"{{ '<|im_start|>system\n' + sys + '<|im_end|>\n' }}"
         r"{% for m in rest %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endfor %}"
         r"{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
LLAMA3 = (r"{{ bos_token }}{% if strftime_now is defined %}{% set today = strftime_now('%d %b %Y') %}"
          r"{% else %}{% set today = '26 Jul 2024' %}{% endif %}"
          r"{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}{% set rest = messages[1:] %}"
          r"{% else %}{% set sys = '' %}{% set rest = messages %}{% endif %}"
          r"{{ '<|start_header_id|>system<|end_header_id|>\n\nToday Date: ' + today + '\n\n' + sys + '<|eot_id|>' }}"
          r"{% for m in rest %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\n\n' + m['content'] + "
          r"'<|eot_id|>' }}{% endfor %}"
          r"{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}")
PHI3 = (r"{% for m in messages %}{{ '<|' + m['role'] + '|>\n' + m['content'] + '<|end|>\n' }}{% endfor %}"
        r"{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}")
GEMMA2 = (r"{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
          r"{% endif %}{% for m in messages %}{% set role = 'model' if m['role'] == 'assistant' else m['role'] %}"
          r"{{ '<start_of_turn>' + role + '\n' + m['content'] | trim + '<end_of_turn>\n' }}{% endfor %}"
          r"{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}")
MISTRAL = (r"{{ bos_token }}{% if messages[0]['role'] == 'system' %}{% set sys = messages[0]['content'] %}"
           r"{% set rest = messages[1:] %}{% else %}{% set rest = messages %}{% endif %}"
           r"{% for m in rest %}{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
           r"{{ raise_exception('Conversation roles must alternate user/assistant') }}{% endif %}"
           r"{% if m['role'] == 'user' and loop.last and sys is defined %}{{ '[INST] ' + sys + '\n\n' + m['content'] + "
           r"'[/INST]' }}{% elif m['role'] == 'user' %}{{ '[INST] ' + m['content'] + '[/INST]' }}"
           r"{% else %}{{ m['content'] + eos_token }}{% endif %}{% endfor %}")
GPT_OSS = (r"{{ '<|start|>system<|message|>You are a helpful model.\nKnowledge cutoff: 2024-06\nCurrent date: ' + "
           r"strftime_now('%Y-%m-%d') + '\n\nReasoning: medium<|end|>' }}"
           r"{% for m in messages %}{% if m['role'] == 'system' %}"
           r"{{ '<|start|>developer<|message|># Instructions\n\n' + m['content'] + '<|end|>' }}"
           r"{% else %}{{ '<|start|>' + m['role'] + '<|message|>' + m['content'] + '<|end|>' }}{% endif %}{% endfor %}"
           r"{% if add_generation_prompt %}{{ '<|start|>assistant' }}{% endif %}")

SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "intermediate_size": 64}
# With tied embeddings and the default init (std 0.02) a 2-layer model's greedy output is its last
# input token repeated, whatever the prompt: a wider init makes the hints depend on the prompt.
WIDE_INIT = {"initializer_range": 0.3}


@dataclass(frozen=True)
class Family:
    config: str  # transformers config class
    dims: dict
    specials: tuple[str, ...]  # special tokens beyond the 256 bytes
    bos: str | None
    eos: str
    pad: str | None
    stop: tuple[str, ...]  # generation_config.eos_token_id
    template: str | None
    lora: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")  # where LoRA lands for the default targets
    policy: bool = True  # a family a user would train
    extra: dict = field(default_factory=dict)


FAMILIES = {
    "qwen2": Family("Qwen2Config", {**SMALL, "num_key_value_heads": 1, "tie_word_embeddings": True},
                    ("<|endoftext|>", "<|im_start|>", "<|im_end|>"), None, "<|im_end|>", "<|endoftext|>",
                    ("<|im_end|>", "<|endoftext|>"), QWEN2, extra=WIDE_INIT),
    "llama": Family("LlamaConfig", {**SMALL, "num_key_value_heads": 1, "tie_word_embeddings": True},
                    ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                     "<|eot_id|>", "<|eom_id|>"),
                    "<|begin_of_text|>", "<|eot_id|>", None, ("<|end_of_text|>", "<|eom_id|>", "<|eot_id|>"), LLAMA3,
                    extra=WIDE_INIT),
    "phi3": Family("Phi3Config", {**SMALL, "num_key_value_heads": 2},
                   ("<s>", "<|endoftext|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
                   "<s>", "<|endoftext|>", "<|endoftext|>", ("<|endoftext|>", "<|end|>"), PHI3, ("qkv_proj", "o_proj")),
    "gemma2": Family("Gemma2Config", {**SMALL, "num_key_value_heads": 1, "head_dim": 16, "sliding_window": 6,
                                      "layer_types": ["sliding_attention", "full_attention"],
                                      "attn_logit_softcapping": 2.0, "final_logit_softcapping": 1.0,
                                      "query_pre_attn_scalar": 16},
                     ("<pad>", "<eos>", "<bos>", "<start_of_turn>", "<end_of_turn>"), "<bos>", "<eos>", "<pad>",
                     ("<eos>", "<end_of_turn>"), GEMMA2),
    "mistral": Family("MistralConfig", {**SMALL, "num_key_value_heads": 1, "head_dim": 16, "sliding_window": 8},
                      ("<unk>", "<s>", "</s>", "[INST]", "[/INST]"), "<s>", "</s>", None, ("</s>",), MISTRAL),
    "gpt2": Family("GPT2Config", {"n_embd": 24, "n_layer": 2, "n_head": 2}, ("<|endoftext|>",),
                   "<|endoftext|>", "<|endoftext|>", None, ("<|endoftext|>",), None, ("c_attn",), policy=False),
    "gpt_oss": Family("GptOssConfig", {**SMALL, "intermediate_size": 32, "num_key_value_heads": 1, "head_dim": 16,
                                       "num_local_experts": 4, "num_experts_per_tok": 2, "sliding_window": 6,
                                       "layer_types": ["sliding_attention", "full_attention"]},
                      ("<|startoftext|>", "<|endoftext|>", "<|start|>", "<|message|>", "<|end|>", "<|return|>",
                       "<|channel|>", "<|call|>"),
                      "<|startoftext|>", "<|return|>", "<|endoftext|>", ("<|return|>", "<|call|>", "<|endoftext|>"),
                      GPT_OSS, policy=False),
}
POLICY_FAMILIES = [k for k, f in FAMILIES.items() if f.policy]


def family_tokenizer(fam: Family):
    """Byte-level BPE over the 256 bytes plus the family's special tokens (each one token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    for t in fam.specials:
        vocab[t] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(list(fam.specials))
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=fam.bos, eos_token=fam.eos, pad_token=fam.pad)
    tok.chat_template = fam.template
    return tok


def build_family(name: str, folder: Path, seed: int = 0) -> Path:
    """Save a tiny random model of family `name` with its tokenizer into `folder` (a model folder)."""
    import torch
    import transformers
    from transformers import AutoModelForCausalLM

    fam = FAMILIES[name]
    tok = family_tokenizer(fam)
    ids = {t: tok.convert_tokens_to_ids(t) for t in fam.specials}
    cfg = getattr(transformers, fam.config)(
        vocab_size=len(tok), bos_token_id=ids.get(fam.bos), eos_token_id=ids[fam.eos],
        pad_token_id=ids.get(fam.pad), **fam.dims, **fam.extra)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.generation_config.eos_token_id = [ids[t] for t in fam.stop]
    model.generation_config.pad_token_id = ids.get(fam.pad)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
