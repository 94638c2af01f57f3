"""Several CPU forwards at once (gpu_worker.forwards): they really overlap, answer in order, each on
its own intra-op threads without changing anyone else's, and the engine's stems stay Demucs'."""

from __future__ import annotations

import threading
import weakref

import pytest
import torch

from gpu_worker import models
from gpu_worker.engine import separate
from gpu_worker.errors import ConfigError
from gpu_worker.forwards import CPU_FORWARDS_ENV, cpu_forwards, run_forwards
from gpu_worker.inference import EngineStats
from gpu_worker.strategy import SeparationParams
from tests.model_fixtures import make_model_repo, tiny_htdemucs
from tests.test_engine_equivalence import assert_equal_to_demucs, demucs_reference, mix

CPU = torch.device("cpu")


@pytest.fixture
def two_threads():
    """torch with 2 intra-op threads, so 2 forwards may run at once even on a 1-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


class Meeting(torch.nn.Module):
    """A model whose forwards wait for each other: run one at a time, the first would time out."""

    def __init__(self, together: int):
        super().__init__()
        self.met = threading.Barrier(together)
        self.threads: list[tuple[str, int]] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.threads.append((threading.current_thread().name, torch.get_num_threads()))
        self.met.wait(timeout=30)
        return x * 2


def test_two_forwards_run_at_once_and_answer_in_order(monkeypatch, two_threads):
    monkeypatch.setenv(CPU_FORWARDS_ENV, "2")
    model = Meeting(together=2)
    stats = EngineStats()
    batches = [[k] for k in range(6)]
    made: list[int] = []

    def make(batch):
        made.append(batch[0])
        return torch.full((1, 2, 4), float(batch[0]))

    out = list(run_forwards(model, batches, make, CPU, "fp32", stats))
    assert [b for b, _ in out] == batches
    assert [float(y[0, 0, 0]) for _, y in out] == [2.0 * k for k in range(6)]
    assert made == list(range(6)) and stats.batches == 6 and stats.segments == 6
    names = {name for name, _ in model.threads}
    assert len(names) == 2 and all(n.startswith("stemset-forward") for n in names)
    assert {count for _, count in model.threads} == {1}  # 2 threads shared by 2 forwards
    # A thread started afterwards still gets torch's own default, not a worker's single thread.
    seen = {}
    t = threading.Thread(target=lambda: seen.setdefault("n", torch.get_num_threads()))
    t.start()
    t.join()
    assert seen["n"] == 2 and torch.get_num_threads() == 2


def test_one_forward_at_a_time_when_asked(monkeypatch, two_threads):
    monkeypatch.setenv(CPU_FORWARDS_ENV, "1")
    model = Meeting(together=1)
    out = list(run_forwards(model, [[0], [1]], lambda b: torch.ones(1, 1) * b[0], CPU, "fp32", EngineStats()))
    assert [float(y) for _, y in out] == [0.0, 2.0]
    assert {name for name, _ in model.threads} == {threading.current_thread().name}


def test_a_failing_forward_stops_the_run_with_its_error(monkeypatch, two_threads):
    monkeypatch.setenv(CPU_FORWARDS_ENV, "2")

    class Breaks(torch.nn.Module):
        def forward(self, x):
            if float(x.flatten()[0]) == 3:
                raise RuntimeError("segment 3 broke")
            return x

    got = []
    with pytest.raises(RuntimeError, match="segment 3 broke"):
        for batch, _ in run_forwards(
            Breaks(), [[k] for k in range(8)], lambda b: torch.ones(1) * b[0], CPU, "fp32", EngineStats()
        ):
            got.append(batch[0])
    assert got == [0, 1, 2]


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5"])
def test_a_bad_setting_is_a_clear_error(value):
    with pytest.raises(ConfigError, match=CPU_FORWARDS_ENV):
        cpu_forwards({CPU_FORWARDS_ENV: value})


def test_never_more_forwards_than_threads_and_one_by_default(two_threads):
    assert cpu_forwards({CPU_FORWARDS_ENV: "8"}) == 2
    assert cpu_forwards({}) == 1  # the default: one forward over all cores


def test_stems_with_parallel_forwards_equal_demucs_and_the_serial_run(tmp_path, monkeypatch, two_threads):
    repo = make_model_repo(tmp_path / "models")
    wav = mix(5.123)
    ref = demucs_reference("htdemucs", repo, wav, shifts=0)
    params = SeparationParams(shifts=0, overlap=0.25, batch_size=1)
    runs = {}
    for n in ("1", "2"):
        monkeypatch.setenv(CPU_FORWARDS_ENV, n)
        stats = EngineStats()
        model = models.load_model("htdemucs", repo)
        runs[n] = separate(model, wav, params, CPU, stats=stats)
        assert stats.segments > 2
    assert_equal_to_demucs(runs["2"], ref)
    for name in runs["1"]:
        assert torch.allclose(runs["1"][name], runs["2"][name], rtol=0, atol=1e-5 * runs["1"][name].abs().max())


def test_no_output_is_alive_while_the_next_forward_runs():
    """The engine lets go of each forward's output (and the views cut from it) before the next
    forward starts: alive, it would sit among that forward's freed activations, and the kept
    heap (gpu_worker.cpu_allocator) would grow around it."""
    model = tiny_htdemucs(seed=1)
    real = model.forward
    outputs: list[weakref.ref] = []
    alive_at_start: list[int] = []

    def forward(x):
        alive_at_start.append(sum(ref() is not None for ref in outputs))
        y = real(x)
        outputs.append(weakref.ref(y))
        return y

    model.forward = forward
    separate(model, mix(4.0), SeparationParams(shifts=1, overlap=0.25, batch_size=1), CPU)
    assert len(alive_at_start) >= 4  # several forwards, each after another's output was consumed
    assert alive_at_start == [0] * len(alive_at_start)
