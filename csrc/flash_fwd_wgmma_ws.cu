// flash_fwd_wgmma_ws.cu: FlashAttention-2 forward, Algorithm 1, on Hopper's warpgroup MMA with
// warp specialization (FlashAttention-3's schedule; sm_90a only): fp16/bf16 in, fp32
// accumulation, O in the input type and L in fp32.
//
// A block is three warpgroups. Warpgroup 0 is the producer: it copies Qi and then each Kj and
// Vj (16-byte cp.async into the 128-byte swizzled tiles of flash_fwd_wgmma.cu) into a ring of
// STAGES buffers, every copy reporting to an mbarrier when it lands; it keeps 40 registers a
// thread. Warpgroups 1 and 2 are consumers with 232 (setmaxnreg; 128 x 40 + 256 x 232 is the
// 384 x 168 the launch gets): each owns 64 of the BR = 128
// rows of Qi and runs, a key tile j at a time,
//   Sij = Qi Kj^T          issued, and behind it Oi += P(j-1) V(j-1) (the previous tile's);
//   Sij's softmax           while P(j-1) V(j-1) runs on the tensor cores;
//   diag(alpha) Oi, Pij     once P(j-1) V(j-1) has landed,
// and frees Kj as soon as Sij has landed, V(j-1) once its product has. The two consumers take
// turns issuing their MMAs (two named barriers): one's softmax runs under the other's MMAs,
// which nothing in flash_fwd_wgmma.cu schedules (there two blocks an SM overlap by chance).
// Row work, masks, scale handling, the causal order and the argument list are those of
// flash_fwd_wgmma.cu: the planner swaps one kernel for the other.
//
// Compile-time: T (fa_half, fa_bfloat16), the head-dim bound D (64 or 128, d <= D zero-padded),
// key tile BC (64 or 128), buffers STAGES, MASK (fa_mask.cuh). Shared memory, mirrored by
// planner.wgmma_ws_smem_bytes: 1 KB of alignment slack, Qi [128][D], STAGES x Kj, STAGES x Vj
// [BC][D], then the mbarriers.
#include "fa_softmax.cuh"
#include "fa_wgmma.cuh"

template <typename T, int D, int BC, int STAGES, int MASK>
__global__ void __launch_bounds__(384, 1)
flash_fwd_wgmma_ws(const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V,
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
    constexpr int BR = 128, PT = 128;              // rows a block; producer threads
    constexpr int ARCH = 80;                        // pack2's cvt.rn.{f16,bf16}x2 (sm_80+)
    constexpr int NS = BC / 8, ND = D / 8, KS = D / 16;
    constexpr int QB = BR * D * 2, KB = BC * D * 2; // bytes of Qi, of Kj (and of Vj)
    static_assert(sizeof(T) == 2, "fp16 / bf16 only");
    static_assert((D == 64 || D == 128) && (BC == 64 || BC == 128), "wgmma N = 64 or 128");
    static_assert(STAGES >= 2, "a ring of at least two buffers");
    constexpr float LOG2E = 1.4426950408889634f;
    // mbarriers: Qi landed / free again, and per buffer Kj landed, Vj landed, Kj free, Vj free.
    // A free-barrier counts the 8 consumer warps; a landed-barrier the producer's threads.
    enum { Q_FULL = 0, Q_FREE = 1, K_FULL = 2, V_FULL = 2 + STAGES, K_FREE = 2 + 2 * STAGES,
           V_FREE = 2 + 3 * STAGES, BARS = 2 + 4 * STAGES };
    enum { TURN = 1 };   // named barriers TURN + w: consumer w may issue its MMAs

    extern __shared__ __align__(1024) unsigned char smem_raw[];
    unsigned char* Qs = smem_raw + ((1024 - (smem_addr(smem_raw) & 1023)) & 1023);   // [D/64][BR][128 B]
    unsigned char* Ks = Qs + QB;                   // buffer s at Ks + s KB, [D/64][BC][128 B]
    unsigned char* Vs = Ks + STAGES * KB;
    const unsigned q_base = smem_addr(Qs), k_base = smem_addr(Ks), v_base = smem_addr(Vs);
    const unsigned bar0 = smem_addr(Vs + STAGES * KB);
    auto bar = [&](int i) { return bar0 + 8u * i; };
    auto tile_at = [](unsigned char* p) { return reinterpret_cast<typename fa_elem<T>::bits*>(p); };

    if (threadIdx.x == 0) {
        for (int i = 0; i < BARS; ++i)
            mbar_init(bar(i), i == Q_FULL || (i >= K_FULL && i < K_FREE) ? PT : 8);
    }
    __syncthreads();   // the only block-wide barrier: the roles part here

    const float neg_inf = __int_as_float(0xff800000);
    const float sl2 = MASK == FA_MODS ? 1.f : fmaxf(fabsf(scale) * LOG2E, 1.17549435e-38f);
    const fa_block blk = fa_block::of<MASK>();   // causal: heaviest Q tiles first
    const int row0 = blk.tile * BR;

    if (threadIdx.x < PT) {   // ---- producer: Qi, then the key tiles, through the ring
        regs_dec<40>();
        const bool q_vec = vec_ok(Q, q_sb, q_sh, q_sn, d), k_vec = vec_ok(K, k_sb, k_sh, k_sn, d);
        const bool v_vec = vec_ok(V, v_sb, v_sh, v_sn, d);
        fa_ring<STAGES> at;   // this tile's buffer
        unsigned heads = 0;   // (batch, head) pairs so far: Qi's barriers' phase
        for (int b = blk.b; b < B; b += gridDim.z)
        for (int h = blk.h; h < H; h += gridDim.y) {
            const fa_tile<MASK> tq = fa_tile<MASK>::of(b, row0, BR, BC, Nq, Nk, cu_q, cu_k, win_left, win_right);
            if (tq.rows <= 0) continue;   // varlen: a shorter sequence has no row in this tile
            const int rows = tq.rows, nk = tq.sq.nk;
            const T* Kbh = K + b * k_sb + (h / group) * k_sh + tq.sq.k0 * k_sn;
            const T* Vbh = V + b * v_sb + (h / group) * v_sh + tq.sq.k0 * v_sn;
            mbar_wait(bar(Q_FREE), (heads & 1) ^ 1);   // the previous pair's Oi has left Qs
            load_tile<T, BR, D, 0, PT, ARCH>(tile_at(Qs), Q + b * q_sb + h * q_sh + (tq.sq.q0 + row0) * q_sn, q_sn,
                                             rows, d, q_vec);
            mbar_arrive_cp_async(bar(Q_FULL));
            for (int j = tq.j0; j < tq.j1; ++j, at.next()) {   // line 7, up to STAGES tiles ahead
                const long long c0 = (long long)j * BC;
                mbar_wait(bar(K_FREE + at.s), at.ph ^ 1);   // the buffer's previous tile is done with
                load_tile_stepped<T, BC, D, 0, PT, ARCH>(tile_at(Ks + at.s * KB), Kbh + c0 * k_sn, k_sn, nk - (int)c0,
                                                         d, k_vec);
                mbar_arrive_cp_async(bar(K_FULL + at.s));
                mbar_wait(bar(V_FREE + at.s), at.ph ^ 1);
                load_tile_stepped<T, BC, D, 0, PT, ARCH>(tile_at(Vs + at.s * KB), Vbh + c0 * v_sn, v_sn, nk - (int)c0,
                                                         d, v_vec);
                mbar_arrive_cp_async(bar(V_FULL + at.s));
            }
            ++heads;
        }
        cp_async_wait_all();   // nothing in flight when the warpgroup leaves
        return;
    }

    // ---- consumers: warpgroup w (0, 1) of the two, its warps cw = 4 w .. 4 w + 3 of 8
    regs_inc<232>();
    const int lane = threadIdx.x % 32, cw = threadIdx.x / 32 - 4, w = cw / 4;
    const bool o_vec = vec_ok(O, o_sb, o_sh, o_sn, d);
    fa_ring<STAGES> at, prev;   // tile j's buffer, and tile j - 1's (its V is read one tile later)
    unsigned heads = 0;
    for (int b = blk.b; b < B; b += gridDim.z)
    for (int h = blk.h; h < H; h += gridDim.y) {
        const fa_tile<MASK> tq = fa_tile<MASK>::of(b, row0, BR, BC, Nq, Nk, cu_q, cu_k, win_left, win_right);
        if (tq.rows <= 0) continue;   // the producer skips it too
        const int rows = tq.rows, nk = tq.sq.nk, j0 = tq.j0, j1 = tq.j1;
        const fa_window& win = tq.win;
        const float slope = MASK == FA_MODS && alibi ? alibi[(long long)b * H + h] : 0.f;

        mbar_wait(bar(Q_FULL), heads & 1);   // line 4: Qi
        fence_proxy_async();                 // copies (generic proxy) are read by wgmma (async proxy)
        if (scale < 0.f) {   // s * scale = (-s) * |scale|: negate this warpgroup's rows of Qi once
            for (int i = threadIdx.x % 128; i < D / 64 * 64 * 32; i += 128) {   // 32 words a 128-byte row
                const int panel = i / (64 * 32), r = i / 32 % 64, word = i % 32;
                reinterpret_cast<unsigned*>(Qs + panel * BR * 128 + (64 * w + r) * 128)[word] ^= 0x80008000u;
            }
            fence_proxy_async();
            named_sync(TURN + 2 + w, 128);
        }

        float o[ND][4] = {};   // line 5: Oi = 0, mi = -inf, li = 0
        float m[2] = {neg_inf, neg_inf}, l[2] = {0.f, 0.f};
        unsigned pa[BC / 16][4];   // P(j-1), the A operand of its product with V(j-1)
        auto pv = [&]() {          // line 10: Oi += P(j-1) V(j-1), V(j-1) in buffer prev.s
            mbar_wait(bar(V_FULL + prev.s), prev.ph);
            fence_proxy_async();
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < BC / 16; ++kk)
                wgmma_rs<T, D>(o, pa[kk], wgmma_desc(v_base + prev.s * KB + kk * 16 * 128, BC * 128, 1024), 1);
            wgmma_commit();
        };
        // Tile j (lines 6-10): Sij = Qi Kj^T issued, and behind it P(j-1) V(j-1), in this consumer's
        // turn; Sij's softmax while P(j-1) V(j-1) runs; then diag(alpha) Oi and Pij. A head's first
        // tile has no P(j-1) V(j-1) and is its own call (first): each wgmma wait then retires the
        // same groups on every path, which ptxas must see, or it serializes every MMA.
        auto tile = [&](int j, bool first) {   // inlined at both calls: `first` is a constant there
            named_sync(TURN + w, 256);   // this consumer's turn on the tensor cores
            mbar_wait(bar(K_FULL + at.s), at.ph);
            fence_proxy_async();
            // Line 8 over KS k-steps of 16 (32 bytes into a panel's 128-byte rows).
            float sc[1][NS][4];   // one m-tile of 16 rows a warp (fa_softmax.cuh's MT = 1)
            wgmma_fence();
#pragma unroll
            for (int kk = 0; kk < KS; ++kk) {
                const unsigned k_off = (kk % 4) * 32;
                wgmma_ss<T, BC>(sc[0], wgmma_desc(q_base + kk / 4 * BR * 128 + w * 64 * 128 + k_off, 16, 1024),
                                wgmma_desc(k_base + at.s * KB + kk / 4 * BC * 128 + k_off, 16, 1024), kk > 0);
            }
            wgmma_commit();
            if (!first) pv();
            if (w == 0 || j + 1 < j1) named_arrive(TURN + 1 - w, 256);   // the other's turn
            if (first)
                wgmma_wait<0>();
            else
                wgmma_wait<1>();   // Sij has landed; P(j-1) V(j-1) may still run
            reg_fence(sc[0]);
            if (lane == 0) mbar_arrive(bar(K_FREE + at.s));

            // Score mods, mask, online softmax (fa_softmax.cuh) on this warp's rows.
            mask_scores<1, NS, MASK>(sc, win, row0 + cw * 16, j * BC, nk, scale, softcap, slope);
            float alpha[2];
            const bool moved = __any_sync(0xffffffffu, softmax_rows<NS>(sc[0], m, l, alpha, sl2));
            // The wait for P(j-1) V(j-1) sits in both arms of a branch on the softmax's result: at
            // the head of the block after the softmax, ptxas hoists it above the exponentials
            // (SASS: nothing would run under the product); in the arms it stays below them.
            if (!first) {
                if (moved) {
                    wgmma_wait<0>();   // P(j-1) V(j-1) has landed: Oi and pa are free
                    reg_fence(o);
                    rescale_rows<ND>(o, alpha);
                } else {
                    wgmma_wait<0>();
                    reg_fence(o);
                }
                reg_fence(pa);
                if (lane == 0) mbar_arrive(bar(V_FREE + prev.s));
            } else if (moved) {
                rescale_rows<ND>(o, alpha);
            }
#pragma unroll
            for (int kk = 0; kk < BC / 16; ++kk) p_fragment<T, ARCH, NS>(pa[kk], sc[0], kk);
            prev = at;
            at.next();
        };
        if (j0 < j1) {
            if (w == 1) named_arrive(TURN, 256);   // consumer 0 issues first
            tile(j0, true);
            for (int j = j0 + 1; j < j1; ++j) tile(j, false);
            pv();   // the last tile's P V
            wgmma_wait<0>();
            reg_fence(o);
            reg_fence(pa);
            if (lane == 0) mbar_arrive(bar(V_FREE + prev.s));
        }

        // Lines 12-15 (fa_wgmma.cuh), through this warp's own rows of Qs (its MMAs are done
        // reading them); then Qs is the producer's again.
        const long long q0 = fa_seq::first_row(b, cu_q);
        store_rows<T, BR, D>(Qs, o, l, m, cw * 16, rows, d, O + b * o_sb + h * o_sh + (q0 + row0) * o_sn, o_sn, o_vec,
                             L + b * l_sb + h * l_sh + q0 + row0);
        __syncwarp();
        if (lane == 0) mbar_arrive(bar(Q_FREE));
        ++heads;
    }
}
