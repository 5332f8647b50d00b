"""Context parallelism: ring attention over ranks that each hold a slice of the sequence.

The ring schedule (schedule.py, ring.py) is written once against a tiny communicator interface
(ring.Group). NcclGroup (nccl.py) is that interface over NCCL through cupyx.distributed, one
process per GPU, started by the launcher (launch.py: `python -m flashattn_cupy.distributed
--nproc N script.py`) and made in each process by init_from_env(). LocalRing (local.py)
simulates the ranks in one process, for tests and for reading the schedule.
"""
from .launch import launch, world_from_env
from .local import LocalRing
from .nccl import NcclGroup, init_from_env, init_process_group
from .ring import Group, ring_attention
from .schedule import Block, ring_schedule
from .sharding import shard, unshard

__all__ = ["ring_attention", "shard", "unshard", "init_from_env", "init_process_group", "NcclGroup", "LocalRing",
           "Group", "Block", "ring_schedule", "launch", "world_from_env"]
