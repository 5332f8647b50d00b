/* flash_fwd.h: the C twin's exported functions (the only declarations cffi sees).
 *
 * FlashAttention-2 forward, Algorithm 1 of Dao (2023), unparallelized. For each of BH
 * independent (batch, head) problems with contiguous row-major Q [Nq][d], K [Nk][d],
 * V [Nk][d], it writes O [Nq][d] and the natural-log logsumexp L [Nq] (always float).
 * Problem bh reads K and V number bh / group: group = 1 gives each Q its own; grouped-query
 * attention shares one K, V among `group` consecutive Q (K and V hold ceil(BH / group)).
 * mods (NULL: none) says which keys each query sees and what its scores become, as
 * csrc/fa_mask.cuh does on the GPU; a row whose keys are all masked gets O = 0 and L = -inf.
 * Extra memory is O((Br + Bc)*d + Br*Bc): never an Nq x Nk matrix.
 * Returns FLASH_OK, or FLASH_EBADARG / FLASH_ENOMEM without touching O and L.
 */
#ifndef FLASH_FWD_H
#define FLASH_FWD_H

#include <stdint.h>

#define FLASH_OK 0
#define FLASH_EBADARG -1
#define FLASH_ENOMEM -2

/* Row i sees key j when i + shift - left <= j <= i + shift + right, shift = Nk - Nq (the
 * sliding window, bottom-right aligned; a negative side is unbounded; causal is left = -1,
 * right = 0). The score x = scale q_i.k_j becomes softcap tanh(x / softcap) when softcap > 0
 * (Gemma 2), then x - alibi[bh] |i + shift - j| when alibi is not NULL (ALiBi: one slope
 * per problem bh, BH of them). */
typedef struct {
    int64_t left, right;
    double softcap;
    const float *alibi;
} flash_mods;

int flash_fwd_f32(const float *Q, const float *K, const float *V, float *O, float *L,
                  int64_t BH, int64_t group, int64_t Nq, int64_t Nk, int64_t d, int64_t Br,
                  int64_t Bc, float scale, const flash_mods *mods);

/* y = exp(x - base), vectorized, as the float kernel computes Pij; exported for its tests. */
int flash_exp_f32(const float *x, float *y, int64_t n, float base);

int flash_fwd_f64(const double *Q, const double *K, const double *V, double *O, float *L,
                  int64_t BH, int64_t group, int64_t Nq, int64_t Nk, int64_t d, int64_t Br,
                  int64_t Bc, double scale, const flash_mods *mods);

#endif
