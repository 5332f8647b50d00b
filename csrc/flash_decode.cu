// flash_decode.cu: split-KV decoding (flash-decoding) for few query rows and many keys, fp16/bf16
// on sm_80+ (mma m16n8k16, cp.async), fp32 accumulation. Two kernels, the second launched after
// the first where the planner does not fuse the merge into it:
//
// flash_decode: one block per (batch b, k/v head hk, split s of the keys). Its rows are every
//   query row that reads k/v head hk: the group's q heads hk*group .. hk*group+group-1 times Nq
//   rows, R = group * Nq <= 16, packed as the rows of one m16 MMA tile (row r is q head
//   hk*group + r / Nq, query r % Nq; rows past R are zeros and never written), so K and V are
//   read once per k/v head, not once per q head. The key tiles some row sees (all, or the
//   window's: fa_mask.cuh) are dealt round-robin to gridDim.x splits of whole BC-key tiles
//   (split s: tiles s, s + splits, ...); a block streams its split through a STAGES-deep
//   cp.async pipeline (tile t + STAGES - 1 loads while tile t is computed). Each of its NW
//   warps takes BC / NW keys of every tile (Sij = Qi Kj^T, online softmax, Oi += Pij Vj as in
//   flash_fwd_mma.cu, whose fragments and ldmatrix addressing this reuses); at the end the
//   warps' (mi, li, Oi) merge through shared memory in a fixed order, and the block writes its
//   split's partial O_s = Oi / li (fp32) and L_s = mi + log li (natural log; -inf with O_s = 0
//   when the split saw no key) to the workspace. One split writes O and L itself. Where the
//   planner fuses the merge (Cnt not null: few rows, partials that fit in the stages), the
//   pair's last split to finish (an atomic count per pair, left at zero again) merges its
//   partials (merge_pair), saving the second launch.
//   A KV cache (kvcache.py): seqlens_k (or null) gives batch b's number of keys, and
//   block_table (or null) where they lie: key j of batch b in page block_table[b][j / page]
//   (page = 2^page_shift rows, K's batch stride k_sb the page stride), row j % page. Pages
//   are read in place, a tile's rows from as many pages as it spans.
// flash_decode_combine: one warp per query row merges the splits exactly (merge.py's math, in
//   fp32): m = max_s L_s, w_s = exp(L_s - m) / sum_s exp(L_s - m), O = sum_s w_s O_s in the
//   input type, L = m + log(sum_s exp(L_s - m)); every L_s = -inf gives O = 0, L = -inf.
//
// Workspace (float32; none for one split): O_s of row (b, h, i) at Op[((b*H + h)*Nq + i)*splits + s][PITCH = D],
// L_s at Lp[((b*H + h)*Nq + i)*splits + s]; the planner sizes it (planner.decode_workspace_bytes).
// Cnt[b*Hk + hk] (int, zero at the launch, zero again after it): the pair's splits done.
//
// Compile-time: T (fa_half, fa_bfloat16), the head-dim bound D, warps NW, key tile BC (BC / NW
// keys a warp, a multiple of 16), STAGES (>= 2) and MASK (fa_mask.cuh). Shared memory, mirrored
// by planner.decode_smem_bytes, from a 128-byte boundary: Qi[16][DP] with DP = D + 8 (16 padding
// bytes a row: ldmatrix without bank conflicts), STAGES x (Kj, Vj) as 128-byte swizzled panels
// (fa_mma.cuh's swz: ceil(D / 64) panels of [BC][128 bytes] each; whole L2 lines a copy, where
// padded rows cost 1.5x the L2 sectors), then the warps' mi, li [NW][16]; after the sweep the
// stages hold the merged Oi [16][D] in fp32.
#include "fa_softmax.cuh"

// A warp turns one query row's L_s (shared memory, splits of them) into the merge's weights in
// place, w_s = exp(L_s - m) / sum_s exp(L_s - m) with m = max_s L_s, and returns the row's L =
// m + log(sum) in every lane; every L_s = -inf gives weights 0 and L = -inf. Lane l owns splits
// l, l + 32, ... and sums them in that order, then across lanes: the same bits wherever it runs.
__device__ float merge_weights(float* w, int splits)
{
    const float neg_inf = __int_as_float(0xff800000);
    const int lane = threadIdx.x % 32;
    float m = neg_inf;
    for (int s = lane; s < splits; s += 32) m = fmaxf(m, w[s]);
#pragma unroll
    for (int x = 16; x > 0; x /= 2) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, x));
    const float base = m == neg_inf ? 0.f : m;   // no key in any split: every weight 0
    float sum = 0.f;
    for (int s = lane; s < splits; s += 32) sum += expf(w[s] - base);
#pragma unroll
    for (int x = 16; x > 0; x /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, x);
    const bool empty = sum == 0.f;
    for (int s = lane; s < splits; s += 32) w[s] = empty ? 0.f : expf(w[s] - base) / sum;
    return empty ? neg_inf : m + logf(sum);
}

// The last split of a (batch, k/v head) to finish merges its R query rows' splits, the whole
// block at once (the planner fuses the merge only where the rows are few and their partials fit
// in the K/V stages: planner.decode_fused_merge). The R * splits O_s (contiguous, D floats each)
// come into Ws by cp.async, all in flight together, the L_s beside them; a warp a row turns the
// L_s into weights (merge_weights) and writes L; a thread per 4 columns of a row sums
// the weighted O_s in split order. Row r is q head r / Nq of O and L (from there), query r % Nq.
template <typename T, int D, int NW>
__device__ void merge_pair(const float* Op, const float* Lp, float* Ws, int R, int splits, int d,
                           T* O, float* L, int Nq, long long o_sh, long long o_sn, long long l_sh)
{
    constexpr int NT = 32 * NW;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, n = R * splits;
    float* Ls = Ws + n * D;   // after the O_s (16-byte aligned: D % 32 == 0)
    for (int i = threadIdx.x; i < n * D / 4; i += NT) cp_async_16(Ws + 4 * i, Op + 4 * i, 16);
    cp_async_commit();
    for (int i = threadIdx.x; i < n; i += NT) Ls[i] = __ldcg(Lp + i);
    __syncthreads();
    for (int r = warp; r < R; r += NW) {   // L_s -> weights, in place
        const float lse = merge_weights(Ls + r * splits, splits);
        if (lane == 0) L[(r / Nq) * l_sh + r % Nq] = lse;
    }
    cp_async_wait_all();
    __syncthreads();
    for (int i = threadIdx.x; i < R * (D / 4); i += NT) {
        const int r = i / (D / 4), c = i % (D / 4) * 4;
        if (c >= d) continue;
        float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
        for (int s = 0; s < splits; ++s) {
            const float w = Ls[r * splits + s];
            const float4 part = *reinterpret_cast<const float4*>(Ws + (r * splits + s) * D + c);
            acc.x += w * part.x, acc.y += w * part.y, acc.z += w * part.z, acc.w += w * part.w;
        }
        T* Orow = O + (r / Nq) * o_sh + (long long)(r % Nq) * o_sn;
        const float out[4] = {acc.x, acc.y, acc.z, acc.w};
#pragma unroll
        for (int e = 0; e < 4; ++e)
            if (c + e < d) Orow[c + e] = from_float<T>(out[e]);
    }
}

template <typename T, int D, int NW, int BC, int STAGES, int MASK>
__global__ void __launch_bounds__(NW * 32)
flash_decode(const T* __restrict__ Q, const T* __restrict__ K, const T* __restrict__ V,
             const float* __restrict__ alibi, const int* __restrict__ seqlens_k,
             const int* __restrict__ block_table, float* __restrict__ Op, float* __restrict__ Lp,
             int* __restrict__ Cnt, T* __restrict__ O, float* __restrict__ L,
             int B, int H, int group, int Nq, int Nk, int d, int win_left, int win_right, int page_shift,
             long long q_sb, long long q_sh, long long q_sn,
             long long k_sb, long long k_sh, long long k_sn,
             long long v_sb, long long v_sh, long long v_sn, long long bt_sb,
             long long o_sb, long long o_sh, long long o_sn, long long l_sb, long long l_sh,
             float scale, float softcap)
{
    using E = fa_elem<T>;
    using bits = typename E::bits;
    constexpr int ARCH = 80;
    constexpr int NT = 32 * NW, KW = BC / NW;                 // threads, keys a warp per tile
    constexpr int DP = D + E::VEC, ROW = DP * sizeof(T);      // smem row pitch: elements, bytes
    constexpr int KS = D / 16, NS = KW / 8, ND = D / 8;       // k-steps of Qi Kj^T, 8-key and 8-d tiles
    constexpr int KT = BC * 128 * ((D + 63) / 64);            // bytes of Kj (and of Vj): swizzled panels
    constexpr int STAGE = 2 * KT;                             // bytes of one stage (Kj, Vj)
    static_assert(sizeof(T) == 2, "fp16 / bf16 only");
    static_assert(D % 32 == 0 && KW % 16 == 0 && STAGES >= 2, "tiles of 16");
    constexpr float LOG2E = 1.4426950408889634f, LN2 = 0.6931471805599453f;

    extern __shared__ __align__(128) unsigned char smem_raw[];
    unsigned char* smem = smem_raw + ((128 - (smem_addr(smem_raw) & 127)) & 127);   // the swizzle's alignment
    bits* Qs = reinterpret_cast<bits*>(smem);   // [16][DP]: 16 (2 D + 16) bytes, a multiple of 128
    unsigned char* St = smem + 16 * ROW;        // STAGES x {Kj, Vj}, swizzled
    float* Mw = reinterpret_cast<float*>(St + STAGES * STAGE);   // [NW][16]: each warp's mi
    float* Lw = Mw + NW * 16;                                    // [NW][16]: each warp's li
    float* Of = reinterpret_cast<float*>(St);   // [16][D] fp32, the merged Oi (after the sweep)

    const float neg_inf = __int_as_float(0xff800000);
    // Raw scores, the scale (times log2 e) folded into the exponent as in flash_fwd_mma.cu; a
    // negative scale flips the sign of Qi's fragments instead (exact), a zero one becomes FLT_MIN.
    const float sl2 = MASK == FA_MODS ? 1.f : fmaxf(fabsf(scale) * LOG2E, 1.17549435e-38f);
    const unsigned q_sign = scale < 0.f ? 0x80008000u : 0u;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32, g = lane / 4, t = lane % 4;
    const int R = group * Nq, Hk = H / group, split = blockIdx.x, splits = gridDim.x;
    const bool q_vec = vec_ok(Q, q_sb, q_sh, q_sn, d), k_vec = vec_ok(K, k_sb, k_sh, k_sn, d);
    const bool v_vec = vec_ok(V, v_sb, v_sh, v_sn, d);
    // ldmatrix lane addresses as in flash_fwd_mma.cu: Qi (A, padded rows), Kj (B, rows are keys)
    // and Vj (B, .trans) swizzled. A lane's Kj / Vj row r has r % 8 = lane % 8, and for the
    // k-step or d-step m its chunk is 2 m + h (h = lane / 8 % 2 for Kj, lane / 16 for Vj), stored
    // at chunk 2 (m % 4) ^ h ^ (lane % 8) of panel m / 4: the lane's address for m = 0, XORed
    // with (m % 4) << 5, plus m / 4 panels (k_at, v_at).
    const unsigned q_lane = smem_addr(Qs) + (lane % 16) * ROW + lane / 16 * 16;
    const unsigned k_lane = smem_addr(St) + (warp * KW + lane % 8 + lane / 16 * 8) * 128 + ((lane / 8 % 2) ^ (lane % 8)) * 16;
    const unsigned v_lane = smem_addr(St) + KT + (warp * KW + lane % 8 + lane / 8 % 2 * 8) * 128 + ((lane / 16) ^ (lane % 8)) * 16;
    auto k_at = [&](int kk) { return (k_lane ^ ((kk % 4) << 5)) + kk / 4 * BC * 128; };
    auto v_at = [&](int p) { return (v_lane ^ ((p % 4) << 5)) + p / 4 * BC * 128; };
    // This thread's rows g and g + 8: their query index (the window's row) and q head.
    int qi[2], qh[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) qi[r] = (g + 8 * r) % Nq, qh[r] = (g + 8 * r) / Nq;

    for (int b = blockIdx.z; b < B; b += gridDim.z)
    for (int hk = blockIdx.y; hk < Hk; hk += gridDim.y) {
        // A KV cache: batch b's keys are its first seqlens_k[b] (clamped to [0, Nk]; the window
        // aligns with them, as causal does), and with a block table key j lives in page
        // block_table[b][j >> page_shift], row j & (2^page_shift - 1), pages k_sb / v_sb apart.
        const int nk = seqlens_k ? min(max(seqlens_k[b], 0), Nk) : Nk;
        const fa_seq sq = fa_seq::of(b, 0, Nq, nk, nullptr, nullptr);
        const fa_window win = fa_window::of(sq, win_left, win_right);
        int j0 = 0, j1 = (nk + BC - 1) / BC;   // the key tiles some query row sees ...
        if (MASK) win.tiles(0, Nq, BC, j0, j1);
        // ... dealt round-robin: split s streams tiles j0 + s, j0 + s + splits, ..., so that the
        // splits of a (batch, k/v head) sweep its K and V side by side, not far apart.
        auto tile = [&](int n) { return j0 + split + n * splits; };
        const T* Qb = Q + b * q_sb + (long long)hk * group * q_sh;
        const int* pages = block_table ? block_table + b * bt_sb : nullptr;
        const T* Kb = K + (pages ? 0 : b * k_sb) + hk * k_sh;   // key 0 of this (batch, k/v head)
        const T* Vb = V + (pages ? 0 : b * v_sb) + hk * v_sh;
        const int in_page = (1 << page_shift) - 1;
        float slope[2] = {0.f, 0.f};
        if (MASK == FA_MODS && alibi) {
#pragma unroll
            for (int r = 0; r < 2; ++r)
                if (g + 8 * r < R) slope[r] = alibi[(long long)b * H + hk * group + qh[r]];
        }

        // Line 4: Qi (row r from q head hk*group + r / Nq, query r % Nq), in the first stage's group.
        {
            constexpr int VEC = E::VEC, CH = D / VEC;
            for (int i = threadIdx.x; i < 16 * CH; i += NT) {
                const int r = i / CH, c = (i % CH) * VEC;
                bits* s = Qs + r * DP + c;
                const bool in = r < R && c < d;
                const T* src = in ? Qb + (long long)(r / Nq) * q_sh + (long long)(r % Nq) * q_sn + c : Q;
                if (q_vec) {
                    cp_async_16(s, src, in ? 16 : 0);
                } else {
#pragma unroll
                    for (int e = 0; e < VEC; ++e) s[e] = (in && c + e < d) ? E::get(src[e]) : 0;
                }
            }
        }
        // The page of a tile within one page is read a tile ahead (next_page: tile n's page, its
        // load issued when tile n - 1 was), so the copies of a stage never wait on that read.
        const bool one_page = pages && (BC >> page_shift) <= 1;
        auto page_of = [&](int n) { return one_page && tile(n) < j1 ? pages[((long long)tile(n) * BC) >> page_shift] : 0; };
        int next_page = page_of(0);
        // The split's tile n into stage n % STAGES; every call commits one group (empty past
        // the split's last tile).
        auto load_stage = [&](int n) {
            if (tile(n) < j1) {
                const long long col0 = (long long)tile(n) * BC;
                const int rows = (int)(nk - col0 < BC ? nk - col0 : BC);
                bits* Ks = reinterpret_cast<bits*>(St + (n % STAGES) * STAGE);   // then Vj, KT bytes on
                bits* Vs = reinterpret_cast<bits*>(St + (n % STAGES) * STAGE + KT);
                using layout = stepped_layout<T, BC, D, 0, NT>;   // load_tile_stepped's
                constexpr int CH = layout::CH, STEP = layout::STEP;
                if constexpr (layout::ok) {
                    // pages shorter than a whole tile: each thread's rows (fixed columns, STEP
                    // rows apart) have their page numbers read once, all in flight together,
                    // for both K and V, then the copies go out
                    if (pages && (BC >> page_shift) > 1 && rows == BC && d == D && k_vec && v_vec) {
                        const int r0 = threadIdx.x / CH, c = threadIdx.x % CH * E::VEC;
                        int pg[BC / STEP];
#pragma unroll
                        for (int it = 0; it < BC / STEP; ++it) pg[it] = pages[(int)(col0 + r0 + it * STEP) >> page_shift];
                        const unsigned sk = smem_addr(Ks) + swz<BC>(r0, threadIdx.x % CH), sv = sk + KT;
#pragma unroll
                        for (int it = 0; it < BC / STEP; ++it) {
                            const long long row = (col0 + r0 + it * STEP) & in_page;
                            cp_async_16_full(stepped_offset<STEP>(sk, it), Kb + pg[it] * k_sb + row * k_sn + c);
                            cp_async_16_full(stepped_offset<STEP>(sv, it), Vb + pg[it] * v_sb + row * v_sn + c);
                        }
                        cp_async_commit();
                        return;
                    }
                }
                if (pages && (BC >> page_shift) > 1) {   // pages shorter than a tile: a page lookup a row
                    auto at = [&](const T* base, long long page_stride, long long sn, int r) {
                        const int key = (int)col0 + r;   // < nk
                        return base + pages[key >> page_shift] * page_stride + (key & in_page) * sn;
                    };
                    load_rows<T, BC, D, 0, NT, ARCH>(Ks, [&](int r) { return at(Kb, k_sb, k_sn, r); }, K, rows, d, k_vec);
                    load_rows<T, BC, D, 0, NT, ARCH>(Vs, [&](int r) { return at(Vb, v_sb, v_sn, r); }, V, rows, d, v_vec);
                } else {   // contiguous, or the tile within one page (pages and tiles: powers of two): one lookup
                    const long long page = next_page, row = pages ? col0 & in_page : col0;
                    next_page = page_of(n + 1);
                    const T* Kt = Kb + page * k_sb + row * k_sn;
                    const T* Vt = Vb + page * v_sb + row * v_sn;
                    load_tile_stepped<T, BC, D, 0, NT, ARCH>(Ks, Kt, k_sn, rows, d, k_vec);
                    load_tile_stepped<T, BC, D, 0, NT, ARCH>(Vs, Vt, v_sn, rows, d, v_vec);
                }
            }
            cp_async_commit();
        };
#pragma unroll
        for (int n = 0; n < STAGES - 1; ++n) load_stage(n);

        float o[ND][4] = {};                    // line 5: Oi = 0, mi = -inf, li = 0 (this warp's keys)
        float m[2] = {neg_inf, neg_inf}, l[2] = {0.f, 0.f};
        // Qi's A fragments (scale's sign folded in) are the same for every tile: held in registers
        // where they fit beside the rest (KS <= 8: 32 registers at D = 128), read from shared
        // memory once, not per tile (8 ldmatrix and 32 XORs a warp a tile at D = 128).
        constexpr bool Q_REGS = KS <= 8;
        operand<4> qf[Q_REGS ? KS : 1];
        if constexpr (Q_REGS) {
            cp_async_wait_group<STAGES - 2>();   // Qi has landed (with tile 0, its group) ...
            __syncthreads();                     // ... for every thread
#pragma unroll
            for (int kk = 0; kk < KS; ++kk) {
                ldmatrix_x4<false>(qf[kk].hi, q_lane + kk * 32);
#pragma unroll
                for (int e = 0; e < 4; ++e) qf[kk].hi[e] ^= q_sign;
            }
        }

        for (int n = 0; tile(n) < j1; ++n) {    // line 6
            cp_async_wait_group<STAGES - 2>();  // tile n (and Qi) have landed ...
            __syncthreads();                    // ... for every thread; all are done with tile n - 1
            load_stage(n + STAGES - 1);         // line 7: into the stage tile n - 1 left
            const unsigned stage = (n % STAGES) * STAGE;
            const int col0 = tile(n) * BC + warp * KW;   // this warp's first key

            // Line 8: Sij = Qi Kj^T over this warp's KW keys.
            float s[NS][4] = {};
#pragma unroll
            for (int kk = 0; kk < KS; ++kk) {
                operand<4> qa;
                if constexpr (Q_REGS) {
                    qa = qf[kk];
                } else {
                    ldmatrix_x4<false>(qa.hi, q_lane + kk * 32);
#pragma unroll
                    for (int e = 0; e < 4; ++e) qa.hi[e] ^= q_sign;
                }
#pragma unroll
                for (int p = 0; p < NS / 2; ++p) {
                    operand<4> kb;   // B operands of key tiles 2p (registers 0, 1) and 2p + 1 (2, 3)
                    ldmatrix_x4<false>(kb.hi, k_at(kk) + stage + p * 16 * 128);
                    mma_op<T, ARCH, 1>(s[2 * p], qa, kb, 0);
                    mma_op<T, ARCH, 1>(s[2 * p + 1], qa, kb, 2);
                }
            }
            if constexpr (MASK == FA_MODS) {
#pragma unroll
                for (int nt = 0; nt < NS; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e)
                        s[nt][e] = score_mod(s[nt][e], fabsf(scale), softcap, slope[e / 2],
                                             win.diag(qi[e / 2]) - (col0 + nt * 8 + 2 * t + e % 2));
            }
            if (col0 + KW > nk || (MASK && !win.covers(0, Nq, col0, KW))) {   // edge tiles only
                int lo[2], hi[2];
#pragma unroll
                for (int r = 0; r < 2; ++r) win.seen<MASK != 0>(qi[r], col0, KW, nk, lo[r], hi[r]);
                mask_outside<NS>(s, lo, hi);
            }

            // Lines 9-10's row work (fa_softmax.cuh), per warp: Pij, mi, li, diag(alpha) Oi.
            float alpha[2];
            if (__any_sync(0xffffffffu, softmax_rows<NS>(s, m, l, alpha, sl2))) rescale_rows<ND>(o, alpha);

            // Line 10: Oi += Pij Vj, Pij rounded to T as the A operand, Vj by ldmatrix.trans.
#pragma unroll
            for (int kk = 0; kk < KW / 16; ++kk) {
                operand<4> pa;
                p_fragment<T, ARCH, NS>(pa.hi, s, kk);
#pragma unroll
                for (int p = 0; p < D / 16; ++p) {
                    operand<4> vb;   // d tiles 2p (registers 0, 1) and 2p + 1 (2, 3)
                    ldmatrix_x4<true>(vb.hi, v_at(p) + stage + kk * 16 * 128);
                    mma_op<T, ARCH, 1>(o[2 * p], pa, vb, 0);
                    mma_op<T, ARCH, 1>(o[2 * p + 1], pa, vb, 2);
                }
            }
        }

        // The warps' (mi, li, Oi) into the block's: M = max_w mi_w, each Oi_w and li_w scaled by
        // exp2(mi_w - M), the Oi_w added into Of in warp order (deterministic).
        cp_async_wait_all();   // only empty groups can be pending; the stages become Of
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
            l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
        }
        if (t == 0) {
#pragma unroll
            for (int r = 0; r < 2; ++r) Mw[warp * 16 + g + 8 * r] = m[r], Lw[warp * 16 + g + 8 * r] = l[r];
        }
        __syncthreads();   // every warp is done with the stages; Mw, Lw are complete
        float M[2], lsum[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            M[r] = neg_inf;
            for (int w = 0; w < NW; ++w) M[r] = fmaxf(M[r], Mw[w * 16 + g + 8 * r]);
            const float base = M[r] == neg_inf ? 0.f : M[r];
            lsum[r] = 0.f;
            for (int w = 0; w < NW; ++w) lsum[r] += Lw[w * 16 + g + 8 * r] * fast_exp2(Mw[w * 16 + g + 8 * r] - base);
            const float f = fast_exp2(m[r] - base);   // 0 for a warp that saw no key
#pragma unroll
            for (int dt = 0; dt < ND; ++dt) o[dt][2 * r] *= f, o[dt][2 * r + 1] *= f;
        }
        for (int w = 0; w < NW; ++w) {
            if (warp == w) {
#pragma unroll
                for (int dt = 0; dt < ND; ++dt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        float* dst = Of + (g + 8 * (e / 2)) * D + dt * 8 + 2 * t + e % 2;
                        *dst = w == 0 ? o[dt][e] : *dst + o[dt][e];
                    }
            }
            __syncthreads();
        }
        if (warp == 0 && t == 0) {   // the block's li and mi per row, for every thread below
#pragma unroll
            for (int r = 0; r < 2; ++r) Lw[g + 8 * r] = lsum[r], Mw[g + 8 * r] = M[r];
        }
        __syncthreads();

        // Lines 12-15: O = Oi / li, L = mi + log li (no key: O = 0, L = -inf). One split writes
        // them to the outputs (O in T); several write this split's partial (O_s in fp32, L_s) to
        // the workspace, and where the merge is fused the pair's last split merges them.
        const long long row0 = ((long long)b * H + (long long)hk * group) * Nq;   // (b, hk*group, 0)
        T* Ob = O + b * o_sb + (long long)hk * group * o_sh;                      // row 0's outputs
        float* Lb = L + b * l_sb + (long long)hk * group * l_sh;
        for (int i = threadIdx.x; i < R * D; i += NT) {   // columns past d too: the merge reads float4s
            const int r = i / D, c = i % D;
            const float li = Lw[r], x = li == 0.f || c >= d ? 0.f : Of[r * D + c] / li;
            if (splits > 1) Op[((row0 + r) * splits + split) * D + c] = x;
            else if (c < d) Ob[(r / Nq) * o_sh + (long long)(r % Nq) * o_sn + c] = from_float<T>(x);
        }
        if (threadIdx.x < R) {
            const int r = threadIdx.x;
            const float li = Lw[r], lse = li == 0.f ? neg_inf : Mw[r] * LN2 + logf(li);
            if (splits > 1) Lp[(row0 + r) * splits + split] = lse;
            else Lb[(r / Nq) * l_sh + r % Nq] = lse;
        }
        if (splits > 1 && Cnt) {
            __threadfence();   // this block's partial is visible to whichever block merges
            __syncthreads();   // every thread's part of it; Mw, Lw and the stages are free
            int* last = reinterpret_cast<int*>(Mw);
            if (threadIdx.x == 0) {
                int* count = Cnt + (long long)b * Hk + hk;
                *last = atomicAdd(count, 1) == splits - 1;
                if (*last) *count = 0;   // zero again for the next call on this stream
            }
            __syncthreads();
            if (*last) {
                __threadfence();   // the other splits' partials, seen after their counts
                merge_pair<T, D, NW>(Op + row0 * splits * D, Lp + row0 * splits, reinterpret_cast<float*>(St),
                                     R, splits, d, Ob, Lb, Nq, o_sh, o_sn, l_sh);
            }
        }
        __syncthreads();   // smem is reused by the next (batch, k/v head)
    }
}

// One warp per query row (b, h, i), rows in (b, h, i) order: the splits' (O_s, L_s) merged into
// O (type T, strides o_*) and L (float32, strides l_*), as merge.py merges two parts. Each lane
// owns 4 adjacent columns of every 128 (one float4 a split: pitch is a multiple of 32, the
// workspace 256-byte aligned), and the loads of UNROLL splits are issued before their sum, so a
// row costs a few memory latencies, not one per split; the sum runs in split order (deterministic).
template <typename T>
__global__ void __launch_bounds__(128)
flash_decode_combine(const float* __restrict__ Op, const float* __restrict__ Lp, T* __restrict__ O,
                     float* __restrict__ L, int B, int H, int Nq, int d, int pitch, int splits,
                     long long o_sb, long long o_sh, long long o_sn, long long l_sb, long long l_sh)
{
    constexpr int MAX_SPLITS = 128, UNROLL = 8;   // planner.DECODE_MAX_SPLITS
    __shared__ float wts[4][MAX_SPLITS];
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const long long rows = (long long)B * H * Nq;
    for (long long row = (long long)blockIdx.x * 4 + warp; row < rows; row += (long long)gridDim.x * 4) {
        const float* Ls = Lp + row * splits;
#pragma unroll
        for (int i = 0; i < MAX_SPLITS / 32; ++i)   // this lane's L_s, s = lane + 32 i, all loads in flight
            if (lane + 32 * i < splits) wts[warp][lane + 32 * i] = Ls[lane + 32 * i];
        const float lse = merge_weights(wts[warp], splits);   // a lane reads back only what it wrote
        __syncwarp();
        const long long b = row / ((long long)H * Nq), h = row / Nq % H, i = row % Nq;
        T* Orow = O + b * o_sb + h * o_sh + i * o_sn;
        const float* Os = Op + row * splits * pitch;
        for (int c = 4 * lane; c < d; c += 128) {
            float4 acc = make_float4(0.f, 0.f, 0.f, 0.f);
            for (int s0 = 0; s0 < splits; s0 += UNROLL) {
                float4 part[UNROLL];
#pragma unroll
                for (int u = 0; u < UNROLL; ++u)
                    part[u] = s0 + u < splits ? *reinterpret_cast<const float4*>(Os + (long long)(s0 + u) * pitch + c)
                                              : make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
                for (int u = 0; u < UNROLL; ++u) {
                    const float w = s0 + u < splits ? wts[warp][s0 + u] : 0.f;
                    acc.x += w * part[u].x, acc.y += w * part[u].y, acc.z += w * part[u].z, acc.w += w * part[u].w;
                }
            }
            const float out[4] = {acc.x, acc.y, acc.z, acc.w};
#pragma unroll
            for (int e = 0; e < 4; ++e)
                if (c + e < d) Orow[c + e] = from_float<T>(out[e]);
        }
        if (lane == 0) L[b * l_sb + h * l_sh + i] = lse;
        __syncwarp();   // wts is rewritten for the next row
    }
}
