"""Ring attention's schedule on the CPU: world sizes 1-8 simulated in one process (LocalRing)
over the C backend, each rank's slice unsharded and checked against the float64 reference
with the bound argued in tolerances.ring_bounds, and against flash_attention on one device;
the double buffering (start/wait) checked through LocalRing with a spy."""
import threading

import numpy as np
import pytest

from cases import inputs
from flashattn_cupy import flash_attention, reference
from flashattn_cupy.distributed import LocalRing, ring, ring_attention, ring_schedule, shard, unshard
from tolerances import bounds, ring_bounds

LAYOUTS = ("contiguous", "zigzag")


def _ring(q, k, v, world, *, layout, causal, wrap=None, **kwargs):
    """Shard q, k, v over world simulated ranks, run the ring, and unshard (O, L). wrap(group)
    stands in for each rank's group when given."""
    def rank_main(group):
        group = group if wrap is None else wrap(group)
        r = group.rank
        q_r, k_r, v_r = (shard(x, world, r, layout=layout) for x in (q, k, v))
        return ring_attention(q_r, k_r, v_r, causal=causal, return_lse=True, group=group, layout=layout,
                              **kwargs)
    parts = LocalRing(world).run(rank_main)
    return (unshard([O for O, _ in parts], layout=layout),
            unshard([L for _, L in parts], layout=layout, axis=-1))


def _assert_within(O, L, O_ref, L_ref, tol):
    masked = np.isneginf(L_ref)
    assert np.array_equal(np.isneginf(L), masked) and (O[masked] == 0).all()
    err_O = float(np.abs(O.astype(np.float64) - O_ref).max())
    err_L = float(np.abs(L[~masked].astype(np.float64) - L_ref[~masked]).max())
    assert err_O <= tol[0], f"max |O - O_ref| = {err_O:.3e} > bound {tol[0]:.3e}"
    assert err_L <= tol[1], f"max |L - L_ref| = {err_L:.3e} > bound {tol[1]:.3e}"


def _check(q, k, v, world, layout, causal, compute="float32"):
    O, L = _ring(q, k, v, world, layout=layout, causal=causal)
    assert O.dtype == q.dtype and L.dtype == np.float32 and O.shape == q.shape
    tol = ring_bounds(q, k, v, world * (2 if layout == "zigzag" else 1), compute=compute,
                      out=np.dtype(q.dtype).name)
    _assert_within(O, L, *reference.attention(q, k, v, causal=causal), tol)
    # and against one device's flash_attention, each within its own bound of the reference
    single = bounds(q, k, v, compute=compute, out=np.dtype(q.dtype).name)
    _assert_within(O, L, *flash_attention(q, k, v, causal=causal, return_lse=True),
                   (tol[0] + single[0], tol[1] + single[1]))


@pytest.mark.parametrize("world", range(1, 9))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [False, True])
def test_ring_equals_single_device_attention(rng, world, layout, causal):
    chunk = (7, 13, 5, 9)[world % 4]              # awkward chunk lengths: no tile multiple
    N = 2 * world * chunk
    q, k, v = inputs(rng, (2, 3), N, N, 40, magnitude=1.5)
    _check(q, k, v, world, layout, causal)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_float64(rng, layout):
    q, k, v = inputs(rng, (2,), 60, 60, 64, dtype=np.float64)
    _check(q, k, v, 3, layout, True, compute="float64")


@pytest.mark.parametrize("layout", LAYOUTS)
def test_grouped_query_heads_pass_through(rng, layout):
    q, _, _ = inputs(rng, (2, 6), 48, 48, 32)
    _, k, v = inputs(rng, (2, 2), 48, 48, 32)     # 2 key/value heads for 6 query heads
    _check(q, k, v, 4, layout, True)


def test_cross_attention_with_other_key_length(rng):
    """Without a mask, q and k/v slices may have different lengths (n_q != n_k)."""
    q, _, _ = inputs(rng, (3,), 30, 30, 24)
    _, k, v = inputs(rng, (3,), 66, 66, 24)
    _check(q, k, v, 3, "zigzag", False)


def test_world_one_is_flash_attention_bitwise(rng):
    """One rank, one contiguous slice: one kernel call merged into the empty start, exactly."""
    q, k, v = inputs(rng, (2, 2), 37, 37, 16)
    for causal in (False, True):
        O, L = flash_attention(q, k, v, causal=causal, return_lse=True)
        for group in (None, "local"):
            if group is None:
                O_r, L_r = ring_attention(q, k, v, causal=causal, return_lse=True)
            else:
                (O_r, L_r), = LocalRing(1).run(
                    lambda g: ring_attention(q, k, v, causal=causal, return_lse=True, group=g))
            np.testing.assert_array_equal(O_r, O)
            np.testing.assert_array_equal(L_r, L)
    assert ring_attention(q, k, v).shape == q.shape   # return_lse=False: O alone


def test_softmax_scale(rng):
    q, k, v = inputs(rng, (2,), 24, 24, 16)
    O, _ = _ring(q, k, v, 3, layout="zigzag", causal=True, softmax_scale=0.3)
    O_ref, _ = reference.attention(q, k, v, causal=True, softmax_scale=0.3)
    O_default, _ = reference.attention(q, k, v, causal=True)
    err = np.abs(O - O_ref).max()
    assert err <= ring_bounds(q, k, v, 6, softmax_scale=0.3)[0] < np.abs(O_default - O_ref).max()


def _positions(N, world, rank, layout):
    return shard(np.arange(N)[:, None], world, rank, layout=layout)[:, 0]


@pytest.mark.parametrize("world", range(1, 9))
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("causal", [False, True])
def test_schedule_computes_each_visible_pair_once(world, layout, causal):
    """Over all ranks and steps the blocks cover each (query, key) pair the mask allows exactly
    once and no other: the schedule alone, by global positions, without arithmetic."""
    N = 2 * world * 3
    count = np.zeros((N, N), int)
    for r in range(world):
        q_pos = _positions(N, world, r, layout)
        for t, blocks in enumerate(ring_schedule(world, r, N // world, N // world, causal=causal, layout=layout)):
            k_pos = _positions(N, world, (r - t) % world, layout)
            for b in blocks:
                nq, nk = b.q.stop - b.q.start, b.k.stop - b.k.start
                seen = ~reference.causal_mask(nq, nk) if b.causal else np.ones((nq, nk), bool)
                assert seen.sum() == b.pairs()
                np.add.at(count, np.ix_(q_pos[b.q], k_pos[b.k]), seen)
    expected = ~reference.causal_mask(N, N) if causal else np.ones((N, N), bool)
    np.testing.assert_array_equal(count, expected.astype(int))


@pytest.mark.parametrize("world", [2, 4, 8])
def test_zigzag_balances_causal_work(world):
    """Work per rank and step, in (query, key) pairs: zigzag gives every rank the same at every
    step; contiguous leaves rank 0 one diagonal block and rank r r whole blocks more."""
    n = 64

    def work(layout):
        return np.array([[sum(b.pairs() for b in step) for step in ring_schedule(world, r, n, n, causal=True,
                                                                                 layout=layout)]
                         for r in range(world)])        # [rank, step]
    zigzag, contiguous = work("zigzag"), work("contiguous")
    assert (zigzag == zigzag[:1]).all()               # each step: the same on every rank
    assert zigzag.sum() == contiguous.sum() == n * world * (n * world + 1) // 2
    per_rank = contiguous.sum(axis=1)
    assert (np.diff(per_rank) == n * n).all()          # each rank one more whole block than the last
    assert per_rank[0] == n * (n + 1) // 2              # the last: about 2 world - 1 times that


def test_each_rank_passes_kv_to_the_next(rng):
    """world - 1 exchanges, rank r to rank r + 1 each time, and the K/V that arrive at step t are
    rank r - t's (checked by content: the received copies are the sender's values)."""
    world = 4
    ring = LocalRing(world)
    k = np.arange(world * 2, dtype=np.float32).reshape(world * 2, 1)

    def rank_main(group):
        k_r = shard(k, world, group.rank)
        seen = [k_r]
        for _ in range(world - 1):
            k_next, = group.exchange((k_r,))
            assert k_next is not seen[-1]
            seen.append(k_r := k_next)
        return seen

    for r, seen in enumerate(ring.run(rank_main)):
        for t, got in enumerate(seen):
            np.testing.assert_array_equal(got, shard(k, world, (r - t) % world))
    assert sorted(ring.log) == sorted((t, r, (r + 1) % world) for t in range(world - 1) for r in range(world))


def test_shard_and_unshard_are_inverse(rng):
    x = rng.standard_normal((2, 24, 3))
    for world in (1, 2, 3, 4, 6, 12):
        for layout in LAYOUTS:
            if 24 % (world * (2 if layout == "zigzag" else 1)):
                continue
            parts = [shard(x, world, r, layout=layout) for r in range(world)]
            np.testing.assert_array_equal(unshard(parts, layout=layout), x)
    zig = [shard(x[0, :, 0], 3, r, layout="zigzag", axis=-1) for r in range(3)]   # chunks of 4
    np.testing.assert_array_equal(zig[0], x[0, np.r_[0:4, 20:24], 0])


@pytest.mark.parametrize("call, words", [
    (lambda x: shard(x, 4, 0), "length 30 does not cut into 4 equal chunks"),
    (lambda x: shard(x, 2, 0, layout="zigzag"), "does not cut into 4 equal chunks"),
    (lambda x: shard(x, 3, 3), "0 <= rank < world"),
    (lambda x: shard(x, 3, 0, layout="striped"), "layout must be one of"),
    (lambda x: unshard([x[:, :3], x[:, :5]], layout="zigzag"), "one even length"),
    (lambda x: ring_attention(x[:, :8], x[:, :10], x[:, :10], causal=True), "n_q=8, n_k=10"),
    (lambda x: ring_attention(x[:, :9], x[:, :9], x[:, :9], layout="zigzag"), "an even length"),
    (lambda x: ring_attention(x[0], x[0], x[0], layout="other"), "layout must be one of"),
])
def test_errors(rng, call, words):
    x = rng.standard_normal((2, 30, 8)).astype(np.float32)
    with pytest.raises(ValueError) as info:
        call(x)
    assert words in str(info.value)


def test_ranks_with_unequal_slices_are_refused(rng):
    """Slices of different lengths (a sequence cut by hand, not by shard) stop every rank with an
    error rather than a wrong answer or a hang."""
    q, k, v = inputs(rng, (2,), 30, 30, 8)

    def rank_main(group):
        n = 10 + 2 * group.rank
        return ring_attention(q[..., :n, :], k[..., :n, :], v[..., :n, :], group=group)
    with pytest.raises(ValueError, match="every rank must hold slices of one shape"):
        LocalRing(3).run(rank_main)


class _ExchangeOnly:
    """A group with exchange alone, as a user's communicator may be: no start/wait, no agree."""

    def __init__(self, group):
        self.rank, self.world_size, self.exchange = group.rank, group.world_size, group.exchange


class _Spy:
    """A LocalRing rank that records, per rank, the receive buffers in flight (start .. wait)."""
    in_flight: dict = {}        # rank -> receive buffers of its started, unwaited transfer
    received_into: dict = {}    # rank -> every start's receive buffers, in order
    local = threading.local()   # the rank whose thread calls

    def __init__(self, group):
        self._group, self.rank, self.world_size, self.agree = group, group.rank, group.world_size, group.agree
        _Spy.in_flight[self.rank], _Spy.received_into[self.rank] = [], []
        _Spy.local.rank = self.rank

    def start(self, send, recv):
        assert not _Spy.in_flight[self.rank], "a second transfer started before the first was waited for"
        assert not any(np.may_share_memory(x, b) for x in send for b in recv)
        _Spy.in_flight[self.rank] = list(recv)
        _Spy.received_into[self.rank].append(recv)
        return self._group.start(send, recv)

    def wait(self, handle):
        self._group.wait(handle)
        _Spy.in_flight[self.rank] = []


@pytest.mark.parametrize("world", [2, 3, 5])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_buffer_received_into_is_never_the_one_computed_on(rng, monkeypatch, world, layout):
    """Each step's kernels read K/V that no transfer is writing: through a spy on LocalRing's
    start/wait and on flash_attention, every kernel call of steps 0 .. world - 2 runs while the
    next step's transfer is in flight (the overlap), into a buffer that shares no memory with the
    call's inputs; the receive buffers alternate between two (reused, not reallocated); and the
    results are bit for bit those of a group with exchange alone (no overlap)."""
    q, k, v = inputs(rng, (2, 2), 2 * world * 6, 2 * world * 6, 16)
    calls: dict = {r: [] for r in range(world)}   # rank -> per kernel call: a transfer in flight?

    def spy_flash_attention(*args, **kwargs):
        rank = _Spy.local.rank
        busy = _Spy.in_flight[rank]
        assert not any(np.may_share_memory(x, b) for x in args for b in busy)
        calls[rank].append(bool(busy))
        return flash_attention(*args, **kwargs)

    monkeypatch.setattr(ring, "flash_attention", spy_flash_attention)
    O, L = _ring(q, k, v, world, layout=layout, causal=True, wrap=_Spy)
    monkeypatch.undo()
    O_x, L_x = _ring(q, k, v, world, layout=layout, causal=True, wrap=_ExchangeOnly)
    assert O.tobytes() == O_x.tobytes() and L.tobytes() == L_x.tobytes()
    for r in range(world):
        last_step = len(ring_schedule(world, r, q.shape[-2] // world, k.shape[-2] // world, causal=True,
                                      layout=layout)[-1])
        assert calls[r] == [True] * (len(calls[r]) - last_step) + [False] * last_step
        bufs = _Spy.received_into[r]
        assert len(bufs) == world - 1
        for t in range(world - 2):
            assert not any(np.may_share_memory(a, b) for a in bufs[t] for b in bufs[t + 1])
            if t + 2 < world - 1:
                assert all(a is b for a, b in zip(bufs[t], bufs[t + 2]))


def test_exchange_only_groups_work_and_refuse_unequal_slices(rng):
    """A user's group with exchange alone runs the same ring (after each step, no overlap) and
    still refuses neighbours with slices of other shapes."""
    q, k, v = inputs(rng, (2,), 24, 24, 8)
    _check(q, k, v, 3, "zigzag", True)
    O, L = _ring(q, k, v, 3, layout="zigzag", causal=True)
    O_x, L_x = _ring(q, k, v, 3, layout="zigzag", causal=True, wrap=_ExchangeOnly)
    assert O.tobytes() == O_x.tobytes() and L.tobytes() == L_x.tobytes()

    def rank_main(group):
        n = 6 + 2 * group.rank
        return ring_attention(q[..., :n, :], k[..., :n, :], v[..., :n, :], group=_ExchangeOnly(group))
    with pytest.raises(ValueError, match="received .* from its neighbour; every rank must hold slices of one"):
        LocalRing(3).run(rank_main)


def test_ranks_called_with_other_flags_are_refused(rng):
    """agree: every rank learns of a difference before any transfer (over NCCL, the ranks that
    matched would otherwise wait for a transfer that never comes)."""
    q, k, v = inputs(rng, (2,), 24, 24, 8)
    raised = []

    def rank_main(group):
        try:
            ring_attention(q, k, v, group=group, causal=group.rank != 1)
        except ValueError as e:
            raised.append(group.rank)
            assert "called with different arguments" in str(e) and "causal=" in str(e)
    LocalRing(3).run(rank_main)
    assert sorted(raised) == [0, 1, 2]


def test_local_ring_catches_a_caller_that_writes_while_a_transfer_is_in_flight():
    def rank_main(group):
        x = np.zeros(4, np.float32)
        recv = (np.empty_like(x),)
        handle = group.start((x,), recv)
        x[0] = 1.0                                    # NCCL could still be sending x
        group.wait(handle)
    with pytest.raises(RuntimeError, match="changed a sent array between start and wait"):
        LocalRing(2).run(rank_main)
