"""cffi build script (API mode), run by setuptools through setup.py's cffi_modules.
The cdef declares only the exported functions of csrc/flash_fwd.h; the sources stay in csrc/.
No -ffast-math: it would let the compiler assume no infinities and break -inf masking.
-ffp-contract=fast lets the tile products use FMA (ISO C mode turns contraction off); FMA
rounds once where mul + add rounds twice, so accuracy only improves."""
from cffi import FFI

ffibuilder = FFI()
ffibuilder.cdef("""
#define FLASH_OK ...
#define FLASH_EBADARG ...
#define FLASH_ENOMEM ...
typedef struct {
    int64_t left, right;
    double softcap;
    const float *alibi;
} flash_mods;
int flash_fwd_f32(const float *Q, const float *K, const float *V, float *O, float *L,
                  int64_t BH, int64_t group, int64_t Nq, int64_t Nk, int64_t d, int64_t Br,
                  int64_t Bc, float scale, const flash_mods *mods);
int flash_exp_f32(const float *x, float *y, int64_t n, float base);
int flash_fwd_f64(const double *Q, const double *K, const double *V, double *O, float *L,
                  int64_t BH, int64_t group, int64_t Nq, int64_t Nk, int64_t d, int64_t Br,
                  int64_t Bc, double scale, const flash_mods *mods);
""")
ffibuilder.set_source(
    "flashattn_cupy._flash_c",
    '#include "flash_fwd.h"',
    sources=["csrc/flash_fwd.c"],
    include_dirs=["csrc"],
    depends=["csrc/flash_fwd.h", "csrc/flash_fwd_body.h"],
    extra_compile_args=["-O3", "-std=c11", "-ffp-contract=fast"],
    libraries=["m"],
)

if __name__ == "__main__":
    ffibuilder.compile(verbose=True)
