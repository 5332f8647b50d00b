"""Hugging Face transformers: run a model's attention through flashattn_cupy.

    import flashattn_cupy.integrations.transformers as fa_transformers
    fa_transformers.register()                       # once per process
    model.set_attn_implementation(fa_transformers.NAME)   # or from_pretrained(..., attn_implementation=NAME)

`register()` adds our attention to transformers' AttentionInterface (and a mask function to its
AttentionMaskInterface, so that padding reaches us and is refused instead of being dropped).
CPU tensors run on the C twin (float32, float64), CUDA tensors on the CUDA kernels (float32,
float16, bfloat16) through DLPack with no copies, on torch's current stream. Causal or not,
the scale, grouped-query attention, sliding windows (Mistral, Gemma 2: `sliding_window`, as
transformers' FlashAttention path reads it) and logit softcapping (Gemma 2's
config.attn_logit_softcapping, passed as `softcap`) come from the model's attention module.
Forward only: run the model under torch.no_grad() or torch.inference_mode().

Not yet: padding masks (they need the varlen path, issue 8: until then a batch must be
unpadded, e.g. one sequence or sequences of one length), attention sinks and position biases;
each is refused with a ValueError naming it.
"""
from __future__ import annotations

from typing import Any

from .._typing import Array
from ..flash_attn_interface import flash_attn_func

# transformers treats names containing "flash" as requests for its own or a Hub kernel
NAME = "cupy_fa2"
_REFUSED = {"s_aux": "attention sinks", "position_bias": "position biases"}


def attention_forward(module: Any, query: Array, key: Array, value: Array, attention_mask: Array | None,
                      dropout: float = 0.0, scaling: float | None = None, is_causal: bool | None = None,
                      **kwargs: Any) -> tuple[Array, None]:
    """transformers' attention-function signature: query (batch, heads, seqlen_q, d), key and
    value (batch, kv_heads, seqlen_k, d); returns ((batch, seqlen_q, heads, d), None)."""
    for keyword, feature in _REFUSED.items():
        if kwargs.get(keyword) is not None:
            raise ValueError(f"{NAME} attention does not support {feature} ({keyword}={kwargs[keyword]!r}) "
                             "yet; use attn_implementation='sdpa' for this model")
    if not _is_no_op(attention_mask):
        raise ValueError(f"{NAME} attention takes no padding or custom attention masks yet (they need "
                         "the varlen path, issue 8): pass unpadded batches (one sequence, or sequences of "
                         "one length), or use attn_implementation='sdpa'")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)
    softcap = kwargs.get("softcap")
    out = flash_attn_func(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                          dropout_p=dropout, softmax_scale=scaling, causal=is_causal,
                          window_size=_window_size(kwargs.get("sliding_window")),
                          softcap=0.0 if softcap is None else softcap)
    return out, None


def _window_size(sliding_window) -> tuple[int, int]:
    """flash-attn's window_size for transformers' sliding_window, as its FlashAttention path has
    it: a query sees the sliding_window keys ending at its own (left sliding_window - 1), and as
    many after it unless causal (which makes right 0)."""
    if sliding_window is None:
        return -1, -1
    if isinstance(sliding_window, bool) or not isinstance(sliding_window, int) or sliding_window < 1:
        raise ValueError(f"sliding_window must be a positive int (keys a query sees, its own included), "
                         f"got {sliding_window!r}")
    return sliding_window - 1, sliding_window - 1


def _is_no_op(mask: Array | None) -> bool:
    """None, or a mask that masks nothing (additive and all 0, or boolean and all True)."""
    if mask is None:
        return True
    return not bool(mask.any()) if mask.dtype.is_floating_point else bool(mask.all())


def register(name: str = NAME) -> str:
    """Make `name` an attention implementation of transformers (idempotent); returns it."""
    if "flash" in name:
        raise ValueError(f"the name must not contain 'flash' (transformers would look for a kernel "
                         f"of that name), got {name!r}")
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask
    AttentionInterface.register(name, attention_forward)
    # FlashAttention's mask function: None when nothing is padded, else the 2D padding mask,
    # which attention_forward refuses. Without one, transformers would pass no mask at all.
    AttentionMaskInterface.register(name, flash_attention_mask)
    return name
