"""Linear weights held in oneDNN's blocked layout, for matmuls at decode batch sizes on a CPU.

`torch.ops.mkldnn._reorder_linear_weight` copies a weight [out, in] once into the layout oneDNN's
matmul reads fastest; `torch.ops.mkldnn._linear_pointwise` multiplies by it. This is what
torch.compile's CPU freezing emits for linears; here it is done by hand for the fused decode step
(pipeline/decode_step.py), which builds its weights once per weight set. It roughly halves the
matmul time of a bf16 token step at decode batch sizes, with bf16 results bit-identical to
F.linear's (the figures: docs/performance.md, "Other matmul paths tried").
"""

from __future__ import annotations

import torch


def can_pack(w: torch.Tensor) -> bool:
    """Whether oneDNN can hold w [out, in] in its blocked layout here: a CPU tensor in float32, or in
    bf16 where oneDNN has bf16 kernels for this CPU."""
    if w.device.type != "cpu" or not torch.backends.mkldnn.is_available():
        return False
    if w.dtype == torch.bfloat16:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return w.dtype == torch.float32


def pack(w: torch.Tensor) -> torch.Tensor | None:
    """oneDNN's blocked copy of a linear weight w [out, in] for `packed_linear`, or None where it
    cannot be made (`can_pack`). The hint (8 rows) picks the blocking; any row count runs on it."""
    if not can_pack(w):
        return None
    try:
        return torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), 8)
    except RuntimeError:  # a build whose oneDNN lacks the kernel: plain F.linear
        return None


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x [..., in] @ W^T + b on a `pack`ed W: [..., out], in x's dtype."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
