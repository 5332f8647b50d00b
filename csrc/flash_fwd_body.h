/* flash_fwd_body.h: FlashAttention-2 forward, Algorithm 1 (Dao 2023), one thread.
 * Included by flash_fwd.c once per type with `real` and the function names defined (it
 * undefines them at its end); see flash_fwd.h.
 * Comments cite the lines of Algorithm 1 in the FlashAttention-2 paper. (The seed write-up
 * numbers the online-softmax step 10-12, after FlashAttention-1; here it is lines 9-10.)
 * Names follow the paper: Qi, Kj, Vj the tiles, Sij the scores, Pij the unnormalized
 * probabilities, Oi the output accumulator, mi / li the running row max / row sum, and
 * mij / lij the same two quantities for the tile in hand.
 *
 * Speed comes from memory layout, not from changing the algorithm: every inner loop runs
 * along a contiguous row so the compiler vectorizes it. Kj is stored transposed (KjT), so
 * Sij = Qi Kj^T walks keys; Oi += Pij Vj walks the head dim; exp runs over a whole row of Sij
 * (EXP_ROW, vectorizable). Tiles are zero-padded to a multiple of FA_PAD columns, so the
 * loops have no ragged tails, and 64-byte aligned. */

/* Row max and row sum, vectorizable without -ffast-math: FA_PAD independent partial results,
 * combined in a fixed order at the end (so the result is the same on every run). */
static real ROW_MAX(const real *restrict x, int64_t n)
{
    real part[FA_PAD];
    for (int64_t l = 0; l < FA_PAD; ++l)
        part[l] = x[l];
    for (int64_t c = FA_PAD; c < n; c += FA_PAD)
        for (int64_t l = 0; l < FA_PAD; ++l)
            part[l] = x[c + l] > part[l] ? x[c + l] : part[l];
    real m = part[0];
    for (int64_t l = 1; l < FA_PAD; ++l)
        m = part[l] > m ? part[l] : m;
    return m;
}

static real ROW_SUM(const real *restrict x, int64_t n)
{
    real part[FA_PAD] = {0};
    for (int64_t c = 0; c < n; c += FA_PAD)
        for (int64_t l = 0; l < FA_PAD; ++l)
            part[l] += x[c + l];
    real s = 0;
    for (int64_t l = 0; l < FA_PAD; ++l)
        s += part[l];
    return s;
}

/* The two tile products, register-blocked: FA_RB = 4 rows by one vector of FA_PAD columns
 * stay in registers (GCC vector extensions: one zmm of floats with AVX-512, split into halves
 * or quarters by the x86-64-v3 and default clones) while the shared dimension runs, so each
 * loaded vector feeds 4 FMAs. Rows are processed 4 at a time: rows_p is a multiple of FA_RB. */
typedef real VEC __attribute__((vector_size(FA_PAD * sizeof(real))));

static inline VEC VLOAD(const real *p) { VEC v; memcpy(&v, p, sizeof v); return v; }
static inline void VSTORE(real *p, VEC v) { memcpy(p, &v, sizeof v); }

/* Sij[r][c] = sum_k Qi[r][k] KjT[k][c] */
static inline void TILE_QKT(real *restrict Sij, const real *restrict Qi, const real *restrict KjT,
                            int64_t rows_p, int64_t Bcp, int64_t d, int64_t dp)
{
    for (int64_t r = 0; r < rows_p; r += FA_RB)
        for (int64_t c = 0; c < Bcp; c += FA_PAD) {
            const real *q0 = Qi + r * dp, *q1 = q0 + dp, *q2 = q1 + dp, *q3 = q2 + dp;
            VEC s0 = {0}, s1 = {0}, s2 = {0}, s3 = {0};
            for (int64_t k = 0; k < d; ++k) {
                const VEC kv = VLOAD(KjT + k * Bcp + c);
                s0 += q0[k] * kv;
                s1 += q1[k] * kv;
                s2 += q2[k] * kv;
                s3 += q3[k] * kv;
            }
            VSTORE(Sij + r * Bcp + c, s0);
            VSTORE(Sij + (r + 1) * Bcp + c, s1);
            VSTORE(Sij + (r + 2) * Bcp + c, s2);
            VSTORE(Sij + (r + 3) * Bcp + c, s3);
        }
}

/* Oi[r][k] = alpha[r] Oi[r][k] + sum_c Pij[r][c] Vj[c][k] */
static inline void TILE_PV(real *restrict Oi, const real *restrict alpha, const real *restrict Pij,
                           const real *restrict Vj, int64_t rows_p, int64_t Bcp, int64_t dp)
{
    for (int64_t r = 0; r < rows_p; r += FA_RB)
        for (int64_t k = 0; k < dp; k += FA_PAD) {
            const real *p0 = Pij + r * Bcp, *p1 = p0 + Bcp, *p2 = p1 + Bcp, *p3 = p2 + Bcp;
            real *o0 = Oi + r * dp + k, *o1 = o0 + dp, *o2 = o1 + dp, *o3 = o2 + dp;
            VEC a0 = alpha[r] * VLOAD(o0), a1 = alpha[r + 1] * VLOAD(o1);
            VEC a2 = alpha[r + 2] * VLOAD(o2), a3 = alpha[r + 3] * VLOAD(o3);
            for (int64_t c = 0; c < Bcp; ++c) {
                const VEC vv = VLOAD(Vj + c * dp + k);
                a0 += p0[c] * vv;
                a1 += p1[c] * vv;
                a2 += p2[c] * vv;
                a3 += p3[c] * vv;
            }
            VSTORE(o0, a0);
            VSTORE(o1, a1);
            VSTORE(o2, a2);
            VSTORE(o3, a3);
        }
}

FA_HOT int FLASH_FWD(const real *Q, const real *K, const real *V, real *O, float *L,
                     int64_t BH, int64_t group, int64_t Nq, int64_t Nk, int64_t d, int64_t Br,
                     int64_t Bc, real scale, const flash_mods *mods)
{
    if (BH < 1 || group < 1 || Nq < 1 || Nk < 1 || d < 1 || Br < 1 || Bc < 1)
        return FLASH_EBADARG;
    static const flash_mods no_mods = {-1, -1, 0.0, NULL};
    if (!mods)
        mods = &no_mods;
    /* The window, as fa_mask.cuh: row i sees key j when diag - left <= j <= diag + right,
     * diag = i + shift. An unbounded (negative) or wider side is clamped to Nk (left) or Nq
     * (right), which reaches every key from every row and keeps the sums in range. */
    const int64_t shift = Nk - Nq;
    const int64_t left = mods->left < 0 || mods->left > Nk ? Nk : mods->left;
    const int64_t right = mods->right < 0 || mods->right > Nq ? Nq : mods->right;
    const real softcap = (real)mods->softcap;
    const int score_mods = softcap > 0 || mods->alibi != NULL;

    /* The on-chip memory of the paper: O((Br + Bc) d + Br Bc) elements per call. */
    /* Rows padded to a multiple of FA_RB, columns to a multiple of FA_PAD. */
    const int64_t dp = round_up(d, FA_PAD), Bcp = round_up(Bc, FA_PAD), Brp = round_up(Br, FA_RB);
    real *Qi = fa_alloc(sizeof(real) * Brp * dp);   /* [Brp][dp], pre-multiplied by scale */
    real *KjT = fa_alloc(sizeof(real) * dp * Bcp);  /* [dp][Bcp]: Kj transposed */
    real *Vj = fa_alloc(sizeof(real) * Bcp * dp);   /* [Bcp][dp] */
    real *Sij = fa_alloc(sizeof(real) * Brp * Bcp); /* [Brp][Bcp], Pij overwrites it in place */
    real *Oi = fa_alloc(sizeof(real) * Brp * dp);   /* [Brp][dp] */
    real *mi = fa_alloc(sizeof(real) * Brp);
    real *li = fa_alloc(sizeof(real) * Brp);
    real *alpha = fa_alloc(sizeof(real) * Brp);     /* exp(mi - mi_new) of the tile in hand */
    int status = FLASH_OK;
    if (!Qi || !KjT || !Vj || !Sij || !Oi || !mi || !li || !alpha) {
        status = FLASH_ENOMEM;
        goto done;
    }
    /* Padding stays zero: padded columns of Qi, KjT and Vj add nothing to any sum. */
    memset(Qi, 0, sizeof(real) * Brp * dp);
    memset(KjT, 0, sizeof(real) * dp * Bcp);
    memset(Vj, 0, sizeof(real) * Bcp * dp);

    const real neg_inf = -(real)INFINITY;
    const int64_t Tr = (Nq + Br - 1) / Br; /* line 1: Q in Tr row tiles, K, V in Tc */
    const int64_t Tc = (Nk + Bc - 1) / Bc;

    for (int64_t bh = 0; bh < BH; ++bh) {
        const int64_t kv = bh / group; /* GQA: `group` consecutive query heads share K, V */
        const real *Qbh = Q + bh * Nq * d, *Kbh = K + kv * Nk * d, *Vbh = V + kv * Nk * d;
        real *Obh = O + bh * Nq * d;
        float *Lbh = L + bh * Nq;
        const real slope = mods->alibi ? (real)mods->alibi[bh] : 0; /* ALiBi: this head's slope */

        for (int64_t i = 0; i < Tr; ++i) { /* line 3 */
            const int64_t row0 = i * Br, rows = min64(Br, Nq - row0);
            const int64_t rows_p = round_up(rows, FA_RB); /* rows past `rows` are zero */

            for (int64_t r = 0; r < rows_p; ++r) { /* line 4: load Qi; line 5: Oi, li, mi */
                for (int64_t k = 0; k < d; ++k)
                    Qi[r * dp + k] = r < rows ? scale * Qbh[(row0 + r) * d + k] : 0;
                memset(Oi + r * dp, 0, sizeof(real) * dp);
                mi[r] = neg_inf;
                li[r] = 0;
            }

            /* The window: the tile's first row sees no key before row0 + shift - left, its
             * last none after row0 + rows - 1 + shift + right (causal: right = 0). K tiles
             * wholly outside are skipped, so a window's cost follows its width. */
            const int64_t first_key = row0 + shift - left, last_key = row0 + rows - 1 + shift + right;
            const int64_t j0 = first_key <= 0 ? 0 : first_key / Bc;
            const int64_t j1 = last_key < 0 ? 0 : min64(Tc, last_key / Bc + 1);

            for (int64_t j = j0; j < j1; ++j) { /* line 6 */
                const int64_t col0 = j * Bc, cols = min64(Bc, Nk - col0);

                /* line 7: load Kj (transposed) and Vj; a short last tile leaves stale
                 * columns behind, which the mask below turns into -inf scores. */
                for (int64_t c = 0; c < cols; ++c) {
                    const real *Kc = Kbh + (col0 + c) * d;
                    for (int64_t k = 0; k < d; ++k)
                        KjT[k * Bcp + c] = Kc[k];
                    memcpy(Vj + c * dp, Vbh + (col0 + c) * d, sizeof(real) * d);
                }
                if (cols < Bcp)
                    memset(Vj + cols * dp, 0, sizeof(real) * (Bcp - cols) * dp);

                /* line 8: Sij = (scale Qi) Kj^T for the whole tile, FA_RB rows at a time */
                TILE_QKT(Sij, Qi, KjT, rows_p, Bcp, d, dp);

                for (int64_t r = 0; r < rows_p; ++r) {
                    real *restrict Sr = Sij + r * Bcp;
                    /* Columns lo..hi-1 are the keys this row sees: score mods there (x = scale
                     * q.k, softcap * tanh(x / softcap), minus slope |diag - key|, as
                     * fa_mask.cuh's score_mod); -inf elsewhere, and for keys past Nk. */
                    const int64_t diag = row0 + r + shift;
                    const int64_t first = diag - left - col0, last = diag + right - col0; /* tile columns */
                    const int64_t lo = first < 0 ? 0 : min64(first, cols);
                    const int64_t hi = last < lo ? lo : min64(last + 1, cols);
                    for (int64_t c = 0; c < lo; ++c)
                        Sr[c] = neg_inf;
                    for (int64_t c = lo; score_mods && c < hi; ++c) {
                        const int64_t off = diag - (col0 + c);
                        real x = Sr[c];
                        if (softcap > 0)
                            x = softcap * TANH(x / softcap);
                        Sr[c] = x - slope * (real)(off < 0 ? -off : off);
                    }
                    for (int64_t c = hi; c < Bcp; ++c)
                        Sr[c] = neg_inf;

                    /* line 9: mi_new = max(mi, rowmax(Sij)), Pij = exp(Sij - mi_new),
                     * lij = rowsum(Pij), li = exp(mi - mi_new) li + lij */
                    const real mij = ROW_MAX(Sr, Bcp);
                    const real mi_new = mi[r] > mij ? mi[r] : mij;
                    /* Every key so far masked: subtract 0 so exp(-inf) = 0, not exp(NaN). */
                    const real base = mi_new == neg_inf ? 0 : mi_new;
                    EXP_ROW(Sr, Bcp, base); /* Sr now holds row r of Pij */
                    const real lij = ROW_SUM(Sr, Bcp);
                    alpha[r] = EXP(mi[r] - base);
                    li[r] = alpha[r] * li[r] + lij;
                    mi[r] = mi_new;
                }

                /* line 10: Oi = diag(exp(mi - mi_new)) Oi + Pij Vj for the whole tile */
                TILE_PV(Oi, alpha, Sij, Vj, rows_p, Bcp, dp);
            }

            for (int64_t r = 0; r < rows; ++r) {
                /* line 12: Oi = diag(li)^-1 Oi;  line 13: Li = mi + log(li);
                 * lines 14-15: write Oi and Li. A row with every key masked (or every score
                 * -inf) has li = 0: O = 0 and L = -inf, chosen, not computed, since Oi may
                 * hold 0 * inf = NaN. A NaN li (NaN in the row's inputs) stays NaN. */
                const int empty = li[r] == 0;
                const real inv_l = empty ? 0 : 1 / li[r];
                for (int64_t k = 0; k < d; ++k)
                    Obh[(row0 + r) * d + k] = empty ? 0 : Oi[r * dp + k] * inv_l;
                Lbh[row0 + r] = empty ? -INFINITY : (float)(mi[r] + LOG(li[r]));
            }
        }
    }

done:
    fa_free(Qi);
    fa_free(KjT);
    fa_free(Vj);
    fa_free(Sij);
    fa_free(Oi);
    fa_free(mi);
    fa_free(li);
    fa_free(alpha);
    return status;
}

#undef real
#undef FLASH_FWD
#undef EXP
#undef EXP_ROW
#undef TANH
#undef LOG
#undef ROW_MAX
#undef ROW_SUM
#undef TILE_QKT
#undef TILE_PV
#undef VEC
#undef VLOAD
#undef VSTORE
