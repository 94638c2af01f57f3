"""The K-weighting runs on scipy's sosfilt kernel loaded alone (gpu_worker.audio.loudness): the
same output and state as the public ``scipy.signal.sosfilt``, block by block, and measuring
loudness does not import ``scipy.signal`` (1.4 s of start-up on the 2-core AMD machine)."""

import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from scipy.signal import sosfilt

from gpu_worker.audio import loudness


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("use_kernel", [True, False])
def test_k_weighting_equals_public_sosfilt_across_blocks(dtype, use_kernel, monkeypatch):
    if not use_kernel:  # the fallback where a scipy lacks the kernel
        monkeypatch.setattr(loudness, "_KERNEL", None)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 50_000)).astype(dtype)
    k = loudness.KWeighting(48000, 3, dtype=dtype)
    assert (k._kernel is not None) == use_kernel
    got = np.concatenate([k(x[:, a:b]) for a, b in [(0, 1), (1, 7_000), (7_000, 7_000), (7_000, 50_000)]], axis=1)
    want, zi = sosfilt(k.sos, x, axis=-1, zi=np.zeros((2, 3, 2), dtype))
    assert got.dtype == dtype and not np.shares_memory(got, x)
    np.testing.assert_array_equal(got, want)
    np.testing.assert_array_equal(np.moveaxis(k.zi, 0, 1), zi)


def test_wider_input_widens_the_filter_as_sosfilt_does():
    k = loudness.KWeighting(44100, 2)  # float32 by default
    x = np.random.default_rng(1).standard_normal((2, 4_000))  # float64
    y = k(x)
    want, _ = sosfilt(k.sos, x, axis=-1, zi=np.zeros((2, 2, 2)))
    assert y.dtype == np.float64 and k.zi.dtype == np.float64
    np.testing.assert_array_equal(y, want)


def test_measuring_loudness_does_not_import_scipy_signal():
    code = (
        "import sys, numpy as np\n"
        "from gpu_worker.audio.analyse import integrated_loudness\n"
        "x = (0.1 * np.random.default_rng(0).standard_normal((2, 44100))).astype(np.float32)\n"
        "assert integrated_loudness(x) is not None\n"
        "print('scipy.signal' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "False", out.stdout + out.stderr


def test_meters_made_at_once_in_threads_load_the_kernel_once(monkeypatch):
    """Stems are measured in threads; two threads loading the extension at once make all but one
    fail (seen in `stemset separate`, which then fell back to importing scipy.signal)."""
    monkeypatch.setattr(loudness, "_KERNEL", False)  # not looked for yet in this process
    calls, real = [], loudness._load_sosfilt_kernel

    def slow_load():
        calls.append(1)
        time.sleep(0.2)  # widen the window two unguarded threads would share
        return real()

    monkeypatch.setattr(loudness, "_load_sosfilt_kernel", slow_load)
    barrier = threading.Barrier(4, timeout=30)

    def make(_):
        barrier.wait()
        return loudness.KWeighting(44100, 2)._kernel

    with ThreadPoolExecutor(4) as pool:
        kernels = list(pool.map(make, range(4)))
    assert len(calls) == 1
    assert all(k is not None for k in kernels) and len({id(k) for k in kernels}) == 1
