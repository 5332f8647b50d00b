// flash_fwd_wgmma_f32_ws.cu: FlashAttention-2 forward, Algorithm 1, for fp32 inputs as 3xTF32 on
// Hopper's warpgroup MMA with warp specialization (sm_90a only): each operand x = hi + lo in TF32
// (fa_mma.cuh's split, the mma kernel's products: hi hi' + hi lo' + lo hi'), fp32 accumulation,
// O and L fp32.
//
// TF32 wgmma reads K-major operands only, so Vj must be transposed, and every operand split:
// where the whole block does that between its MMAs (the kernel this one replaced, in git history,
// 67 TFLOP/s at d = 128 on an H200 against 82 here) the tensor cores wait for it, and shared
// memory holds raw tiles beside split ones. Here:
// - Warpgroup 0, the producer (PREGS registers a thread), loads Qi, Kj and Vj from global memory
//   into registers, splits them there and stores only the split tiles: Qi's hi and lo; Kj's hi
//   and lo rows stacked in one tile of 2 BC rows; Vj transposed into Vj^T's hi and lo. No raw copy lands in shared memory: half the stores and
//   reads of a staged copy. Each stored tile reports to an mbarrier (fence.proxy.async first: the
//   stores are generic-proxy writes read by wgmma). Kj and Vj have rings of KST and VST buffers.
// - Warpgroups 1 and 2, the consumers (CREGS registers), own 64 of the BR = 128 rows each:
//     Sij = Qi Kj^T    per k-step of 8: m64n(2 BC)k8 of Qi's hi against Kj's stacked hi and lo
//                      rows (hi hi' and hi lo' from one read of Qi's hi), then m64nBCk8 of Qi's
//                      lo against Kj's hi into the hi half; KG k-steps into a fresh accumulator,
//                      added to Sij rounding to nearest (the tensor core's sums truncate);
//     Sij's softmax    while the other consumer's MMAs run (they take turns issuing Sij's MMAs:
//                      two named barriers);
//     Oi += Pij Vj     Pij split in registers, three m64nDk8 from registers against Vj^T's hi and
//                      lo, into a fresh accumulator added to Oi in fp32 round-to-nearest.
//   Kj is freed as soon as Sij has landed, Vj once Pij Vj has.
// Row work, masks, scale handling, the causal order and the argument list are those of the other
// kernels: the planner swaps one for another.
//
// Compile-time: the head-dim bound D (40, 48, 64, 96 or 128; d <= D zero-padded), key tile BC (32
// or 64), ring sizes KST and VST, MASK (fa_mask.cuh). Shared memory, mirrored by
// planner.wgmma_f32_ws_smem_bytes: 1 KB of alignment slack, Qi's hi [DP][BR][128 B] and its lo,
// KST stacked Kj [DP][2 BC][128 B], VST x Vj^T's hi and lo [BC/32][D][128 B], all 128-byte
// swizzled (fa_mma.cuh's swz; DP = D / 32 panels rounded up: at D = 40 and 48 Qi and Kj take 64
// columns' room, their MMAs read D), then 2 + 2 KST + 2 VST mbarriers.
#include "fa_softmax.cuh"
#include "fa_wgmma.cuh"

constexpr int FA_PT = 128;   // producer threads

// The producer's thread index, read afresh where it is used: the asm is volatile, so the compiler
// cannot hoist the ~30 addresses and offsets derived from it out of the loops over tiles and
// heads, which would not fit in the producer's registers (it spilled them all).
__device__ __forceinline__ int producer_lane() {
    int t;
    asm volatile("mov.u32 %0, %%tid.x;" : "=r"(t));
    return t % FA_PT;
}

// Floats c .. c + 3 of row r of a strided fp32 tile as raw bits: zeros for rows from `rows` on
// and columns from d on. VEC: 16-byte rows (vec_ok: d % 4 == 0, so a chunk is all in or all out),
// one predicated load; else element by element. Callers branch on vec once, outside their loops.
template <bool VEC>
__device__ __forceinline__ void load4(unsigned (&x)[4], const float* src, long long stride, int r, int c, int rows,
                                      int d) {
    x[0] = x[1] = x[2] = x[3] = 0u;
    const bool in = r < rows && c < d;
    const float* g = src + (in ? r * stride + c : 0);
    if constexpr (VEC) {
        if (in) *reinterpret_cast<fa_u128*>(x) = *reinterpret_cast<const fa_u128*>(g);
    } else {
#pragma unroll
        for (int e = 0; e < 4; ++e)
            if (in && c + e < d) x[e] = __float_as_uint(g[e]);
    }
}

// N chunks of a row-major tile of TOTAL chunks (D / 4 a row) a producer thread: chunk
// (it0 + i) PT + tid, chunks in a row to consecutive threads (a warp reads whole rows). Where
// TOTAL is not a multiple of PT (D = 40, BC = 32) the last step's high threads have none: zeros.
template <int D, int N, int TOTAL>
__device__ __forceinline__ void load_chunks(unsigned (&x)[N][4], const float* src, long long stride, int rows, int d,
                                            bool vec, int it0) {
    constexpr int CH = D / 4;
    if (vec) {
#pragma unroll
        for (int i = 0; i < N; ++i) {
            const int k = (it0 + i) * FA_PT + producer_lane();
            const bool none = TOTAL % FA_PT != 0 && k >= TOTAL;
            load4<true>(x[i], src, stride, k / CH, k % CH * 4, none ? 0 : rows, d);
        }
    } else {
#pragma unroll
        for (int i = 0; i < N; ++i) {
            const int k = (it0 + i) * FA_PT + producer_lane();
            const bool none = TOTAL % FA_PT != 0 && k >= TOTAL;
            load4<false>(x[i], src, stride, k / CH, k % CH * 4, none ? 0 : rows, d);
        }
    }
}

// Those chunks (of TOTAL) split into hi (at hi, swizzled panels of PANEL rows) and lo (lo_off bytes past
// each hi chunk), signs flipped by `sign` (0x80000000 negates). A phase's 8 lanes store one
// 128-byte row: 8 distinct bank groups.
template <int PANEL, int D, int N, int TOTAL>
__device__ __forceinline__ void store_split(const unsigned (&x)[N][4], unsigned char* hi, int lo_off, int it0,
                                            unsigned sign) {
    constexpr int CH = D / 4;
#pragma unroll
    for (int i = 0; i < N; ++i) {
        const int k = (it0 + i) * FA_PT + producer_lane();
        if (TOTAL % FA_PT != 0 && k >= TOTAL) continue;   // past the tile (load_chunks' zeros)
        operand<4> y;
#pragma unroll
        for (int e = 0; e < 4; ++e) y.hi[e] = x[i][e] ^ sign;
        make_operand<float, 3>(y);
        const int off = swz<PANEL>(k / CH, k % CH);
        *reinterpret_cast<fa_u128*>(hi + off) = *reinterpret_cast<const fa_u128*>(y.hi);
        *reinterpret_cast<fa_u128*>(hi + off + lo_off) = *reinterpret_cast<const fa_u128*>(y.lo);
    }
}

// Vj -> Vj^T, in items of 4 keys x 4 floats: keys 8 kg + par + 2 i (i = 0..3) and floats
// 4 c .. 4 c + 3 become 16-byte chunk 2 kg + par of Vj^T's rows 4 c .. 4 c + 3, so that each 8
// keys lie in the order 0 2 4 6 1 3 5 7 (Pij's accumulator columns 2t, 2t + 1 are its A columns
// t, t + 4: fa_mma.cuh's p_operand). Lanes 8 q .. 8 q + 7 of a warp take one (kg, par) and 8
// consecutive c: a warp reads 4 whole 128-byte rows. The 8 lanes of a store phase write rows
// 4 c + e of one chunk column; lane c writes its rows rotated by (c / 2) % 4 (e = (s + rot) % 4
// at step s), so rows % 8 = 4 (c % 2) + e are 8 distinct: 8 bank groups after the swizzle.
template <int D, int BC>
struct v_items {   // octets: BC / 4 (kg, par) x D / 32 blocks of 8 c (D = 48: the second block half used)
    static constexpr int OCTETS = BC / 4 * ((D / 4 + 7) / 8), N = (OCTETS + FA_PT / 8 - 1) / (FA_PT / 8);
    // Item i of this thread: the 8-lane group's octet, its (kg, par) = kp and c; false: no item.
    __device__ static bool at(int i, int& kp, int& c) {
        const int p = producer_lane(), o = i * (FA_PT / 8) + p / 8;
        kp = o % (BC / 4);
        c = o / (BC / 4) * 8 + p % 8;
        return o < OCTETS && c < D / 4;
    }
};

template <int D, int BC, bool VEC>
__device__ __forceinline__ void load_v(unsigned (&x)[v_items<D, BC>::N][4][4], const float* src, long long stride,
                                       int rows, int d) {
#pragma unroll
    for (int i = 0; i < v_items<D, BC>::N; ++i) {
        int kp, c;
        const bool ok = v_items<D, BC>::at(i, kp, c);
#pragma unroll
        for (int k = 0; k < 4; ++k)
            load4<VEC>(x[i][k], src, stride, 8 * (kp / 2) + kp % 2 + 2 * k, 4 * c, ok ? rows : 0, d);
    }
}

// x (keys x floats) -> Vj^T's hi at vt and lo at vt + BC D 4, split on the way.
template <int D, int BC>
__device__ __forceinline__ void store_v(const unsigned (&x)[v_items<D, BC>::N][4][4], unsigned char* vt) {
    constexpr int LO = BC * D * 4;
#pragma unroll
    for (int i = 0; i < v_items<D, BC>::N; ++i) {
        int kp, c;
        if (!v_items<D, BC>::at(i, kp, c)) continue;
        const int rot = c / 2 % 4;
        unsigned y[4][4];   // y[k][s] = x[k][(s + rot) % 4]: a barrel shift by selects, no local memory
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            unsigned a[4];
#pragma unroll
            for (int s = 0; s < 4; ++s) a[s] = rot & 1 ? x[i][k][(s + 1) % 4] : x[i][k][s];
#pragma unroll
            for (int s = 0; s < 4; ++s) y[k][s] = rot & 2 ? a[(s + 2) % 4] : a[s];
        }
#pragma unroll
        for (int s = 0; s < 4; ++s) {   // row 4 c + (s + rot) % 4 of Vj^T: its 4 keys, one chunk
            operand<4> z;
#pragma unroll
            for (int k = 0; k < 4; ++k) z.hi[k] = y[k][s];
            make_operand<float, 3>(z);
            const int off = swz<D>(4 * c + (s + rot) % 4, kp);
            *reinterpret_cast<fa_u128*>(vt + off) = *reinterpret_cast<const fa_u128*>(z.hi);
            *reinterpret_cast<fa_u128*>(vt + LO + off) = *reinterpret_cast<const fa_u128*>(z.lo);
        }
    }
}

template <int D, int BC, int KST, int VST, int MASK>
__global__ void __launch_bounds__(384, 1)
flash_fwd_wgmma_f32_ws(const float* __restrict__ Q, const float* __restrict__ K, const float* __restrict__ V,
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
    constexpr int BR = 128, PREGS = 104, CREGS = 200;   // 128 x 104 + 256 x 200 = 384 x 168 (the launch's)
    // KG k-steps of Sij a fresh accumulator, whose sums the tensor core truncates. H200, the 3xTF32
    // accuracy test's inputs: KG = 4 (D = 48: 2) is 1-4% faster than 2 and its error on L at most
    // 1.05x the CUDA-core kernel's (KG = 2: 0.86x); 8 was 3-8% faster than 2, but 1.97x (2x allowed).
    // D = 40 has 5 k-steps: one group of 5.
    constexpr int NS = BC / 8, ND = D / 8, KS = D / 8, KG = KS % 4 == 0 ? 4 : KS % 5 == 0 ? 5 : 2;
    constexpr int DP = (D + 31) / 32;   // 128-byte panels a row of Qi or Kj (D = 40, 48: two, the second part used)
    constexpr int QB = DP * BR * 128, KB = DP * 2 * BC * 128, VB = 2 * BC * D * 4;   // Qi's hi; a K, a V buffer
    static_assert((D == 40 || D == 48 || D == 64 || D == 96 || D == 128) && (BC == 32 || BC == 64) && KS % KG == 0,
                  "tiles");
    static_assert(KST >= 1 && VST >= 1, "rings of at least one buffer");
    constexpr float LOG2E = 1.4426950408889634f;
    // mbarriers: Qi stored / free again, and per buffer Kj stored, Kj free, Vj stored, Vj free.
    // A stored-barrier counts the producer's threads, a free-barrier the 8 consumer warps.
    enum { Q_FULL = 0, Q_FREE = 1, K_FULL = 2, K_FREE = 2 + KST, V_FULL = 2 + 2 * KST, V_FREE = 2 + 2 * KST + VST,
           BARS = 2 + 2 * KST + 2 * VST };
    enum { TURN = 1 };   // named barriers TURN + w: consumer w may issue Sij's MMAs

    extern __shared__ __align__(1024) unsigned char smem_raw[];
    unsigned char* Qs = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);   // hi, then lo at + QB
    unsigned char* Ks = Qs + 2 * QB;   // buffer s at Ks + s KB: [DP][2 BC][128 B], hi rows then lo rows
    unsigned char* Vs = Ks + KST * KB; // buffer s at Vs + s VB: Vj^T's hi [BC/32][D][128 B], then its lo
    const unsigned q_base = smem_addr(Qs), k_base = smem_addr(Ks), v_base = smem_addr(Vs);
    const unsigned bar0 = smem_addr(Vs + VST * VB);
    auto bar = [&](int i) { return bar0 + 8u * i; };

    if (threadIdx.x == 0) {
        for (int i = 0; i < BARS; ++i)
            mbar_init(bar(i), i == Q_FULL || (i >= K_FULL && i < K_FREE) || (i >= V_FULL && i < V_FREE) ? FA_PT : 8);
    }
    __syncthreads();   // the only block-wide barrier: the roles part here

    const float neg_inf = __int_as_float(0xff800000);
    const float sl2 = MASK == FA_MODS ? 1.f : fmaxf(fabsf(scale) * LOG2E, 1.17549435e-38f);
    const fa_block blk = fa_block::of<MASK>();   // causal: heaviest Q tiles first
    const int row0 = blk.tile * BR;

    if (threadIdx.x < FA_PT) {   // ---- producer: Qi, then the key tiles, split in registers
        regs_dec<PREGS>();
        const bool q_vec = vec_ok(Q, q_sb, q_sh, q_sn, d), k_vec = vec_ok(K, k_sb, k_sh, k_sn, d);
        const bool v_vec = vec_ok(V, v_sb, v_sh, v_sn, d);
        const unsigned q_sign = scale < 0.f ? 0x80000000u : 0u;   // s * scale = (-s) * |scale|: Qi negated
        fa_ring<KST> ka;
        fa_ring<VST> va;
        unsigned heads = 0;   // (batch, head) pairs so far: Qi's barriers' phase
        for (int b = blk.b; b < B; b += gridDim.z)
        for (int h = blk.h; h < H; h += gridDim.y) {
            const fa_tile<MASK> tq = fa_tile<MASK>::of(b, row0, BR, BC, Nq, Nk, cu_q, cu_k, win_left, win_right);
            if (tq.rows <= 0) continue;   // varlen: a shorter sequence has no row in this tile
            const int nk = tq.sq.nk;
            const float* Qbh = Q + b * q_sb + h * q_sh + (tq.sq.q0 + row0) * q_sn;
            const float* Kbh = K + b * k_sb + (h / group) * k_sh + tq.sq.k0 * k_sn;
            const float* Vbh = V + b * v_sb + (h / group) * v_sh + tq.sq.k0 * v_sn;
            // Qi's chunks a thread (BR D / 4 / PT: D / 4 at BR = PT), a step of 8, 4 or 5 at a time
            constexpr int QN = BR * D / 4 / FA_PT, QSTEP = QN % 8 == 0 ? 8 : QN % 4 == 0 ? 4 : 5;
            static_assert(BR == FA_PT && QN % QSTEP == 0, "Qi in steps of 4, 5 or 8 chunks");
            mbar_wait(bar(Q_FREE), (heads & 1) ^ 1);   // the previous pair's MMAs are done with Qi
#pragma unroll 1
            for (int it = 0; it < QN; it += QSTEP) {   // line 4
                unsigned x[QSTEP][4];
                load_chunks<D, QSTEP, BR * D / 4>(x, Qbh, q_sn, tq.rows, d, q_vec, it);
                store_split<BR, D, QSTEP, BR * D / 4>(x, Qs, QB, it, q_sign);
            }
            fence_proxy_async();
            mbar_arrive(bar(Q_FULL));
            constexpr int KT = BC * D / 4, KN = (KT + FA_PT - 1) / FA_PT;   // Kj's chunks, a thread's
            for (int j = tq.j0; j < tq.j1; ++j) {   // line 7, KST / VST tiles ahead
                const long long c0 = (long long)j * BC;
                unsigned kx[KN][4], vx[v_items<D, BC>::N][4][4];   // both tiles' loads in flight at once
                load_chunks<D, KN, KT>(kx, Kbh + c0 * k_sn, k_sn, nk - (int)c0, d, k_vec, 0);
                if (v_vec)
                    load_v<D, BC, true>(vx, Vbh + c0 * v_sn, v_sn, nk - (int)c0, d);
                else
                    load_v<D, BC, false>(vx, Vbh + c0 * v_sn, v_sn, nk - (int)c0, d);
                mbar_wait(bar(K_FREE + ka.s), ka.ph ^ 1);   // the buffer's previous tile is done with
                store_split<2 * BC, D, KN, KT>(kx, Ks + ka.s * KB, BC * 128, 0, 0u);   // lo rows BC below hi
                fence_proxy_async();
                mbar_arrive(bar(K_FULL + ka.s));
                ka.next();
                mbar_wait(bar(V_FREE + va.s), va.ph ^ 1);
                store_v<D, BC>(vx, Vs + va.s * VB);
                fence_proxy_async();
                mbar_arrive(bar(V_FULL + va.s));
                va.next();
            }
            ++heads;
        }
        return;
    }

    // ---- consumers: warpgroup w (0, 1) of the two, its warps cw = 4 w .. 4 w + 3 of 8
    regs_inc<CREGS>();
    const int lane = threadIdx.x % 32, cw = threadIdx.x / 32 - 4, w = cw / 4;
    const unsigned q_lo = q_base + QB;
    fa_ring<KST> ka;
    fa_ring<VST> va;
    unsigned heads = 0;
    for (int b = blk.b; b < B; b += gridDim.z)
    for (int h = blk.h; h < H; h += gridDim.y) {
        const fa_tile<MASK> tq = fa_tile<MASK>::of(b, row0, BR, BC, Nq, Nk, cu_q, cu_k, win_left, win_right);
        if (tq.rows <= 0) continue;   // the producer skips it too
        const int rows = tq.rows, nk = tq.sq.nk, j0 = tq.j0, j1 = tq.j1;
        const float slope = MASK == FA_MODS && alibi ? alibi[(long long)b * H + h] : 0.f;

        mbar_wait(bar(Q_FULL), heads & 1);   // line 4: Qi
        float o[ND][4] = {};                 // line 5: Oi = 0, mi = -inf, li = 0
        float m[2] = {neg_inf, neg_inf}, l[2] = {0.f, 0.f};
        if (j0 < j1 && w == 1) named_arrive(TURN, 256);   // consumer 0 issues first
        for (int j = j0; j < j1; ++j) {   // line 6
            named_sync(TURN + w, 256);    // this consumer's turn on the tensor cores
            mbar_wait(bar(K_FULL + ka.s), ka.ph);
            const unsigned kt_base = k_base + ka.s * KB;
            // Line 8 by k-steps of 8 (32 bytes into a panel's 128-byte rows), KG k-steps a group into
            // two fresh accumulators in turn (hi columns: hi hi' + lo hi'; lo columns: hi lo'),
            // each group added to Sij while the next runs.
            auto qk = [&](float (&x)[2][NS][4], int kk, int first) {
                const unsigned qo = kk / 4 * BR * 128 + w * 64 * 128 + (kk % 4) * 32;
                const unsigned ko = kk / 4 * 2 * BC * 128 + (kk % 4) * 32;
                wgmma_tf32_ss2<BC>(x[0], x[1], wgmma_desc(q_base + qo, 16, 1024), wgmma_desc(kt_base + ko, 16, 1024),
                                   !first);
                wgmma_tf32_ss<BC>(x[0], wgmma_desc(q_lo + qo, 16, 1024), wgmma_desc(kt_base + ko, 16, 1024), 1);
            };
            float s[1][NS][4], part[2][2][NS][4];   // s: one m-tile of 16 rows a warp (fa_softmax.cuh's MT = 1)
#pragma unroll
            for (int g = 0; g <= KS / KG; ++g) {
                if (g < KS / KG) {
                    wgmma_fence();
#pragma unroll
                    for (int kk = g * KG; kk < g * KG + KG; ++kk) qk(part[g % 2], kk, kk == g * KG);
                    wgmma_commit();
                    // The other's turn once the last group is issued: its MMAs queue behind ours.
                    if (g == KS / KG - 1 && (w == 0 || j + 1 < j1)) named_arrive(TURN + 1 - w, 256);
                }
                if (g > 0) {
                    if (g < KS / KG) wgmma_wait<1>(); else wgmma_wait<0>();
                    reg_fence(part[(g - 1) % 2][0]);
                    reg_fence(part[(g - 1) % 2][1]);
#pragma unroll
                    for (int nt = 0; nt < NS; ++nt)
#pragma unroll
                        for (int e = 0; e < 4; ++e) {
                            const float x = part[(g - 1) % 2][0][nt][e] + part[(g - 1) % 2][1][nt][e];
                            s[0][nt][e] = g == 1 ? x : s[0][nt][e] + x;
                        }
                }
            }
            if (lane == 0) mbar_arrive(bar(K_FREE + ka.s));
            ka.next();

            // Score mods, mask, online softmax (fa_softmax.cuh) on this warp's rows.
            mask_scores<1, NS, MASK>(s, tq.win, row0 + cw * 16, j * BC, nk, scale, softcap, slope);
            float alpha[2];
            const bool moved = __any_sync(0xffffffffu, softmax_rows<NS>(s[0], m, l, alpha, sl2));

            // Line 10: Oi += Pij Vj, k-steps of 8 keys (32 bytes into Vj^T's rows), into a fresh
            // accumulator for the tile, added to Oi rounding to nearest.
            operand<4> pa[NS];
#pragma unroll
            for (int kt = 0; kt < NS; ++kt) pa[kt] = p_operand<float, 3>(s[0][kt]);   // finite
            const unsigned vt = v_base + va.s * VB, vt_lo = vt + VB / 2;
            float po[ND][4];
            mbar_wait(bar(V_FULL + va.s), va.ph);
            wgmma_fence();
#pragma unroll
            for (int kt = 0; kt < NS; ++kt) {
                const unsigned vo = kt / 4 * D * 128 + (kt % 4) * 32;
                wgmma_tf32_rs<D>(po, pa[kt].lo, wgmma_desc(vt + vo, 16, 1024), kt > 0);
                wgmma_tf32_rs<D>(po, pa[kt].hi, wgmma_desc(vt_lo + vo, 16, 1024), 1);
                wgmma_tf32_rs<D>(po, pa[kt].hi, wgmma_desc(vt + vo, 16, 1024), 1);
            }
            wgmma_commit();
            if (moved) rescale_rows<ND>(o, alpha);   // under the product: Oi is not its accumulator
            wgmma_wait<0>();
            reg_fence(po);
#pragma unroll
            for (int kt = 0; kt < NS; ++kt) {   // in flight until the wait: not reused before it
                reg_fence(pa[kt].hi);
                reg_fence(pa[kt].lo);
            }
            if (lane == 0) mbar_arrive(bar(V_FREE + va.s));
            va.next();
#pragma unroll
            for (int dt = 0; dt < ND; ++dt)
#pragma unroll
                for (int e = 0; e < 4; ++e) o[dt][e] += po[dt][e];
        }
        __syncwarp();
        if (lane == 0) mbar_arrive(bar(Q_FREE));   // every MMA of this warp reading Qi has landed

        // Lines 12-15 (fa_wgmma.cuh).
        const long long q0 = fa_seq::first_row(b, cu_q);
        store_rows_f32<D>(o, l, m, cw * 16, rows, d, O + b * o_sb + h * o_sh + (q0 + row0) * o_sn, o_sn,
                          L + b * l_sb + h * l_sh + q0 + row0);
        ++heads;
    }
}
