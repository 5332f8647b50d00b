/* flash_fwd_body.h: FlashAttention-2 forward, Algorithm 1 (Dao 2023), one thread.
 * Included by flash_fwd.c with `real`, FLASH_FWD, EXP and LOG defined; see flash_fwd.h.
 * Comments cite the lines of Algorithm 1 in the FlashAttention-2 paper. (The seed write-up
 * numbers the online-softmax step 10-12, after FlashAttention-1; here it is lines 9-10.)
 * Names follow the paper: Qi, Kj, Vj the tiles, Sij the scores, Pij the unnormalized
 * probabilities, Oi the output accumulator, mi / li the running row max / row sum, and
 * mij / lij the same two quantities for the tile in hand. */

int FLASH_FWD(const real *Q, const real *K, const real *V, real *O, float *L,
              int64_t BH, int64_t Nq, int64_t Nk, int64_t d, int64_t Br, int64_t Bc,
              real scale, int causal)
{
    if (BH < 1 || Nq < 1 || Nk < 1 || d < 1 || Br < 1 || Bc < 1)
        return FLASH_EBADARG;

    /* The on-chip memory of the paper: O((Br + Bc) d + Br Bc) elements per call. */
    real *Qi = malloc(sizeof(real) * Br * d);
    real *Kj = malloc(sizeof(real) * Bc * d);
    real *Vj = malloc(sizeof(real) * Bc * d);
    real *Sij = malloc(sizeof(real) * Br * Bc); /* Pij overwrites Sij in place */
    real *Oi = malloc(sizeof(real) * Br * d);
    real *mi = malloc(sizeof(real) * Br);
    real *li = malloc(sizeof(real) * Br);
    int status = FLASH_OK;
    if (!Qi || !Kj || !Vj || !Sij || !Oi || !mi || !li) {
        status = FLASH_ENOMEM;
        goto done;
    }

    const real neg_inf = -(real)INFINITY;
    const int64_t Tr = (Nq + Br - 1) / Br; /* line 1: Q in Tr row tiles, K, V in Tc */
    const int64_t Tc = (Nk + Bc - 1) / Bc;

    for (int64_t bh = 0; bh < BH; ++bh) {
        const real *Qbh = Q + bh * Nq * d, *Kbh = K + bh * Nk * d, *Vbh = V + bh * Nk * d;
        real *Obh = O + bh * Nq * d;
        float *Lbh = L + bh * Nq;

        for (int64_t i = 0; i < Tr; ++i) { /* line 3 */
            const int64_t row0 = i * Br, rows = min64(Br, Nq - row0);

            memcpy(Qi, Qbh + row0 * d, sizeof(real) * rows * d); /* line 4 */
            for (int64_t r = 0; r < rows; ++r) {                  /* line 5 */
                mi[r] = neg_inf;
                li[r] = 0;
            }
            memset(Oi, 0, sizeof(real) * rows * d);

            /* Causal: the tile's last row sees keys up to row0 + rows - 1 + (Nk - Nq);
             * later K tiles are wholly masked, so the loop stops before them. */
            int64_t Tc_i = Tc;
            if (causal) {
                const int64_t last_key = row0 + rows - 1 + (Nk - Nq);
                Tc_i = last_key < 0 ? 0 : min64(Tc, last_key / Bc + 1);
            }

            for (int64_t j = 0; j < Tc_i; ++j) { /* line 6 */
                const int64_t col0 = j * Bc, cols = min64(Bc, Nk - col0);

                memcpy(Kj, Kbh + col0 * d, sizeof(real) * cols * d); /* line 7 */
                memcpy(Vj, Vbh + col0 * d, sizeof(real) * cols * d);

                for (int64_t r = 0; r < rows; ++r) {
                    real *Sr = Sij + r * Bc;
                    /* line 8: Sij = scale * Qi Kj^T, masked keys set to -inf */
                    for (int64_t c = 0; c < cols; ++c) {
                        real s = 0;
                        for (int64_t k = 0; k < d; ++k)
                            s += Qi[r * d + k] * Kj[c * d + k];
                        const int masked = causal && col0 + c > row0 + r + (Nk - Nq);
                        Sr[c] = masked ? neg_inf : scale * s;
                    }

                    /* line 9: new running max, Pij = exp(Sij - mi_new), lij = rowsum(Pij),
                     * li = exp(mi - mi_new) li + lij */
                    real mij = neg_inf;
                    for (int64_t c = 0; c < cols; ++c)
                        mij = Sr[c] > mij ? Sr[c] : mij;
                    const real mi_new = mi[r] > mij ? mi[r] : mij;
                    /* Every key so far masked: subtract 0 so exp(-inf) = 0, not exp(NaN). */
                    const real base = mi_new == neg_inf ? 0 : mi_new;
                    real lij = 0;
                    for (int64_t c = 0; c < cols; ++c) {
                        Sr[c] = EXP(Sr[c] - base); /* Sr now holds row r of Pij */
                        lij += Sr[c];
                    }
                    const real alpha = EXP(mi[r] - base);
                    li[r] = alpha * li[r] + lij;
                    mi[r] = mi_new;

                    /* line 10: Oi = diag(exp(mi - mi_new)) Oi + Pij Vj */
                    real *Or = Oi + r * d;
                    for (int64_t k = 0; k < d; ++k)
                        Or[k] *= alpha;
                    for (int64_t c = 0; c < cols; ++c)
                        for (int64_t k = 0; k < d; ++k)
                            Or[k] += Sr[c] * Vj[c * d + k];
                }
            }

            for (int64_t r = 0; r < rows; ++r) {
                /* line 12: Oi = diag(li)^-1 Oi;  line 13: Li = mi + log(li);
                 * lines 14-15: write Oi and Li. A fully masked row has li = 0. */
                const real inv_l = li[r] > 0 ? 1 / li[r] : 0;
                for (int64_t k = 0; k < d; ++k)
                    Obh[(row0 + r) * d + k] = Oi[r * d + k] * inv_l;
                Lbh[row0 + r] = li[r] > 0 ? (float)(mi[r] + LOG(li[r])) : -INFINITY;
            }
        }
    }

done:
    free(Qi);
    free(Kj);
    free(Vj);
    free(Sij);
    free(Oi);
    free(mi);
    free(li);
    return status;
}
