"""The web's /metrics under a real gunicorn with several workers: every scrape sees every worker."""

from __future__ import annotations

import re
import time
import urllib.error
import urllib.request

import pytest

from config.env import BASE_DIR
from devtools.localredis import free_port
from tests.integration.conftest import wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.integration]

REQUESTS = 20


def get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - a local test server
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def sample(text: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` whose labels include `labels` (0 when there is none)."""
    total = 0.0
    for line in text.splitlines():
        match = re.fullmatch(rf"{name}(?:\{{(.*)\}})? (\S+)", line)
        if match and all(f'{key}="{value}"' in (match.group(1) or "") for key, value in labels.items()):
            total += float(match.group(2))
    return total


def test_metrics_add_up_every_gunicorn_worker_including_recycled_ones(start_service, tmp_path):
    port = free_port()
    metrics_dir = tmp_path / "prometheus"
    metrics_dir.mkdir()
    (metrics_dir / "counter_999999.db").write_bytes(b"left over by an earlier run")
    (metrics_dir / "keep.txt").write_text("not a metrics file")
    web = start_service(
        [
            "gunicorn",
            "config.wsgi",
            "--config",
            str(BASE_DIR / "config" / "gunicorn.py"),
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "2",
            "--threads",
            "2",
            # Workers are replaced every 6 requests: 20 requests are served by at least 4 processes.
            "--max-requests",
            "6",
            "--no-control-socket",
        ],
        extra_env={"PROMETHEUS_MULTIPROC_DIR": str(metrics_dir)},
    )
    base = f"http://127.0.0.1:{port}"

    def healthy():
        try:
            return get(f"{base}/healthz")[0] == 200
        except OSError:
            assert web.process.poll() is None, web.log()[-3000:]
            return False

    wait_for(healthy, timeout=30)
    assert not (metrics_dir / "counter_999999.db").exists(), "the directory is emptied at start"
    assert (metrics_dir / "keep.txt").exists(), "only metric files are removed"

    for image_id in range(REQUESTS):  # each one a database query, then a 404
        assert get(f"{base}/api/thumbnails/{10_000 + image_id}/")[0] == 404

    def folded():
        # Exited workers were folded into the archive: the live workers' files plus the archive.
        counters = sorted(path.name for path in metrics_dir.glob("counter_*.db"))
        return counters if "counter_archive.db" in counters and len(counters) <= 3 else None

    wait_for(folded, timeout=10)
    totals = []
    for _ in range(4):
        status, text = get(f"{base}/metrics")
        assert status == 200
        totals.append(sample(text, "django_http_requests_total_by_method_total", method="GET"))
        assert sample(text, "django_db_execute_total", alias="default") >= REQUESTS
        assert 'celery_queue_length{queue="normal"}' in text  # the scrape-time gauges are there too
        time.sleep(0.05)
    # Scrapes are answered before the counting middleware, so the total stays put, whichever
    # worker answers; and it counts every request, served by live and exited workers alike.
    assert totals == [REQUESTS] * len(totals), totals
    web.stop()
    assert "Traceback" not in web.log(), web.log()[-3000:]
