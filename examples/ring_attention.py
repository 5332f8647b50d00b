"""Ring attention over NCCL: each GPU holds a slice of the sequence; K and V travel round the ring.

    python -m flashattn_cupy.distributed --nproc 4 examples/ring_attention.py --causal --layout zigzag

Every rank builds the same full q, k, v (one seed), keeps its slice (shard), and runs
ring_attention with the communicator that init_from_env() makes from the launcher's variables.
Rank 0 gathers the slices of O and L (an NCCL gather), puts them back in sequence order
(unshard), and compares them with flash_attention over the whole sequence on its one GPU.
"""
import argparse

import cupy as cp
import numpy as np

from flashattn_cupy import flash_attention
from flashattn_cupy.distributed import init_from_env, ring_attention, shard, unshard

parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
parser.add_argument("--n", type=int, default=4096, help="tokens in the whole sequence (default 4096)")
parser.add_argument("--heads", type=int, default=8)
parser.add_argument("--d", type=int, default=64)
parser.add_argument("--dtype", choices=("float16", "float32"), default="float16")
parser.add_argument("--causal", action="store_true")
parser.add_argument("--layout", choices=("contiguous", "zigzag"), default="contiguous",
                    help="zigzag gives every rank the same causal work")
args = parser.parse_args()

group = init_from_env()                      # selects this rank's GPU, joins the world over NCCL
world, rank = group.world_size, group.rank

rng = np.random.default_rng(0)               # the same full sequence on every rank
q, k, v = (rng.standard_normal((1, args.heads, args.n, args.d)).astype(args.dtype) for _ in range(3))
q_r, k_r, v_r = (cp.asarray(shard(x, world, rank, layout=args.layout)) for x in (q, k, v))

O_r, L_r = ring_attention(q_r, k_r, v_r, causal=args.causal, layout=args.layout, return_lse=True, group=group)

# cupyx.distributed's gather: every rank sends its slice to rank 0 (and passes a buffer of all
# the slices' shape, which only rank 0 fills)
O_all = cp.empty((world,) + O_r.shape, O_r.dtype)
L_all = cp.empty((world,) + L_r.shape, L_r.dtype)
group.backend.gather(O_r, O_all, root=0)
group.backend.gather(L_r, L_all, root=0)

if rank == 0:
    O = unshard(list(O_all), layout=args.layout)
    L = unshard(list(L_all), layout=args.layout, axis=-1)
    O_one, L_one = flash_attention(*(cp.asarray(x) for x in (q, k, v)), causal=args.causal, return_lse=True)
    err_O = float(cp.abs(O.astype(cp.float32) - O_one.astype(cp.float32)).max())
    err_L = float(cp.abs(L - L_one).max())
    print(f"ring attention over {world} GPU{'s' * (world > 1)}: q, k, v {q.shape} {args.dtype}, "
          f"{'causal' if args.causal else 'no mask'}, {args.layout}: {args.n // world} tokens per GPU")
    print(f"max |O_ring - O_one_gpu| = {err_O:.2e}, max |L_ring - L_one_gpu| = {err_L:.2e}")
