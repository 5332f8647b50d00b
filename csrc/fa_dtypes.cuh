// fa_dtypes.cuh: the element types the kernels read and write, and their fp32 conversions.
// Self-contained on purpose (no cuda_fp16.h / cuda_bf16.h): NVRTC from a pip wheel may not
// find the toolkit headers, and these two conversions are all the SIMT kernels need.
#pragma once

struct fa_half { unsigned short bits; };      // IEEE binary16
struct fa_bfloat16 { unsigned short bits; };  // bfloat16: the high half of a binary32

__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(fa_half x) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(x.bits));
    return f;
}
__device__ __forceinline__ float to_float(fa_bfloat16 x) {
    return __uint_as_float(static_cast<unsigned>(x.bits) << 16);
}

template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ fa_half from_float<fa_half>(float x) {
    fa_half h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h.bits) : "f"(x));
    return h;
}
template <> __device__ __forceinline__ fa_bfloat16 from_float<fa_bfloat16>(float x) {
    // Round to nearest even in integer arithmetic (cvt.rn.bf16.f32 needs sm_80; this runs on sm_75).
    unsigned u = __float_as_uint(x);
    fa_bfloat16 b;
    if ((u & 0x7fffffffu) > 0x7f800000u) {
        b.bits = static_cast<unsigned short>((u >> 16) | 0x40u);  // NaN stays a (quiet) NaN
    } else {
        b.bits = static_cast<unsigned short>((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
    }
    return b;
}
