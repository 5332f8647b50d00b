// fa_wgmma.cuh: Hopper's warpgroup MMA (wgmma, sm_90a) as inline PTX, and the 128-byte swizzled
// shared-memory tiles its descriptors read, with the fp16/bf16 kernels' epilogue and the warp-
// specialized kernel's barriers. The flash_fwd_wgmma* kernels include it; they are compiled for
// sm_90a (kernels.py), which no other GPU runs.
//
// A warpgroup (4 consecutive warps, the first a multiple of 4) issues one m64nNk16 MMA together:
// A (64 x 16) from shared memory or registers, B (16 x N) from shared memory, fp32 accumulators in
// registers, laid out per warp as mma.sync's m16n8 (fa_softmax.cuh): warp w of the group holds rows
// 16 w .. 16 w + 15, d[nt][e] = (row g + 8 (e / 2), column 8 nt + 2t + e % 2). The MMA runs
// asynchronously: its registers must not be touched between issue and wgmma_wait, and
// reg_fence tells the compiler so.
#pragma once
#include "fa_softmax.cuh"

// Tiles sit in the 128-byte swizzled panels of fa_mma.cuh's swz (load_tile with DP = 0), the
// layout wgmma's 128-byte swizzle mode reads: a panel starts on a 1024-byte boundary.

// A shared-memory matrix descriptor (PTX ISA, "matrix descriptor"): start address, leading and
// stride byte offsets (all >> 4), 128-byte swizzle (mode 1, bits 62-63). For a K-major operand
// (rows of the MMA's M or N, 16 k-elements contiguous) SBO = 1024 steps 8 rows and LBO is unused;
// for an MN-major one (transposed: N contiguous), LBO steps from one 64-column panel to the
// next along N and SBO = 1024 steps 8 rows along K.
__device__ __forceinline__ unsigned long long wgmma_desc(unsigned addr, unsigned lbo, unsigned sbo) {
    return (unsigned long long)((addr & 0x3FFFF) >> 4) | (unsigned long long)(lbo >> 4) << 16 |
           (unsigned long long)(sbo >> 4) << 32 | 1ull << 62;
}

__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
template <int N>
__device__ __forceinline__ void wgmma_wait() { asm volatile("wgmma.wait_group.sync.aligned %0;" :: "n"(N) : "memory"); }
// Shared memory written through the generic proxy (stores, cp.async) and read next by wgmma
// (the async proxy) needs this in each writing thread before the barrier.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }

// The compiler sees a register change here: reads after it stay after a wgmma_wait before it,
// and registers an in-flight MMA still reads are not reused before it.
template <int R, int C>
__device__ __forceinline__ void reg_fence(float (&x)[R][C]) {
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
        for (int j = 0; j < C; ++j) asm volatile("" : "+f"(x[i][j]) :: "memory");
}
template <int N>
__device__ __forceinline__ void reg_fence(unsigned (&x)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+r"(x[i]) :: "memory");
}
template <int R, int C>
__device__ __forceinline__ void reg_fence(unsigned (&x)[R][C]) {
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
        for (int j = 0; j < C; ++j) asm volatile("" : "+r"(x[i][j]) :: "memory");
}

#define FA_F4(x, c) "+f"(x[c][0]), "+f"(x[c][1]), "+f"(x[c][2]), "+f"(x[c][3])
#define FA_ACC_OPS32(x) FA_F4(x, 0), FA_F4(x, 1), FA_F4(x, 2), FA_F4(x, 3), FA_F4(x, 4), FA_F4(x, 5), FA_F4(x, 6), FA_F4(x, 7)
#define FA_ACC_OPS64(x) FA_F4(x, 0), FA_F4(x, 1), FA_F4(x, 2), FA_F4(x, 3), FA_F4(x, 4), FA_F4(x, 5), FA_F4(x, 6), FA_F4(x, 7), FA_F4(x, 8), FA_F4(x, 9), FA_F4(x, 10), FA_F4(x, 11), FA_F4(x, 12), FA_F4(x, 13), FA_F4(x, 14), FA_F4(x, 15)
#define FA_ACC32 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31}"
#define FA_ACC64 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63}"
// One asm statement per (shape, type); operand numbers follow the N / 2 accumulators.
#define FA_WGMMA_SS(SHAPE, TY, ACC, IA, IB, IS, OPS)                                               \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" IS ", 0;\n"                                  \
                 "wgmma.mma_async.sync.aligned." SHAPE ".f32." TY "." TY " " ACC ", %" IA ", %" IB   \
                 ", p, 1, 1, 0, 0;\n}\n"                                                           \
                 : OPS : "l"(a), "l"(b), "r"(accumulate))
#define FA_WGMMA_RS(SHAPE, TY, ACC, IA, IB, IS, OPS)                                               \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" IS ", 0;\n"                                  \
                 "wgmma.mma_async.sync.aligned." SHAPE ".f32." TY "." TY " " ACC ", " IA ", %" IB    \
                 ", p, 1, 1, 1;\n}\n"                                                              \
                 : OPS : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate))

// x (+)= A B, A (64 x 16) and B (16 x N, K-major) from shared memory by descriptors a and b;
// accumulate = 0 overwrites x (the first k-step of Sij = Qi Kj^T).
template <typename T, int N>
__device__ __forceinline__ void wgmma_ss(float (&x)[N / 8][4], unsigned long long a, unsigned long long b,
                                         int accumulate) {
    static_assert(N == 64 || N == 128, "the kernels' tiles: N = 64 or 128");
    constexpr bool BF16 = fa_same<T, fa_bfloat16>::value;
    if constexpr (N == 64 && BF16)
        FA_WGMMA_SS("m64n64k16", "bf16", FA_ACC32, "32", "33", "34", FA_ACC_OPS32(x));
    else if constexpr (N == 64)
        FA_WGMMA_SS("m64n64k16", "f16", FA_ACC32, "32", "33", "34", FA_ACC_OPS32(x));
    else if constexpr (BF16)
        FA_WGMMA_SS("m64n128k16", "bf16", FA_ACC64, "64", "65", "66", FA_ACC_OPS64(x));
    else
        FA_WGMMA_SS("m64n128k16", "f16", FA_ACC64, "64", "65", "66", FA_ACC_OPS64(x));
}

// x (+)= A B, A (64 x 16) from registers (each warp its 16 rows, mma.sync's A fragment) and B
// (16 x N) MN-major from shared memory by descriptor b (transposed: Vj's rows are keys, N is d).
template <typename T, int N>
__device__ __forceinline__ void wgmma_rs(float (&x)[N / 8][4], const unsigned (&a)[4], unsigned long long b,
                                         int accumulate) {
    static_assert(N == 64 || N == 128, "the kernels' tiles: N = 64 or 128");
    constexpr bool BF16 = fa_same<T, fa_bfloat16>::value;
    if constexpr (N == 64 && BF16)
        FA_WGMMA_RS("m64n64k16", "bf16", FA_ACC32, "{%32, %33, %34, %35}", "36", "37", FA_ACC_OPS32(x));
    else if constexpr (N == 64)
        FA_WGMMA_RS("m64n64k16", "f16", FA_ACC32, "{%32, %33, %34, %35}", "36", "37", FA_ACC_OPS32(x));
    else if constexpr (BF16)
        FA_WGMMA_RS("m64n128k16", "bf16", FA_ACC64, "{%64, %65, %66, %67}", "68", "69", FA_ACC_OPS64(x));
    else
        FA_WGMMA_RS("m64n128k16", "f16", FA_ACC64, "{%64, %65, %66, %67}", "68", "69", FA_ACC_OPS64(x));
}

// TF32 (fp32 operands, their low 13 bits ignored by the tensor core; flash_fwd_wgmma_f32_ws.cu):
// m64nNk8, both operands K-major (wgmma transposes 16-bit types only), so Vj goes to shared
// memory transposed. A k-step
// is 8 floats, 32 bytes: the same bytes into a 128-byte panel row as a 16-bit k-step of 16.
#define FA_ACC_OPS16(x) FA_F4(x, 0), FA_F4(x, 1), FA_F4(x, 2), FA_F4(x, 3)
#define FA_ACC16 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15}"
#define FA_ACC_OPS20(x) FA_ACC_OPS16(x), FA_F4(x, 4)
#define FA_ACC20 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19}"
#define FA_ACC_OPS24(x) FA_ACC_OPS16(x), FA_F4(x, 4), FA_F4(x, 5)
#define FA_ACC24 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23}"
#define FA_ACC_OPS48(x) FA_ACC_OPS32(x), FA_F4(x, 8), FA_F4(x, 9), FA_F4(x, 10), FA_F4(x, 11)
#define FA_ACC48 "{%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47}"
#define FA_WGMMA_TF32_SS(SHAPE, ACC, IA, IB, IS, OPS)                                              \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" IS ", 0;\n"                                  \
                 "wgmma.mma_async.sync.aligned." SHAPE ".f32.tf32.tf32 " ACC ", %" IA ", %" IB        \
                 ", p, 1, 1;\n}\n"                                                                 \
                 : OPS : "l"(a), "l"(b), "r"(accumulate))
#define FA_WGMMA_TF32_RS(SHAPE, ACC, IA, IB, IS, OPS)                                              \
    asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, %" IS ", 0;\n"                                  \
                 "wgmma.mma_async.sync.aligned." SHAPE ".f32.tf32.tf32 " ACC ", " IA ", %" IB         \
                 ", p, 1, 1;\n}\n"                                                                 \
                 : OPS : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate))

// x (+)= A B, A (64 x 8) and B (8 x N) from shared memory by descriptors (Sij = Qi Kj^T).
template <int N>
__device__ __forceinline__ void wgmma_tf32_ss(float (&x)[N / 8][4], unsigned long long a, unsigned long long b,
                                              int accumulate) {
    static_assert(N == 32 || N == 64, "the kernels' key tiles: 32 or 64");
    if constexpr (N == 32)
        FA_WGMMA_TF32_SS("m64n32k8", FA_ACC16, "16", "17", "18", FA_ACC_OPS16(x));
    else
        FA_WGMMA_TF32_SS("m64n64k8", FA_ACC32, "32", "33", "34", FA_ACC_OPS32(x));
}

// One MMA of N = 2 NH columns into two accumulators of NH: x (+)= A B0, y (+)= A B1 where B's
// 2 NH rows (K-major) are B0's then B1's (flash_fwd_wgmma_f32_ws.cu: Kj's hi and lo rows under
// one descriptor, so Qi's hi is read once for both products).
#define FA_ACC_OPS16x2(x, y) FA_ACC_OPS16(x), FA_ACC_OPS16(y)
#define FA_ACC_OPS32x2(x, y) FA_ACC_OPS32(x), FA_ACC_OPS32(y)
template <int NH>
__device__ __forceinline__ void wgmma_tf32_ss2(float (&x)[NH / 8][4], float (&y)[NH / 8][4], unsigned long long a,
                                               unsigned long long b, int accumulate) {
    static_assert(NH == 32 || NH == 64, "the kernel's key tiles: 32 or 64");
    if constexpr (NH == 32)
        FA_WGMMA_TF32_SS("m64n64k8", FA_ACC32, "32", "33", "34", FA_ACC_OPS16x2(x, y));
    else
        FA_WGMMA_TF32_SS("m64n128k8", FA_ACC64, "64", "65", "66", FA_ACC_OPS32x2(x, y));
}

// x (+)= A B, A (64 x 8) from registers (each warp its 16 rows, mma.sync m16n8k8 TF32's A
// fragment) and B (8 x N) from shared memory (Oi += Pij Vj, B = Vj^T's rows).
template <int N>
__device__ __forceinline__ void wgmma_tf32_rs(float (&x)[N / 8][4], const unsigned (&a)[4], unsigned long long b,
                                              int accumulate) {
    static_assert(N == 40 || N == 48 || N == 64 || N == 96 || N == 128,
                  "the kernels' head-dim bounds: 40, 48, 64, 96 or 128");
    if constexpr (N == 40)
        FA_WGMMA_TF32_RS("m64n40k8", FA_ACC20, "{%20, %21, %22, %23}", "24", "25", FA_ACC_OPS20(x));
    else if constexpr (N == 48)
        FA_WGMMA_TF32_RS("m64n48k8", FA_ACC24, "{%24, %25, %26, %27}", "28", "29", FA_ACC_OPS24(x));
    else if constexpr (N == 64)
        FA_WGMMA_TF32_RS("m64n64k8", FA_ACC32, "{%32, %33, %34, %35}", "36", "37", FA_ACC_OPS32(x));
    else if constexpr (N == 96)
        FA_WGMMA_TF32_RS("m64n96k8", FA_ACC48, "{%48, %49, %50, %51}", "52", "53", FA_ACC_OPS48(x));
    else
        FA_WGMMA_TF32_RS("m64n128k8", FA_ACC64, "{%64, %65, %66, %67}", "68", "69", FA_ACC_OPS64(x));
}

// Warp specialization (flash_fwd_wgmma_f32_ws.cu): mbarriers in shared memory (a 64-bit word each,
// 32-bit shared-space address), named barriers and the warpgroup register split.
__device__ __forceinline__ void mbar_init(unsigned bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" :: "r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void mbar_arrive(unsigned bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];" :: "r"(bar) : "memory");
}
// Until the phase of this parity has completed; the phase before a barrier's first (parity 1 on
// a fresh one) counts as completed, so a producer's first wait on a free buffer passes.
__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity) {
    asm volatile("{\n.reg .pred done;\nWAIT:\n"
                 "mbarrier.try_wait.parity.shared::cta.b64 done, [%0], %1;\n"
                 "@!done bra WAIT;\n}\n" :: "r"(bar), "r"(parity) : "memory");
}
// Named barrier `id` (1..15; 0 is __syncthreads') of `count` threads: sync waits, arrive does not.
__device__ __forceinline__ void named_sync(int id, int count) {
    asm volatile("bar.sync %0, %1;" :: "r"(id), "r"(count) : "memory");
}
__device__ __forceinline__ void named_arrive(int id, int count) {
    asm volatile("bar.arrive %0, %1;" :: "r"(id), "r"(count) : "memory");
}
// A warpgroup's registers a thread, handed back to (dec) or taken from (inc) the SM's pool.
template <int N> __device__ __forceinline__ void regs_dec() { asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;" :: "n"(N)); }
template <int N> __device__ __forceinline__ void regs_inc() { asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;" :: "n"(N)); }

// A place in a ring of STAGES buffers (the warp-specialized kernels): the buffer, and the parity
// of its barriers' phase (it flips each time the ring wraps). Producer and consumers step through
// the same sequence.
template <int STAGES>
struct fa_ring {
    int s = 0;
    unsigned ph = 0;
    __device__ void next() {
        if (++s == STAGES) {
            s = 0;
            ph ^= 1u;
        }
    }
};

// Lines 12-15 for one warp's 16 rows, wrow .. wrow + 15 of a BR-row tile (the fp16/bf16 wgmma
// kernels): Oi / li rounded to T into the warp's own rows of the swizzled tile `tile` (Qi's,
// which its MMAs are done reading; conflict-free), then out to Ot (the tile's first row of O) as
// whole 16-byte chunks, element by element where rows are not 16-byte aligned (o_vec false);
// Li = mi + ln li to Lt. Rows from `rows` on and columns from d on are not written.
template <typename T, int BR, int D>
__device__ __forceinline__ void store_rows(unsigned char* tile, const float (&o)[D / 8][4], float (&l)[2],
                                           const float (&m)[2], int wrow, int rows, int d, T* Ot, long long o_sn,
                                           bool o_vec, float* Lt) {
    constexpr int ND = D / 8;
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    float inv[2], lse[2];
    finish_rows(l, m, inv, lse);
#pragma unroll
    for (int r = 0; r < 2; ++r)
#pragma unroll
        for (int dt = 0; dt < ND; ++dt)
            *reinterpret_cast<unsigned*>(tile + swz<BR>(wrow + g + 8 * r, dt) + 4 * t) =
                pack2<T, 80>(out_value(o[dt][2 * r], inv[r]), out_value(o[dt][2 * r + 1], inv[r]));
    __syncwarp();
    for (int i = lane; i < 16 * ND; i += 32) {
        const int r = wrow + i / ND, c = i % ND;
        if (r >= rows || c * 8 >= d) continue;
        const unsigned char* src = tile + swz<BR>(r, c);
        T* dst = Ot + r * o_sn + c * 8;
        if (o_vec) {
            *reinterpret_cast<fa_u128*>(dst) = *reinterpret_cast<const fa_u128*>(src);
        } else {
            for (int e = 0; e < 8 && c * 8 + e < d; ++e)
                fa_elem<T>::set(dst[e], reinterpret_cast<const typename fa_elem<T>::bits*>(src)[e]);
        }
    }
    if (t == 0) {
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int row = wrow + g + 8 * r;
            if (row < rows) Lt[row] = lse[r];
        }
    }
}

// Lines 12-15 for one warp's 16 rows, wrow .. wrow + 15 of a tile (the fp32 wgmma kernels): Oi / li
// straight from the accumulators (rows g, g + 8, columns 8 dt + 2t, + 1) to Ot (the tile's first
// row of O); Li = mi + ln li to Lt. Rows from `rows` on and columns from d on are not written.
template <int D>
__device__ __forceinline__ void store_rows_f32(const float (&o)[D / 8][4], float (&l)[2], const float (&m)[2], int wrow,
                                               int rows, int d, float* Ot, long long o_sn, float* Lt) {
    const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    float inv[2], lse[2];
    finish_rows(l, m, inv, lse);
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int row = wrow + g + 8 * r;
        if (row >= rows) continue;
#pragma unroll
        for (int dt = 0; dt < D / 8; ++dt)
#pragma unroll
            for (int e = 0; e < 2; ++e) {
                const int c = dt * 8 + 2 * t + e;
                if (c < d) Ot[row * o_sn + c] = out_value(o[dt][2 * r + e], inv[r]);
            }
        if (t == 0) Lt[row] = lse[r];
    }
}
