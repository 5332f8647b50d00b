"""The public API's type aliases (the package ships py.typed, so type checkers read them)."""
from typing import Any, Literal, TypeAlias

# A NumPy or CuPy array, a torch tensor, a JAX array, or any array with __dlpack__ or
# __cuda_array_interface__. These libraries share no base type (and CuPy has no stubs), so
# this is Any; the functions return the caller's kind, which no static type can follow here.
Array: TypeAlias = Any
Backend: TypeAlias = Literal["auto", "c", "cuda", "reference"]
Fp32Kernel: TypeAlias = Literal["auto", "3xtf32", "simt"]
