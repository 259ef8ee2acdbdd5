"""Alerting on new dead letters: a rate-limited digest email to `DEAD_LETTER_ALERT_EMAILS`.

The first dead letter after a quiet period starts a digest that goes out a minute later (so a
burst becomes one mail); no other digest is started for `JOBS_DEAD_LETTER_ALERT_INTERVAL` seconds.
A failing alert is logged and dead-lettered without alerting again, so it can never loop.
"""

from __future__ import annotations

import logging

from django.conf import settings
from django.core.cache import cache
from django.db.models import Count, Max
from django.utils import timezone

logger = logging.getLogger("jobs.alerts")

LOCK_KEY = "jobs:dead-letter-alert:lock"
LAST_SENT_KEY = "jobs:dead-letter-alert:last-sent"
GATHER_SECONDS = 60


def dead_letter_alert_schedule() -> bool:
    """Starts a digest unless one was started within the alert interval; True if it did."""
    if not settings.DEAD_LETTER_ALERT_EMAILS:
        return False
    from jobs.tasks import dead_letter_digest

    try:
        if not cache.add(LOCK_KEY, timezone.now().isoformat(), timeout=settings.JOBS_DEAD_LETTER_ALERT_INTERVAL):
            return False
        dead_letter_digest.apply_async(countdown=GATHER_SECONDS)
    except Exception:
        logger.warning("dead_letter.alert_schedule_failed", exc_info=True)
        return False
    return True


def dead_letter_digest_send() -> int:
    """Mails the pending dead letters that failed since the last digest, grouped by task and
    exception. Returns how many dead letters it reported (0: nothing sent)."""
    from django.core.mail import send_mail

    from jobs.models import DeadLetter

    recipients = settings.DEAD_LETTER_ALERT_EMAILS
    if not recipients:
        return 0
    since = cache.get(LAST_SENT_KEY)
    now = timezone.now()
    rows = DeadLetter.objects.filter(status=DeadLetter.Status.PENDING)
    if since:
        rows = rows.filter(failed_at__gt=since)
    groups = list(
        rows.values("task_name", "exception_type", "reason")
        .annotate(count=Count("id"), latest=Max("failed_at"))
        .order_by("-count")[:25]
    )
    total = sum(g["count"] for g in groups)
    if not total:
        return 0
    lines = [f"{total} task(s) failed for good and wait in the dead letters.", ""]
    lines += [
        f"{g['count']:>6}  {g['task_name']}  {g['exception_type']}  "
        f"({g['reason']}, latest {g['latest']:%Y-%m-%d %H:%M:%S} UTC)"
        for g in groups
    ]
    lines += [
        "",
        "Inspect and requeue them in the admin (Background jobs > Dead letters)",
        "or with `manage.py requeue_dead`.",
    ]
    send_mail(
        subject=f"[jobs] {total} new dead letter(s)",
        message="\n".join(lines),
        from_email=settings.DEFAULT_FROM_EMAIL,
        recipient_list=recipients,
        fail_silently=False,
    )
    cache.set(LAST_SENT_KEY, now, timeout=None)
    logger.info("dead_letter.digest_sent", extra={"count": total, "recipients": len(recipients)})
    return total
