// Host driver for tests/test_mask_host.py: csrc/fa_mask.cuh's integer logic, which every kernel
// runs, against brute force. fa_window::tiles (the key tiles a Q tile's rows see: every tile with
// a seen key inside [j0, j1), and the first and last of them at its ends), fa_window::covers (every
// row of a warp sees every key of a tile), fa_window::seen (a row's key range in an edge tile,
// score by score against sees()), and fa_block::of (the causal grid order: a bijection
// onto (Q tile, head, batch), heaviest Q tiles first). Prints the checks made and the failures
// (the first few in full); exits 1 on any.
#define __device__
#define __forceinline__ inline
struct fa_dim3 { unsigned x, y, z; };
static fa_dim3 blockIdx, gridDim;
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>
#include "fa_mask.cuh"

static std::mt19937_64 rng(2026);
static long long checks = 0, failures = 0;
static long long pick(long long lo, long long hi) { return lo + (long long)(rng() % (unsigned long long)(hi - lo + 1)); }
#define CHECK(cond, ...) do { ++checks; if (!(cond) && failures++ < 5) { printf(__VA_ARGS__); printf("\n"); } } while (0)

static fa_window window_of(int nq, int nk, int left, int right) {
    fa_seq sq;
    sq.q0 = sq.k0 = 0;
    sq.nq = nq;
    sq.nk = nk;
    sq.rows = nq;
    return fa_window::of(sq, left, right);
}

// Window sides as the kernels get them: clamped to the call's Nk (left) and Nq (right), which a
// varlen sequence's nk and nq may be below, so up to twice them here (within int); causal is
// left = nk, right = 0.
static void sides(int nq, int nk, int& left, int& right) {
    const long long max_left = 2ll * nk < 2147483647 ? 2ll * nk : 2147483647;
    const long long max_right = 2ll * nq < 2147483647 ? 2ll * nq : 2147483647;
    left = pick(0, 3) == 0 ? nk : (int)pick(0, max_left);
    right = pick(0, 3) == 0 ? 0 : (int)pick(0, max_right);
}

static void check_tiles_small() {
    const int nq = (int)pick(1, 300), nk = (int)pick(1, 300), BC = 16 << pick(0, 3), rows = (int)pick(1, 128);
    int left, right;
    sides(nq, nk, left, right);
    const fa_window win = window_of(nq, nk, left, right);
    const int row0 = (int)pick(0, nq - 1), last_row = row0 + rows - 1 < nq ? row0 + rows - 1 : nq - 1;
    int j0 = 0, j1 = (nk + BC - 1) / BC;
    win.tiles(row0, last_row - row0 + 1, BC, j0, j1);
    int first = -1, last = -1;   // the first and last key tile with a key some row sees
    for (int t = 0; t * BC < nk; ++t)
        for (int key = t * BC; key < nk && key < (t + 1) * BC; ++key)
            for (int r = row0; r <= last_row; ++r)
                if (win.sees(r, key)) {
                    if (first < 0) first = t;
                    last = t;
                }
    if (first < 0)
        CHECK(j0 >= j1, "tiles: nq %d nk %d left %d right %d rows %d..%d BC %d: no key seen, got [%d, %d)", nq, nk,
              left, right, row0, last_row, BC, j0, j1);
    else
        CHECK(j0 == first && j1 == last + 1, "tiles: nq %d nk %d left %d right %d rows %d..%d BC %d: seen tiles "
              "%d..%d, got [%d, %d)", nq, nk, left, right, row0, last_row, BC, first, last, j0, j1);
}

static void check_tiles_huge() {   // lengths near int's limit: no seen key may lie in a skipped tile
    const int big = 2147483647;
    const int nq = (int)pick(1, big), nk = (int)pick(1, big), BC = 16 << pick(0, 3), rows = (int)pick(1, 128);
    int left, right;
    sides(nq, nk, left, right);
    const fa_window win = window_of(nq, nk, left, right);
    const int row0 = (int)pick(0, nq - 1), n = row0 + (long long)rows - 1 < nq ? rows : nq - row0;
    int j0 = 0, j1 = (int)((nk + (long long)BC - 1) / BC);
    win.tiles(row0, n, BC, j0, j1);
    for (int s = 0; s < 64; ++s) {
        const int r = row0 + (int)pick(0, n - 1);
        // keys near the row's window edges and at random
        const long long d = win.diag(r);
        const long long cands[4] = {d - left, d + right, pick(0, nk - 1), d};
        for (long long key : cands) {
            if (key < 0 || key >= nk) continue;
            const int t = (int)(key / BC);
            if (win.sees(r, (int)key))
                CHECK(t >= j0 && t < j1, "tiles (huge): nq %d nk %d left %d right %d row %d key %lld BC %d: seen in "
                      "tile %d, outside [%d, %d)", nq, nk, left, right, r, key, BC, t, j0, j1);
        }
    }
}

static void check_covers() {
    const int nq = (int)pick(1, 200), nk = (int)pick(1, 200), WR = 16 << pick(0, 2), BC = 16 << pick(0, 3);
    int left, right;
    sides(nq, nk, left, right);
    const fa_window win = window_of(nq, nk, left, right);
    const int wrow0 = (int)pick(0, nq - 1), col0 = (int)pick(0, nk - 1);
    bool all = true;
    for (int r = wrow0; r < wrow0 + WR && all; ++r)
        for (int key = col0; key < col0 + BC && all; ++key) all = win.sees(r, key);
    CHECK(win.covers(wrow0, WR, col0, BC) == all, "covers: nq %d nk %d left %d right %d rows %d+%d keys %d+%d: "
          "brute force %d", nq, nk, left, right, wrow0, WR, col0, BC, all);
}

// fa_window::seen: the key range of one row in a tile (or a decoding warp's keys, which may start
// past nk) against sees() and the nk bound, score by score; lengths up to int's limit.
static void check_seen() {
    const bool huge = pick(0, 3) == 0;
    const int nq = (int)(huge ? pick(1, 2147483647) : pick(1, 3000)), nk = (int)(huge ? pick(1, 2147483647) : pick(1, 3000));
    int left, right;
    sides(nq, nk, left, right);
    const fa_window win = window_of(nq, nk, left, right);
    const int width = 8 << pick(1, 4);
    const long long tiles = (nk + (long long)width - 1) / width;
    const long long col0 = pick(0, tiles - 1) * width + (pick(0, 3) == 0 ? pick(0, width) : 0);
    if (col0 + width > 2147483647) return;
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
            CHECK(rule == range, "seen: nq %d nk %d left %d right %d row %d col0 %lld key %d window %d: sees %d, "
                  "range [%d, %d]", nq, nk, left, right, row, col0, key, window, !rule, lo, hi);
        }
    }
}

static void check_block_order(unsigned gx, unsigned gy, unsigned gz, bool exhaustive) {
    gridDim = {gx, gy, gz};
    const long long heads = (long long)gy * gz, blocks = heads * gx;
    std::vector<char> seen(exhaustive ? blocks : 0, 0);
    long long prev_tile = gx;
    const long long samples = exhaustive ? blocks : 200;
    for (long long s = 0; s < samples; ++s) {
        const long long lin = exhaustive ? s : pick(0, blocks - 1);
        blockIdx = {(unsigned)(lin % gx), (unsigned)(lin / gx % gy), (unsigned)(lin / gx / gy)};
        const fa_block blk = fa_block::of<1>();
        const bool in = blk.tile >= 0 && blk.tile < (long long)gx && blk.h >= 0 && blk.h < (long long)gy &&
                        blk.b >= 0 && blk.b < (long long)gz;
        CHECK(in, "fa_block: grid (%u, %u, %u), block %lld -> (%d, %d, %d) out of range", gx, gy, gz, lin, blk.tile,
              blk.h, blk.b);
        // the inverse: linear index = (Q tiles from the last) x (batch, head) slots + slot
        CHECK((gx - 1 - (long long)blk.tile) * heads + (long long)blk.b * gy + blk.h == lin,
              "fa_block: grid (%u, %u, %u), block %lld -> (%d, %d, %d) not where it maps back", gx, gy, gz, lin,
              blk.tile, blk.h, blk.b);
        if (exhaustive && in) {
            const long long id = ((long long)blk.tile * gy + blk.h) * gz + blk.b;
            CHECK(!seen[id], "fa_block: grid (%u, %u, %u): (%d, %d, %d) twice", gx, gy, gz, blk.tile, blk.h, blk.b);
            seen[id] = 1;
            CHECK(blk.tile <= prev_tile, "fa_block: grid (%u, %u, %u): block %lld takes tile %d after tile %lld",
                  gx, gy, gz, lin, blk.tile, prev_tile);
            prev_tile = blk.tile;
        }
    }
}

int main(int argc, char** argv) {
    const long long trials = argc > 1 ? atoll(argv[1]) : 20000;
    for (long long i = 0; i < trials; ++i) {
        check_tiles_small();
        check_tiles_huge();
        check_covers();
        for (int s = 0; s < 20; ++s) check_seen();
    }
    for (int i = 0; i < 200; ++i)
        check_block_order((unsigned)pick(1, 40), (unsigned)pick(1, 12), (unsigned)pick(1, 12), true);
    for (int i = 0; i < 200; ++i)   // grids CUDA allows: x < 2^31, y and z <= 65535
        check_block_order((unsigned)pick(1, 2147483647), (unsigned)pick(1, 65535), (unsigned)pick(1, 65535), false);
    printf("%lld checks, %lld failures\n", checks, failures);
    return failures != 0;
}
