"""The launcher: one process per GPU of this host, each told its place in the world.

    python -m flashattn_cupy.distributed --nproc 8 script.py [args]
    python -m flashattn_cupy.distributed --nproc 8 -m package.module [args]

Every process gets, as torchrun gives them, RANK (0 .. WORLD_SIZE - 1), WORLD_SIZE, LOCAL_RANK
(its GPU on this host), MASTER_ADDR and MASTER_PORT (where rank 0 holds the rendezvous: CuPy's
TCP store, which hands NCCL's unique id to the others). In the script, init_from_env() selects the
GPU and returns the communicator.

Several hosts: start the launcher once on each, with the same --nnodes, --master-addr (an address
of node 0's host that every host reaches), --master-port and --nproc, and --node-rank 0 .. nnodes -
1; node n's processes get ranks n * nproc .. (n + 1) * nproc - 1. NCCL then finds its own way
between the hosts (InfiniBand, RoCE, or TCP sockets: NCCL_SOCKET_IFNAME names the interface,
NCCL_DEBUG=INFO tells what it chose). The code is the same as on one host.

A process that fails would leave the others waiting in NCCL for ever: the launcher stops the rest
(SIGTERM, then SIGKILL after --grace seconds) and exits with the failed process's status (128 +
the signal for one killed by a signal). It cannot see a failure on another host: there, stop the
launchers by hand or through the cluster's scheduler.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time

ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class _Stopped(Exception):
    """The launcher itself got a signal to stop."""

    def __init__(self, signum: int):
        self.signum = signum


def world_from_env(environ=None) -> tuple[int, int, int, str, int]:
    """(rank, world_size, local_rank, master_addr, master_port) from the environment that the
    launcher (or torchrun, or a scheduler's script) set; ValueError naming what is missing."""
    environ = os.environ if environ is None else environ
    missing = [name for name in ENV if not environ.get(name)]
    if missing:
        raise ValueError(f"{', '.join(missing)} not set: start this script with the launcher, "
                         "`python -m flashattn_cupy.distributed --nproc N script.py`, or set "
                         f"{', '.join(ENV)} for each process yourself")
    try:
        rank, world, local, port = (int(environ[name]) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT"))
    except ValueError:
        raise ValueError("RANK, WORLD_SIZE, LOCAL_RANK and MASTER_PORT must be integers, got "
                         + ", ".join(f"{n}={environ[n]!r}" for n in ENV if n != "MASTER_ADDR")) from None
    if not (0 <= rank < world and local >= 0 and 0 < port < 65536):
        raise ValueError(f"need 0 <= RANK < WORLD_SIZE, LOCAL_RANK >= 0 and a port in 1..65535; got RANK={rank}, "
                         f"WORLD_SIZE={world}, LOCAL_RANK={local}, MASTER_PORT={port}")
    return rank, world, local, environ["MASTER_ADDR"], port


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nobody listens on at host now (the kernel's pick)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def launch(command: list[str], nproc: int, *, nnodes: int = 1, node_rank: int = 0,
           master_addr: str = "127.0.0.1", master_port: int | None = None, grace: float = 5.0) -> int:
    """Run `python command...` as nproc processes (ranks node_rank * nproc ..), each in a session
    of its own; returns 0 once all exited 0, else the first failure's status, the others stopped."""
    port = free_port(master_addr) if master_port is None else master_port
    procs = []
    for local in range(nproc):
        env = dict(os.environ, RANK=str(node_rank * nproc + local), WORLD_SIZE=str(nnodes * nproc),
                   LOCAL_RANK=str(local), MASTER_ADDR=master_addr, MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, *command], env=env, start_new_session=True))

    def stop(signum, frame):
        raise _Stopped(signum)

    main_thread = threading.current_thread() is threading.main_thread()   # where signals arrive
    previous = {s: signal.signal(s, stop) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP) if main_thread}
    status = 0
    try:
        while True:
            codes = [p.poll() for p in procs]
            failed = [(r, c) for r, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                local, code = failed[0]
                status = 128 - code if code < 0 else code
                print(f"flashattn_cupy.distributed: rank {node_rank * nproc + local} exited with status {status}"
                      + (f" (signal {-code})" if code < 0 else "")
                      + f"; stopping the other {sum(c is None for c in codes)} processes", file=sys.stderr)
                break
            if all(c == 0 for c in codes):
                break
            time.sleep(0.05)
    except _Stopped as e:
        status = 128 + e.signum
        print(f"flashattn_cupy.distributed: signal {e.signum}; stopping the {nproc} processes", file=sys.stderr)
    finally:
        for s in previous:
            signal.signal(s, signal.SIG_IGN)          # a second signal does not cut the stopping short
        _stop(procs, grace)
        for s, handler in previous.items():
            signal.signal(s, handler)
    return status


def _stop(procs, grace: float) -> None:
    """SIGTERM to each process's session (its children too), SIGKILL to what is left after grace
    seconds. Sessions whose process already exited are swept too: what it left running goes."""
    def signal_all(signum):
        for p in procs:
            try:
                os.killpg(p.pid, signum)
            except (ProcessLookupError, PermissionError):
                pass                                  # the session is empty

    signal_all(signal.SIGTERM)
    deadline = time.monotonic() + grace
    while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
        time.sleep(0.05)
    signal_all(signal.SIGKILL)
    for p in procs:
        p.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        allow_abbrev=False,   # the script's own options (e.g. --n) must not read as abbreviations of ours
        prog="python -m flashattn_cupy.distributed",
        description="Start one process per GPU of this host for ring attention over NCCL: each gets RANK, "
                    "WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT, and the script's "
                    "flashattn_cupy.distributed.init_from_env() turns them into a communicator. If one process "
                    "fails, the others are stopped and its exit status is returned.",
        epilog="Several hosts: run it on each with the same --nnodes, --master-addr, --master-port and "
               "--nproc, and --node-rank 0 .. nnodes - 1.")
    parser.add_argument("--nproc", type=int, required=True, help="processes on this host (one per GPU)")
    parser.add_argument("--nnodes", type=int, default=1, help="hosts taking part (default 1)")
    parser.add_argument("--node-rank", type=int, default=0, help="this host's index, 0 .. nnodes - 1 (default 0)")
    parser.add_argument("--master-addr", default="127.0.0.1",
                        help="address of node 0's host, where rank 0 holds the rendezvous (default 127.0.0.1)")
    parser.add_argument("--master-port", type=int,
                        help="its TCP port (default: a free port, on one host; required with --nnodes > 1)")
    parser.add_argument("--grace", type=float, default=5.0,
                        help="seconds a process gets to exit after SIGTERM before SIGKILL (default 5)")
    parser.add_argument("-m", dest="module", action="store_true",
                        help="run the command as a module, as python -m does")
    parser.add_argument("command", help="the script (or, with -m, the module) each process runs")
    parser.add_argument("args", nargs=argparse.REMAINDER, help="its arguments")
    a = parser.parse_args(argv)
    if a.nproc < 1 or a.nnodes < 1:
        parser.error(f"--nproc and --nnodes must be at least 1, got {a.nproc} and {a.nnodes}")
    if not 0 <= a.node_rank < a.nnodes:
        parser.error(f"--node-rank must be in 0 .. {a.nnodes - 1} (--nnodes {a.nnodes}), got {a.node_rank}")
    if a.nnodes > 1 and a.master_port is None:
        parser.error("--master-port is required with --nnodes > 1: every host must name the same port")
    if a.grace < 0:
        parser.error(f"--grace must be >= 0, got {a.grace}")
    command = (["-m", a.command] if a.module else [a.command]) + a.args
    return launch(command, a.nproc, nnodes=a.nnodes, node_rank=a.node_rank, master_addr=a.master_addr,
                  master_port=a.master_port, grace=a.grace)
