"""prometheus_client's multiprocess mode for the web: folding exited workers, the scrape lock,
the /metrics page over a directory of metric files, and the gunicorn hooks in config/gunicorn.py."""

from __future__ import annotations

import importlib.util
import os
import tempfile
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from unittest import mock

import pytest
from prometheus_client.mmap_dict import MmapedDict, mmap_key
from prometheus_client.multiprocess import MultiProcessCollector

from config.env import BASE_DIR
from config.prometheus_multiprocess import empty_directory, process_exited
from jobs import prometheus_multiprocess
from jobs.prometheus_multiprocess import directory_lock

REQUESTS = "django_http_requests_total_by_method"
LATENCY = "django_http_requests_latency_seconds_by_view_method"


def write(path: Path, typ: str, pid: int | str, values: dict[tuple[str, str, tuple, tuple], float]) -> None:
    """Writes values into `<typ>_<pid>.db` as a process in multiprocess mode would."""
    mmap = MmapedDict(str(path / f"{typ}_{pid}.db"))
    for (metric, sample, labelnames, labelvalues), value in values.items():
        mmap.write_value(mmap_key(metric, sample, labelnames, labelvalues, "help"), value, 0.0)
    mmap.close()


def process_files(path: Path, pid: int, requests: float, fast: float, slow: float) -> None:
    write(path, "counter", pid, {(REQUESTS, f"{REQUESTS}_total", ("method",), ("GET",)): requests})
    write(
        path,
        "histogram",
        pid,
        {
            (LATENCY, f"{LATENCY}_bucket", ("view", "le"), ("home", "0.1")): fast,
            (LATENCY, f"{LATENCY}_bucket", ("view", "le"), ("home", "+Inf")): slow,
            (LATENCY, f"{LATENCY}_sum", ("view",), ("home",)): fast * 0.05 + slow * 2,
        },
    )
    write(path, "gauge_livesum", pid, {("in_flight", "in_flight", (), ()): 1})
    write(path, "gauge_all", pid, {("started", "started", (), ()): 100 + pid})


def collected(path: Path) -> dict[tuple, float]:
    """Every sample the scrape would show, by (name, labels)."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for metric in MultiProcessCollector(None, path=str(path)).collect()
        for s in metric.samples
    }


def test_an_exited_process_is_folded_into_the_archive_without_changing_a_total(tmp_path):
    process_files(tmp_path, 101, requests=7, fast=5, slow=2)
    process_files(tmp_path, 102, requests=3, fast=1, slow=2)
    before = collected(tmp_path)
    assert before[(f"{REQUESTS}_total", (("method", "GET"),))] == 10
    assert before[(f"{LATENCY}_count", (("view", "home"),))] == 10

    process_exited(101, str(tmp_path))
    names = {p.name for p in tmp_path.glob("*.db")}
    assert {"counter_101.db", "histogram_101.db", "gauge_livesum_101.db"}.isdisjoint(names)
    assert {"counter_archive.db", "histogram_archive.db", "gauge_all_101.db"} <= names
    after = collected(tmp_path)
    live_gauge = ("in_flight", ())
    assert before.pop(live_gauge) == 2
    assert after.pop(live_gauge) == 1  # a live gauge counts live processes only
    assert after == before

    process_exited(102, str(tmp_path))
    process_exited(103, str(tmp_path))  # a process that wrote nothing
    assert sorted(p.name for p in tmp_path.glob("counter_*.db")) == ["counter_archive.db"]
    final = collected(tmp_path)
    assert final[(f"{REQUESTS}_total", (("method", "GET"),))] == 10
    assert final[(f"{LATENCY}_bucket", (("le", "0.1"), ("view", "home")))] == 6
    assert final[(f"{LATENCY}_bucket", (("le", "+Inf"), ("view", "home")))] == 10
    assert not list(tmp_path.glob("*.tmp"))


def test_a_fold_waits_for_a_scrape_in_progress(tmp_path):
    process_files(tmp_path, 101, requests=1, fast=1, slow=0)
    with directory_lock(str(tmp_path), exclusive=False):
        fold = threading.Thread(target=process_exited, args=(101, str(tmp_path)))
        fold.start()
        time.sleep(0.3)
        assert (tmp_path / "counter_101.db").exists(), "folded while a scrape was reading"
    fold.join(timeout=5)
    assert not (tmp_path / "counter_101.db").exists()


def test_a_failed_fold_leaves_the_archive_and_the_process_file_as_they_were(tmp_path):
    process_files(tmp_path, 101, requests=4, fast=1, slow=0)
    process_exited(101, str(tmp_path))
    process_files(tmp_path, 102, requests=3, fast=1, slow=0)
    archive = (tmp_path / "counter_archive.db").read_bytes()
    full = mock.patch("prometheus_client.mmap_dict.MmapedDict.write_value", side_effect=OSError("no space"))
    with full, pytest.raises(OSError, match="no space"):
        process_exited(102, str(tmp_path))
    assert (tmp_path / "counter_archive.db").read_bytes() == archive
    assert (tmp_path / "counter_102.db").exists()
    assert collected(tmp_path)[(f"{REQUESTS}_total", (("method", "GET"),))] == 7
    process_exited(102, str(tmp_path))  # the next attempt starts over from a clean archive
    assert collected(tmp_path)[(f"{REQUESTS}_total", (("method", "GET"),))] == 7


def test_empty_directory_removes_metric_files_only(tmp_path):
    target = tmp_path / "prometheus"
    empty_directory(str(target))
    assert target.is_dir()
    process_files(target, 101, requests=1, fast=1, slow=0)
    (target / "notes.txt").write_text("keep")
    empty_directory(str(target))
    assert [p.name for p in target.iterdir()] == ["notes.txt"]


def test_process_exited_does_nothing_without_a_directory(monkeypatch):
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR", raising=False)
    monkeypatch.delenv("prometheus_multiproc_dir", raising=False)
    assert prometheus_multiprocess.multiprocess_dir() is None
    process_exited(101)


@pytest.mark.django_db
def test_metrics_page_adds_up_the_processes_files_and_keeps_the_scrape_time_gauges(
    client, monkeypatch, tmp_path, redis_client
):
    process_files(tmp_path, 101, requests=7, fast=5, slow=2)
    process_files(tmp_path, 102, requests=3, fast=1, slow=2)
    process_exited(101, str(tmp_path))
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain")
    text = response.content.decode()
    assert f'{REQUESTS}_total{{method="GET"}} 10.0' in text
    assert f'{LATENCY}_count{{view="home"}} 10.0' in text
    assert 'celery_queue_length{queue="normal"} 0.0' in text
    assert 'jobs_dead_letters{status="pending"} 0.0' in text
    # This process's own registry is not mixed in: its counts are not in the files.
    assert "python_gc_objects_collected_total" not in text


# --- config/gunicorn.py ---------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _gunicorn_environment_undone(monkeypatch):
    """What config/gunicorn.py puts in the environment is taken out after each test."""
    monkeypatch.setenv("CELERY_BROKER_SOCKET_TIMEOUT", "")
    monkeypatch.delenv("CELERY_BROKER_SOCKET_TIMEOUT")


def load_gunicorn_config():
    spec = importlib.util.spec_from_file_location("gunicorn_config_under_test", BASE_DIR / "config" / "gunicorn.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def server(**attributes):
    return SimpleNamespace(**{"master_pid": 0, "reexec_pid": 0, "log": mock.Mock(), **attributes})


def test_gunicorn_config_keeps_a_given_directory_and_empties_it_at_start(monkeypatch, tmp_path):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    config = load_gunicorn_config()
    assert os.environ["PROMETHEUS_MULTIPROC_DIR"] == str(tmp_path)
    assert os.environ["CELERY_BROKER_SOCKET_TIMEOUT"] == "2"  # the web's publishes fail fast
    # Only hooks and underscored helpers: gunicorn takes every other module-level name as a setting.
    assert {name for name in vars(config) if not name.startswith("_")} == {"on_starting", "child_exit", "on_exit"}

    process_files(tmp_path, 101, requests=1, fast=1, slow=0)
    config.on_starting(server(master_pid=4242))  # a re-executed master: the old workers still write
    assert (tmp_path / "counter_101.db").exists()
    config.on_starting(server())
    assert not list(tmp_path.glob("*.db"))

    process_files(tmp_path, 102, requests=2, fast=1, slow=0)
    config.child_exit(server(), SimpleNamespace(pid=102))
    assert not (tmp_path / "counter_102.db").exists()
    assert collected(tmp_path)[(f"{REQUESTS}_total", (("method", "GET"),))] == 2

    failing = server()
    with mock.patch("config.prometheus_multiprocess.process_exited", side_effect=OSError("no space")):
        config.child_exit(failing, SimpleNamespace(pid=103))  # logged; the master carries on
    failing.log.exception.assert_called_once()

    config.on_exit(server())
    assert tmp_path.is_dir(), "a directory the operator gave is never removed"


def test_gunicorn_config_creates_and_removes_a_private_directory(monkeypatch):
    # setenv first, so monkeypatch restores "unset" after the config module has set it.
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", "x")
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    monkeypatch.delenv("prometheus_multiproc_dir", raising=False)
    config = load_gunicorn_config()
    private = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    assert private.is_dir()
    assert private.parent == Path(tempfile.gettempdir())
    config.on_starting(server())
    config.on_exit(server(reexec_pid=4243))  # the new master (USR2) keeps using it
    assert private.is_dir()
    config.on_exit(server())
    assert not private.exists()
