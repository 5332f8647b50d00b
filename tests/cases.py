"""Shapes the backends are tested on (awkward on purpose), and the devices the planner must
serve: shared by the C, CUDA, compile and emulator tests."""
import itertools

import numpy as np

KB = 1024
# The shared-memory limits of real devices, by compute capability, the planner must serve
DEVICE_LIMITS = {
    75: (48 * KB, 64 * KB),               # T4 without / with the opt-in
    80: (48 * KB, 99 * KB, 163 * KB),     # sm_86/89 consumer parts run sm_80 code; A100
    90: (227 * KB,),                      # H100, H200
}
SIZES = (1, 17, 31, 32, 33, 113, 203, 256, 1023)   # around every tile size, and odd ones
HEAD_DIMS = (16, 40, 59, 64, 80, 96, 128, 256)


def size_cases():
    """Every (Nq, Nk) pair of SIZES, each with a head dim from HEAD_DIMS in rotation."""
    pairs = itertools.product(SIZES, SIZES)
    return [(Nq, Nk, HEAD_DIMS[n % len(HEAD_DIMS)]) for n, (Nq, Nk) in enumerate(pairs)]


def inputs(rng, lead, Nq, Nk, d, dtype=np.float32, magnitude=1.0):
    """Standard-normal q, k, v of shapes lead + (Nq, d) and lead + (Nk, d), times magnitude."""
    shape = lambda N: tuple(lead) + (N, d)  # noqa: E731
    return tuple((magnitude * rng.standard_normal(shape(N))).astype(dtype)
                 for N in (Nq, Nk, Nk))
