"""Context parallelism: ring attention over ranks that each hold a slice of the sequence.

The ring schedule (schedule.py, ring.py) is written once against a tiny communicator interface
(ring.Group). LocalRing (local.py) simulates the ranks in one process, for tests and for reading
the schedule; an NCCL transport for GPUs is not written yet.
"""
from .local import LocalRing
from .ring import Group, ring_attention
from .schedule import Block, ring_schedule
from .sharding import shard, unshard

__all__ = ["ring_attention", "shard", "unshard", "LocalRing", "Group", "Block", "ring_schedule"]
