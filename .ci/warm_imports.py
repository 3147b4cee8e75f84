"""Byte-compile what the tests import, once, by importing it with bytecode writing on.

Where PYTHONDONTWRITEBYTECODE is set, every fresh interpreter (each pytest-xdist worker, each CLI
subprocess a test starts) would compile its imports from source again. Compiling the whole
environment (compileall) does ~18,000 files for the ~5,000 that are imported; importing them once
writes only those. A module missing from this list still works: it is compiled in memory where it is
imported, as before. Run by .ci/install as `env -u PYTHONDONTWRITEBYTECODE python .ci/warm_imports.py`.
"""

import importlib
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

MODULES = [
    # third-party, heaviest first
    "torch", "torch._inductor.codecache", "torch.distributed.run", "transformers", "peft", "numpy", "scipy.stats",
    "sklearn.linear_model", "h5py", "polars", "typer", "yaml", "matplotlib.pyplot", "reasoning_gym", "tqdm",
    "tensorboardX", "safetensors.torch", "gguf", "datasets", "ray", "hypothesis", "pytest", "xdist", "jinja2",
    # the model classes the tests build
    "transformers.models.llama.modeling_llama", "transformers.models.qwen2.modeling_qwen2",
    "transformers.models.gpt2.modeling_gpt2", "transformers.models.gemma2.modeling_gemma2",
    "transformers.models.gemma3.modeling_gemma3", "transformers.models.mistral.modeling_mistral",
    "transformers.models.phi3.modeling_phi3", "transformers.models.bert.modeling_bert",
    # musk itself
    "cli", "train.loop", "evaluate.run", "analyze.report", "sweep.runner", "pipeline.extract",
]

missing = []
for name in MODULES:
    try:
        importlib.import_module(name)
    except Exception as e:  # an optional package not installed: nothing to compile
        missing.append(f"{name} ({type(e).__name__})")
print(f"warm imports: {len(MODULES) - len(missing)} of {len(MODULES)} modules compiled"
      + (f"; not importable: {', '.join(missing)}" if missing else ""))
