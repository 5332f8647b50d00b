// fa_mma.cuh: the warp-level tensor-core primitives of flash_fwd_mma.cu, as inline PTX.
// Inline PTX rather than mma.h/cuda_pipeline.h keeps NVRTC free of toolkit headers (it runs
// from pip wheels). ARCH selects the instruction set a kernel is built on, not the device
// it runs on: 80 = mma m16n8k16 + cp.async (sm_80+), 75 = mma m16n8k8 + plain loads (Turing).
// An ARCH 75 kernel runs on any later GPU too, which is how its path is tested on an H100.
#pragma once
#include "fa_dtypes.cuh"

template <typename A, typename B> struct fa_same { static constexpr bool value = false; };
template <typename A> struct fa_same<A, A> { static constexpr bool value = true; };

__device__ __forceinline__ unsigned smem_addr(const void* p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// 16 bytes global -> shared without passing through registers; bytes past src_bytes (0 or 16)
// are zero-filled, which is how rows past N and columns past d become zeros.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;"
                 :: "r"(smem_addr(dst)), "l"(src), "r"(src_bytes) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }

// Four 8x8 b16 matrices; lane l gives the shared-space address of row l % 8 of matrix l / 8.
// Without .trans register i of lane l holds row l/4, columns 2(l%4), +1 of matrix i; with
// .trans, the transpose. Addresses are 32-bit shared-space integers (smem_addr once, then
// constant offsets) so the compiler folds the offsets into the instruction.
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], unsigned addr) {
    if (TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3]) : "r"(addr));
}

// c += a b for a 16x16 (row-major) A and a 16x8 (column-major) B of T, fp32 accumulators, in
// the PTX ISA's fragment layout: a[0..3] = (row g, k 2t..2t+1), (g+8, 2t), (g, 2t+8), (g+8, 2t+8),
// b[0..1] = (k 2t, n g), (k 2t+8, n g), c[0..3] = (g, n 2t..2t+1), (g+8, n 2t..2t+1), where
// g = lane / 4 and t = lane % 4. ARCH 75 issues the k16 step as two m16n8k8 (fp16 only).
template <typename T, int ARCH>
__device__ __forceinline__ void mma_16x8x16(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    static_assert(ARCH == 80 || ARCH == 75, "ARCH is 75 or 80");
    if constexpr (ARCH == 80) {
        if constexpr (fa_same<T, fa_bfloat16>::value)
            asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
                         "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                         : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
        else
            asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
                         "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                         : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else {
        static_assert(fa_same<T, fa_half>::value, "Turing tensor cores take fp16, not bf16");
        asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 "
                     "{%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(b0));
        asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.f16.f16.f32 "
                     "{%0,%1,%2,%3}, {%4,%5}, {%6}, {%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[2]), "r"(a[3]), "r"(b1));
    }
}

// Two floats rounded to nearest into one b16x2 register, lo in the low half.
template <typename T, int ARCH>
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
    unsigned r;
    if constexpr (ARCH >= 80 && fa_same<T, fa_bfloat16>::value)
        asm("cvt.rn.bf16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    else if constexpr (ARCH >= 80)
        asm("cvt.rn.f16x2.f32 %0, %1, %2;" : "=r"(r) : "f"(hi), "f"(lo));
    else
        r = static_cast<unsigned>(from_float<T>(lo).bits) | (static_cast<unsigned>(from_float<T>(hi).bits) << 16);
    return r;
}

// 2^x by the SFU's ex2.approx (max relative error 2^-22, PTX ISA), results below 2^-126 flushed
// to zero: a weight that small next to the row max's 1 changes no fp32 sum, and -inf gives 0.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}
