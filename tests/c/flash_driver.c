/* flash_driver.c: runs the C twin on cases read from stdin, for tests/test_sanitizers.py, which
 * builds it with csrc/flash_fwd.c under AddressSanitizer and UBSan and checks the outputs.
 *
 * Every buffer is its own malloc of exactly the bytes the call may touch, so a read or write
 * one element past any of them lands in ASan's red zone. A record on stdin is
 *   int64 op, BH, group, Nq, Nk, d, Br, Bc, left, right, has_alibi; double scale, softcap;
 *   then the inputs
 * op 0: flash_fwd_f32 on float Q [BH][Nq][d], K and V [KV][Nk][d] with KV = ceil(BH / group),
 *       then, if has_alibi, float slopes [BH]; mods {left, right, softcap, slopes or NULL};
 *       writes O, then float L [BH][Nq]
 * op 1: flash_fwd_f64, the same with double Q, K, V, O
 * op 2: flash_exp_f32 on BH floats with base = scale; writes the BH results
 * Exit status: 0 at end of input, 2 for a short or malformed record, 3 if a call fails
 * (sizes are >= 1: the Python side sends only valid calls). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>

#include "flash_fwd.h"

static void *read_exact(size_t bytes)
{
    void *p = malloc(bytes);
    if (!p || fread(p, 1, bytes, stdin) != bytes) {
        fprintf(stderr, "flash_driver: short input (%zu bytes wanted)\n", bytes);
        exit(2);
    }
    return p;
}

static void write_exact(const void *p, size_t bytes)
{
    if (fwrite(p, 1, bytes, stdout) != bytes) {
        fprintf(stderr, "flash_driver: short write\n");
        exit(2);
    }
}

int main(void)
{
    int64_t h[11];
    while (fread(h, sizeof h, 1, stdin) == 1) {
        const int64_t op = h[0], BH = h[1], group = h[2], Nq = h[3], Nk = h[4], d = h[5], Br = h[6];
        const int64_t Bc = h[7], KV = group > 0 ? (BH + group - 1) / group : 0;
        const int has_alibi = (int)h[10];
        double f[2]; /* scale, softcap */
        if (fread(f, sizeof f, 1, stdin) != 1 || op < 0 || op > 2 || BH < 0 || group < 1) {
            fprintf(stderr, "flash_driver: malformed record\n");
            return 2;
        }
        int status;
        if (op == 2) {
            float *x = read_exact(sizeof(float) * BH), *y = malloc(sizeof(float) * BH);
            status = flash_exp_f32(x, y, BH, (float)f[0]);
            if (status == FLASH_OK)
                write_exact(y, sizeof(float) * BH);
            free(x);
            free(y);
        } else {
            const size_t size = op == 0 ? sizeof(float) : sizeof(double);
            void *Q = read_exact(size * BH * Nq * d), *K = read_exact(size * KV * Nk * d);
            void *V = read_exact(size * KV * Nk * d);
            float *alibi = has_alibi ? read_exact(sizeof(float) * BH) : NULL;
            void *O = malloc(size * BH * Nq * d);
            float *L = malloc(sizeof(float) * BH * Nq);
            const flash_mods mods = {h[8], h[9], f[1], alibi};
            status = op == 0 ? flash_fwd_f32(Q, K, V, O, L, BH, group, Nq, Nk, d, Br, Bc, (float)f[0], &mods)
                             : flash_fwd_f64(Q, K, V, O, L, BH, group, Nq, Nk, d, Br, Bc, f[0], &mods);
            free(alibi);
            if (status == FLASH_OK) {
                write_exact(O, size * BH * Nq * d);
                write_exact(L, sizeof(float) * BH * Nq);
            }
            free(Q);
            free(K);
            free(V);
            free(O);
            free(L);
        }
        if (status != FLASH_OK) {
            fprintf(stderr, "flash_driver: op %lld returned %d\n", (long long)op, status);
            return 3;
        }
        fflush(stdout);
    }
    return 0;
}
