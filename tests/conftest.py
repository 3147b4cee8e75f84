"""Shared fixtures: tiny random experts and policy (built in code, no hub), tiny caches."""

from __future__ import annotations

import fcntl
import os
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ["HF_HUB_OFFLINE"] = "1"
# Under pytest-xdist there is one worker a core: one torch thread each (and in their subprocesses), so
# N workers do not run N x N threads on N cores. Set before any test module imports torch.
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("OMP_NUM_THREADS", "1")

from tests.helpers import tiny_extract_config, write_yaml  # noqa: E402


@pytest.fixture(autouse=True)
def _musk_home(tmp_path_factory, monkeypatch):
    home = tmp_path_factory.getbasetemp() / "musk_home"
    monkeypatch.setenv("MUSK_HOME", str(home))


@contextmanager
def _built_once(tmp_path_factory, name: str):
    """A folder that the whole test run builds once, xdist workers included: yields (folder, built);
    the first caller builds it (built False) while the others wait on the lock, then find it built.
    Tests only read it (copy it to change it)."""
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the workers' basetemps share this parent
    d = root / name
    with open(root / f"{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        built = (root / f"{name}.built").exists()
        d.mkdir(exist_ok=True)
        yield d, built
        (root / f"{name}.built").touch()


@pytest.fixture(scope="session")
def tiny_cache(tmp_path_factory) -> Path:
    """A complete tiny cache: 2 random experts, hints, router; 12 train + 4 val prompts."""
    from pipeline.extract import load_extract_config, run_extract

    with _built_once(tmp_path_factory, "shared-cache") as (d, built):
        if built:
            return d / "tiny.h5"
        os.environ["MUSK_HOME"] = str(tmp_path_factory.getbasetemp() / "musk_home")
        cfg_path = write_yaml(d / "extract.yaml", tiny_extract_config(d / "tiny.h5"))
        return run_extract(load_extract_config(str(cfg_path)), progress=False, log=lambda *a: None)


@pytest.fixture(scope="session")
def tiny_policy(tmp_path_factory) -> Path:
    """A tiny random Llama saved as a local folder with a byte tokenizer and a chat template."""
    with _built_once(tmp_path_factory, "shared-policy") as (d, built):
        if not built:
            _save_tiny_policy(d)
    return d


def _save_tiny_policy(d: Path) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from pipeline.experts import byte_tokenizer

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
