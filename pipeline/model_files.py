"""An expert's model files: the weight files of a folder, an hf model's config.json read without its
weights, and a GGUF file converted once into a float32 safetensors folder under MUSK_HOME (transformers
dequantizes GGUF on every load; under torchrun rank 0 converts and the other ranks wait for it)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import torch

from core.atomic import atomic_path, atomic_write_text
from core.errors import MuskError
from core.hashing import musk_home


def weight_files(folder: Path) -> list[Path]:
    files = sorted(
        f for f in folder.iterdir() if f.suffix in (".safetensors", ".bin", ".gguf", ".pt") and f.is_file()
    )
    if not files:
        raise MuskError(f"no weight files (.safetensors/.bin/.gguf) in {str(folder)!r}")
    return files


def hub_config(model: str) -> dict:
    """The config.json of an hf expert's `model` (hub id or folder), read without fetching its weights
    ({} where it cannot be read: loading then says why)."""
    p = Path(model).expanduser()
    try:
        if p.is_dir():
            return json.loads((p / "config.json").read_text())
        from huggingface_hub import hf_hub_download

        try:
            return json.loads(Path(hf_hub_download(model, "config.json", local_files_only=True)).read_text())
        except Exception:
            return json.loads(Path(hf_hub_download(model, "config.json")).read_text())
    except Exception:
        return {}


def _drop_gguf_quantization(config_json: Path) -> None:
    cfg = json.loads(config_json.read_text())
    if cfg.get("quantization_config", {}).get("quant_method") != "gguf":
        return
    del cfg["quantization_config"]
    atomic_write_text(config_json, json.dumps(cfg, indent=2))


def materialize_gguf(path: Path, sha: str) -> Path:
    """Convert a GGUF file once into a safetensors folder under MUSK_HOME (later loads are fast).

    transformers dequantizes GGUF on every load (tens of seconds) and `save_pretrained` refuses a
    GGUF-loaded model, so the model is rebuilt from its config and given the state dict.
    """
    target = musk_home() / "models" / f"{path.stem}-{sha[:16]}"
    if (target / "config.json").exists():
        _drop_gguf_quantization(target / "config.json")  # folders converted by musk <= 0.1.0
        return target
    if torch.distributed.is_available() and torch.distributed.is_initialized() and torch.distributed.get_rank() != 0:
        # Under torchrun transformers' save_pretrained writes weights and config on rank 0 alone (a
        # folder from another rank would hold only the tokenizer), so rank 0 converts, the others wait.
        return wait_for_conversion(target, path)
    with atomic_path(target, directory=True, replace=False) as tmp:  # another process may win the race
        convert_gguf(path, tmp)
        (tmp / "musk_source.json").write_text(json.dumps({"gguf": str(path), "sha256": sha}))
        if not (tmp / "config.json").exists() or not weight_files(tmp):  # never commit a folder without a model
            raise MuskError(f"GGUF conversion of {path.name}: save_pretrained wrote no config or weights")
    return target


def convert_gguf(path: Path, folder: Path) -> None:
    """Write the GGUF file's model and tokenizer into `folder` as float32 safetensors."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    loaded = AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    fresh = AutoModelForCausalLM.from_config(loaded.config, dtype=torch.float32)
    # The weights are plain floats now: a leftover GGUF quantization_config would send every load
    # through the GGUF quantizer and make trainers (TRL, HF Trainer) refuse the model as quantized.
    if hasattr(fresh.config, "quantization_config"):
        del fresh.config.quantization_config
    missing, unexpected = fresh.load_state_dict(loaded.state_dict(), strict=False)
    missing = [k for k in missing if "lm_head" not in k]  # tied head
    if missing or unexpected:
        raise MuskError(f"GGUF conversion of {path.name}: missing {missing[:5]}, unexpected {unexpected[:5]}")
    fresh.save_pretrained(folder)
    tok.save_pretrained(folder)


def wait_for_conversion(target: Path, path: Path, timeout: float = 1800.0, poll: float = 0.5) -> Path:
    """Wait until another process (rank 0) has committed the converted folder `target`."""
    deadline = time.monotonic() + timeout
    while not (target / "config.json").exists():
        if time.monotonic() > deadline:
            raise MuskError(f"waited {timeout:.0f} s for rank 0 to convert {path.name} into {target}; "
                            "does rank 0 load the same experts?")
        time.sleep(poll)
    return target
