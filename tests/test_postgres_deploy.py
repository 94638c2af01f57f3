"""Production Dagster on a real Postgres (from the pgserver wheel): the instance of
``deploy/dagster.yaml`` as ``stemset deploy render`` writes it for a test config, with the real
daemon, code server and webserver as separate processes on loopback.

- the new_recordings sensor in the daemon registers inputs and its runs go through the queue, at
  most ``runs.gpu_concurrency`` GPU runs at once (measured from the runs' start and end times);
  then a ``stemset backfill`` through the webserver runs on the backfill daemon;
- a run whose separator fails, and a run whose step process is killed, are marked failed and
  retried by the daemon (``run_retries``), and the retries succeed;
- a run whose run worker is killed is failed by the code server that started it; a run left with no
  process at all (run worker and code server killed) is failed by run monitoring's runtime limit;
  both are retried into success (the DefaultRunLauncher has no run worker health check);
- the spend guard holds back new inputs past the day's budget, spending read from the recorded
  cost of stems materialisations on Postgres.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml
from dagster import AssetKey, AssetMaterialization, DagsterInstance, DagsterRunStatus, build_sensor_context

from gpu_worker.stores.local import LocalObjectStore
from stemset_assets.config import load_config
from stemset_assets.core.deploy_files import instance_config
from stemset_assets.core.layout import manifest_key
from stemset_assets.core.run_tags import ESTIMATE_TAG, GPU_TAG
from stemset_assets.defs.partitions import RECORDINGS_PARTITIONS
from stemset_assets.defs.resources import MediaStoreResource
from stemset_assets.defs.sensors import build_new_recordings_sensor
from stemset_assets.defs.spending import read_spending
from tests.audio_fixtures import music_like, write_audio
from tests.configs import tiny_config_yaml
from tests.model_fixtures import make_model_repo
from tests.postgres_fixtures import start_postgres, stop_postgres
from tests.webserver import code_server, dagster_daemon, dagster_webserver, grpc_workspace

ROOT = Path(__file__).resolve().parent.parent
DONE = {DagsterRunStatus.SUCCESS, DagsterRunStatus.FAILURE, DagsterRunStatus.CANCELED}


@pytest.fixture(scope="module")
def postgres():
    server = start_postgres()
    try:
        yield server
    finally:
        stop_postgres(server)


@pytest.fixture
def pg(postgres, tmp_path, monkeypatch):
    """A fresh database; DAGSTER_HOME and the DAGSTER_PG_* variables set for this process."""
    env = postgres.env(postgres.create_database())
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    return home, env


def project(tmp_path: Path, sections: str, inputs: int) -> tuple[Path, LocalObjectStore]:
    repo = make_model_repo(tmp_path / "models")
    config_path = tmp_path / "config.yaml"
    config_path.write_text(tiny_config_yaml(repo, tmp_path / "media", sections=sections))
    store = LocalObjectStore(tmp_path / "media")
    for i in range(inputs):
        write_audio(tmp_path / f"t{i}.wav", music_like(1.0, seed=i), 44100)
        store.upload(tmp_path / f"t{i}.wav", f"inputs/h4n/t{i}.wav")
    return config_path, store


def instance_yaml(config_path: Path) -> str:
    """The production dagster.yaml for this config (what `stemset deploy render` writes)."""
    return yaml.safe_dump(instance_config(load_config(config_path, env={})), sort_keys=False)


def wait_for(predicate, timeout_s: float, what: str, poll_s: float = 2.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s:.0f} s"
        time.sleep(poll_s)


def max_overlap(records) -> int:
    """The most runs in progress at one moment, from their start and end times."""
    edges = sorted(
        [(r.start_time, 1) for r in records if r.start_time] + [(r.end_time, -1) for r in records if r.end_time],
        key=lambda e: (e[0], e[1]),  # an end before a start at the same instant
    )
    now = peak = 0
    for _, step in edges:
        now += step
        peak = max(peak, now)
    return peak


def test_daemon_sensor_queue_cap_and_backfill_on_postgres(tmp_path, pg):
    home, env = pg
    cap = 2
    sections = f"sensors: {{interval_s: 2, settle_s: 0}}\nruns: {{gpu_concurrency: {cap}, max_retries: 0}}\n"
    config_path, store = project(tmp_path, sections, inputs=5)
    text = instance_yaml(config_path)
    assert "postgresql+psycopg2" in text and "StemsetRunCoordinator" in text
    (home / "dagster.yaml").write_text(text)
    instance = DagsterInstance.from_config(str(home))
    assert type(instance.run_storage).__name__ == "PostgresRunStorage"
    assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
    with (
        code_server(config_path, "stemset_assets.definitions", env, tmp_path / "code.log") as port,
        dagster_daemon(
            home,
            config_path,
            workspace=grpc_workspace(tmp_path / "ws.yaml", port),
            env=env,
            log_path=tmp_path / "d.log",
        ),
    ):

        def sensor_runs_done():  # (the stem_set_state sensor adds catalog runs: not GPU runs)
            runs = [r for r in instance.get_runs() if r.tags.get("stemset/launched_by") == "new_recordings"]
            return len(runs) == 5 and all(r.status in DONE for r in runs) and runs

        runs = wait_for(sensor_runs_done, 600, "the sensor's five runs")
        assert {r.status for r in runs} == {DagsterRunStatus.SUCCESS}, (tmp_path / "d.log").read_text()[-3000:]
        assert all(r.tags.get(GPU_TAG) == "true" and r.tags["stemset/launched_by"] == "new_recordings" for r in runs)
        gpu_records = [r for r in instance.get_run_records() if r.dagster_run.tags.get(GPU_TAG) == "true"]
        assert max_overlap(gpu_records) <= cap
        keys = sorted(instance.get_dynamic_partitions(RECORDINGS_PARTITIONS))
        assert keys == [f"h4n/t{i}" for i in range(5)]
        assert all(store.exists(manifest_key(k, "htdemucs")) for k in keys)

        # A backfill of every set, launched by `stemset backfill` through the webserver, run by the daemon.
        ws = grpc_workspace(tmp_path / "ws.yaml", port)
        with dagster_webserver(home, config_path, instance_yaml=text, workspace=ws, env=env) as client:
            from stemset_assets.cli.main import main

            assert (
                main(["-c", str(config_path), "-q", "backfill", "-s", "htdemucs", "--all", "--webserver", client.url])
                == 0
            )
            (backfill,) = instance.get_backfills()
            assert backfill.tags[GPU_TAG] == "true" and "stemset/backfill_estimated_cost_usd" in backfill.tags
            wait_for(
                lambda: instance.get_backfill(backfill.backfill_id).status.value != "REQUESTED", 400, "the backfill"
            )
    assert instance.get_backfill(backfill.backfill_id).status.value == "COMPLETED_SUCCESS"
    backfill_runs = [r for r in instance.get_runs() if r.tags.get("dagster/backfill") == backfill.backfill_id]
    assert backfill_runs and all(
        r.status == DagsterRunStatus.SUCCESS and r.tags[GPU_TAG] == "true" for r in backfill_runs
    )
    assert max_overlap([r for r in instance.get_run_records() if r.dagster_run.tags.get(GPU_TAG) == "true"]) <= cap
    instance.dispose()


def failed_then_retried(instance, partition: str, fail_within_s: float, log: Path):
    """The partition's first run once it has failed, and its automatic retry once that has ended.

    Dagster 1.13 can lose a retry: ``handle_new_event`` stores a RUN_FAILURE event, then updates
    the run's status and ``dagster/will_retry`` tag in separate writes; when the daemon's event log
    consumer reads the event between them it sees the run not yet FAILURE, skips it and moves its
    cursor past it for good. Seen once here on a loaded machine, for a failure the code server wrote.
    Such a run keeps ``will_retry=true`` with no ``auto_retry_run_id``: the test is then marked xfail
    with that diagnosis, not passed."""

    def mine():
        return sorted(
            (r for r in instance.get_runs() if r.tags.get("dagster/partition") == partition),
            key=lambda r: int(r.tags.get("dagster/retry_number", "0")),
        )

    first = wait_for(lambda: next((r for r in mine() if r.status in DONE), None), fail_within_s, "the first run")
    assert first.status == DagsterRunStatus.FAILURE, log.read_text(errors="replace")[-3000:]
    failed_at = instance.get_run_record_by_id(first.run_id).end_time

    def retried_or_lost():
        runs = mine()
        if len(runs) == 2 and runs[1].status in DONE:
            return runs[1]
        tags = instance.get_run_by_id(first.run_id).tags
        if len(runs) == 1 and "dagster/auto_retry_run_id" not in tags and time.time() - failed_at > 90:
            return "lost"
        return None

    retry = wait_for(retried_or_lost, 420, "the retry")
    if retry == "lost":
        tags = instance.get_run_by_id(first.run_id).tags
        pytest.xfail(
            f"Dagster lost the retry of {first.run_id} (will_retry={tags.get('dagster/will_retry')}, no retry"
            " 90 s after the failure): the event-log consumer race in the docstring"
        )
    return first, retry


def flaky_location(tmp_path: Path) -> Path:
    """A workspace of tests.deploy_location, the daemon's own code server (as ``dagster dev`` runs it)."""
    ws = tmp_path / "ws.yaml"
    ws.write_text(
        "load_from:\n  - python_module:\n      module_name: tests.deploy_location\n"
        f"      working_directory: {ROOT}\n      location_name: stemset\n"
    )
    return ws


def test_failed_and_killed_runs_are_retried_on_postgres(tmp_path, pg):
    home, env = pg
    sections = "sensors: {interval_s: 2, settle_s: 0}\nruns: {gpu_concurrency: 2, max_retries: 1}\n"
    config_path, store = project(tmp_path, sections, inputs=2)
    flaky = tmp_path / "flaky"
    flaky.mkdir()
    (flaky / "h4n__t0.fail").touch()  # its separator returns an error once
    (flaky / "h4n__t1.kill").touch()  # its run's process is killed once
    text = instance_yaml(config_path)
    (home / "dagster.yaml").write_text(text)
    ws = flaky_location(tmp_path)
    instance = DagsterInstance.from_config(str(home))
    test_env = {**env, "STEMSET_TEST_FLAKY_DIR": str(flaky)}
    with dagster_daemon(home, config_path, workspace=ws, env=test_env, log_path=tmp_path / "d.log"):

        def both_succeeded():
            runs = instance.get_runs()
            ok = {r.tags.get("dagster/partition") for r in runs if r.status == DagsterRunStatus.SUCCESS}
            return ok >= {"h4n/t0", "h4n/t1"} and runs

        wait_for(both_succeeded, 600, "both partitions to succeed after a retry")
    runs = instance.get_runs()
    for pk in ("h4n/t0", "h4n/t1"):
        mine = sorted(
            (r for r in runs if r.tags.get("dagster/partition") == pk),
            key=lambda r: r.tags.get("dagster/retry_number", "0"),
        )
        assert [r.status for r in mine] == [DagsterRunStatus.FAILURE, DagsterRunStatus.SUCCESS], pk
        assert mine[1].tags["dagster/retry_number"] == "1" and mine[1].parent_run_id == mine[0].run_id
        assert mine[1].tags.get(GPU_TAG) == "true"  # a retry keeps its place in the GPU queue
        assert store.exists(manifest_key(pk, "htdemucs"))
    killed = next(
        r for r in runs if r.tags.get("dagster/partition") == "h4n/t1" and r.status == DagsterRunStatus.FAILURE
    )
    messages = " ".join(e.message or "" for e in instance.all_logs(killed.run_id))
    # the killed process was noticed (Dagster's crash explanation), and the run failed
    assert "terminated by signal 9 (SIGKILL)" in messages or "unexpectedly exited" in messages, messages[-2000:]
    assert not list(flaky.iterdir())
    instance.dispose()


def test_dead_run_worker_is_failed_and_retried_on_postgres(tmp_path, pg):
    """The run worker itself dies (SIGKILL, no chance to write a failure event): under the
    DefaultRunLauncher the code server that started it sees its process gone and fails the run;
    run_retries then retries it, and the retry succeeds."""
    home, env = pg
    sections = "sensors: {interval_s: 2, settle_s: 0}\nruns: {gpu_concurrency: 2, max_retries: 1}\n"
    config_path, store = project(tmp_path, sections, inputs=1)
    flaky = tmp_path / "flaky"
    flaky.mkdir()
    (flaky / "h4n__t0.killworker").touch()
    (home / "dagster.yaml").write_text(instance_yaml(config_path))
    instance = DagsterInstance.from_config(str(home))
    # The daemon's run monitoring cannot health-check this launcher's run workers (K8sRunLauncher can).
    assert type(instance.run_launcher).__name__ == "DefaultRunLauncher"
    assert not instance.run_launcher.supports_check_run_worker_health
    test_env = {**env, "STEMSET_TEST_FLAKY_DIR": str(flaky)}
    log = tmp_path / "d.log"
    with dagster_daemon(home, config_path, workspace=flaky_location(tmp_path), env=test_env, log_path=log):
        first, retry = failed_then_retried(instance, "h4n/t0", 400, log)
    assert retry.status == DagsterRunStatus.SUCCESS and retry.parent_run_id == first.run_id
    assert retry.tags["dagster/retry_number"] == "1" and retry.tags.get(GPU_TAG) == "true"
    assert not list(flaky.iterdir())  # the marker fired: the run worker was killed
    messages = [e.message or "" for e in instance.all_logs(first.run_id)]
    # Written by the code server's check for run processes that are gone, not by the run worker
    # (a step's death reads "Multiprocess executor: child process for step ...").
    notice = f"[DagsterApiServer] Run execution process for {first.run_id} was terminated by signal 9 (SIGKILL)."
    assert any(m.startswith(notice) for m in messages), "\n".join(messages[-12:])
    assert "This run has been marked as failed from outside the execution context." in messages
    record = instance.get_run_record_by_id(first.run_id)
    assert record.end_time is not None and record.end_time - record.start_time < 300
    assert store.exists(manifest_key("h4n/t0", "htdemucs"))
    instance.dispose()


def test_run_with_no_process_left_is_failed_by_monitoring_on_postgres(tmp_path, pg):
    """The run worker and the code server that started it both die (a host or container restart):
    no process is left that knows the run, which would stay STARTED for ever. The daemon's run
    monitoring fails it once it passes ``runs.max_runtime_s`` (Dagster's ``max_runtime_seconds``:
    the DefaultRunLauncher offers no run worker health check), and run_retries retries it."""
    home, env = pg
    limit = 150  # above a whole run's time here, loaded machine included
    sections = f"sensors: {{interval_s: 2, settle_s: 0}}\nruns: {{max_retries: 1, max_runtime_s: {limit}}}\n"
    config_path, store = project(tmp_path, sections, inputs=1)
    flaky = tmp_path / "flaky"
    flaky.mkdir()
    (flaky / "h4n__t0.killserver").touch()
    settings = instance_config(load_config(config_path, env={}))
    assert settings["run_monitoring"]["max_runtime_seconds"] == limit
    settings["run_monitoring"]["poll_interval_seconds"] = 5  # deploy/ polls every 30 s; a shorter test
    (home / "dagster.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
    instance = DagsterInstance.from_config(str(home))
    test_env = {**env, "STEMSET_TEST_FLAKY_DIR": str(flaky)}
    log = tmp_path / "d.log"
    with dagster_daemon(home, config_path, workspace=flaky_location(tmp_path), env=test_env, log_path=log):
        first, retry = failed_then_retried(instance, "h4n/t0", limit + 300, log)
    assert not list(flaky.iterdir())  # the marker fired: run worker and code server killed
    messages = [e.message or "" for e in instance.all_logs(first.run_id)]
    # Nobody but the monitoring daemon noticed: no code server's crash notice, the runtime limit's.
    assert not any("Run execution process for" in m for m in messages), messages[-12:]
    assert f"Canceling due to exceeding maximum runtime of {limit} seconds." in messages, messages[-12:]
    assert any(m.startswith("This job is being forcibly marked as failed") for m in messages), messages[-12:]
    record = instance.get_run_record_by_id(first.run_id)
    assert limit <= record.end_time - record.start_time < limit + 120
    assert retry.status == DagsterRunStatus.SUCCESS and retry.parent_run_id == first.run_id
    assert store.exists(manifest_key("h4n/t0", "htdemucs"))
    instance.dispose()


def test_spend_guard_holds_back_new_inputs_on_postgres(tmp_path, pg):
    home, _ = pg
    # A priced backend (never called here): $2.50/h; 14.4 billed s per audio s = $0.01 per audio second.
    sections = (
        "gpu: {backend: http, url: 'http://127.0.0.1:9', type: A100-40GB}\n"
        "sensors: {settle_s: 0}\nbackfill: {billed_seconds_per_audio_second: 14.4}\n"
        "budget: {gpu_usd_per_day: 1.0, gpu_usd_per_month: 100}\n"
    )
    config_path, store = project(tmp_path, sections, inputs=0)
    config = load_config(config_path, env={})
    (home / "dagster.yaml").write_text(instance_yaml(config_path))
    instance = DagsterInstance.from_config(str(home))
    ten_seconds = b"RIFF" + bytes(176_400 * 10 - 4)  # a 10 s 16-bit stereo WAV's size: estimated $0.10
    for i in range(6):
        store.put_bytes(f"inputs/h4n/take{i}.wav", ten_seconds)
    drums = AssetKey(["stems", "htdemucs", "drums"])
    instance.add_dynamic_partitions(RECORDINGS_PARTITIONS, ["h4n/earlier"])
    instance.report_runless_asset_event(
        AssetMaterialization(drums, partition="h4n/earlier", metadata={"run_cost_usd": 0.70})
    )
    assert read_spending(instance, config).day_usd == pytest.approx(0.70)

    media = MediaStoreResource(backend="local", root=str(tmp_path / "media"))
    sensor = build_new_recordings_sensor(config)
    result = sensor(build_sensor_context(instance=instance, resources={"media_store": media}))
    admitted = [r.partition_key for r in result.run_requests]
    assert admitted == ["h4n/take0", "h4n/take1", "h4n/take2"]  # $0.30 fits the $0.30 left today
    assert all(r.tags[ESTIMATE_TAG] == "0.100000" and r.tags[GPU_TAG] == "true" for r in result.run_requests)
    # The three held back are registered (they show as missing) and not marked handled.
    assert len(result.dynamic_partitions_requests[0].partition_keys) == 6

    # Those three ran and recorded their cost: the day is spent, the next tick launches nothing and says why.
    for pk in admitted:
        instance.report_runless_asset_event(AssetMaterialization(drums, partition=pk, metadata={"run_cost_usd": 0.10}))
    again = sensor(build_sensor_context(instance=instance, cursor=result.cursor, resources={"media_store": media}))
    assert not again.run_requests
    reason = again.skip_reason.skip_message
    assert "3 new input(s) held back by the GPU budget" in reason and "budget.gpu_usd_per_day" in reason
    assert "today $1.00 of $1.00" in reason
    instance.dispose()


def test_the_instance_keeps_its_postgres_connections_open(tmp_path, pg, monkeypatch):
    """deploy/dagster.yaml's storage reuses one connection per store where dagster_postgres's own
    opens one for every read and write (counted at the driver)."""
    import psycopg2

    home, _ = pg
    config_path, _ = project(tmp_path, "", 0)
    rendered = yaml.safe_load(instance_yaml(config_path))
    plain = {**rendered, "storage": {"postgres": rendered["storage"]["custom"]["config"]}}
    opened = []
    real_connect = psycopg2.connect
    monkeypatch.setattr(psycopg2, "connect", lambda *a, **k: opened.append(1) or real_connect(*a, **k))
    counts = {}
    for name, settings in (("deploy", rendered), ("dagster_postgres", plain)):
        (home / "dagster.yaml").write_text(yaml.safe_dump(settings, sort_keys=False))
        instance = DagsterInstance.from_config(str(home))
        try:
            opened.clear()
            for i in range(40):
                instance.report_runless_asset_event(AssetMaterialization(asset_key="probe", partition=f"{name}{i}"))
                instance.get_runs(limit=1)
            assert len(instance.get_materialized_partitions(AssetKey("probe"))) >= 40  # the writes landed
            counts[name] = len(opened)
        finally:
            instance.dispose()
    assert counts["deploy"] <= 6, counts  # a few: one per store, plus set-up
    assert counts["dagster_postgres"] >= 80, counts  # the count is not vacuous: one per call without the pool
