// flash_fwd_wgmma_f32.cu: FlashAttention-2 forward, Algorithm 1, for fp32 inputs on Hopper's
// warpgroup MMA (wgmma, sm_90a only) as 3xTF32: each operand x = hi + lo in TF32, three MMAs
// hi hi' + hi lo' + lo hi', about fp32's accuracy (fa_mma.cuh's make_operand splits them, as in
// flash_fwd_mma.cu: both kernels compute the same products). fp32 accumulation, O and L fp32.
// (Plain TF32 stays on flash_fwd_mma.cu, which ran it faster at d = 128: BENCHMARKS.md.)
//
// The partition is flash_fwd_wgmma.cu's: a block of NWG warpgroups owns BR = 64 NWG rows of Q,
// warpgroup w rows 64 w .. 64 w + 63, and a key tile costs two MMA chains issued by the whole
// warpgroup:
//   Sij = Qi Kj^T   m64nBCk8, Qi and Kj from shared memory (K-major: rows of d);
//   Oi += Pij Vj    m64nDk8, Pij from registers (the Sij accumulators, fa_mma.cuh's p_operand)
//                   and Vj^T from shared memory: TF32 wgmma reads K-major operands only, so Vj
//                   lands in a staging buffer (16-byte cp.async, padded rows) and the block
//                   transposes it into Vj^T, rows of d holding BC keys (transpose_v). Pij's
//                   accumulator columns 2t, 2t + 1 are its A columns t, t + 4, so each 8 keys
//                   are stored in the order 0 2 4 6 1 3 5 7.
// Qi and Kj land raw and are rounded in place to hi, their lo written to a buffer of the same
// layout (split_tf32: same offsets); Vj^T's hi and lo come out of the transpose. The
// products go to fresh accumulators (scores KG k-steps at a time, Pij Vj a tile at a time) that
// are added to Sij and Oi rounding to nearest: the tensor core's own sums truncate, 2e-4
// relative over a whole row's keys (flash_fwd_mma.cu).
// Pipeline: tile j + 1's Kj (two raw buffers) and Vj (one staging buffer, free once transposed)
// stream in while tile j is computed; one barrier a tile after its transpose and split.
// Masks, online softmax, scale handling and the causal order are fa_softmax.cuh's and
// fa_mask.cuh's, with flash_fwd_wgmma.cu's argument list: the planner swaps kernels freely.
//
// Compile-time: the head-dim bound D (64, 96 or 128, d <= D zero-padded), warpgroups NWG, key tile
// BC (32 or 64), MASK (fa_mask.cuh). Shared memory, mirrored by planner.wgmma_f32_smem_bytes:
// 1 KB of alignment slack, Qi [BR][D] and its lo, two raw Kj [BC][D] and one lo, Vj^T [D][BC]
// and its lo, all 128-byte swizzled, then Vj's staging buffer [BC][D + 4] (padded rows: the
// transpose reads it without bank conflicts).
#include "fa_softmax.cuh"
#include "fa_wgmma.cuh"

// Vj (staging, [BC][D + 4] floats) -> Vj^T's hi and lo ([BC / 32][D][128 B] swizzled each,
// keys 8 kg + par + 2 i at position 8 kg + 4 par + i). A lane moves 4 keys x 4 floats of d: four
// 16-byte reads (keys 8 kg + par + {0, 2, 4, 6}, floats 4 c .. 4 c + 3), transposed in registers,
// four 16-byte writes (rows 4 c .. 4 c + 3 of Vj^T, chunk 2 kg + par). Lane q of each 8 takes kg =
// kg0 + q / 2, par = q % 2, c = c0 + 2 (q / 2) (mod D / 4): the 8 lanes of a 16-byte access phase
// then meet 8 distinct bank groups in both the reads (row pitch D + 4) and the swizzled writes.
template <int D, int BC, int NT>
__device__ __forceinline__ void transpose_v(const float* Vs, unsigned char* hi, unsigned char* lo) {
    constexpr int C = D / 4, ITEMS = BC / 32 * C;   // (kg0, c0) items, 8 lanes each
    const int q = threadIdx.x % 8, a = q / 2, par = q % 2;
    for (int it = threadIdx.x / 8; it < ITEMS; it += NT / 8) {
        const int kg = it / C * 4 + a, c = (it % C + 2 * a) % C;
        operand<4> x[4];   // x[i]: key 8 kg + par + 2 i, floats 4 c .. 4 c + 3
#pragma unroll
        for (int i = 0; i < 4; ++i)
            *reinterpret_cast<fa_u128*>(x[i].hi) =
                *reinterpret_cast<const fa_u128*>(Vs + (8 * kg + par + 2 * i) * (D + 4) + 4 * c);
#pragma unroll
        for (int e = 0; e < 4; ++e) {   // row 4 c + e of Vj^T: its 4 keys, one chunk
            operand<4> y;
#pragma unroll
            for (int i = 0; i < 4; ++i) y.hi[i] = x[i].hi[e];
            make_operand<float, 3>(y);
            const int off = swz<D>(4 * c + e, 2 * kg + par);
            *reinterpret_cast<fa_u128*>(hi + off) = *reinterpret_cast<const fa_u128*>(y.hi);
            *reinterpret_cast<fa_u128*>(lo + off) = *reinterpret_cast<const fa_u128*>(y.lo);
        }
    }
}

// Splits `bytes` of raw fp32 at hi (in place) into hi and lo (at lo, same offsets), 16 bytes a thread.
template <int NT>
__device__ __forceinline__ void split_tf32(unsigned char* hi, unsigned char* lo, int bytes) {
    for (int i = threadIdx.x * 16; i < bytes; i += NT * 16) {
        operand<4> x;
        *reinterpret_cast<fa_u128*>(x.hi) = *reinterpret_cast<const fa_u128*>(hi + i);
        make_operand<float, 3>(x);
        *reinterpret_cast<fa_u128*>(hi + i) = *reinterpret_cast<const fa_u128*>(x.hi);
        *reinterpret_cast<fa_u128*>(lo + i) = *reinterpret_cast<const fa_u128*>(x.lo);
    }
}

template <int D, int NWG, int BC, int MASK>
__global__ void __launch_bounds__(NWG * 128, 1)
flash_fwd_wgmma_f32(const float* __restrict__ Q, const float* __restrict__ K, const float* __restrict__ V,
                    const float* __restrict__ alibi, const int* __restrict__ cu_q, const int* __restrict__ cu_k,
                    float* __restrict__ O, float* __restrict__ L,
                    int B, int H, int group, int Nq, int Nk, int d, int win_left, int win_right,
                    long long q_sb, long long q_sh, long long q_sn,
                    long long k_sb, long long k_sh, long long k_sn,
                    long long v_sb, long long v_sh, long long v_sn,
                    long long o_sb, long long o_sh, long long o_sn,
                    long long l_sb, long long l_sh,
                    float scale, float softcap)
{
    constexpr int BR = 64 * NWG, NT = 128 * NWG;
    constexpr int NS = BC / 8, ND = D / 8, KS = D / 8;     // 8-key tiles of Sij, 8-wide tiles of Oi, k-steps
    constexpr int KG = 2;                                   // k-steps a fresh score accumulator takes (as the mma kernel)
    constexpr int QB = BR * D * 4, KB = BC * D * 4;         // bytes of Qi, of Kj (and of Vj^T)
    static_assert((D == 64 || D == 96 || D == 128) && (BC == 32 || BC == 64) && KS % KG == 0, "tiles");
    constexpr float LOG2E = 1.4426950408889634f;

    extern __shared__ __align__(1024) unsigned char smem_raw[];
    unsigned char* Qs = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);   // [D/32][BR][128 B]
    unsigned char* Ks = Qs + 2 * QB;                                 // Qi's lo between; raw Kj s at Ks + s KB
    unsigned char* Klo = Ks + 2 * KB;
    unsigned char* Vt = Klo + KB;                                    // Vj^T, then its lo
    float* Vs = reinterpret_cast<float*>(Vt + 2 * KB);               // staging [BC][D + 4]
    const unsigned q_base = smem_addr(Qs), k_raw = smem_addr(Ks), k_lo = smem_addr(Klo);
    const unsigned v_base = smem_addr(Vt), v_lo = v_base + KB, q_lo = q_base + QB;

    const float neg_inf = __int_as_float(0xff800000);
    const float sl2 = MASK == FA_MODS ? 1.f : fmaxf(fabsf(scale) * LOG2E, 1.17549435e-38f);
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, wg = warp / 4;
    const fa_block blk = fa_block::of<MASK>();   // causal: heaviest Q tiles first
    const int row0 = blk.tile * BR;
    const bool q_vec = vec_ok(Q, q_sb, q_sh, q_sn, d), k_vec = vec_ok(K, k_sb, k_sh, k_sn, d);
    const bool v_vec = vec_ok(V, v_sb, v_sh, v_sn, d);

    for (int b = blk.b; b < B; b += gridDim.z)
    for (int h = blk.h; h < H; h += gridDim.y) {
        const fa_seq sq = fa_seq::of(b, row0, Nq, Nk, cu_q, cu_k);
        if (sq.rows <= 0) continue;   // varlen: a shorter sequence has no row in this tile
        const int rows = min(BR, sq.rows), nk = sq.nk;
        const fa_window win = fa_window::of(sq, win_left, win_right);
        int j0 = 0, j1 = (nk + BC - 1) / BC;
        if (MASK) win.tiles(row0, rows, BC, j0, j1);
        const float slope = MASK == FA_MODS && alibi ? alibi[(long long)b * H + h] : 0.f;
        const float* Qbh = Q + b * q_sb + h * q_sh + (sq.q0 + row0) * q_sn;
        const float* Kbh = K + b * k_sb + (h / group) * k_sh + sq.k0 * k_sn;
        const float* Vbh = V + b * v_sb + (h / group) * v_sh + sq.k0 * v_sn;
        auto load_kv = [&](int j, int stage) {   // line 7: Kj into raw buffer `stage`, Vj into staging
            const long long c0 = (long long)j * BC;
            load_tile<float, BC, D, 0, NT, 80>(reinterpret_cast<unsigned*>(Ks + stage * KB), Kbh + c0 * k_sn, k_sn,
                                               nk - (int)c0, d, k_vec);
            load_tile<float, BC, D, D + 4, NT, 80>(reinterpret_cast<unsigned*>(Vs), Vbh + c0 * v_sn, v_sn,
                                                   nk - (int)c0, d, v_vec);
        };

        // Line 4: Qi, with K(j0) and V(j0) behind it.
        load_tile<float, BR, D, 0, NT, 80>(reinterpret_cast<unsigned*>(Qs), Qbh, q_sn, rows, d, q_vec);
        if (j0 < j1) load_kv(j0, 0);
        cp_async_commit();

        float o[ND][4] = {};   // line 5: Oi = 0, mi = -inf, li = 0
        float m[2] = {neg_inf, neg_inf}, l[2] = {0.f, 0.f};
        for (int j = j0; j < j1; ++j) {   // line 6
            const int stage = (j - j0) % 2, col0 = j * BC;
            cp_async_wait_all();
            __syncthreads();   // tile j has landed; every warpgroup is done with the buffers refilled next
            if (j == j0) {     // Qi once: s * scale = (-s) * |scale| (negated), then split
                if (scale < 0.f) {
                    for (int i = threadIdx.x; i < QB / 4; i += NT) reinterpret_cast<unsigned*>(Qs)[i] ^= 0x80000000u;
                    __syncthreads();
                }
                split_tf32<NT>(Qs, Qs + QB, QB);   // its lo right after it
            }
            transpose_v<D, BC, NT>(Vs, Vt, Vt + KB);
            split_tf32<NT>(Ks + stage * KB, Klo, KB);
            fence_proxy_async();   // these stores (generic proxy) are read by wgmma (async proxy)
            __syncthreads();       // Vj^T and Kj's lo are whole; the staging buffer is free
            if (j + 1 < j1) load_kv(j + 1, 1 - stage);   // tile j + 1 streams in while tile j is computed
            cp_async_commit();
            const unsigned k_base = k_raw + stage * KB;

            // Line 8: Sij = Qi Kj^T, k-steps of 8 (32 bytes into a panel's 128-byte rows).
            auto qk = [&](float (&x)[NS][4], int kk, int first) {
                const unsigned qo = kk / 4 * BR * 128 + wg * 64 * 128 + (kk % 4) * 32, ko = kk / 4 * BC * 128 + (kk % 4) * 32;
                // the small products first
                wgmma_tf32_ss<BC>(x, wgmma_desc(q_lo + qo, 16, 1024), wgmma_desc(k_base + ko, 16, 1024), !first);
                wgmma_tf32_ss<BC>(x, wgmma_desc(q_base + qo, 16, 1024), wgmma_desc(k_lo + ko, 16, 1024), 1);
                wgmma_tf32_ss<BC>(x, wgmma_desc(q_base + qo, 16, 1024), wgmma_desc(k_base + ko, 16, 1024), 1);
            };
            // KG k-steps a group into two fresh accumulators in turn, each added to Sij as the next runs.
            float s[1][NS][4], part[2][NS][4];   // s: one m-tile of 16 rows a warp (fa_softmax.cuh's MT = 1)
#pragma unroll
            for (int g = 0; g <= KS / KG; ++g) {
                if (g < KS / KG) {
                    wgmma_fence();
#pragma unroll
                    for (int kk = g * KG; kk < g * KG + KG; ++kk) qk(part[g % 2], kk, kk == g * KG);
                    wgmma_commit();
                }
                if (g > 0) {
                    if (g < KS / KG) wgmma_wait<1>(); else wgmma_wait<0>();
                    reg_fence(part[(g - 1) % 2]);
#pragma unroll
                    for (int nt = 0; nt < NS; ++nt)
#pragma unroll
                        for (int e = 0; e < 4; ++e)
                            s[0][nt][e] = g == 1 ? part[0][nt][e] : s[0][nt][e] + part[(g - 1) % 2][nt][e];
                }
            }

            // Score mods, mask, online softmax and diag(alpha) Oi (fa_softmax.cuh) on this warp's rows.
            mask_scores<1, NS, MASK>(s, win, row0 + warp * 16, col0, nk, scale, softcap, slope);
            float alpha[2];
            if (__any_sync(0xffffffffu, softmax_rows<NS>(s[0], m, l, alpha, sl2))) rescale_rows<ND>(o, alpha);

            // Line 10: Oi += Pij Vj, k-steps of 8 keys (an 8-key Sij tile; 32 bytes into Vj^T's rows),
            // into a fresh accumulator for the tile, added to Oi rounding to nearest.
            operand<4> pa[NS];
#pragma unroll
            for (int kt = 0; kt < NS; ++kt) pa[kt] = p_operand<float, 3>(s[0][kt]);   // finite
            float po[ND][4];
            wgmma_fence();
#pragma unroll
            for (int kt = 0; kt < NS; ++kt) {
                const unsigned vo = kt / 4 * D * 128 + (kt % 4) * 32;
                wgmma_tf32_rs<D>(po, pa[kt].lo, wgmma_desc(v_base + vo, 16, 1024), kt > 0);
                wgmma_tf32_rs<D>(po, pa[kt].hi, wgmma_desc(v_lo + vo, 16, 1024), 1);
                wgmma_tf32_rs<D>(po, pa[kt].hi, wgmma_desc(v_base + vo, 16, 1024), 1);
            }
            wgmma_commit();
            wgmma_wait<0>();
            reg_fence(po);
#pragma unroll
            for (int kt = 0; kt < NS; ++kt) {   // in flight until the wait: not reused before it
                reg_fence(pa[kt].hi);
                reg_fence(pa[kt].lo);
            }
#pragma unroll
            for (int dt = 0; dt < ND; ++dt)
#pragma unroll
                for (int e = 0; e < 4; ++e) o[dt][e] += po[dt][e];
        }
        cp_async_wait_all();   // no key tile: Qi's copies are still to be waited for
        __syncthreads();       // every warpgroup is done with Qi before the next (batch, head) reloads it

        // Lines 12-15: Oi / li straight from the accumulators (rows g, g + 8 of this warp's 16,
        // columns 8 dt + 2t, + 1); Li = mi + log li.
        float inv[2], lse[2];
        finish_rows(l, m, inv, lse);
        const int g = lane / 4, t = lane % 4;
        const long long q0 = fa_seq::first_row(b, cu_q);
        float* Obh = O + b * o_sb + h * o_sh + (q0 + row0) * o_sn;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int row = warp * 16 + g + 8 * r;
            if (row >= rows) continue;
#pragma unroll
            for (int dt = 0; dt < ND; ++dt)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    const int c = dt * 8 + 2 * t + e;
                    if (c < d) Obh[row * o_sn + c] = out_value(o[dt][2 * r + e], inv[r]);
                }
            if (t == 0) L[b * l_sb + h * l_sh + q0 + row0 + row] = lse[r];
        }
    }
}
