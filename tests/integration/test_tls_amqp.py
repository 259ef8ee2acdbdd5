"""The broker over TLS, RabbitMQ side: `amqps://` with certificate verification, against a private
node of the installed rabbitmq-server (never the system node, which these tests do not touch)."""

from __future__ import annotations

import contextlib
import glob
import json
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
import uuid
from pathlib import Path
from urllib.parse import quote

import pytest
from kombu import Connection
from kombu.exceptions import OperationalError

from config.env import BASE_DIR
from devtools.localredis import free_port
from tests.integration.certificates import Certificates, issue_certificates
from tests.integration.conftest import WorkerProcess, process_env, wait_for

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.integration]

USER = "jobs"
PASSWORD = "amqps-Pw-5d81c0e4"  # the private node's only user; it must never reach a log
START_TIMEOUT = 30.0


def _rabbitmq_server() -> str | None:
    """The rabbitmq-server script itself. Debian's /usr/sbin/rabbitmq-server is a wrapper that, run
    as root, switches to the rabbitmq user with that user's HOME (cookie) and log files."""
    for candidate in ("/usr/lib/rabbitmq/bin/rabbitmq-server", shutil.which("rabbitmq-server")):
        wrapper = candidate and os.path.realpath(candidate).endswith("rabbitmq-script-wrapper")
        if candidate and os.access(candidate, os.X_OK) and not wrapper:
            return candidate
    return None


def _epmd() -> str | None:
    return shutil.which("epmd") or next(iter(sorted(glob.glob("/usr/lib/erlang/erts-*/bin/epmd"))), None)


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
        return True
    return False


def _stop_group(process: subprocess.Popen | None, timeout: float = 15.0) -> None:
    """SIGTERM to the process group `process` leads (the node's shell, beam and its helpers), then
    SIGKILL to whatever of the group is left after `timeout`."""
    if process is None:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=timeout)
    while time.monotonic() < deadline:  # beam may outlive the shell that started it by a moment
        try:
            os.killpg(process.pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


class PrivateRabbitMQ:
    """A RabbitMQ node of its own, on free ports: a TLS listener only (no plain AMQP port to fall
    back to), one user with a password of its own, and its own node name, Erlang cookie (HOME),
    data, logs, configuration, plugins (none) and epmd. The system node and the shared epmd are
    left alone."""

    def __init__(self, server: str, epmd: str, directory: Path, certificates: Certificates) -> None:
        self.server, self.epmd_binary, self.directory, self.certificates = server, epmd, directory, certificates
        ports: set[int] = set()
        while len(ports) < 3:
            ports.add(free_port())
        self.port, self.dist_port, self.epmd_port = ports
        self.node_name = f"jobtest-{uuid.uuid4().hex[:8]}@localhost"
        self.output = directory / "node.out"
        self.epmd: subprocess.Popen | None = None
        self.node: subprocess.Popen | None = None

    def url(self, ca: Path | None = None) -> str:
        """The broker URL an operator would set: verification required, against `ca`."""
        ca_file = quote(str(ca or self.certificates.ca), safe="/")
        return f"amqps://{USER}:{PASSWORD}@localhost:{self.port}//?ssl_cert_reqs=required&ssl_ca_certs={ca_file}"

    def connection(self) -> Connection:
        """A kombu connection of the test itself (it runs under the suite's Redis settings)."""
        tls = {"ca_certs": str(self.certificates.ca), "cert_reqs": ssl.CERT_REQUIRED, "server_hostname": "localhost"}
        return Connection(f"amqps://{USER}:{PASSWORD}@localhost:{self.port}//", ssl=tls, connect_timeout=2)

    def start(self) -> str | None:
        """Starts epmd and the node and waits until it accepts a verified TLS login; on failure
        returns why (the caller skips), with both processes stopped."""
        d, c = self.directory, self.certificates
        (d / "rabbitmq.conf").write_text(
            "listeners.tcp = none\n"
            f"listeners.ssl.default = 127.0.0.1:{self.port}\n"
            f"ssl_options.cacertfile = {c.ca}\n"
            f"ssl_options.certfile = {c.cert}\n"
            f"ssl_options.keyfile = {c.key}\n"
            "ssl_options.verify = verify_none\n"  # the server does not ask for client certificates
            "ssl_options.fail_if_no_peer_cert = false\n"
            f"default_user = {USER}\n"
            f"default_pass = {PASSWORD}\n"
            "default_vhost = /\n"
        )
        (d / "enabled_plugins").write_text("[].\n")
        (d / "rabbitmq-env.conf").write_text("")  # not /etc/rabbitmq's (the system node's name and flags)
        env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
            "LANG": "C.UTF-8",
            "HOME": str(d),  # a fresh ~/.erlang.cookie, not the system node's
            "RABBITMQ_NODENAME": self.node_name,
            "RABBITMQ_CONF_ENV_FILE": str(d / "rabbitmq-env.conf"),
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_ADVANCED_CONFIG_FILE": str(d / "advanced.config"),  # absent
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1",
            "RABBITMQ_NODE_PORT": str(self.port),
            "RABBITMQ_DIST_PORT": str(self.dist_port),  # else 25672, which the system node holds
            "ERL_EPMD_PORT": str(self.epmd_port),
            "ERL_EPMD_ADDRESS": "127.0.0.1",
        }
        # An epmd of our own, so nothing is left registered or running on the shared one (an epmd
        # the node started itself would daemonize and outlive the test).
        self.epmd = subprocess.Popen(
            [self.epmd_binary, "-port", str(self.epmd_port), "-address", "127.0.0.1"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=True,
        )
        deadline = time.monotonic() + 5
        while not _listening(self.epmd_port):
            if self.epmd.poll() is not None or time.monotonic() > deadline:
                self.stop()
                return f"epmd did not listen on 127.0.0.1:{self.epmd_port}"
            time.sleep(0.05)
        with self.output.open("wb") as output:
            self.node = subprocess.Popen(
                [self.server], cwd=d, env=env, stdout=output, stderr=subprocess.STDOUT, start_new_session=True
            )
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.node.poll() is not None:
                reason = f"{self.server} exited with {self.node.returncode}: {self._last_words()}"
                self.stop()
                return reason
            try:
                with self.connection() as conn:
                    conn.ensure_connection(max_retries=0, timeout=2)
                return None
            except (OSError, OperationalError) as exc:  # not listening yet, or still booting
                last = f"{type(exc).__name__}: {exc}"
                time.sleep(0.2)
        self.stop()
        return f"no verified TLS login within {START_TIMEOUT:.0f} s ({last}); node output: {self._last_words()}"

    def _last_words(self) -> str:
        """The node's first error lines (the cause; what follows is the crash it leads to)."""
        lines = self.output.read_text(errors="replace").splitlines()
        errors = [line.split("[error]", 1)[1].strip().split("> ", 1)[-1] for line in lines if "[error]" in line]
        words = list(dict.fromkeys(e for e in errors if e))[:3] or [line for line in lines if line.strip()][-3:]
        return " | ".join(words)[:600] or "(no output)"

    def stop(self) -> None:
        _stop_group(self.node)
        _stop_group(self.epmd, timeout=5)


@pytest.fixture(scope="module")
def tls_rabbitmq(tmp_path_factory):
    """The private node for this module's tests (it takes a few seconds to boot); always stopped."""
    server, epmd = _rabbitmq_server(), _epmd()
    if server is None:
        pytest.skip("no rabbitmq-server script (Debian: apt-get install rabbitmq-server)")
    if epmd is None:
        pytest.skip("no epmd (Erlang) to run a private RabbitMQ node")
    directory = tmp_path_factory.mktemp("rabbitmq")
    # For localhost only, so that 127.0.0.1 (the same listener) is a name the certificate does not vouch for.
    node = PrivateRabbitMQ(server, epmd, directory, issue_certificates(directory, names=("localhost",)))
    try:
        reason = node.start()
        if reason:
            pytest.skip(f"a private RabbitMQ node cannot be started here: {reason}")
        yield node
    finally:
        node.stop()


def test_worker_consumes_over_verified_amqps(start_worker, tls_rabbitmq):
    from django_celery_results.models import TaskResult

    from jobs.tasks import ping

    worker = start_worker(extra_env={"CELERY_BROKER_URL": tls_rabbitmq.url()})
    with tls_rabbitmq.connection() as conn:
        result = ping.apply_async(connection=conn)
    wait_for(lambda: TaskResult.objects.filter(task_id=result.id, status="SUCCESS").exists())
    log = worker.log()
    assert re.search(rf"amqps://{USER}:\*+@", log)  # the banner names the TLS transport, password masked
    assert PASSWORD not in log


def test_an_unverifiable_certificate_is_refused_not_downgraded(tmp_path, tls_rabbitmq):
    # The node has no plain listener: a worker that dropped TLS would be refused outright, so the
    # handshake's own complaint is what shows the certificate was checked, and found wanting.
    wrong = tls_rabbitmq.url(ca=tls_rabbitmq.certificates.other_ca())
    worker = WorkerProcess(
        tmp_path / "worker.log", extra_env={"CELERY_BROKER_URL": wrong, "CELERY_BROKER_CONNECTION_MAX_RETRIES": "1"}
    )
    try:
        with pytest.raises(RuntimeError, match="worker exited at start"):
            worker.start(timeout=30)
    finally:
        worker.stop()
    log = worker.log()
    assert "certificate verify failed" in log.lower()
    assert " ready." not in log
    assert PASSWORD not in log


def _broker_check(url: str) -> dict:
    """What `/readyz` reports about the broker in a process configured with `url` (this test
    process runs on the suite's Redis settings)."""
    code = (
        "import json, django; django.setup(); from jobs.health import check_broker; print(json.dumps(check_broker()))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        cwd=BASE_DIR,
        env=process_env(CELERY_BROKER_URL=url),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_certificate_must_name_the_host(tls_rabbitmq):
    assert _broker_check(tls_rabbitmq.url())["ok"] is True
    # The same listener and CA, reached by a name its certificate does not carry: py-amqp alone
    # would not check the name; the settings make it.
    check = _broker_check(tls_rabbitmq.url().replace("@localhost:", "@127.0.0.1:"))
    assert check["ok"] is False
    assert "certificate verify failed" in check["error"].lower()
    assert "mismatch" in check["error"].lower()
    assert PASSWORD not in json.dumps(check)
