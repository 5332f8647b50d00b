// cuda_on_cpu.h: just enough of CUDA to run our CUDA-core kernels (flash_fwd_simt.cu,
// flash_fwd_fma.cu) on the CPU, unchanged, for tests on machines without a GPU.
//
// Each thread of a block is a fiber (ucontext) on one OS thread; a fiber runs until it reaches
// a barrier (__syncthreads, __syncwarp, a shuffle), then the next one runs. So a block executes
// in one of the orders the hardware allows (each thread's code between two barriers in one go,
// thread after thread), shared memory is one buffer the block's fibers share, and threadIdx /
// blockIdx are globals the scheduler sets before it switches to a fiber. Blocks run one after
// another. Asynchronous copies (cp.async, csrc/fa_async.cuh's FA_CPU_EMULATION branch) read their
// source when issued and land when their thread waits for them. Other inline PTX (tensor cores)
// is out of reach: kernels using it cannot be built here.
#pragma once
#define FA_CPU_EMULATION
#include <ucontext.h>

#include <math.h>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <deque>
#include <utility>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __align__(n)
#define __shared__   // only `extern __shared__ float smem[]` (below): a static __shared__ array would be per thread

struct uint3 { unsigned x, y, z; };
struct dim3 { unsigned x, y, z; };
struct alignas(8) float2 { float x, y; };
struct alignas(16) float4 { float x, y, z, w; };
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }

inline uint3 threadIdx, blockIdx;
inline dim3 blockDim, gridDim;

constexpr size_t FA_EMU_SMEM = 228 * 1024;   // an H100's shared memory a block, the most any plan asks
alignas(128) inline float smem[FA_EMU_SMEM / sizeof(float)];   // `extern __shared__ float smem[]`

inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline float __uint_as_float(unsigned i) { float f; std::memcpy(&f, &i, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned i; std::memcpy(&i, &f, 4); return i; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
inline long long min(long long a, long long b) { return a < b ? a : b; }
inline long long max(long long a, long long b) { return a > b ? a : b; }
template <typename T> T atomicAdd(T* p, T v) { T old = *p; *p = old + v; return old; }

namespace emu {

struct Copy { char* dst; char bytes[16]; int size; };   // an asynchronous copy, its source read

struct Fiber {
    ucontext_t ctx;
    bool done;
    std::vector<Copy> open;                  // copies issued since the last commit
    std::deque<std::vector<Copy>> groups;    // committed, oldest first
};

struct Block {
    std::vector<Fiber> fibers;
    std::vector<char> stacks;
    ucontext_t scheduler;
    int current = 0, live = 0;
    long long progress = 0;   // arrivals, releases and returns: a round of the scheduler without any is a deadlock
    // a barrier: how many have arrived, and its generation (bumped at each release)
    long long arrived = 0, generation = 0;
    std::vector<long long> warp_arrived, warp_generation, warp_live;
    std::vector<unsigned long long> lanes;   // a shuffle's values, one slot a thread
};
inline Block* block;
constexpr size_t STACK = 256 * 1024;

inline void yield() { swapcontext(&block->fibers[block->current].ctx, &block->scheduler); }

// Wait until every live thread of the group (the block, or one warp) has arrived.
inline void barrier(long long& arrived, long long& generation, const long long& live) {
    const long long mine = generation;
    ++block->progress;
    if (++arrived == live) {
        arrived = 0;
        ++generation;
        return;
    }
    while (generation == mine) yield();
}

inline void sync_warp() {
    const int w = threadIdx.x / 32;
    barrier(block->warp_arrived[w], block->warp_generation[w], block->warp_live[w]);
}

// Lane `source` of this warp's values of v.
template <typename T>
T shuffle(unsigned mask, T v, int source) {
    static_assert(sizeof(T) <= 8, "a register's worth");
    if (mask != 0xffffffffu) { std::fprintf(stderr, "cuda_on_cpu: shuffles take the full warp\n"); std::abort(); }
    const int t = threadIdx.x, base = t - t % 32;
    std::memcpy(&block->lanes[t], &v, sizeof(T));
    sync_warp();   // every lane's value is written
    T r;
    std::memcpy(&r, &block->lanes[base + source % 32], sizeof(T));
    sync_warp();   // every lane has read before the slots are written again
    return r;
}

// cp.async: `size` bytes to dst from src, of which the first src_size are read (the rest zeros).
inline void copy_async(void* dst, const void* src, int src_size, int size) {
    Copy c{static_cast<char*>(dst), {}, size};
    std::memcpy(c.bytes, src, src_size);
    block->fibers[block->current].open.push_back(c);
}
inline void commit_async() {
    Fiber& f = block->fibers[block->current];
    f.groups.push_back(std::move(f.open));
    f.open.clear();
}
// Land all but the newest n committed groups of this thread.
inline void wait_async(int n) {
    Fiber& f = block->fibers[block->current];
    for (; (int)f.groups.size() > n; f.groups.pop_front())
        for (const Copy& c : f.groups.front()) std::memcpy(c.dst, c.bytes, c.size);
}

}  // namespace emu

inline void __syncthreads() { emu::barrier(emu::block->arrived, emu::block->generation, emu::block->live); }
inline void __syncwarp(unsigned mask = 0xffffffffu) { (void)mask; emu::sync_warp(); }

template <typename T> T __shfl_xor_sync(unsigned mask, T v, int x) {
    return emu::shuffle(mask, v, (threadIdx.x % 32) ^ x);
}
template <typename T> T __shfl_sync(unsigned mask, T v, int src) { return emu::shuffle(mask, v, src); }

namespace emu {

template <typename F>
struct Entry { static inline F* body; };

template <typename F>
void fiber_main() {
    (*Entry<F>::body)();
    Fiber& f = block->fibers[block->current];
    f.done = true;
    ++block->progress;
    --block->live;   // a thread that returns stops counting at barriers (as on Volta and later)
    const int w = block->current / 32;
    --block->warp_live[w];
    // release barriers the others now wait at with everyone left arrived
    if (block->live > 0 && block->arrived == block->live) { block->arrived = 0; ++block->generation; }
    if (block->warp_live[w] > 0 && block->warp_arrived[w] == block->warp_live[w]) {
        block->warp_arrived[w] = 0;
        ++block->warp_generation[w];
    }
}

// Run `body` (the kernel call) as a grid of blocks of `threads` threads with `smem_bytes` of
// dynamic shared memory, which starts each block as NaN bytes (a read before a write shows).
// Returns 0; -1 when the block could not be run (the caller's plan asked for too much); -2 when
// its threads deadlocked (each waits at a barrier the others never reach, as a hang on a GPU).
template <typename F>
int launch(dim3 grid, unsigned threads, size_t smem_bytes, F body) {
    if (smem_bytes > FA_EMU_SMEM || threads == 0 || threads % 32) return -1;
    Entry<F>::body = &body;
    gridDim = grid;
    blockDim = dim3{threads, 1, 1};
    Block b;
    b.fibers.resize(threads);
    b.stacks.resize(threads * STACK);
    b.lanes.resize(threads);
    block = &b;
    for (unsigned z = 0; z < grid.z; ++z)
    for (unsigned y = 0; y < grid.y; ++y)
    for (unsigned x = 0; x < grid.x; ++x) {
        blockIdx = uint3{x, y, z};
        std::memset(smem, 0xff, smem_bytes);
        b.live = threads;
        b.arrived = 0;
        b.warp_arrived.assign(threads / 32, 0);
        b.warp_generation.assign(threads / 32, 0);
        b.warp_live.assign(threads / 32, 32);
        for (unsigned t = 0; t < threads; ++t) {
            Fiber& f = b.fibers[t];
            f.done = false;
            f.open.clear();
            f.groups.clear();   // a copy never waited for is lost with its block (the kernel's bug to show)
            getcontext(&f.ctx);
            f.ctx.uc_stack.ss_sp = b.stacks.data() + t * STACK;
            f.ctx.uc_stack.ss_size = STACK;
            f.ctx.uc_link = &b.scheduler;
            makecontext(&f.ctx, fiber_main<F>, 0);
        }
        for (unsigned left = threads; left > 0;) {   // round robin until every thread has returned
            const long long before = b.progress;
            left = 0;
            for (unsigned t = 0; t < threads; ++t) {
                if (b.fibers[t].done) continue;
                b.current = t;
                threadIdx = uint3{t, 0, 0};
                swapcontext(&b.scheduler, &b.fibers[t].ctx);
                left += !b.fibers[t].done;
            }
            if (left > 0 && b.progress == before) {
                block = nullptr;
                return -2;
            }
        }
    }
    block = nullptr;
    return 0;
}

// A kernel called with its arguments as cuLaunchKernel takes them: args[i] addresses the i-th.
template <typename... P, size_t... I>
void call(void (*kernel)(P...), void** args, std::index_sequence<I...>) {
    kernel(*static_cast<std::remove_cv_t<std::remove_reference_t<P>>*>(args[I])...);
}
template <typename... P>
int launch_kernel(void (*kernel)(P...), dim3 grid, unsigned threads, size_t smem_bytes, void** args) {
    return launch(grid, threads, smem_bytes, [=] { call(kernel, args, std::index_sequence_for<P...>{}); });
}

}  // namespace emu
