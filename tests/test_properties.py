"""Property tests (hypothesis): random batch, heads (and fewer k/v heads: MQA), Nq, Nk (1..2048),
d (1..256), causal, sliding window, softcap, ALiBi slopes, scale, dtype, value scale, value
distribution and memory layout, against the float64 reference with the bounds of tolerances.py. The C twin in CI (500 examples); CUDA and C together on the GPU (1000).

Replay: the runs are derandomized (the examples follow from the test's source and hypothesis's
version), so a failure recurs on every run; hypothesis prints the shrunk example, and print_blob
a @reproduce_failure line that replays it exactly. A shrunk failure becomes a regular test below.
Sizes are capped so the reference's Nq x Nk matrices stay small (B H Nq Nk <= 2**22 and
B H Nq Nk d <= 2**27): large Nq and Nk come with small d, and the other way round.
"""
from dataclasses import dataclass

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from backends import FP32_OPTIONS, np_dtype, run
from flashattn_cupy import _device
from tolerances import assert_attention_close

MAX_SCORES, MAX_MACS = 2**22, 2**27
# Around every tile size either backend uses (8..128) and the ends of the ranges
AWKWARD = sorted({1, 2, 3} | {n + e for n in (8, 16, 32, 64, 128, 256, 512, 1024, 2048) for e in (-1, 0, 1)})
FUZZ = dict(derandomize=True, database=None, print_blob=True, deadline=None,
            suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@dataclass(frozen=True)
class Problem:
    lead: tuple
    Nq: int
    Nk: int
    d: int
    causal: bool
    scale: float | None
    dtype: str
    magnitude: float
    values: str      # "normal", "uniform" or "ties" (small integers: many equal scores)
    layout: str      # "contiguous", "transposed" ((B, N, H, d) memory) or "reversed" (negative strides)
    seed: int
    backend: str     # "c", or a key of backends.FP32_OPTIONS: how float32 runs on CUDA
    mqa: bool = False             # k and v with one head (when there are heads)
    window: tuple | None = None   # (left, right), -1 unbounded
    softcap: float = 0.0
    alibi: tuple | None = None    # one slope per head

    def mods(self) -> dict:
        """flash_attention's keywords for the drawn mask and score mods."""
        slopes = None if self.alibi is None else np.array(self.alibi, dtype=np.float32)
        return dict(causal=self.causal, softmax_scale=self.scale, window=self.window, softcap=self.softcap,
                    alibi_slopes=slopes)

    def arrays(self, xp=np):
        """q, k, v as arrays of module xp (NumPy or CuPy), in the drawn layout (views made there)."""
        rng = np.random.default_rng(self.seed)
        transposed = self.layout == "transposed" and self.lead

        def one(N, lead):
            shape = lead[:-1] + (N, lead[-1], self.d) if transposed else lead + (N, self.d)
            x = {"normal": lambda: rng.standard_normal(shape), "uniform": lambda: rng.uniform(-1, 1, shape),
                 "ties": lambda: rng.integers(-2, 3, shape).astype(np.float64)}[self.values]()
            x = xp.asarray((self.magnitude * x).astype(np_dtype(self.dtype)))
            if transposed:
                return x.swapaxes(-2, -3)
            return x[..., ::-1, :] if self.layout == "reversed" else x

        kv_lead = self.lead[:-1] + (1,) if self.mqa else self.lead
        return one(self.Nq, self.lead), one(self.Nk, kv_lead), one(self.Nk, kv_lead)


def _sizes(upper):
    return st.one_of(st.integers(1, upper), st.sampled_from([n for n in AWKWARD if n <= upper]))


@st.composite
def problems(draw, dtypes, backends=("c",)):
    """A Problem; its backend is backends[0], or for float32 any of `backends`."""
    lead = tuple(draw(st.lists(st.integers(1, 3), max_size=2)))
    bh = int(np.prod(lead))
    Nq = draw(_sizes(min(2048, MAX_SCORES // bh)))
    Nk = draw(_sizes(min(2048, MAX_SCORES // (bh * Nq))))
    d = draw(_sizes(min(256, MAX_MACS // (bh * Nq * Nk))))
    scale = draw(st.one_of(st.none(), st.floats(-4.0, 4.0, allow_nan=False)))
    dtype = draw(st.sampled_from(dtypes))
    side = lambda: st.one_of(st.just(-1), st.integers(0, max(Nq, Nk) + 1))  # noqa: E731
    heads = lead[-1] if lead else 1
    mods = dict(mqa=bool(lead) and draw(st.booleans()),
                window=draw(st.one_of(st.none(), st.tuples(side(), side()))),
                softcap=draw(st.sampled_from([0.0, 0.0, 1.0, 7.5, 50.0])),
                alibi=draw(st.one_of(st.none(), st.tuples(*[st.floats(0.0, 1.0, width=32)] * heads))))
    return Problem(lead, Nq, Nk, d, draw(st.booleans()), scale, dtype,
                   draw(st.sampled_from([2.0**-6, 2.0**-3, 0.5, 1.0, 2.0, 8.0, 32.0])),
                   draw(st.sampled_from(["normal", "uniform", "ties"])),
                   draw(st.sampled_from(["contiguous", "transposed", "reversed"])),
                   draw(st.integers(0, 2**32 - 1)),
                   draw(st.sampled_from(backends)) if dtype == "float32" else backends[0], **mods)


def _check(backend, p, args, host):
    """flash_attention on `backend` and `args` against the reference on `host`, the same values
    as NumPy arrays."""
    O, L, rounding = run(backend, *args, **p.mods())
    assert O.dtype == host[0].dtype and O.shape == host[0].shape
    assert_attention_close(O, L, *host, **p.mods(), **rounding)


@settings(max_examples=500, **FUZZ)
@given(p=problems(("float32", "float64")))
def test_c_matches_the_reference(p):
    q, k, v = p.arrays()
    _check("c", p, (q, k, v), (q, k, v))


@pytest.mark.gpu
@settings(max_examples=1000, **FUZZ)
@given(p=problems(("float32", "float16", "bfloat16"), tuple(FP32_OPTIONS)))
def test_cuda_and_c_match_the_reference(p):
    """CUDA on the drawn dtype, float32 kernel and layout (views made on the GPU); the C twin on
    the same values in float32 (fp16/bf16 are exact in it). Each within its bound of the
    reference, so the two agree within the sum of the bounds."""
    cp = _device.cupy()
    device = p.arrays(cp)
    host = [cp.asnumpy(x) for x in device]
    _check(p.backend, p, device, host)
    host32 = [x.astype(np.float32) for x in host]
    _check("c", p, host32, host32)
