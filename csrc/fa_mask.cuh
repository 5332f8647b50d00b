// fa_mask.cuh: which keys a query row sees, and what its scores become, for every kernel.
//
// A kernel's (batch, head) index b reads one sequence: fixed-length (rows 0..Nq-1 of Q, keys
// 0..Nk-1), or varlen (cu_q, cu_k given: rows cu_q[b]..cu_q[b+1]-1 of the packed tensors).
// Row i of a sequence with nq queries and nk keys sees key j when
//     i + shift - left <= j <= i + shift + right,    shift = nk - nq (bottom-right aligned),
// the sliding window; causal is right = 0 and left = nk (unbounded). The caller clamps an
// unbounded side to nk (left) or nq (right), enough for any row, and in int range.
// Score mods (MASK = FA_MODS): x = scale * q.k, then softcap * tanh(x / softcap) when softcap > 0
// (Gemma 2), then - slope * |i + shift - j| (ALiBi), as the flash-attn package defines them.
#pragma once

enum { FA_NONE = 0, FA_WINDOW = 1, FA_MODS = 2 };   // the kernels' MASK: what is applied

struct fa_seq {
    long long q0, k0;   // the sequence's first row in Q / O and in K / V (varlen; else 0)
    int nq, nk;         // its queries and keys
    int rows;           // its rows from the tile's first on (<= 0: none)

    __device__ static long long first_row(int b, const int* cu) { return cu ? cu[b] : 0; }

    __device__ static fa_seq of(int b, int row0, int Nq, int Nk, const int* cu_q, const int* cu_k) {
        fa_seq s;
        s.q0 = first_row(b, cu_q);
        s.k0 = first_row(b, cu_k);
        s.nq = cu_q ? cu_q[b + 1] - cu_q[b] : Nq;
        s.nk = cu_k ? cu_k[b + 1] - cu_k[b] : Nk;
        s.rows = s.nq - row0;
        return s;
    }
};

// The Q tile a block computes and the first (batch, head) it takes (the kernels' grid is (Q tiles,
// heads, batch), striding over heads and batch past 65535). Without a mask every tile costs the
// same, and consecutive blocks share a head, whose K and V then stay in L2. With one, tile i of a
// causal call sees i + 1 key tiles: the heaviest tile index goes first over the whole grid (tile
// index slowest), so the blocks still running at the end are short ones. On an H200 (wgmma, fp16,
// causal) that ran 4-13% faster than heaviest-first within each head, the most at long N.
struct fa_block {
    int tile, h, b;

    template <int MASK>
    __device__ static fa_block of() {
        if (!MASK) return fa_block{(int)blockIdx.x, (int)blockIdx.y, (int)blockIdx.z};
        const long long heads = (long long)gridDim.y * gridDim.z;   // (batch, head) slots: up to 2^32
        const long long lin = blockIdx.x + gridDim.x * (blockIdx.y + (long long)gridDim.y * blockIdx.z);
        const long long bh = lin % heads;
        return fa_block{(int)(gridDim.x - 1 - lin / heads), (int)(bh % gridDim.y), (int)(bh / gridDim.y)};
    }
};

struct fa_window {
    long long shift;
    int left, right, nk;

    __device__ static fa_window of(const fa_seq& s, int left, int right) {
        return fa_window{(long long)s.nk - s.nq, left, right, s.nk};
    }
    // The key aligned with row i (its causal diagonal), in 64 bits: i + shift spans (-nq, nk).
    __device__ long long diag(int row) const { return row + shift; }
    __device__ bool sees(int row, int key) const {
        const long long off = diag(row) - key;
        return off <= left && -off <= right;
    }
    // [j0, j1): the key tiles of BC keys that rows row0..row0+rows-1 see; others are skipped,
    // so a window's cost follows its width. j1 comes in as the tile count of nk keys.
    __device__ void tiles(int row0, int rows, int BC, int& j0, int& j1) const {
        const long long first = diag(row0) - left, last = diag(row0 + rows - 1) + right;
        if (last < 0 || first >= nk || first > last) {
            j1 = j0;
            return;
        }
        j0 = first <= 0 ? 0 : (int)(first / BC);
        j1 = (int)(last / BC + 1 < j1 ? last / BC + 1 : j1);
    }
    // The keys col0 + c (0 <= c < width, and key < nk) that row `row` sees, as the offsets
    // lo <= c <= hi (hi < lo: none); WINDOW false: only the bound nk. An edge tile's mask is then
    // one 32-bit test a score (sees() costs ~15 instructions and a branch a score, in 64 bits).
    template <bool WINDOW>
    __device__ void seen(int row, int col0, int width, int nk, int& lo, int& hi) const {
        lo = 0;
        hi = (nk - col0 < width ? nk - col0 : width) - 1;
        if (WINDOW) {
            const long long first = diag(row) - left - col0, last = diag(row) + right - col0;
            if (first > lo) lo = first > width ? width : (int)first;
            if (last < hi) hi = last < -1 ? -1 : (int)last;
        }
    }
    // Every row wrow0..wrow0+WR-1 sees every key col0..col0+BC-1: no per-score mask needed.
    __device__ bool covers(int wrow0, int WR, int col0, int BC) const {
        return col0 >= diag(wrow0 + WR - 1) - left && col0 + BC - 1 <= diag(wrow0) + right;
    }
};

// A block's Q tile of BR rows from row0 on in sequence b: the sequence, the rows of the tile it
// has (rows <= 0: none, the block skips it), its window, and the key tiles [j0, j1) of BC keys
// that some of those rows see (all of them without a mask).
template <int MASK>
struct fa_tile {
    fa_seq sq;
    fa_window win;
    int rows, j0, j1;

    __device__ static fa_tile of(int b, int row0, int BR, int BC, int Nq, int Nk, const int* cu_q, const int* cu_k,
                                 int left, int right) {
        fa_tile t;
        t.sq = fa_seq::of(b, row0, Nq, Nk, cu_q, cu_k);
        t.rows = t.sq.rows < BR ? t.sq.rows : BR;
        t.win = fa_window::of(t.sq, left, right);
        t.j0 = 0;
        t.j1 = (t.sq.nk + BC - 1) / BC;
        if (MASK && t.rows > 0) t.win.tiles(row0, t.rows, BC, t.j0, t.j1);
        return t;
    }
};

// The modded score in the log2 domain, from s with s * scale the scaled score; off = i + shift - j.
__device__ __forceinline__ float score_mod(float s, float scale, float softcap, float slope, long long off) {
    float x = s * scale;
    if (softcap > 0.f) x = softcap * tanhf(x / softcap);
    x -= slope * fabsf((float)off);
    return x * 1.4426950408889634f;
}
