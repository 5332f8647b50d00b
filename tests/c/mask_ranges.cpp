// Host driver for tests/test_mask_ranges.py: csrc/fa_mask.cuh's fa_window::seen (the key range a
// row sees in a tile, which the tensor-core kernels and decoding mask edge tiles with) against its
// per-score rule, sees() and the nk bound, on every score of random tiles. Prints the count of
// scores checked and mismatches (the first few in full); exits 1 on any.
#define __device__
#define __forceinline__ inline
struct fa_dim3 { unsigned x, y, z; };
static fa_dim3 blockIdx, gridDim;   // fa_block reads them; unused here
#include <cstdio>
#include <random>
#include "fa_mask.cuh"

int main(int argc, char** argv) {
    const long long trials = argc > 1 ? atoll(argv[1]) : 1000000;
    std::mt19937_64 rng(12345);
    auto pick = [&](long long lo, long long hi) { return lo + (long long)(rng() % (unsigned long long)(hi - lo + 1)); };
    const int big = 2147483647;
    long long checked = 0, bad = 0;
    for (long long trial = 0; trial < trials; ++trial) {
        const bool huge = trial % 4 == 0;   // sequences up to int's limit: 64-bit diagonals
        const int nq = (int)(huge ? pick(1, big) : pick(1, 3000)), nk = (int)(huge ? pick(1, big) : pick(1, 3000));
        // sides as the callers clamp them: left in [0, nk] (causal: nk), right in [0, nq] (causal: 0)
        int left = pick(0, 3) == 0 ? nk : (int)pick(0, nk < 5000 ? nk : 5000);
        int right = pick(0, 3) == 0 ? 0 : pick(0, 2) == 0 ? nq : (int)pick(0, nq < 5000 ? nq : 5000);
        if (huge && pick(0, 1)) left = (int)pick(0, nk);
        fa_seq sq;
        sq.q0 = sq.k0 = 0;
        sq.nq = nq;
        sq.nk = nk;
        sq.rows = nq;
        const fa_window win = fa_window::of(sq, left, right);
        const int width = 8 << pick(1, 4);   // 16..128 keys
        const long long tiles = (nk + (long long)width - 1) / width;
        // a tile's first key, or a decoding warp's, which may lie past nk in the last tile
        const long long col0 = pick(0, tiles - 1) * width + (pick(0, 3) == 0 ? pick(0, width) : 0);
        if (col0 + width > big) continue;
        const int row = (int)pick(0, nq - 1);
        for (int window = 0; window < 2; ++window) {
            int lo, hi;
            if (window)
                win.seen<true>(row, (int)col0, width, nk, lo, hi);
            else
                win.seen<false>(row, (int)col0, width, nk, lo, hi);
            for (int c = 0; c < width; ++c) {
                const int key = (int)col0 + c;
                const bool rule = key >= nk || (window && !win.sees(row, key)), range = c < lo || c > hi;
                ++checked;
                if (rule != range && bad++ < 5)
                    printf("mismatch: nq %d nk %d left %d right %d row %d col0 %lld key %d window %d: sees %d, "
                           "range [%d, %d]\n", nq, nk, left, right, row, col0, key, window, !rule, lo, hi);
            }
        }
    }
    printf("checked %lld scores, %lld mismatches\n", checked, bad);
    return bad != 0;
}
