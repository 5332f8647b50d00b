/* flash_fwd.c: instantiates Algorithm 1 (flash_fwd_body.h) for float and double.
 * The body is written once over a type `real`; float accumulates in float, as the GPU
 * kernels do, and double in double. Built by cffi (flashattn_cupy/_build_cffi.py). */
#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "flash_fwd.h"

static int64_t min64(int64_t a, int64_t b) { return a < b ? a : b; }

#define real float
#define FLASH_FWD flash_fwd_f32
#define EXP expf
#define LOG logf
#include "flash_fwd_body.h"
#undef real
#undef FLASH_FWD
#undef EXP
#undef LOG

#define real double
#define FLASH_FWD flash_fwd_f64
#define EXP exp
#define LOG log
#include "flash_fwd_body.h"
#undef real
#undef FLASH_FWD
#undef EXP
#undef LOG
