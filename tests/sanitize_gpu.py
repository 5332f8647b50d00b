#!/usr/bin/env python3
"""Every CUDA kernel variant the planner emits for this GPU, under compute-sanitizer's memcheck,
racecheck, initcheck and synccheck, with a summary per tool.

    python tests/sanitize_gpu.py                        # a plain run, then the four tools
    python tests/sanitize_gpu.py --tools memcheck,racecheck --log-dir logs
    python tests/sanitize_gpu.py --jobs 8 --parallel --timeout 900   # compile first, tools at once
    python tests/sanitize_gpu.py --tools racecheck --shards 12        # the grid over 12 processes
    python tests/sanitize_gpu.py --family flash_fwd_wgmma --parallel  # one kernel family's variants
    python tests/sanitize_gpu.py --list --arch 90 --smem-limit 232448   # the calls only, no GPU

compute-sanitizer is taken from --sanitizer, PATH, $CUDA_HOME/bin, /usr/local/cuda/bin or the pip
wheel nvidia-cuda-sanitizer-api-cu12 (or nvidia-cuda-sanitizer-api for CUDA 13). Under
each tool one Python process (this file with --worker; --shards N: N of them at once, each a
slice of the grid) makes one flash_attention call per point of a grid: for every kernel variant
the planner emits for this device's shared-memory limit and arch (every head-dim bound D,
dtype, mask (none, causal, and a sliding window with softcap and ALiBi: MASK 0, 1, 2) and
float32 mode, as fp32_kernel / allow_tf32; on sm_90 both the wgmma kernel and the mma one,
through planner.wgmma_default; the workers report which variant each call ran,
from plan_for, and the run fails if one is missed), head dims D, D - 24 (a multiple of 8) and
D - 31 (odd), shapes with ragged tiles ((77, 203), and (203, 77), whose first 126 causal rows
see no key), with batch 2 and 3 heads (racecheck: 1 and 1, TOOL_LEAD), in three layouts:
contiguous, (B, N, H, d) memory viewed as (B, H, N, d), and data starting one element past an
aligned address (element-wise loads). The worker turns CuPy's memory pool off, so every array
is its own cudaMalloc and memcheck (with --padding) sees an access past any end; it makes its
inputs on the host, so the kernels run are ours; it checks every result against the float64
reference, and copies every output back in full, so initcheck sees any element left unwritten.
Exit status 0 only when the plain run and every tool are clean.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
# run as `python tests/sanitize_gpu.py` from a checkout: the package beside tests/ (installed in
# editable mode or not: sys.path[0] is tests/ then, not the checkout)
sys.path.insert(1, str(HERE.parent))
TOOLS = ("memcheck", "racecheck", "initcheck", "synccheck")
TOOL_OPTIONS = {"memcheck": ["--padding", "512"]}
# The leading (batch, heads) dims of every call; racecheck's one batch index and one head: its
# hazards are within a block, and one head's blocks run every code path that six heads' do (the
# simt kernel's scalar shared-memory loops did not finish under it in 340 s with six).
LEAD = (2, 3)
TOOL_LEAD = {"racecheck": (1, 1)}
# (d below the head-dim bound D, layout, shapes (Nq, Nk)): no tile size divides 77 or 203, and
# causal (203, 77) leaves rows that see no key
CASES = ((0, "contiguous", ((77, 203), (203, 77))), (24, "transposed", ((203, 77),)),
         (31, "unaligned", ((77, 203),)))
# split-KV decoding's variants (fp16/bf16 on sm_80+): few query rows, keys past a tile and past
# DECODE_MIN_KEYS, so the planner splits them (the last split's last tile ragged) and merges them
# in the kernel (1 or 3 rows) or by the combine launch (5 rows); 300 keys: one split
DECODE_CASES = ((0, "contiguous", ((1, 1000), (5, 1000))), (24, "transposed", ((3, 777),)),
                (31, "unaligned", ((2, 300),)))
# planner.plan's fp32 modes as flash_attention's options
API_FP32 = {"auto": {}, "3xtf32": {"fp32_kernel": "3xtf32"}, "tf32": {"allow_tf32": True},
            "simt": {"fp32_kernel": "simt"}}
# The kernels' MASK (planner.MASKS) as flash_attention's options: nothing, causal, and a window
# (which empties rows of (203, 77)) with softcap and ALiBi ("alibi": the worker makes the slopes)
MASK_OPTIONS = {0: {}, 1: {"causal": True}, 2: {"window": (40, 8), "softcap": 5.0, "alibi": True}}


def calls(smem_limit: int, arch: int, family: str = ""):
    """The grid, as (kernel, dtype, mods, d, Nq, Nk, layout, options): for every variant the
    planner emits here (every head-dim bound, dtype, mask and float32 mode), each case; mods are
    MASK_OPTIONS' entries. family: only that kernel family's calls ("" for all)."""
    from flashattn_cupy import kernels, planner
    grid, seen = [], set()
    for D in range(planner.MMA_HEAD_DIM_STEP, planner.MAX_HEAD_DIM + 1, planner.MMA_HEAD_DIM_STEP):
        for dtype in planner.CUDA_TYPES:
            for mask in planner.MASKS:
                for mode in planner.FP32_MODES if dtype == "float32" else ("auto",):
                    if mode == "3xtf32" and arch < 80:
                        continue
                    for wgmma in (True, False):   # the wgmma kernel where it runs, and the one it replaces
                        with planner.wgmma_default(wgmma):
                            p = _plan(planner, 1, 1, D, dtype, MASK_OPTIONS[mask], smem_limit, arch, mode)
                        if p.head_dim_bound != D or p.kernel in seen:   # each variant at its own bound
                            continue
                        seen.add(p.kernel)
                        options = {**API_FP32[mode], "wgmma": wgmma}
                        grid += [(p.kernel, dtype, MASK_OPTIONS[mask], D - _below(below, p), Nq, Nk, layout, options)
                                 for below, layout, shapes in CASES for Nq, Nk in shapes]
                for page in planner.DECODE_PAGES:   # a tile only a paged cache gets: read through kvcache
                    if dtype in planner.DECODE_DTYPES and arch >= 80 and planner.decode_tiles(D, smem_limit, page):
                        p = _plan(planner, 1, planner.DECODE_MIN_KEYS, D, dtype, MASK_OPTIONS[mask], smem_limit,
                                  arch, "auto", sm_count=1, decode=True, page=page)
                        if p.head_dim_bound == D and p.kernel not in seen:
                            seen.add(p.kernel)
                            grid += [(p.kernel, dtype, MASK_OPTIONS[mask], D - _below(below, p), Nq, Nk, layout,
                                      {"page": page} if page else {})
                                     for below, layout, shapes in DECODE_CASES for Nq, Nk in shapes]
    return [call for call in grid if not family or kernels.family(call[0]) == family]


def variants(smem_limit: int, arch: int, family: str = "") -> set:
    """Every variant the planner emits here, of `family` only when given (a decoding kernel's
    combine kernel belongs to it)."""
    from flashattn_cupy import kernels, planner
    names = set(planner.cuda_variants(smem_limit, arch))
    if family:
        names = {n for n in names if kernels.family(n) == family or
                 (family == "flash_decode" and kernels.family(n) == "flash_decode_combine")}
    return names


def _launched(plan) -> set:
    """The kernels a plan launches: its kernel, and a decoding plan's combine where it has one."""
    return {plan.kernel, plan.combine} - {""}


def _below(below, plan):
    """CASES' d below the bound (given for a step of 32) for this plan's kernel, whose step may be
    16 (the mma kernel): the same kernel must run d = D - below."""
    from flashattn_cupy import planner
    step = planner.MMA_HEAD_DIM_STEP if plan.kernel.startswith("flash_fwd_mma<") else planner.HEAD_DIM_STEP
    return below * step // planner.HEAD_DIM_STEP


def _plan(planner, Nq, Nk, d, dtype, mods, smem_limit, arch, fp32, **extra):
    """planner.plan for a call with these mods (MASK_OPTIONS), as flash_attention plans it."""
    return planner.plan(Nq, Nk, d, dtype=dtype, causal=mods.get("causal", False), batch=2, heads=3,
                        smem_limit=smem_limit, arch=arch, fp32=fp32, window="window" in mods,
                        score_mod="softcap" in mods or "alibi" in mods, **extra)


def kernels_reached(smem_limit: int, arch: int, family: str = "") -> tuple[set, set]:
    """(the kernels the grid's calls are planned to run, every variant the planner emits here)."""
    from flashattn_cupy import planner
    reached = set()
    for _, dtype, mods, d, Nq, Nk, _, options in calls(smem_limit, arch, family):
        fp32 = "tf32" if options.get("allow_tf32") else options.get("fp32_kernel", "auto")
        with planner.wgmma_default(options.get("wgmma", False)):
            p = _plan(planner, Nq, Nk, d, dtype, mods, smem_limit, arch, fp32, sm_count=132,
                      **({"decode": True, "page": options["page"]} if "page" in options else {}))
        reached.update(_launched(p))
    return reached, variants(smem_limit, arch, family)


def _arrays(cp, rng, dtype, d, Nq, Nk, layout, lead=LEAD):
    """q, k, v on the GPU, made on the host (so no kernel of CuPy's runs), leading dims `lead`."""
    import ml_dtypes
    import numpy as np
    host_type = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
    out = []
    for N in (Nq, Nk, Nk):
        x = rng.standard_normal((*lead, N, d)).astype(host_type)
        if layout == "transposed":
            out.append(cp.asarray(np.ascontiguousarray(x.swapaxes(1, 2))).swapaxes(1, 2))
        elif layout == "unaligned":
            buf = cp.empty(x.size + 1, dtype=x.dtype)
            buf[1:].set(x.ravel())
            out.append(buf[1:].reshape(x.shape))
        else:
            out.append(cp.asarray(x))
    return out


def shard_of(items: list, shard: int, shards: int) -> list:
    """The shard-th of `shards` contiguous, near-equal slices of items (together: each item once)."""
    return items[len(items) * shard // shards:len(items) * (shard + 1) // shards]


def worker(shard: int = 0, shards: int = 1, family: str = "", lead: tuple = LEAD) -> int:
    """The shard-th of `shards` contiguous slices of the grid (which lists each variant's calls
    together, so a shard loads only its own variants: the sanitizers instrument every module a
    process loads), each call on its own seeded inputs (the same whatever the sharding); prints
    the wrong results and the kernels run ("ran: a|b|..."), for the parent."""
    begun = time.perf_counter()
    import numpy as np
    sys.path.insert(0, str(HERE))
    from flashattn_cupy import _device, flash_attention, plan_for, planner
    from tolerances import assert_attention_close, kernel_rounding
    cp = _device.cupy()
    cp.cuda.set_allocator(None)                 # each array its own cudaMalloc
    cp.cuda.set_pinned_memory_allocator(None)
    smem_limit, arch = _device.smem_limit(), _device.compute_capability()
    ran, failures = set(), []
    grid = shard_of(list(enumerate(calls(smem_limit, arch, family))), shard, shards)
    start = time.perf_counter()
    print(f"worker: ready in {start - begun:.1f} s (imports, CUDA context)", flush=True)
    for done, (index, (_, dtype, mods, d, Nq, Nk, layout, options)) in enumerate(grid):
        if done:   # progress, so a log cut short by --timeout says how far and how fast it went
            print(f"worker: {done} of {len(grid)} calls in {time.perf_counter() - start:.1f} s", flush=True)
        rng = np.random.default_rng([0, index])
        q, k, v = _arrays(cp, rng, dtype, d, Nq, Nk, layout, lead)
        # slopes made on the host, one per (batch, head): validation copies them as they are
        mods = {key: rng.uniform(0, 1, lead).astype(np.float32) if key == "alibi" else value
                for key, value in mods.items()}
        kw = {("alibi_slopes" if key == "alibi" else key): value for key, value in mods.items()}
        api = {key: value for key, value in options.items() if key != "wgmma"}   # "wgmma": the planner's default
        with planner.wgmma_default(options.get("wgmma", False)):
            if "page" in api:
                plan, O, L = _paged_call(cp, rng, q, k, v, api["page"], kw)
            else:
                plan = plan_for(q, k, v, **kw, **api)
                O, L = flash_attention(q, k, v, return_lse=True, **kw, **api)
            ran.update(_launched(plan))
        try:
            assert_attention_close(cp.asnumpy(O), cp.asnumpy(L), *(cp.asnumpy(x) for x in (q, k, v)),
                                   **kw, **kernel_rounding(plan))
        except AssertionError as exc:
            failures.append(f"{plan.kernel} d={d} Nq={Nq} Nk={Nk} {layout} {mods_name(mods)}: {exc}")
    print(f"worker: {len(grid)} calls; wrong results: {len(failures)}")
    for line in failures:
        print("  " + line)
    print("ran: " + "|".join(sorted(ran)))
    return 1 if failures else 0


def _paged_call(cp, rng, q, k, v, page: int, kw: dict):
    """(plan, O, L) of flash_attention_kvcache on k and v copied into a paged cache (pages of
    `page` keys dealt in a shuffled order, the last page's tail zero and past the length)."""
    import numpy as np
    from flashattn_cupy import kvcache
    B, H, Nk, d = k.shape
    per_seq = -(-Nk // page)
    order = rng.permutation(B * per_seq).astype(np.int32)
    paged = []
    for x in (k, v):   # built on the host (as the grid's inputs are), then copied up
        padded = np.zeros((B, H, per_seq * page, d), x.dtype)
        padded[:, :, :Nk] = cp.asnumpy(x)
        pages = np.empty((B * per_seq, H, page, d), x.dtype)
        pages[order] = padded.reshape(B, H, per_seq, page, d).transpose(0, 2, 1, 3, 4).reshape(-1, H, page, d)
        paged.append(cp.asarray(pages))
    table = cp.asarray(order.reshape(B, per_seq))
    options = {"causal": False, "softmax_scale": None, "window": None, "softcap": 0.0, "alibi_slopes": None,
               "return_lse": True, **kw}   # flash_attention_kvcache's, as it validates them
    plan = kvcache._decoding_plan(kvcache._validate(q, *paged, Nk, table, backend="auto", **options))
    O, L = kvcache.flash_attention_kvcache(q, *paged, cache_seqlens=Nk, block_table=table, **options)
    return plan, O, L


def mods_name(mods) -> str:
    return ", ".join(f"{key}={'...' if key == 'alibi' else value}" for key, value in mods.items()) or "no mask"


def find_sanitizer(given: str | None) -> str | None:
    """compute-sanitizer from the argument, PATH, the CUDA toolkit, or a pip wheel
    (nvidia-cuda-sanitizer-api-cu12, or -api for CUDA 13: nvidia/cuda_sanitizer_api/bin)."""
    import importlib.util
    roots = [os.environ.get("CUDA_HOME"), "/usr/local/cuda"]
    spec = importlib.util.find_spec("nvidia")
    wheels = [Path(p) / "cuda_sanitizer_api" for p in (spec.submodule_search_locations or [])] if spec else []
    candidates = [given, shutil.which("compute-sanitizer"),
                  *(Path(r) / "bin" / "compute-sanitizer" for r in roots + wheels if r)]
    return next((str(c) for c in candidates if c and Path(c).is_file()), None)


def summarize(output: str) -> tuple[int, int] | None:
    """(errors, warnings) from a compute-sanitizer log; None if it printed no summary."""
    errors = [int(n) for n in re.findall(r"ERROR SUMMARY: (\d+) error", output)]
    races = re.findall(r"RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) errors?, (\d+) warnings?\)", output)
    if not errors and not races:
        return None
    return sum(errors) + sum(int(e) for e, _ in races), sum(int(w) for _, w in races)


def warm(jobs: int, family: str = "") -> None:
    """Compile every variant the planner emits here into CuPy's disk cache, on `jobs` processes,
    so the plain run and the tools load cubins instead of each compiling ~100 kernels in turn."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from flashattn_cupy import _device, planner
    names = sorted(variants(_device.smem_limit(), _device.compute_capability(), family))
    start = time.perf_counter()
    # spawn, not fork: this process has a CUDA context already, which a forked child cannot use
    with ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(_compile_slice, [names[i::jobs] for i in range(jobs)]))
    print(f"warm: {len(names)} variants compiled on {jobs} processes in {time.perf_counter() - start:.1f} s",
          flush=True)


def _compile_slice(names) -> None:
    from types import SimpleNamespace
    from flashattn_cupy import _device, kernels
    for name in names:   # smem_bytes 0: compile and load only; the worker's launches set the limit
        kernels.get(SimpleNamespace(kernel=name, smem_bytes=0), _device.current_device())


def _run_tool(sanitizer: str, tool: str, log_dir: Path, timeout: int, shards: int = 1,
              family: str = "") -> tuple[str, int]:
    """(the summary row, 0 if clean) of one tool (or "plain") over the worker, the grid cut into
    `shards` worker processes run at once (a sanitizer's time is host time, one core each); the
    shards' logs to log_dir, one file."""
    from flashattn_cupy import _device
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    prefix = [] if tool == "plain" else \
        [sanitizer, "--tool", tool, "--print-limit", "20", *TOOL_OPTIONS.get(tool, [])]
    start = time.perf_counter()
    procs = [subprocess.Popen([*prefix, sys.executable, str(Path(__file__).resolve()), "--worker",
                               "--shard", str(i), "--shards", str(shards), "--family", family,
                               "--lead", ",".join(map(str, TOOL_LEAD.get(tool, LEAD)))],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for i in range(shards)]
    outputs, codes = [], []
    for proc in procs:
        try:
            out, _ = proc.communicate(timeout=max(1.0, timeout - (time.perf_counter() - start)))
            codes.append(proc.returncode)
        except subprocess.TimeoutExpired:
            proc.kill()
            out = proc.communicate()[0] + f"\ntimed out after {timeout} s"
            codes.append(-1)
        outputs.append(out)
    seconds = time.perf_counter() - start
    output = "\n".join(outputs)
    (log_dir / f"{tool}.log").write_text(output)
    smem_limit, arch = _device.smem_limit(), _device.compute_capability()
    ran = {name for line in output.splitlines() if line.startswith("ran: ") for name in line[5:].split("|") if name}
    missed = variants(smem_limit, arch, family) - ran
    reports = re.findall(r"^worker: (\d+) calls; wrong results: (\d+)", output, re.M)
    worker_line = (f"worker: {sum(int(n) for n, _ in reports)} calls in {len(reports)} of {shards} processes, "
                   f"{len(ran)} kernel variants (shared-memory limit {smem_limit} B, sm_{arch}); wrong results: "
                   f"{sum(int(w) for _, w in reports)}; variants not reached: {len(missed)}")
    counts = (0, 0) if tool == "plain" else summarize(output)
    clean = all(code == 0 for code in codes) and counts == (0, 0) and len(reports) == shards and not missed
    found = "no summary" if counts is None else f"{counts[0]} errors, {counts[1]} warnings"
    row = f"{tool:10} {'clean' if clean else 'FAILED':7} {found:24} {seconds:7.1f} s   {worker_line}"
    print(row, flush=True)
    return row, int(not clean)


def run_tools(sanitizer: str, tools, log_dir: Path, timeout: int, parallel: bool = False, shards: int = 1,
              family: str = "") -> int:
    """The plain run, then each tool; with parallel, the tools at once (each its own process and
    CUDA context: the kernels are tiny, the sanitizers' time is host time)."""
    from concurrent.futures import ThreadPoolExecutor
    log_dir.mkdir(parents=True, exist_ok=True)
    results = [_run_tool(sanitizer, "plain", log_dir, timeout, shards, family)]
    with ThreadPoolExecutor(len(tools) if parallel and tools else 1) as pool:
        results += list(pool.map(lambda tool: _run_tool(sanitizer, tool, log_dir, timeout, shards, family), tools))
    print(f"\nsummary (logs in {log_dir}):")
    print("\n".join(row for row, _ in results))
    return int(any(failed for _, failed in results))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tools", default=",".join(TOOLS), help="comma-separated, from " + ", ".join(TOOLS))
    parser.add_argument("--sanitizer", help="path of compute-sanitizer")
    parser.add_argument("--log-dir", default="sanitize-logs", help="where each tool's full output goes")
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per tool")
    parser.add_argument("--list", action="store_true", help="print the calls and the variants they reach; no GPU run")
    parser.add_argument("--arch", type=int, help="with --list: compute capability, e.g. 90 (default: this GPU's)")
    parser.add_argument("--smem-limit", type=int, help="with --list: opt-in shared memory per block in bytes")
    parser.add_argument("--parallel", action="store_true", help="run the tools at once, not one after another")
    parser.add_argument("--jobs", type=int, default=0,
                        help="first compile every variant into the kernel cache on this many processes")
    parser.add_argument("--shards", type=int, default=1,
                        help="cut the grid into this many worker processes per tool, run at once")
    parser.add_argument("--family", default="", help="only this kernel family's variants, e.g. flash_fwd_wgmma")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--shard", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--lead", default=",".join(map(str, LEAD)), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args.shard, args.shards, args.family, tuple(int(n) for n in args.lead.split(",")))
    tools = [t for t in args.tools.split(",") if t]
    if any(t not in TOOLS for t in tools):
        parser.error(f"--tools takes {', '.join(TOOLS)}")
    if args.list:
        if args.arch is None or args.smem_limit is None:
            from flashattn_cupy import _device
            args.arch = args.arch or _device.compute_capability()
            args.smem_limit = args.smem_limit or _device.smem_limit()
        reached, emitted = kernels_reached(args.smem_limit, args.arch, args.family)
        for call in calls(args.smem_limit, args.arch, args.family):
            print(*call)
        print(f"{len(reached & emitted)} of {len(emitted)} variants reached; missed: {sorted(emitted - reached)}")
        return 0 if emitted <= reached else 1
    sanitizer = find_sanitizer(args.sanitizer)
    if sanitizer is None:
        print("compute-sanitizer not found (PATH, $CUDA_HOME/bin, /usr/local/cuda/bin, pip's nvidia/"
              "cuda_sanitizer_api/bin): pip install nvidia-cuda-sanitizer-api-cu12, or pass --sanitizer PATH",
              file=sys.stderr)
        return 2
    if args.jobs > 0:
        warm(args.jobs, args.family)
    return run_tools(sanitizer, tools, Path(args.log_dir), args.timeout, args.parallel, max(1, args.shards),
                     args.family)


if __name__ == "__main__":
    sys.exit(main())
