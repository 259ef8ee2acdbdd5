"""The README's screenshots, of the site as `make run` starts it with real work flowing:
`make screenshots`.

Starts the processes of the Procfile (web, workers, beat, Flower) with a Redis of their own
(`devtools.localredis`), a scratch SQLite database and free ports, as `make run` does; sends the
site work through its own API (thumbnails, emails) and the job table (a report due in an hour, a clean-up in a paused
queue); then, logged into the admin as an operator, takes the dashboard, the jobs page and a
job's page in headless Chromium into `docs/screenshots/`. Nothing of the test suite is in them.

    python -m devtools.screenshots [--out docs/screenshots] [--wait 40]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM = "/usr/bin/chromium"

#: Run inside the site's own settings (`manage.py shell -c`): an operator, an API token, and
#: jobs only the job table can make (one due in an hour; one in the `low` queue, paused).
SETUP = """
import json
from django.contrib.auth import get_user_model
from jobs.runtime.outbox import enqueue
from jobs.services import api_token_create, queue_pause
user = get_user_model().objects.create_superuser("operator", "operator@example.com", {password!r})
token = api_token_create(user=user, name="screenshots")[1]
queue_pause(queue="low", actor="admin:operator")
report = enqueue("jobs.daily_report", countdown=3600)
cleanup = enqueue("jobs.cleanup_temp_files", queue="low")
print(json.dumps({{"token": token, "report": report, "cleanup": cleanup}}))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_http(url: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2):  # noqa: S310 - our own local server
                return
        except OSError:
            time.sleep(0.5)
    raise RuntimeError(f"{url} did not answer within {timeout:.0f} s")


def request(url: str, *, data: bytes, headers: dict[str, str]) -> dict:
    req = urllib.request.Request(url, data=data, headers=headers, method="POST")  # noqa: S310 - local
    with urllib.request.urlopen(req, timeout=10) as response:  # noqa: S310 - local
        return json.loads(response.read())


def png(seed: int) -> bytes:
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (1200, 800), (40 + seed * 30 % 200, 90, 160))
    draw = ImageDraw.Draw(image)
    for n in range(12):
        draw.ellipse((n * 90, n * 50, n * 90 + 300, n * 50 + 300), outline=(255, 255, 255), width=6)
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def multipart(field: str, filename: str, body: bytes) -> tuple[bytes, str]:
    boundary = secrets.token_hex(12)
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="{field}"; filename="{filename}"\r\n'
        "Content-Type: image/png\r\n\r\n"
    ).encode()
    return head + body + f"\r\n--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def send_work(base: str, token: str) -> None:
    for n in range(4):
        body, content_type = multipart("image", f"photo-{n}.png", png(n))
        request(f"{base}/api/thumbnails/", data=body, headers={"Content-Type": content_type})
    auth = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
    for name in ("Ada", "Grace", "Edsger", "Barbara", "Ken"):
        payload = {"template": "welcome", "to": [f"{name.lower()}@example.com"], "context": {"name": name}}
        request(f"{base}/api/emails/", data=json.dumps(payload).encode(), headers=auth)


def shoot(base: str, password: str, report_id: str, out: Path) -> None:
    from playwright.sync_api import sync_playwright

    out.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as manager:
        browser = manager.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1400, "height": 900})
        page.set_default_timeout(30_000)
        page.goto(f"{base}/admin/login/?next=/admin/jobs/dashboard/")
        page.fill("#id_username", "operator")
        page.fill("#id_password", password)
        page.click("input[type=submit]")
        page.wait_for_selector("#queues")
        page.screenshot(path=str(out / "dashboard.png"), full_page=True)
        page.goto(f"{base}/admin/jobs/job/")
        page.wait_for_selector("#result_list")
        page.screenshot(path=str(out / "jobs.png"), full_page=False)
        page.goto(f"{base}/admin/jobs/job/?q={report_id}")
        page.click(f"text={report_id}")
        page.wait_for_selector("#job-actions")
        page.screenshot(path=str(out / "job.png"), full_page=True)
        browser.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "screenshots")
    parser.add_argument("--wait", type=float, default=40.0, help="seconds of work flowing before the shots")
    options = parser.parse_args(argv)
    if not Path(CHROMIUM).exists():
        sys.stderr.write(f"no Chromium at {CHROMIUM}: run `make browser` first\n")
        return 1
    tmp = Path(tempfile.mkdtemp(prefix="screenshots-"))
    web_port = free_port()
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "config.settings.local",
        "DATABASE_URL": f"sqlite:///{tmp / 'site.sqlite3'}",
        "MEDIA_ROOT": str(tmp / "media"),
        "LIVENESS_DIR": str(tmp / "run"),
        "WEB_PORT": str(web_port),
        "FLOWER_PORT": str(free_port()),
        "WORKER_METRICS_PORT": "0",
        "MAIL_WORKER_METRICS_PORT": "0",
        "CELERY_SHUTDOWN_TIMEOUT": "5",
        # The Procfile's commands (`celery`, `python`) from this virtualenv, as `make run` finds them.
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    from devtools.localredis import LocalRedis

    redis = LocalRedis().start()
    env.update(REDIS_URL=redis.url, CELERY_BROKER_URL=redis.url)
    python = sys.executable
    for command in (["migrate", "--noinput", "-v0"], ["setup_schedules", "-v0"]):
        subprocess.run([python, "manage.py", *command], cwd=ROOT, env=env, check=True)  # noqa: S603 - our own
    site = subprocess.Popen(  # noqa: S603 - our own commands
        [python, "-m", "devtools.procfile", "start", "-f", "Procfile"],
        cwd=ROOT,
        env=env,
        stdout=(tmp / "site.log").open("wb"),
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{web_port}"
    try:
        wait_for_http(f"{base}/healthz")
        password = secrets.token_urlsafe(16)
        setup = subprocess.run(  # noqa: S603 - our own commands
            [python, "manage.py", "shell", "-c", SETUP.format(password=password)],
            cwd=ROOT,
            env=env,
            capture_output=True,
            text=True,
            check=False,
        )
        if setup.returncode:
            raise RuntimeError(f"setup failed: {setup.stderr[-2000:]}")
        made = json.loads(setup.stdout.strip().splitlines()[-1])
        send_work(base, made["token"])
        time.sleep(options.wait)  # beat ticks, heartbeats, finished work in the charts
        shoot(base, password, made["report"], options.out)
        sys.stdout.write(f"screenshots in {options.out}\n")
    finally:
        os.killpg(site.pid, signal.SIGINT)
        try:
            site.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(site.pid, signal.SIGKILL)
        redis.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
