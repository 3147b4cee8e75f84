"""Prompts of the paper's length for the GPU check, with no hub: a tokenizer built in code whose
token counts are Qwen2.5's on the task's prompts (benchmarks/gpu_check.py), and the left-padded
prompt batch a decode is timed on."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.extract import load_extract_config  # noqa: E402
from pipeline.tasks import build_prompts  # noqa: E402

EXTRACT_CONFIG = Path(__file__).resolve().parents[1] / "configs/extract/arithmetic-default.yaml"  # the paper's task

TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant: {% endif %}")


# Qwen2's pre-tokenizer split (its tokenizer.json): contractions, a letter run with one leading
# non-letter, each digit alone, a punctuation run, newlines, spaces.
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")


def paper_length_tokenizer(texts: list[str]):
    """A byte-level BPE tokenizer built in code whose token counts on `texts` are Qwen2.5's where
    Qwen2.5 keeps a piece whole: Qwen2's split (QWEN2_SPLIT, then byte-level symbols), and merges
    trained on `texts` until every piece of them is one token. A piece is never split finer than
    Qwen2's pre-tokenizer splits it, so these counts are a lower bound on Qwen2.5's (equal where its
    152k vocabulary holds the piece, as it does for the common words and single digits of these
    prompts). Other text falls back to shorter merges and bytes; every text decodes exactly.
    transformers loads it as Qwen2Tokenizer in a Qwen2 model folder (it rebuilds the same BPE)."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(QWEN2_SPLIT), "isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tk.decoder = decoders.ByteLevel()
    specials = ["<s>", "</s>", "<pad>"]
    trainer = trainers.BpeTrainer(vocab_size=1 << 20, min_frequency=0, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator(texts + ["system", "user", "assistant"], trainer)  # the template's roles too
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    tok.chat_template = TEMPLATE
    return tok


def task_texts(size: dict) -> list[str]:
    """The texts the cache's prompts are made of: the task's system prompt, its questions, the template's words."""
    cfg = load_extract_config(str(EXTRACT_CONFIG), {"task": {"train_size": size["train_size"],
                                                             "val_size": size["val_size"]}})
    return [cfg.task.system_prompt(), "system user assistant: "] + [q.text for q in build_prompts(cfg.task)]


def tokenizer(folder: str):
    """The tokenizer saved in `folder`, with a chat template where it has none."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    tok.pad_token = tok.pad_token or tok.eos_token
    tok.chat_template = tok.chat_template or TEMPLATE
    return tok


def prompt_batch(tok_dir: str, size: dict) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """The first size["prompts"] training questions with the task's system prompt through the chat
    template, left-padded: (ids [B, P], mask [B, P], each prompt's length in tokens)."""
    texts = task_texts(size)
    tok = tokenizer(tok_dir)
    tok.padding_side = "left"
    chats = [tok.apply_chat_template([{"role": "system", "content": texts[0]}, {"role": "user", "content": q}],
                                     tokenize=False, add_generation_prompt=True)
             for q in texts[2:2 + size["prompts"]]]
    enc = tok(chats, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc.input_ids, enc.attention_mask, enc.attention_mask.sum(1).tolist()
