"""The launcher, on the CPU: `python -m flashattn_cupy.distributed` starts real processes running
small scripts (no GPU, no NCCL), which report what they were given in files; a failing rank
stops the others, its status becomes the launcher's, and nothing is left running."""
import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from flashattn_cupy.distributed import world_from_env

LAUNCH = [sys.executable, "-m", "flashattn_cupy.distributed"]

# Each rank writes what it was given to out/rank<RANK>.json, then does what its line of ACTS says.
SCRIPT = """
import json, os, signal, subprocess, sys, time
out = sys.argv[1]
rank = int(os.environ["RANK"])
child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"]) if "--child" in sys.argv else None
info = {name: os.environ.get(name) for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")}
info.update(argv=sys.argv[2:], pid=os.getpid(), child=child and child.pid)
with open(os.path.join(out, f"rank{rank}.json.tmp"), "w") as f:
    json.dump(info, f)
os.replace(os.path.join(out, f"rank{rank}.json.tmp"), os.path.join(out, f"rank{rank}.json"))
acts = dict(a.split("=") for a in os.environ.get("ACTS", "").split(",") if a)
act = acts.get(str(rank), "exit0")
def all_ready():  # the other ranks are running (so there is something to stop)
    for _ in range(600):
        if len([n for n in os.listdir(out) if n.endswith(".json")]) == int(os.environ["WORLD_SIZE"]):
            return
        time.sleep(0.05)
if act == "exit3":
    all_ready(); sys.exit(3)
elif act == "sigkill":
    all_ready(); os.kill(os.getpid(), signal.SIGKILL)
elif act in ("sleep", "stubborn"):
    if act == "stubborn":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(120)
"""


@pytest.fixture
def script(tmp_path):
    path = tmp_path / "rank_script.py"
    path.write_text(textwrap.dedent(SCRIPT))
    (tmp_path / "out").mkdir()
    return path


def _launch(script, *args, acts="", timeout=60, extra=()):
    env = dict(os.environ, ACTS=acts)
    return subprocess.run([*LAUNCH, *args, str(script), str(script.parent / "out"), *extra], env=env,
                          capture_output=True, text=True, timeout=timeout)


def _reports(script):
    out = script.parent / "out"
    return {int(p.stem[4:].split(".")[0]): json.loads(p.read_text()) for p in out.glob("rank*.json")}


def _alive(pid):
    """pid runs (a zombie waiting for its parent to reap it has stopped running)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_each_process_gets_its_place_in_the_world(script):
    # the script's own options, even those that abbreviate the launcher's (--n, --node), are its own
    ran = _launch(script, "--nproc", "3", extra=["--nproc", "5", "--n", "4096", "--node", "x y"])
    assert ran.returncode == 0, ran.stderr
    reports = _reports(script)
    assert sorted(reports) == [0, 1, 2]
    ports = {r["MASTER_PORT"] for r in reports.values()}
    assert len(ports) == 1 and 0 < int(ports.pop()) < 65536
    for rank, r in reports.items():
        assert (r["RANK"], r["WORLD_SIZE"], r["LOCAL_RANK"]) == (str(rank), "3", str(rank))
        assert r["MASTER_ADDR"] == "127.0.0.1"
        assert r["argv"] == ["--nproc", "5", "--n", "4096", "--node", "x y"]   # untouched
    assert len({r["pid"] for r in reports.values()}) == 3


def test_a_module_runs_with_dash_m(script):
    ran = subprocess.run([*LAUNCH, "--nproc", "2", "-m", "rank_script", str(script.parent / "out")],
                         cwd=script.parent, capture_output=True, text=True, timeout=60)
    assert ran.returncode == 0, ran.stderr
    assert sorted(_reports(script)) == [0, 1]


def test_two_hosts_share_one_world(script):
    """--nnodes 2 on this one host: two launchers, node ranks 0 and 1, one master port."""
    port = subprocess.run([sys.executable, "-c", "from flashattn_cupy.distributed.launch import free_port; "
                           "print(free_port())"], capture_output=True, text=True, check=True).stdout.strip()
    common = ["--nproc", "2", "--nnodes", "2", "--master-port", port]
    nodes = [subprocess.Popen([*LAUNCH, *common, "--node-rank", str(n), str(script), str(script.parent / "out")])
             for n in (0, 1)]
    assert [p.wait(timeout=60) for p in nodes] == [0, 0]
    reports = _reports(script)
    assert sorted(reports) == [0, 1, 2, 3]
    assert [(r["WORLD_SIZE"], r["LOCAL_RANK"], r["MASTER_PORT"]) for _, r in sorted(reports.items())] == [
        ("4", "0", port), ("4", "1", port), ("4", "0", port), ("4", "1", port)]


def test_a_failing_rank_stops_the_others_and_its_status_is_returned(script):
    ran = _launch(script, "--nproc", "3", acts="0=sleep,1=exit3,2=sleep", extra=["--child"])
    assert ran.returncode == 3
    assert "rank 1 exited with status 3; stopping the other 2 processes" in ran.stderr
    reports = _reports(script)
    assert sorted(reports) == [0, 1, 2]
    for r in reports.values():   # the ranks, and the children they started, are gone
        assert not _alive(r["pid"]) and not _alive(r["child"])


def test_a_rank_killed_by_a_signal(script):
    ran = _launch(script, "--nproc", "2", acts="0=sleep,1=sigkill")
    assert ran.returncode == 128 + signal.SIGKILL
    assert f"rank 1 exited with status {128 + signal.SIGKILL} (signal {signal.SIGKILL.value})" in ran.stderr


def test_a_rank_that_ignores_sigterm_is_killed_after_the_grace(script):
    start = time.monotonic()
    ran = _launch(script, "--nproc", "2", "--grace", "0.5", acts="0=stubborn,1=exit3")
    assert ran.returncode == 3 and time.monotonic() - start < 60   # rank 0 would sleep 120 s
    assert not _alive(_reports(script)[0]["pid"])


def test_success_leaves_nothing_running(script):
    """Every rank exits 0; the child each started (still sleeping) goes with its session."""
    ran = _launch(script, "--nproc", "2", extra=["--child"])
    assert ran.returncode == 0, ran.stderr
    assert not any(_alive(r["child"]) for r in _reports(script).values())


def test_stopping_the_launcher_stops_the_ranks(script):
    out = script.parent / "out"
    launcher = subprocess.Popen([*LAUNCH, "--nproc", "2", str(script), str(out)], stderr=subprocess.PIPE, text=True,
                                env=dict(os.environ, ACTS="0=sleep,1=sleep"))
    for _ in range(600):
        if len(list(out.glob("rank*.json"))) == 2:
            break
        time.sleep(0.05)
    launcher.send_signal(signal.SIGTERM)
    assert launcher.wait(timeout=60) == 128 + signal.SIGTERM
    assert "stopping the 2 processes" in launcher.stderr.read()
    assert not any(_alive(r["pid"]) for r in _reports(script).values())


@pytest.mark.parametrize("args, words", [
    (["--nproc", "0"], "--nproc and --nnodes must be at least 1"),
    (["--nproc", "2", "--nnodes", "2", "--node-rank", "2", "--master-port", "29500"], "--node-rank must be in 0 .. 1"),
    (["--nproc", "2", "--nnodes", "2", "--node-rank", "1"], "--master-port is required with --nnodes > 1"),
    (["--nproc", "2", "--grace", "-1"], "--grace must be >= 0"),
])
def test_bad_arguments(script, args, words):
    ran = _launch(script, *args)
    assert ran.returncode == 2 and words in ran.stderr
    assert _reports(script) == {}


def test_world_from_env():
    env = {"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1", "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "29500"}
    assert world_from_env(env) == (3, 8, 1, "10.0.0.1", 29500)
    with pytest.raises(ValueError, match="RANK, MASTER_PORT not set: start this script with the launcher"):
        world_from_env({**env, "RANK": "", "MASTER_PORT": ""})
    with pytest.raises(ValueError, match="must be integers, got RANK='x'"):
        world_from_env({**env, "RANK": "x"})
    with pytest.raises(ValueError, match="need 0 <= RANK < WORLD_SIZE.*RANK=8, WORLD_SIZE=8"):
        world_from_env({**env, "RANK": "8"})
