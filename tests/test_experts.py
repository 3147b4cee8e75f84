"""Expert loading details that decide what an expert reads: the files a hub download fetches."""

import fnmatch
from pathlib import Path

import pytest

from core.errors import MuskError
from pipeline.experts import ExpertSpec, hf_folder


def test_hub_download_fetches_chat_templates_and_tokenizers(monkeypatch, tmp_path):
    """A chat template kept in its own .jinja file must come down with the weights: without it the
    expert silently reads the plain prompt format."""
    import huggingface_hub

    calls = []

    def fake_snapshot_download(repo_id, local_files_only=False, allow_patterns=None, **kw):
        calls.append((local_files_only, allow_patterns))
        if local_files_only:
            raise FileNotFoundError("not in the local cache")
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    assert hf_folder(ExpertSpec("e", "hf", "org/some-model")) == tmp_path
    patterns = calls[-1][1]
    repo = ["config.json", "generation_config.json", "model-00001-of-00002.safetensors", "model.safetensors.index.json",
            "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
            "tokenizer.model", "vocab.json", "merges.txt", "qwen.tiktoken", "modeling_custom.py"]
    missed = [f for f in repo if not any(fnmatch.fnmatch(f, p) for p in patterns)]
    assert missed == []
    assert not any(fnmatch.fnmatch("pytorch_model.bin", p) for p in patterns)  # no second copy of the weights


def test_unreachable_hub_is_a_clear_error(monkeypatch):
    import huggingface_hub

    def offline(*a, **k):
        raise ConnectionError("offline")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    with pytest.raises(MuskError, match="neither a local folder nor in the local Hugging Face cache"):
        hf_folder(ExpertSpec("e", "hf", "org/some-model"))


def test_waiting_for_rank_zero_times_out_with_a_message(tmp_path):
    import threading

    from pipeline.model_files import wait_for_conversion

    with pytest.raises(MuskError, match="rank 0"):
        wait_for_conversion(tmp_path / "never", Path("m.gguf"), timeout=0.2, poll=0.05)
    target = tmp_path / "late"
    t = threading.Timer(0.2, lambda: (target.mkdir(), (target / "config.json").write_text("{}")))
    t.start()
    assert wait_for_conversion(target, Path("m.gguf"), timeout=5, poll=0.05) == target
    t.join()


def test_an_expert_named_all_is_refused_with_the_reason():
    """'all' would read as the condition shuffle:all (every expert together), not as that expert."""
    from pipeline.experts import ExpertSpec

    with pytest.raises(MuskError, match="reserved.*shuffle:all"):
        ExpertSpec(name="all", kind="random", model="llama").validate()
    ExpertSpec(name="all-minilm", kind="probe-noise", model="x").validate()  # a longer name is fine
