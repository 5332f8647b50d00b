// fa_mma.cuh: the warp-level tensor-core primitives of flash_fwd_mma.cu, as inline PTX.
// Inline PTX rather than mma.h/cuda_pipeline.h keeps NVRTC free of toolkit headers (it runs
// from pip wheels). ARCH selects the instruction set a kernel is built on, not the device
// it runs on: 80 = mma m16n8k16 (fp16/bf16) or m16n8k8 TF32 (fp32), with cp.async (sm_80+);
// 75 = mma m16n8k8 fp16 with plain loads (Turing). An ARCH 75 kernel runs on any later GPU too,
// which is how its path is tested on an H100.
#pragma once
#include "fa_async.cuh"
#include "fa_dtypes.cuh"

template <typename A, typename B> struct fa_same { static constexpr bool value = false; };
template <typename A> struct fa_same<A, A> { static constexpr bool value = true; };

// How an element type sits in memory: its bits, and VEC elements per 16-byte chunk.
template <typename T> struct fa_elem {   // fa_half, fa_bfloat16
    using bits = unsigned short;
    static constexpr int VEC = 8;
    static __device__ __forceinline__ bits get(T x) { return x.bits; }
    static __device__ __forceinline__ void set(T& x, bits b) { x.bits = b; }
};
template <> struct fa_elem<float> {
    using bits = unsigned;
    static constexpr int VEC = 4;
    static __device__ __forceinline__ bits get(float x) { return __float_as_uint(x); }
    static __device__ __forceinline__ void set(float& x, bits b) { x = __uint_as_float(b); }
};

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

// c += a b for one tensor-core tile, fp32 accumulators, in the PTX ISA's fragment layout with
// g = lane / 4, t = lane % 4: c[0..3] = (row g, n 2t..2t+1), (g+8, n 2t..2t+1). For 16-bit T,
// A is 16x16 row-major, a[0..3] = (g, k 2t..2t+1), (g+8, 2t), (g, 2t+8), (g+8, 2t+8), and B
// is 16x8 column-major, b0 = (k 2t..2t+1, n g), b1 = (k 2t+8.., n g); ARCH 75 issues the step
// as two m16n8k8 (fp16 only). For T = float the tile is m16n8k8 TF32: a[0..3] = (g, k t),
// (g+8, t), (g, t+4), (g+8, t+4), b0 = (k t, n g), b1 = (k t+4, n g).
template <typename T, int ARCH>
__device__ __forceinline__ void mma_tile(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
    static_assert(ARCH == 80 || ARCH == 75, "ARCH is 75 or 80");
    if constexpr (fa_same<T, float>::value) {
        static_assert(ARCH == 80, "TF32 tensor cores need sm_80");
        asm volatile("mma.sync.aligned.m16n8k8.row.col.f32.tf32.tf32.f32 "
                     "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    } else if constexpr (ARCH == 80) {
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

// A tensor-core operand of N registers: the value as the MMA takes it (hi) and, for 3xTF32,
// the remainder (lo). Unused lo registers cost nothing: the compiler drops them.
template <int N> struct operand { unsigned hi[N], lo[N]; };

// Raw bits in x.hi -> MMA operand. 16-bit types go as they are, and so does fp32 for TF32
// (PASSES 1): the tensor core reads the TF32 bits of an fp32 register (its low 13 bits are
// ignored: truncation), with no cvt.rna (a slow pipe) for every element loaded.
// 3xTF32 (PASSES 3, as CUTLASS's) splits x = hi + lo: hi * hi' + hi * lo' + lo * hi' then misses
// only lo * lo' and lo's truncation, about 2^-21 relative, near fp32. hi is x rounded to TF32;
// lo = x - hi (exact) goes as an fp32 register, truncated by the tensor core as above (as
// error-corrected TF32 GEMMs do).
template <typename T, int PASSES, int N>
__device__ __forceinline__ void make_operand(operand<N>& x) {
    if constexpr (fa_same<T, float>::value && PASSES == 3) {
#pragma unroll
        for (int i = 0; i < N; ++i) {
            // No conversion instruction (a slow pipe; 3xTF32 splits every operand element it
            // loads): hi is cvt.rna's TF32 by integer operations (half an ulp added to the
            // magnitude, the low 13 bits cleared; on an H200 12-13% faster, bit-identical), lo
            // unconverted (12-13% more, errors of the same size: BENCHMARKS.md). A NaN may wrap
            // to +-0 in hi; its remainder keeps the NaN.
            const float f = __uint_as_float(x.hi[i]);
            // An infinite x (or one that rounds up to infinity, |x| >= 0x7f7ff000's value) goes
            // as hi = +-1, lo = x, so that it meets only the other operand's hi: x y comes out
            // +-inf, or NaN where y = 0, as in exact arithmetic (hi = inf would meet the other's
            // lo, often 0). The flip of +-inf's bits to +-1's folds into the rounding's mask (one
            // LOP3) and its test reads x, not the rounded bits: the instruction count and depth of
            // a split without the fix (a test of the rounded bits cost 9% on an H200).
            const unsigned flip = fabsf(f) >= __uint_as_float(0x7f7ff000u) ? 0x40000000u : 0u;
            const unsigned h = ((x.hi[i] + 0x1000u) & 0xffffe000u) ^ flip;
            x.hi[i] = h;
            x.lo[i] = __float_as_uint(f - __uint_as_float(h));   // exact; NaN for NaN, x for +-inf
        }
    }
}

// c += a b over registers j, j + 1 of b, in 1 or 3 passes (the small products first).
template <typename T, int ARCH, int PASSES, int N>
__device__ __forceinline__ void mma_op(float (&c)[4], const operand<4>& a, const operand<N>& b, int j) {
    if constexpr (PASSES == 3) {
        mma_tile<T, ARCH>(c, a.lo, b.hi[j], b.hi[j + 1]);
        mma_tile<T, ARCH>(c, a.hi, b.lo[j], b.lo[j + 1]);
    }
    mma_tile<T, ARCH>(c, a.hi, b.hi[j], b.hi[j + 1]);
}

// An fp32 Pij accumulator tile as the A operand of an m16n8k8 TF32 MMA: accumulator columns
// 2t, 2t + 1 serve as A columns t, t + 4 (with Vj's rows to match).
template <typename T, int PASSES>
__device__ __forceinline__ operand<4> p_operand(const float (&c)[4]) {
    operand<4> a;
    a.hi[0] = __float_as_uint(c[0]);
    a.hi[1] = __float_as_uint(c[2]);
    a.hi[2] = __float_as_uint(c[1]);
    a.hi[3] = __float_as_uint(c[3]);
    make_operand<T, PASSES>(a);
    return a;
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

// Tile movement shared by flash_fwd_mma.cu and flash_decode.cu.
struct alignas(16) fa_u128 { unsigned x, y, z, w; };
struct alignas(8) fa_f2 { float x, y; };

template <typename T>
__device__ __forceinline__ bool vec_ok(const T* p, long long sb, long long sh, long long sn, int d) {
    // 16-byte loads need every row start 16-byte aligned: base, strides and d multiples of VEC.
    constexpr int VEC = fa_elem<T>::VEC;
    return (reinterpret_cast<unsigned long long>(p) & 15) == 0 && sb % VEC == 0 && sh % VEC == 0 &&
           sn % VEC == 0 && d % VEC == 0;
}

// A tile of ROWS rows in shared memory lies either in rows of DP elements (DP > 0; a 16-byte pad
// keeps ldmatrix free of bank conflicts) or, with DP = 0, in 128-byte swizzled panels: D / 64
// panels of [ROWS][128 bytes], the 16-byte chunk c of row r stored at chunk c ^ (r % 8) of its
// 128 bytes (address bits 4-6 xor bits 7-9 from a 128-byte-aligned tile; a wgmma operand's
// panel on a 1024-byte boundary, as its 128-byte swizzle mode reads). Swizzled, every 8 rows'
// chunk of one column fall in 8 distinct bank groups without a pad, and 128 bytes of a global
// row land as 128 aligned bytes: cp.async then asks L2 for whole lines (padded rows, 16 bytes
// out of step with them, cost flash_decode 1.5x the L2 sectors in 2.6x the requests).
template <int ROWS>
__device__ __forceinline__ int swz(int r, int c16) {   // byte offset of row r's 16-byte chunk c16
    return (c16 / 8) * (ROWS * 128) + r * 128 + (((c16 % 8) ^ (r % 8)) << 4);
}
template <typename T, int ROWS, int DP>
__device__ __forceinline__ int tile_offset(int r, int c16) {   // bytes, either layout
    if constexpr (DP == 0)
        return swz<ROWS>(r, c16);
    else
        return r * DP * (int)sizeof(T) + c16 * 16;
}

// Rows [0, ROWS) x columns [0, D) of a tile into shared memory (tile_offset's layout); rows
// past `rows` and columns past d become zeros. 16-byte chunks when `vec`, elements otherwise.
// Row r starts at row(r) (r < rows only; `any` is a valid address for the chunks that copy
// nothing): a strided tile (load_tile below) or one gathered from the pages of a paged KV cache.
template <typename T, int ROWS, int D, int DP, int NT, int ARCH, typename RowAt>
__device__ __forceinline__ void load_rows(typename fa_elem<T>::bits* dst, RowAt row, const T* any,
                                          int rows, int d, bool vec) {
    constexpr int VEC = fa_elem<T>::VEC, CH = D / VEC;
    for (int i = threadIdx.x; i < ROWS * CH; i += NT) {
        const int r = i / CH, c = (i % CH) * VEC;
        typename fa_elem<T>::bits* s = reinterpret_cast<typename fa_elem<T>::bits*>(
            reinterpret_cast<unsigned char*>(dst) + tile_offset<T, ROWS, DP>(r, i % CH));
        const bool in = r < rows && c < d;
        const T* g = in ? row(r) + c : any;
        if (vec) {
            if constexpr (ARCH >= 80) {
                cp_async_16(s, g, in ? 16 : 0);
            } else {
                const fa_u128 zero = {0u, 0u, 0u, 0u};
                *reinterpret_cast<fa_u128*>(s) = in ? *reinterpret_cast<const fa_u128*>(g) : zero;
            }
        } else {
#pragma unroll
            for (int e = 0; e < VEC; ++e) s[e] = (in && c + e < d) ? fa_elem<T>::get(g[e]) : 0;
        }
    }
}

template <typename T, int ROWS, int D, int DP, int NT, int ARCH>
__device__ __forceinline__ void load_tile(typename fa_elem<T>::bits* dst, const T* src, long long stride,
                                          int rows, int d, bool vec) {
    load_rows<T, ROWS, D, DP, NT, ARCH>(dst, [=](int r) { return src + r * stride; }, src, rows, d, vec);
}

// load_tile, but a whole tile (rows == ROWS, d == D, 16-byte rows) goes faster where each row's
// 16-byte chunks divide among the threads evenly (NT % (D / VEC) == 0): a thread's chunks then
// lie in one column, STEP = NT / (D / VEC) rows apart, so its addresses are a base and a fixed
// step, with no division, bounds test or size operand a chunk (~3 instructions a chunk, not ~12).
// Swizzled (DP = 0, STEP a power of two), row r0 + it STEP of a thread's first row r0 < STEP
// (or STEP a multiple of 8) has r0 % 8 ^ (it STEP) % 8 as its low three bits: a constant XOR
// an unrolled step (stepped_offset).
template <int STEP>
__device__ __forceinline__ unsigned stepped_offset(unsigned first, int it) {   // swizzled, from a 128-aligned base
    return (first ^ (((it * STEP) % 8) << 4)) + it * STEP * 128;
}
template <typename T, int ROWS, int D, int DP, int NT>
struct stepped_layout {   // a thread's chunks: column threadIdx.x % CH, rows threadIdx.x / CH + it STEP
    static constexpr int CH = D / fa_elem<T>::VEC, STEP = NT / CH;
    static constexpr bool ok = NT % CH == 0 && ROWS % STEP == 0 && (DP > 0 || (STEP & (STEP - 1)) == 0);
};
template <typename T, int ROWS, int D, int DP, int NT, int ARCH>
__device__ __forceinline__ void load_tile_stepped(typename fa_elem<T>::bits* dst, const T* src, long long stride,
                                                  int rows, int d, bool vec) {
    using layout = stepped_layout<T, ROWS, D, DP, NT>;
    constexpr int CH = layout::CH, STEP = layout::STEP;
    if constexpr (ARCH >= 80 && layout::ok) {
        if (rows == ROWS && d == D && vec) {
            const int r0 = threadIdx.x / CH, c16 = threadIdx.x % CH;
            const unsigned s = smem_addr(dst) + tile_offset<T, ROWS, DP>(r0, c16);
            const T* g = src + r0 * stride + c16 * fa_elem<T>::VEC;
#pragma unroll
            for (int it = 0; it < ROWS / STEP; ++it, g += STEP * stride)
                cp_async_16_full(DP > 0 ? s + it * STEP * DP * (int)sizeof(T) : stepped_offset<STEP>(s, it), g);
            return;
        }
    }
    load_tile<T, ROWS, D, DP, NT, ARCH>(dst, src, stride, rows, d, vec);
}
