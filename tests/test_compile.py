"""Every kernel variant the planner can emit compiles with NVRTC for sm_75, sm_80 and sm_90 (the
wgmma family for sm_90a, the target kernels.ARCH_TARGETS gives it).

No GPU needed: NVRTC and the CUDA headers come from pip wheels (the `test` extra: cuda-core,
nvidia-cuda-nvrtc-cu12, nvidia-cuda-runtime-cu12), and compiling to a cubin for an explicit
arch never touches a driver. The source and options are the ones kernels.py hands to NVRTC."""
import io

import pytest

from cases import DEVICE_LIMITS
from flashattn_cupy import kernel_cache, kernels, planner

ARCHES = {f"sm_{cc}": limits for cc, limits in DEVICE_LIMITS.items()}


@pytest.mark.parametrize("arch", sorted(ARCHES))
def test_every_variant_compiles(arch):
    try:
        from cuda.core import Program, ProgramOptions
    except ImportError as exc:
        pytest.fail(f"cuda.core is missing ({exc}): install the test extra, pip install -e '.[test]'")
    cc = int(arch.removeprefix("sm_"))
    names = sorted({n for limit in ARCHES[arch] for n in planner.cuda_variants(limit, cc)})
    for family in sorted({kernels.family(n) for n in names}):
        wanted = [n for n in names if kernels.family(n) == family]
        target = kernels.target(family, arch)
        assert kernels.nvrtc_options(family, arch) == ("-std=c++17", "-ftz=true", f"-arch={target}")
        options = ProgramOptions(arch=target, std="c++17", ftz=True)
        program = Program(kernels.source(kernels.SOURCES[family]), "c++", options)
        log = io.StringIO()
        cubin = program.compile("cubin", name_expressions=wanted, logs=log)
        # ptxas says so when it has to wait for each wgmma before the next (an MMA in a divergent
        # path, or registers of one in flight read): every MMA serialized, no error, a slow kernel
        assert "Potential Performance Loss" not in log.getvalue(), log.getvalue()
        assert sorted(cubin.symbol_mapping) == wanted
        assert kernel_cache.variants(cubin.code) == wanted   # what `info` reads back from the cache
        assert len(cubin.code) > 0


@pytest.mark.parametrize("filename", sorted(set(kernels.SOURCES.values())))
def test_every_local_include_is_inlined(filename):
    """What NVRTC compiles names no file: NVRTC is given no include path for csrc (a line the
    inliner missed fails there as 'cannot open source file'), and our disk cache keys on this
    text, so it must hold every line the kernel uses. Each header appears once."""
    text = kernels.source(filename)
    assert '#include "' not in text
    headers = sorted(f.name for f in kernels.source_file(filename).parent.iterdir() if f.name.endswith(".cuh"))
    used = [h for h in headers if f"// {h}:" in text]
    assert used and all(text.count(f"// {h}:") == 1 for h in used), used
