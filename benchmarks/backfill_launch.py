"""Submitting a ``stemset backfill`` to Dagster and the backfill daemon turning it into runs, on a
real webserver, daemon and code server (loopback processes) over the production instance.

Used by ``benchmarks/scale.py``. The instance's run queue is set to ``max_concurrent_runs: 0``
(Dagster's documented "stop any runs from launching"), so every run the daemon creates stays
QUEUED: what is timed is the submission and the run creation, never separation work.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path

BACKFILL_TAG = "dagster/backfill"
RANGE_START = "dagster/asset_partition_range_start"
RANGE_END = "dagster/asset_partition_range_end"
PROCESS_LABELS = {  # a substring of the command line -> the label reported
    "dagster_webserver": "webserver",
    "dagster._daemon": "daemon",
    "code-server": "code_server",
    "api grpc": "code_server_grpc",
}


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        for child in children.get(pid, []):
            out.append(child)
            todo.append(child)
    return out


def dagster_processes() -> dict[str, dict[str, float]]:
    """Peak RSS (VmHWM, MB) and CPU seconds so far of the Dagster processes this process started."""
    tick = os.sysconf("SC_CLK_TCK")
    out: dict[str, dict[str, float]] = {}
    for pid in _descendants(os.getpid()):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            status = Path(f"/proc/{pid}/status").read_text()
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        label = next((name for key, name in PROCESS_LABELS.items() if key in cmd), None)
        if label is None:
            continue
        hwm = next((int(line.split()[1]) for line in status.splitlines() if line.startswith("VmHWM:")), 0)
        cpu = (int(fields[11]) + int(fields[12])) / tick  # utime + stime
        if label in out:
            label = f"{label}_{pid}"
        out[label] = {"peak_rss_mb": round(hwm / 1024, 1), "cpu_s": round(cpu, 1)}
    return out


def record_recordings(store, keys: list[str], duration_s: float = 180.0) -> float:
    """Write each partition's ``recording.json`` (the fields the state rule reads, the input's real
    ETag) so the sets are missing stems only and the plan leaves ``recording`` out; seconds taken."""
    import json
    from concurrent.futures import ThreadPoolExecutor

    from stemset_assets.core.layout import record_key

    etags = {info.key: info.etag for info in store.list("inputs/")}
    t0 = time.perf_counter()

    def put(i_pk: tuple[int, str]) -> None:
        i, pk = i_pk
        original = f"inputs/{pk}.wav"
        doc = {"source_sha256": f"{i:064x}", "input_etag": etags[original], "original_key": original}
        store.put_bytes(record_key(pk), json.dumps({**doc, "duration_s": duration_s}).encode())

    with ThreadPoolExecutor(16) as pool:
        list(pool.map(put, enumerate(keys)))
    return time.perf_counter() - t0


def wait_for_daemon(instance, timeout_s: float) -> float:
    """Seconds until the backfill daemon has sent a heartbeat (bounded)."""
    t0 = time.monotonic()
    while "BACKFILL" not in instance.get_daemon_heartbeats():
        if time.monotonic() - t0 > timeout_s:
            raise RuntimeError(f"the dagster-daemon sent no backfill heartbeat within {timeout_s:.0f} s")
        time.sleep(1.0)
    return time.monotonic() - t0


def partitions_per_run(instance, runs, keys: list[str]) -> dict[str, int]:
    """How many partitions each run covers (from its partition-range tags), summarised."""
    index = {k: i for i, k in enumerate(keys)}
    sizes = []
    for run in runs:
        start, end = run.tags.get(RANGE_START), run.tags.get(RANGE_END)
        if start in index and end in index:
            sizes.append(index[end] - index[start] + 1)
        elif run.tags.get("dagster/partition") in index:
            sizes.append(1)
    return {"min": min(sizes, default=0), "max": max(sizes, default=0), "total": sum(sizes)}


def submit_and_create_runs(plan, config, instance, client, *, window_s: float, poll_s: float = 2.0) -> dict:
    """``stemset backfill``'s submission of ``plan`` through the webserver at ``client``, then the
    daemon's run creation polled until every run exists or ``window_s`` passes."""
    from dagster import RunsFilter

    from stemset_assets.defs.backfill import launch_backfill

    expected = math.ceil(plan.count / config.backfill.max_partitions_per_run)
    if plan.include_recording:  # recording is one partition a run (BackfillPolicy.multi_run(1)), first
        expected = plan.count
    t0 = time.perf_counter()
    launched = launch_backfill(plan, config, instance, url=client.url, say=lambda _: None)
    submit_s = time.perf_counter() - t0
    if launched.path != "webserver":
        raise RuntimeError(f"the backfill did not go through the webserver: {launched.message}")
    backfill_id = launched.backfill_id
    runs_filter = RunsFilter(tags={BACKFILL_TAG: backfill_id})
    samples: list[tuple[float, int]] = []
    first_run_s = None
    while True:
        count = instance.get_runs_count(runs_filter)
        elapsed = time.perf_counter() - t0
        samples.append((round(elapsed, 1), count))
        if count and first_run_s is None:
            first_run_s = elapsed
        if count >= expected or elapsed > window_s:
            break
        time.sleep(poll_s)
    runs = instance.get_runs(runs_filter)
    statuses: dict[str, int] = {}
    for run in runs:
        statuses[run.status.value] = statuses.get(run.status.value, 0) + 1
    keys = list(instance.get_dynamic_partitions("recordings"))
    complete = count >= expected
    created_s = samples[-1][0]
    rate = (count / (created_s - first_run_s)) if first_run_s and created_s > first_run_s else None
    step = max(1, len(samples) // 40)
    return {
        "backfill_id": backfill_id,
        "partitions": plan.count,
        "include_recording": plan.include_recording,
        "max_partitions_per_run": config.backfill.max_partitions_per_run,
        "submit_s": round(submit_s, 2),
        "runs_expected": expected,
        "runs_created": count,
        "run_statuses": statuses,  # QUEUED: none dequeued (a run may still be NOT_STARTED, mid-submission)
        "all_runs_created": complete,
        "first_run_after_submit_s": round(first_run_s, 1) if first_run_s is not None else None,
        "submit_to_last_run_s" if complete else "window_s": created_s,
        "runs_per_s": round(rate, 2) if rate else None,
        "partitions_per_run": partitions_per_run(instance, runs, keys),
        "backfill_status": instance.get_backfill(backfill_id).status.value,
        "samples_s_runs": samples[::step] + ([samples[-1]] if samples[-1] not in samples[::step] else []),
    }
