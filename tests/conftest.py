import zlib

import numpy as np
import pytest

from flashattn_cupy import _device, api


def pytest_collection_modifyitems(config, items):
    why = _device.gpu_unavailable_reason()
    if why:
        skip = pytest.mark.skip(reason=f"no usable GPU: {why}")
        for item in items:
            if "gpu" in item.keywords:
                item.add_marker(skip)
        return
    count = _device.cupy().cuda.runtime.getDeviceCount()
    if count < 2:
        skip = pytest.mark.skip(reason=f"needs 2 or more GPUs (multigpu), this machine has {count}")
        for item in items:
            if "multigpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def rng(request):
    """A generator seeded from the test's id: fresh inputs per test, and any failure replays."""
    return np.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def cp():
    return _device.cupy()


@pytest.fixture(autouse=True)
def fresh_calls(monkeypatch):
    """Each test starts without api's kept calls (api._CALLS, api._GROWING), so a test that watches the CUDA
    path's steps sees them whatever ran before it; repeats within a test still reuse theirs."""
    monkeypatch.setattr(api, "_CALLS", {})
    monkeypatch.setattr(api, "_GROWING", {})
