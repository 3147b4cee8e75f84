"""Cache schema (see SPEC.md): names of groups, datasets and attributes.

Schema 5 (this musk writes it): schema 4 plus, per expert when extracted with `solo: true`, its own
scored answers (datasets solo, solo_score, solo_n_tokens; attrs solo_source, solo_fingerprint,
solo_max_new_tokens, solo_answer_extraction, solo_seconds, solo_machine; pipeline/solo.py). Prompts
and features are as in schema 4, so fingerprints keep schema 4's key (PROMPTS_SCHEMA) and a schema-4
cache is completed in place: a rerun adds the solo answers and leaves every feature as it was.

Schema 4: schema 3 with every Reasoning Gym family split by a hash partition of
its problem (commutative rewordings of a chain sum are one problem), each dataset's configured share
of each split exact, and the root attribute `split_shares` (JSON: {"mix": {dataset: configured
share}, "train"/"val"/"test": {dataset: {"prompts": n, "share": s}}}). Schemas 1-3 are read; their
shares are counted from the prompts (no "mix").

Schema 3: schema 2 with held-out splits by construction, the root attribute
`split_overlap` (validation prompts whose text is in the training split: 0) and a data fingerprint
that covers the prompts themselves. Schemas 1 and 2 are read; a run refuses one whose validation
prompts appear in its training split.

Schema 2: `random_token`, `random_layer` and their indices hold
`pooling_draws` seeded draws per prompt ([N, D, d] and [N, D]; the training seed picks draw
seed % D), and the variant `first_block` (hidden_states[1] at the last real token) is added.
Schema 1 (random variants [N, d], no first_block) is read as one draw.
"""

from __future__ import annotations

import json

SCHEMA_VERSION = 5
READABLE_SCHEMAS = (1, 2, 3, 4, 5)
APPENDABLE_SCHEMAS = (4, 5)  # caches `musk extract` adds experts or solo answers to
PROMPTS_SCHEMA = 4  # the schema whose prompts and features this one keeps: the fingerprints' key
MUSK_VERSION = "0.1.0"

PROMPT_COLUMNS = ("text", "answer", "task", "split", "entry")
POOLED = ("last_token", "first_token", "random_token", "first_layer", "first_block", "random_layer")
RANDOM_VARIANTS = ("random_token", "random_layer")  # [N, D, d]: several seeded draws per prompt
EXPERT_DATASETS = POOLED + ("random_token_index", "random_layer_index", "n_tokens")
SOLO_DATASETS = ("solo", "solo_score", "solo_n_tokens")  # optional per expert (schema 5)
EXPERT_ATTRS = ("source", "weights_sha256", "hidden_size", "num_layers", "dtype", "prompt_format")
ROOT_ATTRS = ("musk_schema", "fingerprint", "config", "complete", "versions")
SCHEMA_1_VARIANTS = ("last_token", "first_token", "random_token", "first_layer", "random_layer")


def versions() -> str:
    import torch
    import transformers

    return json.dumps({"musk": MUSK_VERSION, "torch": torch.__version__, "transformers": transformers.__version__})


def open_failure(path, e: OSError) -> str:
    """The message for an HDF5 file at `path` that h5py could not open (OSError `e`). A lock failure
    (another process has the file open for writing, or a file system without locks such as some NFS
    mounts) says so and names HDF5_USE_FILE_LOCKING; anything else reads as an unreadable file."""
    if "lock" in str(e).lower():
        return (f"cache {str(path)!r} could not be locked ({e}): another process may be writing it (wait for it "
                "to finish), or its file system does not support HDF5's file locks; there, set "
                "HDF5_USE_FILE_LOCKING=FALSE in the environment (only where no other process writes the file)")
    return f"cache {str(path)!r} is not a readable HDF5 file ({e})"
