"""A decode step with few operations for the Llama, Qwen2, Mistral and Gemma-3 families.

Same maths as the transformers modules it reads its weights from, in fewer, larger operations:
  - a static KV cache per layer, [N, Hk, S, hd], written in place (no torch.cat per layer and token);
  - query/key/value in one matmul and gate/up in one matmul (weights concatenated once per weight set);
  - rotary from a table built once by the model's own rotary module (bit-identical cos/sin), applied
    to the queries and keys together;
  - attention by SDPA on the cache with enable_gqa (grouped keys and values are never repeated);
  - the LoRA branch fused: the A matrices of q/k/v (and gate/up) stacked into one [R, d] matmul and
    the B matrices (scale folded in) into one block matrix, in float32 as PEFT computes it. Under
    `train.policy.merged_lora` the adapters are off and W + B A is what the base layers hold, so the
    step reads the merged weights and runs no LoRA branch at all.

Numbers: float32 greedy tokens equal the transformers loop's on the tested families (the rounding of
a fused matmul or of F.rms_norm differs in the last bit; tests/test_decode_step.py). In bfloat16 the
norms round where the modules round; fused matmuls and attention kernels may still round
differently, so logits agree to bf16 rounding, not bit for bit.

On a CPU each fused weight is also held in oneDNN's blocked layout (pipeline/packed.py;
torch.compile's CPU freezing does the same): at decode batches its matmul reads the weights about
twice as fast as F.linear's. bf16 outputs are bit-identical to F.linear's; float32 ones differ in
the last bits (another summation order), like any fused matmul. MUSK_DECODE_PACK=0 turns it off.
The KV cache is float32 on a CPU (`cache_dtype`), so one bf16 query attends in float32 without
casting the cache every token.

MUSK_DECODE_COMPILE=1: on a CPU each decode step's layer (norms, rotary, cache write, attention,
residuals, activation; the matmuls as opaque calls) runs as one torch.compile'd function with fixed
shapes, shared by the layers: one kernel per layer for the elementwise work instead of ~40 eager
operations. The cache's columns are then rounded up to a multiple of 64 (masked), so prompts of
different lengths reuse one compilation. Off by default: at 8 rows on a 2-core AVX-512 CPU it did
not win and compiles for tens of seconds a process (docs/performance.md).

The static path (`static=True`) attends over the whole cache under a mask, with the column as a
tensor, so one step has fixed shapes and no host sync: that is what a CUDA graph captures
(pipeline/generation.py replays it once a token). On a CPU the eager path attends over the filled
columns only.
"""

from __future__ import annotations

import os
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from pipeline.packed import pack, packed_linear

FAMILIES = ("llama", "qwen2", "mistral", "gemma3_text")


class Unsupported(Exception):
    """The model (or a module in it) is outside what the fused step covers; the caller falls back."""


def _linear_parts(mod) -> tuple[torch.Tensor, torch.Tensor | None, list[tuple[torch.Tensor, torch.Tensor]]]:
    """(W [out, in], bias [out] or None, [(A [r, in], s B [out, r])]) of an nn.Linear or a PEFT LoRA
    linear. The LoRA list is empty when the adapters are off (merged_lora, disable_adapter) or merged."""
    if hasattr(mod, "lora_A") and hasattr(mod, "get_base_layer"):
        base = mod.get_base_layer()
        loras = []
        if not mod.disable_adapters and not mod.merged:
            for a in mod.active_adapters:
                if a not in mod.lora_A:
                    continue
                if mod.use_dora.get(a, False) or getattr(mod, "lora_bias", {}).get(a, False):
                    raise Unsupported("DoRA / LoRA bias")
                drop = mod.lora_dropout[a]
                if mod.training and isinstance(drop, torch.nn.Dropout) and drop.p > 0:
                    raise Unsupported("LoRA dropout in training mode")
                loras.append((mod.lora_A[a].weight, mod.lora_B[a].weight * mod.scaling[a]))
        if type(base) is not torch.nn.Linear:
            raise Unsupported(f"base layer {type(base).__name__}")
        return base.weight, base.bias, loras
    if type(mod) is not torch.nn.Linear:
        raise Unsupported(f"linear of type {type(mod).__name__}")
    return mod.weight, mod.bias, []


# first module of a fused set -> (weakrefs to its source weights and biases, their versions, packing
# asked, fused W, bias, packed W or None): the base weights do not change while LoRA trains, so each
# training step's rebuild reuses them instead of concatenating and packing ~all parameters again
_BASE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _base(mods: list, parts: list, packed: bool):
    src = [t for w, b, _ in parts for t in (w, b) if t is not None]
    hit = _BASE.get(mods[0])
    if hit is not None:
        refs, vers, asked, w, bias, pw = hit
        # `asked`, not whether a packed copy exists: where packing is unavailable (a GPU, fp16) the
        # entry holds none and must still be reused
        if (asked == packed and len(refs) == len(src) and all(r() is t for r, t in zip(refs, src))
                and vers == [t._version for t in src]):
            return w, bias, pw
    ws = [w for w, _, _ in parts]
    w = ws[0] if len(ws) == 1 else torch.cat(ws, 0)
    bias = None
    if any(b is not None for _, b, _ in parts):
        bias = torch.cat([b if b is not None else w.new_zeros(wi.shape[0]) for (wi, b, _) in parts])
    pw = pack(w) if packed else None
    _BASE[mods[0]] = ([weakref.ref(t) for t in src], [t._version for t in src], packed, w, bias, pw)
    return w, bias, pw


@dataclass
class Fused:
    """One fused projection: y = x W^T + b + (x A^T) B^T, the LoRA part in float32."""

    weight: torch.Tensor  # [out, in]
    bias: torch.Tensor | None  # [out]
    lora_a: torch.Tensor | None  # [R, in] float32
    lora_b: torch.Tensor | None  # [out, R] float32, scale folded in
    packed: torch.Tensor | None = None  # weight in oneDNN's layout (`pack`), used when present

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            y = packed_linear(x, self.packed, self.bias)
        else:
            y = F.linear(x, self.weight, self.bias)
        if self.lora_a is None:
            return y
        # PEFT: the base output (rounded to x's dtype) plus the float32 branch, rounded once more.
        return (y.float() + F.linear(F.linear(x.float(), self.lora_a), self.lora_b)).to(x.dtype)


def fuse(mods: list, packed: bool = False) -> Fused:
    """Concatenate linears that read the same input into one (q/k/v, gate/up); packed: also hold the
    weight in oneDNN's layout where `can_pack`."""
    parts = [_linear_parts(m) for m in mods]
    ws = [w for w, _, _ in parts]
    w, bias, pw = _base(mods, parts, packed)
    loras = [(i, a, b) for i, (_, _, ls) in enumerate(parts) for a, b in ls]
    if not loras:
        return Fused(w, bias, None, None, pw)
    offs = [0]
    for wi in ws:
        offs.append(offs[-1] + wi.shape[0])
    R = sum(a.shape[0] for _, a, _ in loras)
    A = torch.cat([a.float() for _, a, _ in loras], 0)  # [R, in]
    B = torch.zeros(w.shape[0], R, dtype=torch.float32, device=w.device)  # block matrix [out, R]
    r0 = 0
    for i, a, b in loras:
        B[offs[i]:offs[i + 1], r0:r0 + a.shape[0]] = b.float()
        r0 += a.shape[0]
    return Fused(w, bias, A, B, pw)


@dataclass
class Layer:
    qkv: Fused
    o: Fused
    gate_up: Fused
    down: Fused
    norms: list  # RMSNorm weights in application order (Gemma: 1 + w, float32)
    qk_norm: torch.Tensor | None  # Gemma [Hq + Hk, hd] float32 (1 + w), per head
    window: int | None  # sliding window (columns), None for full attention
    rope: str  # key into Weights.cos / .sin
    act: object


@dataclass
class Weights:
    """Everything one step reads, fused once per weight set (see `fused_weights`)."""

    family: str
    layers: list[Layer]
    final_norm: torch.Tensor
    embed: torch.Tensor  # [V, d]
    embed_scale: torch.Tensor | None  # Gemma: sqrt(d) in the weights' dtype
    hq: int
    hk: int
    hd: int
    scaling: float
    eps: float
    cos: dict  # rope kind -> [max_pos, hd]
    sin: dict  # rope kind -> [max_pos, hd], first half negated (rotate_half folded in)
    head: Fused  # the LM head [V, d] (tied: the embedding), logits in the weights' dtype


def family_of(lm) -> str | None:
    t = getattr(lm.config, "model_type", None)
    return t if t in FAMILIES else None


def _rope_tables(backbone, cfg, kinds: set, max_pos: int, *, dtype, device) -> tuple[dict, dict]:
    """cos/sin [max_pos, hd] from the model's own rotary module (the values it would compute)."""
    pos = torch.arange(max_pos, device=device)[None]
    x = torch.zeros(1, dtype=dtype, device=device)
    cos, sin = {}, {}
    for k in kinds:
        c, s = backbone.rotary_emb(x, pos) if k == "" else backbone.rotary_emb(x, pos, k)
        c, s = c[0], s[0]  # [max_pos, hd]
        h = s.shape[-1] // 2
        cos[k], sin[k] = c.contiguous(), torch.cat([-s[:, :h], s[:, h:]], -1)
    return cos, sin


def pack_default() -> bool:
    """Packed weights unless MUSK_DECODE_PACK=0 (they are only made where `can_pack`)."""
    return os.environ.get("MUSK_DECODE_PACK", "1") != "0"


def compile_default() -> bool:
    """One compiled function per decode-step layer on a CPU when MUSK_DECODE_COMPILE=1 (default off)."""
    return os.environ.get("MUSK_DECODE_COMPILE", "0") == "1"


@torch.library.custom_op("musk::packed_linear", mutates_args=())
def _packed_linear_op(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None, out: int) -> torch.Tensor:
    """packed_linear as one opaque operation for torch.compile (inductor cannot lower oneDNN's linear
    on a packed weight that is an input rather than a frozen constant). x [..., in] -> [..., out]."""
    return packed_linear(x, w, b)


@_packed_linear_op.register_fake
def _(x, w, b, out):
    return x.new_empty(*x.shape[:-1], out)


def build_weights(lm, max_pos: int, packed: bool | None = None) -> Weights:
    """Read (and fuse) the weights of a covered model; packed (default `pack_default`): also in
    oneDNN's layout on a CPU. Raises Unsupported otherwise."""
    packed = pack_default() if packed is None else packed
    fam = family_of(lm)
    if fam is None:
        raise Unsupported(f"model type {getattr(lm.config, 'model_type', '?')!r}")
    cfg, bb = lm.config, lm.base_model
    if getattr(cfg, "attn_logit_softcapping", None):
        raise Unsupported("attention logit softcapping")
    if getattr(cfg, "use_bidirectional_attention", False):
        raise Unsupported("bidirectional attention")
    if lm.training and getattr(cfg, "attention_dropout", 0.0):
        raise Unsupported("attention dropout in training mode")
    gemma = fam == "gemma3_text"
    hd = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    lt = getattr(cfg, "layer_types", None)
    layers = []
    for i, L in enumerate(bb.layers):
        at, mlp = L.self_attn, L.mlp
        if lt is not None:
            window = cfg.sliding_window if lt[i] == "sliding_attention" else None
        else:
            window = getattr(cfg, "sliding_window", None)
        if gemma:
            norms = [1.0 + n.weight.float() for n in (L.input_layernorm, L.post_attention_layernorm,
                                                     L.pre_feedforward_layernorm, L.post_feedforward_layernorm)]
            qk = torch.cat([(1.0 + at.q_norm.weight.float()).expand(cfg.num_attention_heads, hd),
                            (1.0 + at.k_norm.weight.float()).expand(cfg.num_key_value_heads, hd)])
        else:
            norms, qk = [L.input_layernorm.weight, L.post_attention_layernorm.weight], None
        layers.append(Layer(fuse([at.q_proj, at.k_proj, at.v_proj], packed), fuse([at.o_proj], packed),
                            fuse([mlp.gate_proj, mlp.up_proj], packed), fuse([mlp.down_proj], packed), norms, qk, window,
                            lt[i] if gemma else "", mlp.act_fn))
    emb = bb.embed_tokens
    scale = emb.embed_scale.to(emb.weight.dtype) if gemma else None
    kinds = {la.rope for la in layers}
    cos, sin = _rope_tables(bb, cfg, kinds, max_pos, dtype=emb.weight.dtype, device=emb.weight.device)
    scaling = cfg.query_pre_attn_scalar ** -0.5 if gemma else hd ** -0.5
    final = (1.0 + bb.norm.weight.float()) if gemma else bb.norm.weight
    return Weights(fam, layers, final, emb.weight, scale, cfg.num_attention_heads, cfg.num_key_value_heads, hd,
                   scaling, cfg.rms_norm_eps, cos, sin, fuse([lm.get_output_embeddings()], packed))


def _sources(lm) -> list[torch.Tensor]:
    """The tensors a Weights is built from: a changed one (new object or in-place update) means rebuild."""
    return [p for p in lm.parameters()]


# lm -> (weakrefs to sources, versions, adapters on, Weights); the entry goes with the model
_CACHE: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def fused_weights(lm, max_pos: int, packed: bool | None = None) -> Weights:
    """build_weights, reused while no parameter of lm was replaced or updated in place (an optimizer
    step bumps the version; merged_lora swaps whole tensors) and the adapters are in the same state.
    One entry per model: the fused copies of the previous weight set are released on a rebuild (the
    base weights' fused and packed copies are kept while those weights are unchanged, see `_base`).
    Rotary tables shorter than max_pos are rebuilt alone (twice as long), not the weights."""
    packed = pack_default() if packed is None else packed
    src = _sources(lm)
    state = (packed,) + tuple(bool(getattr(m, "disable_adapters", False)) for m in lm.modules() if hasattr(m, "lora_A"))
    hit = _CACHE.get(lm)
    if hit is not None:
        refs, vers, st, w = hit
        if (st == state and len(refs) == len(src) and all(r() is s for r, s in zip(refs, src))
                and vers == [s._version for s in src]):
            if next(iter(w.cos.values())).shape[0] < max_pos:
                w.cos, w.sin = _rope_tables(lm.base_model, lm.config, set(w.cos), 2 * max_pos, dtype=w.embed.dtype,
                                            device=w.embed.device)
            return w
    _CACHE.pop(lm, None)
    w = build_weights(lm, max(max_pos, 1024), packed)
    _CACHE[lm] = ([weakref.ref(s) for s in src], [s._version for s in src], state, w)
    return w


def _norm(x: torch.Tensor, w: torch.Tensor, eps: float, gemma: bool) -> torch.Tensor:
    if gemma:  # (x_fp32 normalised * (1 + w)).to(dtype), as Gemma3RMSNorm
        return F.rms_norm(x.float(), (x.shape[-1],), w, eps).to(x.dtype)
    if x.dtype != torch.float32:  # w * (x_fp32 normalised).to(dtype): Llama's two roundings
        return F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype) * w
    return F.rms_norm(x, (x.shape[-1],), w, eps)


def cache_dtype(dtype: torch.dtype, device) -> torch.dtype:
    """The KV cache's dtype for weights in `dtype`: float32 on a CPU, where one reduced-precision query
    attends in float32 (`attend`) and would otherwise cast every filled column each token (bf16 keys
    and values are exact in float32, so the values attended are the same); the weights' dtype elsewhere."""
    return torch.float32 if torch.device(device).type == "cpu" else dtype


class KVCache:
    """Static keys and values: per layer [N, Hk, S, hd], written in place at their column (in the
    cache's dtype: see `cache_dtype`)."""

    def __init__(self, W: Weights, N: int, S: int, dtype, device):
        if compile_default() and torch.device(device).type == "cpu":  # see `_compiled_layers`
            S = -(-S // COMPILE_COLUMNS) * COMPILE_COLUMNS
        self.k = [torch.zeros(N, W.hk, S, W.hd, dtype=dtype, device=device) for _ in W.layers]
        self.v = [torch.zeros(N, W.hk, S, W.hd, dtype=dtype, device=device) for _ in W.layers]


def attn_masks(W: Weights, valid: torch.Tensor, q_cols: torch.Tensor, L: int) -> dict:
    """Boolean SDPA masks [N, 1, Tq, L] per window: key real, not after the query, within the window;
    a query may always see itself (a padding query then attends to itself only, never to nothing)."""
    k = torch.arange(L, device=valid.device)
    base = valid[:, None, None, :L] & (k <= q_cols[:, None])  # [N, 1, Tq, L]
    eye = (k == q_cols[:, None])
    out = {}
    for win in {la.window for la in W.layers}:
        m = base if win is None else base & (k > q_cols[:, None] - win)
        out[win] = m | eye
    return out


def attend(q: torch.Tensor, K: torch.Tensor, V: torch.Tensor, mask: torch.Tensor, scale: float) -> torch.Tensor:
    """Attention of q [n, Hq, T, hd] on K, V [n, Hk, L, hd] under a boolean mask [n, 1, T, L], grouped
    keys and values never copied. SDPA (enable_gqa), except for one reduced-precision query on a CPU:
    there the two bmm below are several times faster than SDPA's kernel (docs/performance.md,
    "Figures behind code comments")."""
    n, hq, T, hd = q.shape
    hk = K.shape[1]
    if T > 1 or q.device.type != "cpu" or q.dtype == torch.float32:
        K, V = K.to(q.dtype), V.to(q.dtype)  # a float32 cache under bf16 weights: exact round trip
        return F.scaled_dot_product_attention(q, K, V, attn_mask=mask, scale=scale, enable_gqa=hq != hk)
    L, g = K.shape[2], hq // hk
    # float32 throughout, one rounding at the output, as SDPA's CPU kernel accumulates; the cache is
    # float32 already on a CPU (cache_dtype), else its filled columns [n * Hk, L, hd] are cast here
    Kb, Vb = K.reshape(n * hk, L, hd).float(), V.reshape(n * hk, L, hd).float()
    s = torch.bmm(q.reshape(n * hk, g, hd).float(), Kb.transpose(1, 2)).view(n, hk, g, L) * scale  # [n, Hk, g, L]
    p = torch.softmax(s.masked_fill_(~mask, float("-inf")), -1)
    return torch.bmm(p.view(n * hk, g, L), Vb).view(n, hq, 1, hd).to(q.dtype)


def forward(W: Weights, cache: KVCache, x: torch.Tensor, pos: torch.Tensor, *, col0, masks: dict,
            L: int, group: int = 1) -> torch.Tensor:
    """Run x [n, T, d] (columns col0..col0+T-1 of every row) through the layers; returns the final
    hidden states [n, T, d] after the last norm. pos [n, T]: rotary positions. col0: int, or a
    0-d tensor (static path, T == 1). Keys and values land in the cache; group > 1: n = N / group
    rows are computed and each is written to its `group` cache rows (a prefill shared by G rollouts).
    Attention reads cache columns [0, L)."""
    n, T, _ = x.shape
    gemma = W.family == "gemma3_text"
    hq, hk, hd = W.hq, W.hk, W.hd
    rope = {k: (W.cos[k][pos][:, :, None], W.sin[k][pos][:, :, None]) for k in W.cos}  # [n, T, 1, hd] per kind
    if T == 1 and group == 1 and x.device.type == "cpu" and compile_default() and _compilable(W):
        return _compiled_layers(W, cache, x, rope, col0=col0, masks=masks)
    h = x
    for i, la in enumerate(W.layers):
        r = _norm(h, la.norms[0], W.eps, gemma)
        qkv = la.qkv(r).view(n, T, hq + 2 * hk, hd)  # [n, T, Hq + 2 Hk, hd]
        qk, v = qkv[:, :, :hq + hk], qkv[:, :, hq + hk:]
        if la.qk_norm is not None:
            qk = F.rms_norm(qk.float(), (hd,), None, W.eps).mul_(la.qk_norm).to(x.dtype)
        cos, sin = rope[la.rope]
        qk = qk * cos + qk.view(n, T, hq + hk, 2, hd // 2).flip(3).view(n, T, hq + hk, hd) * sin
        q = qk[:, :, :hq].transpose(1, 2)  # [n, Hq, T, hd]
        k, v = qk[:, :, hq:].transpose(1, 2), v.transpose(1, 2)  # [n, Hk, T, hd]
        K, V = cache.k[i], cache.v[i]
        if isinstance(col0, torch.Tensor):
            K.index_copy_(2, col0.view(1), k.to(K.dtype))
            V.index_copy_(2, col0.view(1), v.to(V.dtype))
        elif group == 1:
            K[:, :, col0:col0 + T] = k
            V[:, :, col0:col0 + T] = v
        else:
            K.view(n, group, hk, -1, hd)[:, :, :, col0:col0 + T] = k[:, None]
            V.view(n, group, hk, -1, hd)[:, :, :, col0:col0 + T] = v[:, None]
        Kr, Vr = (K[::group], V[::group]) if group > 1 else (K, V)
        a = attend(q, Kr[:, :, :L], Vr[:, :, :L], masks[la.window], W.scaling)  # [n, Hq, T, hd]
        a = la.o(a.transpose(1, 2).reshape(n, T, hq * hd))
        if gemma:
            h = h + _norm(a, la.norms[1], W.eps, True)
            r = _norm(h, la.norms[2], W.eps, True)
        else:
            h = h + a
            r = _norm(h, la.norms[1], W.eps, False)
        gu = la.gate_up(r)
        g, u = gu.chunk(2, -1)
        m = la.down(la.act(g) * u)
        h = h + (_norm(m, la.norms[3], W.eps, True) if gemma else m)
    return _norm(h, W.final_norm, W.eps, gemma)


COMPILE_COLUMNS = 64  # the cache's columns are a multiple of this under MUSK_DECODE_COMPILE=1
_ACTS = {"SiLUActivation": F.silu, "SiLU": F.silu}
_COMPILED: dict = {}  # "fn": the compiled layer; "failed": why compiling is off for this process


def _compilable(W: Weights) -> bool:
    """Families the compiled layer covers: no Gemma (sandwich and q/k norms), a SiLU gate."""
    return W.family != "gemma3_text" and all(type(la.act).__name__ in _ACTS for la in W.layers) \
        and "failed" not in _COMPILED


def _lin_args(f: Fused) -> tuple:
    """A Fused as plain arguments for the compiled layer (tensors, then constants)."""
    return (f.packed if f.packed is not None else f.weight, f.bias, f.lora_a, f.lora_b, f.packed is not None,
            f.weight.shape[0])


def _lin(x, w, bias, lora_a, lora_b, packed: bool, out: int):
    """Fused.__call__ on _lin_args (the packed matmul through the opaque op)."""
    y = _packed_linear_op(x, w, bias, out) if packed else F.linear(x, w, bias)
    if lora_a is None:
        return y
    return (y.float() + F.linear(F.linear(x.float(), lora_a), lora_b)).to(x.dtype)


def _layer_t1(h, norms, qkv, o, gate_up, down, K, V, cos, sin, mask, col, hq: int, hk: int, hd: int, eps: float,
              scaling: float, act: str):
    """One Llama/Qwen2/Mistral layer for one token: `forward`'s loop body with T = 1 and the static
    path's fixed shapes (h [n, 1, d], K/V [n, Hk, S, hd] written at col (0-d), mask [n, 1, 1, S])."""
    n = h.shape[0]
    r = _norm(h, norms[0], eps, False)
    qkv_ = _lin(r, *qkv).view(n, 1, hq + 2 * hk, hd)
    qk, v = qkv_[:, :, :hq + hk], qkv_[:, :, hq + hk:]
    qk = qk * cos + qk.view(n, 1, hq + hk, 2, hd // 2).flip(3).view(n, 1, hq + hk, hd) * sin
    q = qk[:, :, :hq].transpose(1, 2)  # [n, Hq, 1, hd]
    k, v = qk[:, :, hq:].transpose(1, 2), v.transpose(1, 2)  # [n, Hk, 1, hd]
    K.index_copy_(2, col.view(1), k.to(K.dtype))
    V.index_copy_(2, col.view(1), v.to(V.dtype))
    a = _lin(attend(q, K, V, mask, scaling).transpose(1, 2).reshape(n, 1, hq * hd), *o)
    h = h + a
    g, u = _lin(_norm(h, norms[1], eps, False), *gate_up).chunk(2, -1)
    return h + _lin(_ACTS[act](g) * u, *down)


def _compiled_layers(W: Weights, cache: KVCache, x: torch.Tensor, rope: dict, *, col0, masks: dict) -> torch.Tensor:
    """`forward` for one token on a CPU with each layer through one torch.compile'd `_layer_t1`
    (fixed shapes: all cache columns under the mask, so a step's shapes do not change with the
    column). Falls back to the eager layer, for the rest of the process, where compiling fails
    (no C++ compiler) and says so once."""
    S = cache.k[0].shape[2]
    col = col0 if isinstance(col0, torch.Tensor) else torch.tensor(col0, device=x.device)
    full = {w: F.pad(m, (0, S - m.shape[-1])) for w, m in masks.items()}  # [n, 1, 1, S]: False past the filled
    if "fn" not in _COMPILED:
        _COMPILED["fn"] = torch.compile(_layer_t1, dynamic=False)
    h = x
    for i, la in enumerate(W.layers):
        cos, sin = rope[la.rope]
        args = (la.norms, _lin_args(la.qkv), _lin_args(la.o), _lin_args(la.gate_up), _lin_args(la.down),
                cache.k[i], cache.v[i], cos, sin, full[la.window], col, W.hq, W.hk, W.hd, W.eps, W.scaling,
                type(la.act).__name__)
        if "failed" in _COMPILED:
            h = _layer_t1(h, *args)
            continue
        try:
            h = _COMPILED["fn"](h, *args)
        except Exception as e:  # the eager layer below writes the same cache column again
            _COMPILED["failed"] = f"{type(e).__name__}: {str(e)[:200]}"
            import logging

            logging.getLogger(__name__).warning("MUSK_DECODE_COMPILE=1: torch.compile failed (%s); decoding "
                                                "with the eager step", _COMPILED["failed"])
            h = _layer_t1(h, *args)
    return _norm(h, W.final_norm, W.eps, False)


def embed(W: Weights, ids: torch.Tensor) -> torch.Tensor:
    """Token embeddings [N, T, d] as the model's embedding module gives them (Gemma: scaled)."""
    e = F.embedding(ids, W.embed)
    return e * W.embed_scale if W.embed_scale is not None else e


class GraphedStep:
    """A fixed-shape step fn(nxt [N], col [], pos [N]) -> logits [N, V], captured as one CUDA graph
    (torch.cuda.graph) and replayed: one launch a token instead of one per operation. The inputs are
    copied into the graph's static tensors before each replay; the output tensor is the graph's own
    (read it before the next replay). The warm-up runs on the real first inputs, so the cache writes
    it makes are the ones the first replay makes again."""

    def __init__(self, fn, nxt: torch.Tensor, col: torch.Tensor, pos: torch.Tensor):
        self.inputs = (nxt.clone(), col.clone(), pos.clone())
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(2):
                fn(*self.inputs)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.out = fn(*self.inputs)

    def __call__(self, nxt: torch.Tensor, col: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        for dst, src in zip(self.inputs, (nxt, col, pos)):
            dst.copy_(src, non_blocking=True)
        self.graph.replay()
        return self.out
