"""HTTP `POST /api/thumbnails/` latency under 16 concurrent clients, against the same view
without Celery: what enqueueing costs on the request path.

    python bench/upload.py [--quick] [--clients N] [--requests N]

Two gunicorn servers with the same flags (2 workers x 4 threads, as the Dockerfile on 2 cores)
run side by side on the same scratch database and private Redis:

- ours: `config.wsgi`, the real view: validate, store, write the `Image` row and the outbox row
  in one transaction, publish to Redis after commit;
- bare: `bench.bare_wsgi`, the same view and upload handling with the publishing step taken out.

16 client threads, each on its own keep-alive connection, post a photo-like JPEG as fast as
answers come back. Rounds alternate between the servers so that drift on a shared machine hits
both alike. No worker runs: the tasks wait in the queue, which is all the request path sees.
"""

from __future__ import annotations

import argparse
import http.client
import io
import os
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

# Run as a script, sys.path[0] is bench/, whose modules would shadow the standard library's.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench.common import ROOT, Environment, emit, percentile, positive_int, stop_process, table  # noqa: E402
from devtools.localredis import free_port  # noqa: E402

SERVERS = (("bare", "bench.bare_wsgi"), ("ours", "config.wsgi"))


class Server:
    """gunicorn serving `module` on a free port, with the Dockerfile's flags (minus logging)."""

    def __init__(self, module: str, workers: int = 2, threads: int = 4) -> None:
        self.port = free_port()
        self.args = [sys.executable, "-m", "gunicorn", module, "--bind", f"127.0.0.1:{self.port}",
                     "--workers", str(workers), "--threads", str(threads), "--keep-alive", "5",
                     "--timeout", "60", "--no-control-socket", "--log-level", "warning"]  # fmt: skip
        self.process: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> Server:
        self.process = subprocess.Popen(self.args, cwd=ROOT, env={**os.environ})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"gunicorn exited with {self.process.returncode}")
            try:
                connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=2)
                connection.request("GET", "/healthz")
                if connection.getresponse().status == 200:
                    return self
            except OSError:
                time.sleep(0.1)
        raise RuntimeError("gunicorn not ready")

    def stop(self) -> None:
        stop_process(self.process)


def photo(width: int = 1600, height: int = 1200) -> bytes:
    """A photo-like JPEG of a phone upload's order of size (grain, so it does not compress away)."""
    from PIL import Image

    base = Image.effect_noise((width // 40, height // 40), 90).resize((width, height), Image.Resampling.BICUBIC)
    grain = Image.effect_noise((width, height), 18)
    picture = Image.merge("RGB", [Image.blend(base, grain, 0.15), base, grain])
    out = io.BytesIO()
    picture.save(out, format="JPEG", quality=88)
    return out.getvalue()


def multipart(data: bytes) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="photo.jpg"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def hammer(port: int, body: bytes, content_type: str, clients: int, per_client: int) -> tuple[list[float], float]:
    """`clients` threads post `per_client` uploads each; returns the latencies (ms) and the
    requests per second. Any answer but 202 stops the run: a fast error is not a result."""
    latencies: list[float] = []
    errors: list[str] = []
    lock = threading.Lock()
    headers = {"Content-Type": content_type, "Content-Length": str(len(body))}

    def client() -> None:
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine = []
        try:
            for _ in range(per_client):
                started = time.perf_counter()
                connection.request("POST", "/api/thumbnails/", body=body, headers=headers)
                response = connection.getresponse()
                payload = response.read()
                mine.append((time.perf_counter() - started) * 1000)
                if response.status != 202:
                    raise RuntimeError(f"HTTP {response.status}: {payload[:200]!r}")
        except Exception as exc:  # noqa: BLE001 - reported below, in the main thread
            with lock:
                errors.append(str(exc))
        finally:
            connection.close()
            with lock:
                latencies.extend(mine)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    elapsed = time.perf_counter() - started
    if errors:
        raise RuntimeError(f"{len(errors)} clients failed, first: {errors[0]}")
    return latencies, len(latencies) / elapsed


def run(*, quick: bool, clients: int, per_client: int, rounds: int) -> dict:
    with Environment() as env:
        os.environ["DJANGO_ALLOWED_HOSTS"] = "127.0.0.1,localhost"
        body, content_type = multipart(photo())
        servers = {label: Server(module) for label, module in SERVERS}
        try:
            for server in servers.values():
                server.start()
            for server in servers.values():  # warm-up: imports, connections, page cache
                hammer(server.port, body, content_type, clients, 2)
            results = {label: {"latencies": [], "rates": []} for label in servers}
            for _ in range(rounds):
                for label, server in servers.items():
                    latencies, rate = hammer(server.port, body, content_type, clients, per_client)
                    results[label]["latencies"] += latencies
                    results[label]["rates"].append(rate)
        finally:
            for server in servers.values():
                server.stop()
        import redis

        queued = redis.Redis.from_url(env.redis.url).llen("normal")
    expected = clients * (2 + per_client * rounds)  # ours published one task per upload
    if queued != expected:
        raise RuntimeError(f"{queued} tasks in the queue, expected {expected}")
    bare, ours = results["bare"], results["ours"]
    rows = [["measure", "bare view", "ours (+ enqueue)", "difference"]]
    for q in (50, 99):
        b, o = percentile(bare["latencies"], q), percentile(ours["latencies"], q)
        rows.append([f"latency p{q} (ms)", f"{b:.1f}", f"{o:.1f}", f"{o - b:+.1f} ms"])
        emit("upload", f"POST latency p{q}", o, b, "ms", "", better="lower")
    b_rate, o_rate = sum(bare["rates"]) / rounds, sum(ours["rates"]) / rounds
    rows.append(["requests/s", f"{b_rate:.0f}", f"{o_rate:.0f}", f"{o_rate / b_rate:.2f}x"])
    emit("upload", "POST requests/s", o_rate, b_rate, "req/s", "")
    size_kb = len(body) // 1024
    total = clients * per_client * rounds
    print(f"POST /api/thumbnails/, {clients} concurrent clients, {total} uploads of {size_kb} KB per server"
          + (" (quick)" if quick else ""))  # fmt: skip
    print(table(rows))
    print(f"{queued} tasks waiting in Redis: one per upload to the real view, none from the bare one")
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run for CI")
    parser.add_argument("--clients", type=positive_int, default=16)
    parser.add_argument("--requests", type=positive_int, help="uploads per client and round")
    options = parser.parse_args(argv)
    per_client = options.requests or (10 if options.quick else 50)
    run(quick=options.quick, clients=options.clients, per_client=per_client, rounds=2 if options.quick else 4)
    return 0


if __name__ == "__main__":
    sys.exit(main())
