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
Padded batches: the 2D padding mask (transformers' FlashAttention mask function, which
register() installs) takes the padding out, and the sequences run packed through
flash_attn_varlen_func, as transformers does for flash-attn; padded query rows give zeros.
Forward only: run the model under torch.no_grad() or torch.inference_mode().

Not supported: other (4D or additive) attention masks, attention sinks and position biases;
each is refused with a ValueError naming it.
"""
from __future__ import annotations

from typing import Any

from .._typing import Array
from ..flash_attn_interface import flash_attn_func, flash_attn_varlen_func

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
    padding: Any = None if _is_no_op(attention_mask) else attention_mask
    if padding is not None and (padding.dim() != 2 or padding.dtype.is_floating_point):
        raise ValueError(f"{NAME} attention takes padding masks of shape (batch, keys) (register() installs "
                         f"transformers' FlashAttention mask function, which makes them), not custom attention "
                         f"masks (got shape {tuple(padding.shape)}, {padding.dtype}); use "
                         "attn_implementation='sdpa' for this model")
    is_causal = getattr(module, "is_causal", True) if is_causal is None else bool(is_causal)
    softcap = kwargs.get("softcap")
    options: dict[str, Any] = dict(dropout_p=dropout, softmax_scale=scaling, causal=is_causal,
                                   window_size=_window_size(kwargs.get("sliding_window")),
                                   softcap=0.0 if softcap is None else softcap)
    q, k, v = query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2)
    if padding is not None:
        return _unpadded(q, k, v, padding, options), None
    return flash_attn_func(q, k, v, **options), None


def _unpadded(q: Any, k: Any, v: Any, mask: Any, options: dict) -> Any:
    """Attention for a padded batch: q (batch, q_len, heads, d), k, v (batch, kv_len, kv_heads, d),
    mask (batch, keys) bool, True on real tokens. The real rows are packed and run as one varlen
    call, the rows taken as transformers' flash-attn path (_upad_input) takes them: k and v cut to
    the mask's length (a static cache's are longer); the queries the same rows as the keys when
    q_len == kv_len, each sequence's one query when q_len == 1 (decoding), else the last q_len
    positions of the mask (padding on the left). Returns (batch, q_len, heads, d), zeros on
    padded query rows."""
    import torch
    batch, q_len, heads, d = q.shape
    mask_k = mask.bool()[:, -k.shape[1]:]
    k, v = k[:, :mask_k.shape[1]], v[:, :mask_k.shape[1]]
    mask_q = mask_k if q_len == k.shape[1] else torch.ones_like(mask_k[:, :1]) if q_len == 1 else mask_k[:, -q_len:]
    packed, offsets, longest = [], [], []
    for m, x in ((mask_q, q), (mask_k, k), (mask_k, v)):
        packed.append(x.reshape(-1, *x.shape[2:])[m.reshape(-1)])
    for m in (mask_q, mask_k):
        lengths = m.sum(dim=1, dtype=torch.int32)
        offsets.append(torch.nn.functional.pad(lengths.cumsum(0, dtype=torch.int32), (1, 0)))
        longest.append(int(lengths.max()))
    out = flash_attn_varlen_func(*packed, *offsets, *longest, **options)
    full = out.new_zeros((batch * q_len, heads, d))
    full[mask_q.reshape(-1)] = out
    return full.view(batch, q_len, heads, d)


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
