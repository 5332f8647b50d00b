"""flashattn_cupy: FlashAttention-2 forward as NVRTC-compiled CUDA kernels (through CuPy) and a
plain C twin (through cffi), behind one function for NumPy and CuPy arrays."""
from ._device import BackendUnavailableError
from .api import flash_attention, plan_for
from .flash_attn_interface import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
from .kvcache import flash_attention_kvcache
from .merge import merge_attention
from .planner import Plan, plan
from .varlen import flash_attention_varlen

__version__ = "0.1.0"
__all__ = ["flash_attention", "flash_attention_kvcache", "flash_attention_varlen", "flash_attn_func",
           "flash_attn_varlen_func", "flash_attn_with_kvcache", "merge_attention", "plan", "plan_for", "Plan",
           "BackendUnavailableError", "__version__"]
