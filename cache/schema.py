"""Cache schema version 1 (see SPEC.md): names of groups, datasets and attributes."""

from __future__ import annotations

import json

SCHEMA_VERSION = 1
MUSK_VERSION = "0.1.0"

PROMPT_COLUMNS = ("text", "answer", "task", "split", "entry")
POOLED = ("last_token", "first_token", "random_token", "first_layer", "random_layer")
EXPERT_DATASETS = POOLED + ("random_token_index", "random_layer_index", "n_tokens")
EXPERT_ATTRS = ("source", "weights_sha256", "hidden_size", "num_layers", "dtype", "prompt_format")
ROOT_ATTRS = ("musk_schema", "fingerprint", "config", "complete", "versions")


def versions() -> str:
    import torch
    import transformers

    return json.dumps({"musk": MUSK_VERSION, "torch": torch.__version__, "transformers": transformers.__version__})
