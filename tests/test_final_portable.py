"""A portable final/: the adapter names where its base model comes from (hub id, or the pip package and
GGUF file musk converted), so that it loads on another machine, with another MUSK_HOME, after the same
install."""

from __future__ import annotations

import json

import pytest
import torch

import pipeline.experts as ex
from core.errors import MuskError
from tests.families import build_family
from tests.helpers import quiet_train, tiny_train_overrides


@pytest.fixture
def tiny_gguf_package(tmp_path, monkeypatch):
    """A registered GGUF package "tiny-gguf" (pip distribution tiny-gguf-pkg) holding tiny.Q8_0.gguf. The
    conversion (transformers' GGUF dequantization) is stood in for by copying a tiny random Llama; all
    else (the file's hash, the converted folder under MUSK_HOME, the recorded origin) is musk's own path."""
    import shutil

    import pipeline.model_files

    llama = build_family("llama", tmp_path / "llama")
    gguf = tmp_path / "site-packages" / "tiny_gguf" / "tiny.Q8_0.gguf"
    gguf.parent.mkdir(parents=True)
    gguf.write_bytes(b"GGUF tiny stand-in")
    monkeypatch.setitem(ex.GGUF_PACKAGES, "tiny-gguf", lambda: gguf)
    monkeypatch.setitem(ex.GGUF_DISTRIBUTIONS, "tiny-gguf", "tiny-gguf-pkg")
    monkeypatch.setitem(ex.EXPERTS, "tiny-gguf", ex.ExpertSpec("tiny-gguf", "gguf-package", "tiny-gguf"))
    monkeypatch.setattr(pipeline.model_files, "convert_gguf", lambda path, folder: shutil.copytree(llama, folder, dirs_exist_ok=True))
    return gguf


def test_final_loads_with_another_musk_home(tiny_gguf_package, tiny_cache, tmp_path, monkeypatch):
    from peft import PeftModel

    from train.config import load_train_config
    from train.loop import run_train
    from train.policy import load_base_model

    home_a, home_b = tmp_path / "home-a", tmp_path / "home-b"
    monkeypatch.setenv("MUSK_HOME", str(home_a))
    cfg = load_train_config(None, tiny_train_overrides("tiny-gguf", method="single", total_training_steps=1,
                                                       gradient_accumulation_steps=1, eval_without_context=False))
    run = run_train(cfg, tiny_cache, tmp_path / "run", **quiet_train())
    final = run / "final"
    adapter_cfg = json.loads((final / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == "pypi:tiny-gguf-pkg/tiny.Q8_0.gguf"
    assert str(home_a) not in (final / "adapter_config.json").read_text()
    origin = json.loads((final / "musk_base.json").read_text())
    assert (origin["package"], origin["file"]) == ("tiny-gguf-pkg", "tiny.Q8_0.gguf")
    ids = torch.tensor([[5, 17, 42, 99, 7]])
    with torch.no_grad():
        base_a, _ = load_base_model(final)  # converted under home A during training: read from there
        want = PeftModel.from_pretrained(base_a, final)(input_ids=ids).logits

    monkeypatch.setenv("MUSK_HOME", str(home_b))  # another machine: nothing converted yet
    base_b, tok = load_base_model(final)
    assert list((home_b / "models").iterdir())[0].name.startswith("tiny.Q8_0-")
    with torch.no_grad():
        trained = PeftModel.from_pretrained(base_b, final)
        got = trained(input_ids=ids).logits
        torch.testing.assert_close(got, want, rtol=0, atol=0)
        with trained.disable_adapter():
            assert not torch.equal(got, trained(input_ids=ids).logits)  # the trained LoRA is in there

    tiny_gguf_package.write_bytes(b"GGUF another release")  # the package upgraded under the adapter
    with pytest.raises(MuskError, match="tiny-gguf-pkg ships another tiny.Q8_0.gguf"):
        load_base_model(final)


def test_hub_models_are_named_by_their_hub_id():
    from train.policy import base_origin

    o = base_origin(ex.ExpertSpec("p", "hf", "Qwen/Qwen2.5-3B-Instruct"))
    assert o["base_model_name_or_path"] == "Qwen/Qwen2.5-3B-Instruct"
