"""`jobs` as another project adopts it: the package built from this checkout, installed into a new
virtualenv beside a project made by `django-admin startproject`, set up exactly as CONTRACT.md's
"Using `jobs` in another Django project" says (with Django's Tasks API on Celery), and run with a
real worker.

Nothing of this site is importable there (`config`, `mailer`, `thumbnails`, `devtools`), so an
import of the site from `jobs`, a setting without a default, a template or migration left out of
the package, or a bootstep that only this site's `config/celery.py` installs fails here.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
import zipfile
from pathlib import Path

import django
import pytest

from config.env import BASE_DIR

pytestmark = pytest.mark.integration

SITE_PACKAGES = ("config", "mailer", "thumbnails", "devtools", "tests", "bench")

CELERY_PY = """\
import os

from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "newsite.settings")

app = Celery("newsite")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
"""

TASKS_PY = """\
from celery import shared_task

from jobs.base import JobTask
from jobs.exceptions import PermanentError


@shared_task(base=JobTask)
def refund(order_id):
    raise PermanentError(f"order {order_id} cannot be refunded")


@shared_task(base=JobTask)
def add(x, y):
    return x + y


try:  # Django's Tasks API: built in from Django 6.0, the django-tasks backport on 5.2
    from django.tasks import task
except ImportError:
    from django_tasks import task


@task
def total(x, y):
    return x + y


@task
def cancel(order_id):
    raise PermanentError(f"order {order_id} cannot be cancelled")
"""

# Run with `manage.py shell -c` and TASK, ARGS in the environment: enqueue a @task, print its id.
ENQUEUE_TASK = """
import json, os
from shop import tasks
print(getattr(tasks, os.environ["TASK"]).enqueue(*json.loads(os.environ["ARGS"])).id)
"""

# With TASK, RESULT_ID: the result as get_result gives it, as JSON.
TASK_RESULT = """
import json, os
from shop import tasks
r = getattr(tasks, os.environ["TASK"]).get_result(os.environ["RESULT_ID"])
print(json.dumps({
    "status": str(r.status),
    "value": r.return_value if r.status == "SUCCESSFUL" else None,
    "errors": [e.exception_class_path for e in r.errors],
    "attempts": r.attempts,
    "times_in_order": bool(r.is_finished and r.enqueued_at <= r.started_at <= r.finished_at),
}))
"""

# Run with `manage.py shell -c`: the admin pages a staff member opens, and jobs' own URLs.
ADMIN_PAGES = """
import json
from django.contrib.auth import get_user_model
from django.test import Client
from django.test.utils import setup_test_environment
from jobs.models import DeadLetter

setup_test_environment()
user = get_user_model().objects.create_superuser("admin", "admin@example.com", "pw")
client = Client()
client.force_login(user)
row = DeadLetter.objects.order_by("pk").first()
pages = [
    "/admin/",
    "/admin/jobs/deadletter/",
    f"/admin/jobs/deadletter/{row.pk}/change/",
    "/admin/jobs/deadletter/groups/",
    "/admin/jobs/dashboard/",
    "/admin/django_celery_beat/periodictask/",
    "/metrics",
    "/healthz",
    "/readyz",
    "/api/jobs/health/",
]
print(json.dumps({page: client.get(page).status_code for page in pages}))
"""


def run(args: list[str], *, cwd: Path, env: dict[str, str], timeout: float = 300) -> str:
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert done.returncode == 0, f"{args} exited {done.returncode}:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def dead_letters(python: Path, project: Path, env: dict[str, str]) -> list[dict]:
    code = (
        "import json; from jobs.models import DeadLetter; "
        "print(json.dumps(list(DeadLetter.objects.values('task_name', 'status', 'failure_count', 'requeue_count'))))"
    )
    out = run([str(python), "manage.py", "shell", "-c", code], cwd=project, env=env)
    return json.loads(out.strip().splitlines()[-1])


def task_result(python: Path, project: Path, env: dict[str, str], name: str, result_id: str) -> dict:
    out = run(
        [str(python), "manage.py", "shell", "-c", TASK_RESULT],
        cwd=project,
        env={**env, "TASK": name, "RESULT_ID": result_id},
    )
    return json.loads(out.strip().splitlines()[-1])


def wait_until(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """The distribution `pip install <checkout>` builds from this checkout: built from a copy of
    the files git tracks, so a stale `build/` or a file left out of git cannot slip in."""
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=BASE_DIR, capture_output=True, check=True).stdout
    source = tmp_path_factory.mktemp("checkout")
    for name in filter(None, tracked.decode().split("\0")):
        if (BASE_DIR / name).is_file():
            (source / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(BASE_DIR / name, source / name)
    out = tmp_path_factory.mktemp("dist")
    run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--disable-pip-version-check", "-q", "-w", str(out), "."],
        cwd=source,
        env=dict(os.environ),
    )
    (built,) = out.glob("*.whl")
    return built


def test_the_package_holds_jobs_and_nothing_of_the_site(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    tops = {name.split("/", 1)[0] for name in names if not name.split("/", 1)[0].endswith(".dist-info")}
    assert tops == {"jobs"}
    assert not {name.split("/", 1)[0] for name in names} & set(SITE_PACKAGES)
    assert "jobs/templates/admin/jobs/deadletter/change_list.html" in names
    assert "jobs/static/jobs/dashboard.js" in names
    assert "jobs/migrations/0001_dead_letters.py" in names
    assert "jobs/management/commands/requeue_dead.py" in names
    assert "jobs/runtime/worker.py" in names


def test_a_new_startproject_adopts_jobs_and_replays_a_dead_letter_on_a_real_worker(wheel, tmp_path, redis_server):
    venv = tmp_path / "venv"
    run([sys.executable, "-m", "venv", str(venv)], cwd=tmp_path, env=dict(os.environ))
    python = venv / "bin" / "python"
    # A clean environment: nothing of this suite's settings, database or paths leaks into the project.
    env = {
        "PATH": f"{venv / 'bin'}:/usr/bin:/bin",
        "HOME": os.environ.get("HOME", str(tmp_path)),
        "LANG": "C.UTF-8",
        "TMPDIR": str(tmp_path),  # the default liveness directory lives here, not in a shared /tmp
        "CELERY_BROKER_URL": redis_server.url,
    }
    for name in ("PIP_INDEX_URL", "PIP_EXTRA_INDEX_URL", "PIP_FIND_LINKS", "PIP_CONFIG_FILE"):
        if name in os.environ:
            env[name] = os.environ[name]
    # On Django 5.2 the project needs the Tasks API backport: the package's extra brings it.
    requirement = str(wheel) if django.VERSION >= (6, 0) else f"{wheel}[backport]"
    pin = f"Django=={django.get_version()}"  # the Django of this leg of the suite
    run(
        [str(python), "-m", "pip", "install", "-q", "--disable-pip-version-check", requirement, pin],
        cwd=tmp_path,
        env=env,
    )
    for package in SITE_PACKAGES:
        missing = subprocess.run(
            [str(python), "-c", f"import {package}"], cwd=tmp_path, env=env, capture_output=True, check=False
        )
        assert missing.returncode != 0, f"{package} must not be installed with jobs"

    run([str(venv / "bin" / "django-admin"), "startproject", "newsite"], cwd=tmp_path, env=env)
    project = tmp_path / "newsite"
    run([str(python), "manage.py", "startapp", "shop"], cwd=project, env=env)
    package = project / "newsite"
    # The contract's steps, and nothing more: apps, Celery's standard Django setup, the URLs, a task.
    with (package / "settings.py").open("a", encoding="utf-8") as settings:
        settings.write(
            textwrap.dedent("""
                import os

                INSTALLED_APPS += ["django_celery_beat", "django_celery_results", "jobs", "shop"]
                CELERY_BROKER_URL = os.environ["CELERY_BROKER_URL"]
                TASKS = {"default": {"BACKEND": "jobs.backends.CeleryBackend"}}
            """)
        )
        if django.VERSION < (6, 0):
            settings.write('INSTALLED_APPS += ["django_tasks"]\n')
    (package / "celery.py").write_text(CELERY_PY, encoding="utf-8")
    (package / "__init__.py").write_text("from .celery import app as celery_app\n\n__all__ = ('celery_app',)\n")
    urls = (package / "urls.py").read_text(encoding="utf-8")
    assert "from django.urls import path" in urls
    urls = urls.replace("from django.urls import path", "from django.urls import include, path")
    urls = urls.replace("urlpatterns = [", 'urlpatterns = [\n    path("", include("jobs.urls")),')
    (package / "urls.py").write_text(urls, encoding="utf-8")
    (project / "shop" / "tasks.py").write_text(TASKS_PY, encoding="utf-8")

    checked = subprocess.run(
        [str(python), "manage.py", "check"], cwd=project, env=env, capture_output=True, text=True, check=False
    )
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.strip() == "System check identified no issues (0 silenced).", checked.stdout + checked.stderr
    run([str(python), "manage.py", "migrate", "--noinput"], cwd=project, env=env)

    log = (tmp_path / "worker.log").open("w")
    worker = subprocess.Popen(
        [str(venv / "bin" / "celery"), "-A", "newsite", "worker", "-c", "1", "-n", "newsite@%h", "--loglevel", "INFO"],
        cwd=project,
        env=env,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        enqueue = "from shop.tasks import refund; refund.delay(7)"
        run([str(python), "manage.py", "shell", "-c", enqueue], cwd=project, env=env)
        (row,) = wait_until(lambda: dead_letters(python, project, env), 60, "the dead letter")
        assert row == {"task_name": "shop.tasks.refund", "status": "pending", "failure_count": 1, "requeue_count": 0}

        listed = run([str(python), "manage.py", "dead_letters", "list"], cwd=project, env=env)
        assert "shop.tasks.refund" in listed
        requeued = run([str(python), "manage.py", "requeue_dead", "--all"], cwd=project, env=env)
        assert "1" in requeued, requeued
        # The replay ran on the worker and failed again: the same row, back to pending.
        (row,) = wait_until(
            lambda: [r for r in dead_letters(python, project, env) if r["failure_count"] == 2], 60, "the replay"
        )
        assert row == {"task_name": "shop.tasks.refund", "status": "pending", "failure_count": 2, "requeue_count": 1}

        # jobs put its consumer and bootsteps into the project's own worker (config/celery.py of this
        # site is not there to do it): a message for a task nobody has is a dead letter, not lost,
        # and the worker's liveness file answers the probe.
        send = "from newsite.celery import app; app.send_task('shop.tasks.gone', args=[1])"
        run([str(python), "manage.py", "shell", "-c", send], cwd=project, env=env)
        wait_until(
            lambda: [r for r in dead_letters(python, project, env) if r["task_name"] == "shop.tasks.gone"],
            60,
            "the unknown task's dead letter",
        )
        run([str(python), "manage.py", "probe", "worker"], cwd=project, env=env)

        # Django's Tasks API through jobs: a @task runs on the worker and get_result reports it; a
        # failing one ends FAILED with a dead letter that requeue_dead replays.
        def enqueue_task(name: str, *args) -> str:
            out = run(
                [str(python), "manage.py", "shell", "-c", ENQUEUE_TASK],
                cwd=project,
                env={**env, "TASK": name, "ARGS": json.dumps(args)},
            )
            return out.strip().splitlines()[-1]

        def finished(name: str, result_id: str) -> dict:
            return wait_until(
                lambda: (
                    (r := task_result(python, project, env, name, result_id))["status"] in {"SUCCESSFUL", "FAILED"}
                    and r
                ),
                60,
                f"{name} to finish",
            )

        total_id = enqueue_task("total", 2, 3)
        assert finished("total", total_id) == {
            "status": "SUCCESSFUL",
            "value": 5,
            "errors": [],
            "attempts": 1,
            "times_in_order": True,
        }
        cancel_id = enqueue_task("cancel", 8)
        assert finished("cancel", cancel_id) == {
            "status": "FAILED",
            "value": None,
            "errors": ["jobs.exceptions.PermanentError"],
            "attempts": 1,
            "times_in_order": True,
        }
        (row,) = [r for r in dead_letters(python, project, env) if r["task_name"] == "shop.tasks.cancel"]
        assert row["status"] == "pending"
        run([str(python), "manage.py", "requeue_dead", "--task", "shop.tasks.cancel"], cwd=project, env=env)
        wait_until(
            lambda: [
                r
                for r in dead_letters(python, project, env)
                if r["task_name"] == "shop.tasks.cancel" and r["failure_count"] == 2
            ],
            60,
            "the @task's replay",
        )

        pages = run([str(python), "manage.py", "shell", "-c", ADMIN_PAGES], cwd=project, env=env)
        assert json.loads(pages.strip().splitlines()[-1]) == {
            "/admin/": 200,
            "/admin/jobs/deadletter/": 200,
            "/admin/jobs/deadletter/1/change/": 200,
            "/admin/jobs/deadletter/groups/": 200,
            "/admin/jobs/dashboard/": 200,
            "/admin/django_celery_beat/periodictask/": 200,
            "/metrics": 200,
            "/healthz": 200,  # the probes come with jobs.urls, as the adoption guide says
            "/readyz": 200,
            "/api/jobs/health/": 503,  # no beat runs in this project: its tick is missing
        }

        # The host's logging as Celery and the host set it up (Django's default LOGGING): the
        # worker's usual lines at -l INFO, and the app's events with their fields (jobs had taken
        # Celery's set-up away: no "ready", no "received", and bare event names).
        printed = (tmp_path / "worker.log").read_text(errors="replace")
        assert re.search(r"newsite@\S+ ready\.", printed), printed[-3000:]
        assert re.search(r"Task shop\.tasks\.total\[[0-9a-f-]+\] received", printed), printed[-3000:]
        assert re.search(r"Task shop\.tasks\.total\[[0-9a-f-]+\] succeeded in", printed), printed[-3000:]
        assert re.search(
            r"ERROR/\S+\] dead_letter\.created dead_letter_id=1 dead_letter_task=shop\.tasks\.refund ", printed
        )
    finally:
        worker.terminate()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        log.close()
