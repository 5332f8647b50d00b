// fa_async.cuh: copies from global to shared memory that do not pass through registers
// (cp.async, sm_80+), as inline PTX: a thread issues them, commits them as a group and waits for
// its groups before a barrier makes them visible to the block.
#pragma once

#ifdef FA_CPU_EMULATION
// tests/emulator/cuda_on_cpu.h runs the CUDA-core kernels on a CPU: a copy lands when its thread
// waits for it (the latest the hardware may land it), so a read before the wait finds the old data.
__device__ __forceinline__ unsigned smem_addr(const void* p) { return static_cast<unsigned>(static_cast<const char*>(p) - reinterpret_cast<const char*>(smem)); }
__device__ __forceinline__ void cp_async_4(unsigned dst, const float* src, bool valid) {
    emu::copy_async(reinterpret_cast<char*>(smem) + dst, src, valid ? 4 : 0, 4);
}
__device__ __forceinline__ void fa_opaque(unsigned&) {}
__device__ __forceinline__ void cp_async_commit() { emu::commit_async(); }
__device__ __forceinline__ void cp_async_wait_all() { emu::wait_async(0); }
template <int N>
__device__ __forceinline__ void cp_async_wait_group() { emu::wait_async(N); }
#else
__device__ __forceinline__ unsigned smem_addr(const void* p) {
    unsigned a;
    asm("{ .reg .u64 t; cvta.to.shared.u64 t, %1; cvt.u32.u64 %0, t; }" : "=r"(a) : "l"(p));
    return a;
}

// 16 bytes global -> shared without passing through registers; bytes past src_bytes (0 or 16)
// are zero-filled, which is how rows past N and columns past d become zeros. L2::128B asks L2
// to fetch the whole 128-byte line (as CUTLASS's sm_80 copies do): on an H200, 3% off the
// decoding rows' time and 2-9% on the N = 1k rows, the N = 4k rows unchanged (one A/B run).
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16, %2;"
                 :: "r"(smem_addr(dst)), "l"(src), "r"(src_bytes) : "memory");
}
// The same for a whole chunk: no size operand (load_tile_stepped, decoding's paged tiles).
__device__ __forceinline__ void cp_async_16_full(unsigned dst, const void* src) {
    asm volatile("cp.async.cg.shared.global.L2::128B [%0], [%1], 16;" :: "r"(dst), "l"(src) : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;" ::: "memory"); }
__device__ __forceinline__ void cp_async_wait_all() { asm volatile("cp.async.wait_all;" ::: "memory"); }
// Wait until at most N of this thread's committed groups are still in flight (a multi-stage pipeline).
template <int N>
__device__ __forceinline__ void cp_async_wait_group() { asm volatile("cp.async.wait_group %0;" :: "n"(N) : "memory"); }

// One float to shared address dst, kept in L1 too (.ca: a transposing copy reads each 32-byte
// sector with several instructions); not valid: a zero is written and nothing is read.
__device__ __forceinline__ void cp_async_4(unsigned dst, const float* src, bool valid) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;" :: "r"(dst), "l"(src), "r"(valid ? 4 : 0) : "memory");
}
// x as the compiler must take it from here on: addresses made from it are not hoisted out of a
// loop into registers held across it (a tile copy's 32 shared addresses a thread, otherwise).
__device__ __forceinline__ void fa_opaque(unsigned& x) { asm volatile("" : "+r"(x)); }
#endif
