"""The web host cut from the broker for 30 s under steady `POST /api/emails/` and uploads.

The web host reaches the database but not Redis (the broker, and the cache). A request writes
its job to the ledger in its own transaction and publishes it after commit: with the broker gone
that publish must fail fast, so every request answers well within its timeout, and the relay on
the worker host (which still reaches the broker) publishes what the web could not.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import pytest
import requests
from django.contrib.auth import get_user_model

from jobs.models import OutboxMessage
from mailer.models import Email
from tests.cluster.conftest import report
from tests.conftest import grant
from tests.integration.conftest import wait_for
from tests.thumbnails import images
from thumbnails.models import Image

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.cluster]

#: Each request must answer within this (the client's timeout; gunicorn's own is 60 s).
REQUEST_TIMEOUT = 10.0
CUT = 30.0
AUTH = ("ops", "s3cret-ops-pass")


@dataclass
class Answer:
    kind: str
    sent_at: float
    seconds: float
    status: int  # 0: no answer within REQUEST_TIMEOUT (or the connection failed)
    job: int | None


def produce(base: str, kind: str, stop: threading.Event, answers: list[Answer], pause: float = 0.25) -> None:
    session = requests.Session()
    picture = images.jpeg((160, 120))
    n = 0
    while not stop.is_set():
        n += 1
        started = time.monotonic()
        try:
            if kind == "email":
                body = {"template": "welcome", "to": [f"user{n}@example.com"], "context": {"name": f"User {n}"}}
                response = session.post(f"{base}/api/emails/", json=body, auth=AUTH, timeout=REQUEST_TIMEOUT)
            else:
                files = {"image": (f"photo-{n}.jpg", picture, "image/jpeg")}
                response = session.post(f"{base}/api/thumbnails/", files=files, timeout=REQUEST_TIMEOUT)
            status = response.status_code
            job = response.json().get("id") if status == 202 else None
        except requests.RequestException:
            status, job = 0, None
        answers.append(Answer(kind, started, time.monotonic() - started, status, job))
        stop.wait(pause)


def test_the_web_host_cut_from_the_broker_for_30_s_under_steady_requests(cluster):
    grant(get_user_model().objects.create_user(AUTH[0], password=AUTH[1], is_staff=True))
    media = str(cluster.tmp / "media")
    cluster.worker("w1", concurrency=3, MEDIA_ROOT=media)
    web, base = cluster.web("web", MEDIA_ROOT=media)

    answers: list[Answer] = []
    stop = threading.Event()
    producers = [threading.Thread(target=produce, args=(base, kind, stop, answers)) for kind in ("email", "image")]
    for producer in producers:
        producer.start()
    try:
        time.sleep(5)
        cluster.network.cut(web, cluster.broker)
        cut_at = time.monotonic()
        time.sleep(CUT)
        cluster.network.heal(web, cluster.broker)
        healed_at = time.monotonic()
        time.sleep(10)
    finally:
        stop.set()
        for producer in producers:
            producer.join(timeout=2 * REQUEST_TIMEOUT)

    during = [a for a in answers if cut_at <= a.sent_at < healed_at]
    slowest = max(a.seconds for a in answers)
    # Every request answered, within its timeout, and was accepted: the broker is not on its path.
    assert during
    assert {a.kind for a in during} == {"email", "image"}
    timeline = " ".join(f"{a.kind[0]}{a.sent_at - cut_at:+.1f}:{a.seconds:.2f}:{a.status}" for a in answers)
    assert [a for a in answers if a.status != 202] == [], timeline
    assert slowest < REQUEST_TIMEOUT, timeline
    # Every accepted job ran, once the relay had published what the web could not.
    emails = [a.job for a in answers if a.kind == "email"]
    pictures = [a.job for a in answers if a.kind == "image"]
    wait_for(lambda: Email.objects.filter(pk__in=emails, status="sent").count() == len(emails), timeout=120)
    wait_for(lambda: Image.objects.filter(pk__in=pictures, status="done").count() == len(pictures), timeout=120)
    wait_for(lambda: not OutboxMessage.objects.exists(), timeout=60)
    assert Email.objects.filter(pk__in=emails, attempts=1).count() == len(emails)  # each sent once
    report(
        "web host cut from the broker 30 s",
        cluster,
        requests=len(answers),
        during_cut=len(during),
        slowest_answer=round(slowest, 2),
        slowest_during_cut=round(max(a.seconds for a in during), 2),
        jobs_run=len(emails) + len(pictures),
    )
    for host in [web, *cluster.workers.values()]:
        assert host.processes[-1].poll() is None, f"{host.name} died"
