/* flash_fwd.c: instantiates Algorithm 1 (flash_fwd_body.h) for float and double.
 * The body is written once over a type `real`; float accumulates in float, as the GPU
 * kernels do, and double in double. Built by cffi (flashattn_cupy/_build_cffi.py). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "flash_fwd.h"

/* One wheel, fast on AVX2 and AVX-512 machines and correct on any x86-64: GCC compiles the
 * hot functions three times and picks one at load time (ifunc). No -march=native. */
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define FA_HOT __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define FA_HOT
#endif

#define FA_PAD 16     /* tile rows are padded to a multiple of 16 elements (one AVX-512 vector) */
#define FA_ALIGN 64   /* and start on a cache line */
#define FA_RB 4       /* rows of Sij and Oi the tile products keep in registers (unrolled by hand) */

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }
static int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
static void *fa_alloc(size_t bytes) { return aligned_alloc(FA_ALIGN, (size_t)round_up((int64_t)bytes, FA_ALIGN)); }
static void fa_free(void *p) { free(p); }

/* exp(x) for a whole row, vectorizable (libm's expf is a call the compiler cannot vectorize).
 * Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, a degree-7 polynomial for e^r (Cephes
 * coefficients), 2^n by building the exponent bits. Within 2 ulp of the exact value for
 * x in [-87.33, 88) (tests/test_c_twin.py checks it on dense sweeps); below that (and -inf,
 * the masked scores) it returns 0, from 88 on +inf, and NaN stays NaN. The kernel passes
 * x <= 0, scores minus their running max, except in a row holding NaN (which ends NaN); the
 * clamps keep the float-to-int conversion in range for any x (past int32 it is undefined). */
FA_HOT int flash_exp_f32(const float *x, float *y, int64_t n, float base)
{
    const float lo = -87.33654f; /* log(FLT_MIN): 2^n stays a normal number above it */
    const float hi = 88.f;       /* e^88 < FLT_MAX: 2^n stays finite below it */
    for (int64_t c = 0; c < n; ++c) {
        const float t = x[c] - base;
        const float tl = t > lo ? t : lo; /* NaN takes the clamp here, and its own value below */
        const float tc = tl < hi ? tl : hi;
        const float fn = (tc * 1.44269504f + 12582912.f) - 12582912.f; /* round(t / ln2) */
        const float r = (tc - fn * 0.693359375f) + fn * 2.12194440e-4f;
        float p = 1.9875691500e-4f;
        p = p * r + 1.3981999507e-3f;
        p = p * r + 8.3334519073e-3f;
        p = p * r + 4.1665795894e-2f;
        p = p * r + 1.6666665459e-1f;
        p = p * r + 5.0000001201e-1f;
        p = p * r * r + r + 1.f;
        union { int32_t i; float f; } two_n = {((int32_t)fn + 127) << 23};
        const float e = p * two_n.f;
        y[c] = t > lo ? (t < hi ? e : INFINITY) : (t != t ? t : 0.f);
    }
    return FLASH_OK;
}

static void exp_row_f32(float *row, int64_t n, float base) { flash_exp_f32(row, row, n, base); }
static void exp_row_f64(double *row, int64_t n, double base)
{
    for (int64_t c = 0; c < n; ++c)
        row[c] = exp(row[c] - base);
}

#define real float
#define FLASH_FWD flash_fwd_f32
#define EXP expf
#define TANH tanhf
#define EXP_ROW exp_row_f32
#define ROW_MAX row_max_f32
#define ROW_SUM row_sum_f32
#define TILE_QKT tile_qkt_f32
#define TILE_PV tile_pv_f32
#define VEC vec_f32
#define VLOAD vload_f32
#define VSTORE vstore_f32
#define LOG logf
#include "flash_fwd_body.h"

#define real double
#define FLASH_FWD flash_fwd_f64
#define EXP exp
#define TANH tanh
#define EXP_ROW exp_row_f64
#define ROW_MAX row_max_f64
#define ROW_SUM row_sum_f64
#define TILE_QKT tile_qkt_f64
#define TILE_PV tile_pv_f64
#define VEC vec_f64
#define VLOAD vload_f64
#define VSTORE vstore_f64
#define LOG log
#include "flash_fwd_body.h"
