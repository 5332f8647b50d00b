// flash_fwd_wgmma.cu: FlashAttention-2 forward, Algorithm 1, on Hopper's warpgroup MMA (wgmma,
// sm_90a only), fp16/bf16 in, fp32 accumulation, O in the input type and L in fp32.
//
// A block of NWG warpgroups owns a Q tile of BR = 64 * NWG rows; warpgroup w computes rows
// 64 w .. 64 w + 63 (each of its warps 16 of them) with two MMAs a key tile, both issued by the
// whole warpgroup and reading shared memory directly (no ldmatrix):
//   Sij = Qi Kj^T   m64nBCk16, A = Qi and B = Kj from shared memory (K-major: rows of d);
//   Oi += Pij Vj    m64nDk16, A = Pij from registers (the Sij accumulators rounded to T, as in
//                   flash_fwd_mma.cu) and B = Vj from shared memory, transposed (MN-major).
// Qi, Kj and Vj sit in the 128-byte swizzled layout the MMA reads (fa_mma.cuh, swz): conflict-free
// without padding. Kj and Vj stream through two buffers by cp.async, tile j + 1 loading while
// tile j is computed, one barrier a tile. Two blocks share an SM (launch bounds: at most 128
// registers a thread at NWG = 2), so one block's MMAs run while the other does its softmax, its
// prologue or its epilogue: an H200 sweep measured that ahead of one block with three stages
// and P(j-1) V(j-1) overlapping tile j's softmax inside it (FlashAttention-3's in-warpgroup
// pipelining), and ahead of 3 warpgroups a block at all but the longest calls (planner.py). Row work (mask, online softmax in exp2 with
// the scale folded into the exponent, rescale, the final Oi / li and Li) is fa_softmax.cuh's, as
// in flash_fwd_mma.cu, whose argument list, scale handling (negative: Qi negated once; zero:
// FLT_MIN) and causal order (heaviest Q tiles first) this kernel keeps: the planner swaps one for
// the other.
//
// Compile-time: T (fa_half, fa_bfloat16), the head-dim bound D (64 or 128, d <= D zero-padded),
// warpgroups NWG (1 or 2), key tile BC (64 or 128), MASK (fa_mask.cuh). Shared memory, mirrored by
// planner.wgmma_smem_bytes: 1 KB of alignment slack, Qi [BR][D], then 2 x (Kj, Vj [BC][D]).
#include "fa_softmax.cuh"
#include "fa_wgmma.cuh"

template <typename T, int D, int NWG, int BC, int MASK>
__global__ void __launch_bounds__(NWG * 128, 2)
flash_fwd_wgmma(const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V,
                const float* __restrict__ alibi, const int* __restrict__ cu_q, const int* __restrict__ cu_k,
                T* __restrict__ O, float* __restrict__ L,
                int B, int H, int group, int Nq, int Nk, int d, int win_left, int win_right,
                long long q_sb, long long q_sh, long long q_sn,
                long long k_sb, long long k_sh, long long k_sn,
                long long v_sb, long long v_sh, long long v_sn,
                long long o_sb, long long o_sh, long long o_sn,
                long long l_sb, long long l_sh,
                float scale, float softcap)
{
    constexpr int BR = 64 * NWG, NT = 128 * NWG;
    constexpr int ARCH = 80;                        // pack2's cvt.rn.{f16,bf16}x2 (sm_80+)
    constexpr int NS = BC / 8, ND = D / 8, KS = D / 16;
    constexpr int QB = BR * D * 2, KB = BC * D * 2; // bytes of Qi, of Kj (and of Vj)
    static_assert(sizeof(T) == 2, "fp16 / bf16 only");
    static_assert((D == 64 || D == 128) && (BC == 64 || BC == 128), "wgmma N = 64 or 128");
    static_assert(NWG == 1 || NWG == 2, "two blocks an SM: 128 registers a thread at NWG = 2");
    constexpr float LOG2E = 1.4426950408889634f;

    extern __shared__ __align__(1024) unsigned char smem_raw[];
    unsigned char* Qs = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);   // [D/64][BR][128 B]
    unsigned char* KV = Qs + QB;   // buffer s: Kj at KV + 2 s KB, Vj at KV + (2 s + 1) KB, [D/64][BC][128 B]
    const unsigned q_base = smem_addr(Qs), kv_base = smem_addr(KV);
    auto tile_at = [](unsigned char* p) { return reinterpret_cast<typename fa_elem<T>::bits*>(p); };   // load_tile's type

    const float neg_inf = __int_as_float(0xff800000);
    const float sl2 = MASK == FA_MODS ? 1.f : fmaxf(fabsf(scale) * LOG2E, 1.17549435e-38f);
    const int warp = threadIdx.x / 32, wg = warp / 4;
    const fa_block blk = fa_block::of<MASK>();   // causal: heaviest Q tiles first
    const int row0 = blk.tile * BR;
    const bool q_vec = vec_ok(Q, q_sb, q_sh, q_sn, d), k_vec = vec_ok(K, k_sb, k_sh, k_sn, d);
    const bool v_vec = vec_ok(V, v_sb, v_sh, v_sn, d), o_vec = vec_ok(O, o_sb, o_sh, o_sn, d);

    for (int b = blk.b; b < B; b += gridDim.z)
    for (int h = blk.h; h < H; h += gridDim.y) {
        const fa_seq sq = fa_seq::of(b, row0, Nq, Nk, cu_q, cu_k);
        if (sq.rows <= 0) continue;   // varlen: a shorter sequence has no row in this tile
        const int rows = min(BR, sq.rows), nk = sq.nk;
        const fa_window win = fa_window::of(sq, win_left, win_right);
        int j0 = 0, j1 = (nk + BC - 1) / BC;
        if (MASK) win.tiles(row0, rows, BC, j0, j1);
        const float slope = MASK == FA_MODS && alibi ? alibi[(long long)b * H + h] : 0.f;
        const T* Qbh = Q + b * q_sb + h * q_sh + (sq.q0 + row0) * q_sn;
        const T* Kbh = K + b * k_sb + (h / group) * k_sh + sq.k0 * k_sn;
        const T* Vbh = V + b * v_sb + (h / group) * v_sh + sq.k0 * v_sn;
        auto load_kv = [&](int j, int stage) {   // line 7: Kj and Vj into buffer `stage`
            const long long c0 = (long long)j * BC;
            load_tile<T, BC, D, 0, NT, ARCH>(tile_at(KV + 2 * stage * KB), Kbh + c0 * k_sn, k_sn, nk - (int)c0, d, k_vec);
            load_tile<T, BC, D, 0, NT, ARCH>(tile_at(KV + (2 * stage + 1) * KB), Vbh + c0 * v_sn, v_sn, nk - (int)c0, d,
                                             v_vec);
        };

        // Line 4: Qi, with K(j0) and V(j0) behind it.
        load_tile<T, BR, D, 0, NT, ARCH>(tile_at(Qs), Qbh, q_sn, rows, d, q_vec);
        if (j0 < j1) load_kv(j0, 0);
        cp_async_commit();

        float o[ND][4] = {};   // line 5: Oi = 0, mi = -inf, li = 0
        float m[2] = {neg_inf, neg_inf}, l[2] = {0.f, 0.f};
        for (int j = j0; j < j1; ++j) {   // line 6
            const int stage = (j - j0) % 2, col0 = j * BC;
            cp_async_wait_all();
            fence_proxy_async();   // the copies (generic proxy) are read by wgmma (async proxy)
            __syncthreads();       // tile j has landed; every warp is done with the buffer refilled next
            if (j == j0 && scale < 0.f) {   // s * scale = (-s) * |scale|: negate Qi once
                for (int i = threadIdx.x; i < QB / 4; i += NT) reinterpret_cast<unsigned*>(Qs)[i] ^= 0x80008000u;
                fence_proxy_async();
                __syncthreads();
            }
            if (j + 1 < j1) {   // tile j + 1 streams in while tile j is computed
                load_kv(j + 1, 1 - stage);
                cp_async_commit();
            }
            const unsigned k_base = kv_base + 2 * stage * KB, v_base = k_base + KB;

            // Line 8: Sij = Qi Kj^T over KS k-steps of 16 (32 bytes into a panel's 128-byte rows).
            float s[1][NS][4];   // one m-tile of 16 rows a warp (fa_softmax.cuh's MT = 1)
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < KS; ++kk) {
                const unsigned k_off = (kk % 4) * 32;   // within the 128-byte row; panels kk / 4
                wgmma_ss<T, BC>(s[0], wgmma_desc(q_base + kk / 4 * BR * 128 + wg * 64 * 128 + k_off, 16, 1024),
                                wgmma_desc(k_base + kk / 4 * BC * 128 + k_off, 16, 1024), kk > 0);
            }
            wgmma_commit();
            wgmma_wait<0>();
            reg_fence(s[0]);

            // Score mods, mask, online softmax and diag(alpha) Oi (fa_softmax.cuh) on this warp's rows.
            mask_scores<1, NS, MASK>(s, win, row0 + warp * 16, col0, nk, scale, softcap, slope);
            float alpha[2];
            if (__any_sync(0xffffffffu, softmax_rows<NS>(s[0], m, l, alpha, sl2))) rescale_rows<ND>(o, alpha);

            // Line 10: Oi += Pij Vj, k-steps of 16 keys (2048 bytes of Vj).
            unsigned pa[BC / 16][4];
#pragma unroll
            for (int kk = 0; kk < BC / 16; ++kk) p_fragment<T, ARCH, NS>(pa[kk], s[0], kk);
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < BC / 16; ++kk)
                wgmma_rs<T, D>(o, pa[kk], wgmma_desc(v_base + kk * 16 * 128, BC * 128, 1024), 1);
            wgmma_commit();
            wgmma_wait<0>();
            reg_fence(o);
            reg_fence(pa);
        }
        cp_async_wait_all();   // no key tile: Qi's copies are still to be waited for
        __syncthreads();       // every MMA is done reading Qi: its rows take Oi on the way out

        // Lines 12-15 (fa_wgmma.cuh), through this warp's own rows of Qs.
        const long long q0 = fa_seq::first_row(b, cu_q);
        store_rows<T, BR, D>(Qs, o, l, m, warp * 16, rows, d, O + b * o_sb + h * o_sh + (q0 + row0) * o_sn, o_sn, o_vec,
                             L + b * l_sb + h * l_sh + q0 + row0);
        __syncthreads();   // smem is reused by the next (batch, head)
    }
}
