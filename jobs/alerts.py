"""Alerting on new dead letters: a rate-limited digest email to `DEAD_LETTER_ALERT_EMAILS`.

The first dead letter after a quiet period opens an alert window of
`JOBS_DEAD_LETTER_ALERT_INTERVAL` seconds and starts a digest that goes out a minute later (so a
burst becomes one mail). A dead letter arriving while a window is open schedules, once per window,
a follow-up digest for the window's end; that follow-up opens the next window when it has
something to mail (so a storm still mails about once per interval) and closes it otherwise. Every
dead letter is thus mailed within about the interval plus a minute.
A failing alert is logged and dead-lettered without alerting again, so it can never loop: only a
new dead letter of another task schedules digests (the digest task's own are recorded with
`alert=False`), and a follow-up only ever reschedules itself while its window's lock still holds.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from django.conf import settings
from django.core.cache import cache
from django.db.models import Count, Max
from django.utils import timezone

from jobs.conf import jobs_settings
from jobs.logging import get_logger

logger = get_logger("jobs.alerts")

LOCK_KEY = "jobs:dead-letter-alert:lock"  # value: when the open window started (ISO 8601)
FOLLOW_UP_KEY = "jobs:dead-letter-alert:follow-up:{window}"  # set once a window's follow-up is scheduled
LAST_SENT_KEY = "jobs:dead-letter-alert:last-sent"
GATHER_SECONDS = 60
#: A follow-up is due this long after its window's end (the lock must be gone when it runs).
FOLLOW_UP_MARGIN = 1


def dead_letter_alert_schedule() -> bool:
    """Starts a digest (a minute from now) unless an alert window is open; in an open window,
    makes sure one follow-up digest runs when the window ends. True if it scheduled either."""
    if not jobs_settings.DEAD_LETTER_ALERT_EMAILS:
        return False
    from jobs.tasks import dead_letter_digest

    interval = jobs_settings.DEAD_LETTER_ALERT_INTERVAL
    try:
        now = timezone.now()
        for _attempt in range(2):  # a second time when the window ended between `add` and `get`
            if cache.add(LOCK_KEY, now.isoformat(), timeout=interval):
                dead_letter_digest.apply_async(countdown=GATHER_SECONDS)
                return True
            window = cache.get(LOCK_KEY)
            if window is not None:
                break
        else:
            return False  # another process opened the window just now and started its digest
        # One cheap `add` per dead letter in the window; only the first schedules anything.
        left = _seconds_left(window, now)
        if not cache.add(FOLLOW_UP_KEY.format(window=window), 1, timeout=int(left) + GATHER_SECONDS):
            return False
        dead_letter_digest.apply_async(kwargs={"window": window}, countdown=left + FOLLOW_UP_MARGIN)
    except Exception:
        logger.warning("dead_letter.alert_schedule_failed", exc_info=True)
        return False
    return True


def _seconds_left(window: str, now: datetime) -> float:
    """Seconds until the alert window that started at `window` ends (its lock times out)."""
    interval = jobs_settings.DEAD_LETTER_ALERT_INTERVAL
    try:
        end = datetime.fromisoformat(window) + timedelta(seconds=interval)
    except (TypeError, ValueError):
        return float(interval)
    return min(max((end - now).total_seconds(), 0.0), float(interval))


def dead_letter_follow_up(window: str) -> int:
    """The digest due when the alert window that started at `window` ends: mails what came in
    since the last digest. Returns how many dead letters it reported.

    It opens the next window when it mails (so the next dead letters wait for that window's
    end: about one mail per interval) and leaves none open when there was nothing to mail. If a
    newer window is already open, that window's own digest reports everything: nothing to do.
    Run before its window ended (clocks differ), it schedules itself again for the end.
    """
    from jobs.tasks import dead_letter_digest

    now = timezone.now()
    if not cache.add(LOCK_KEY, now.isoformat(), timeout=jobs_settings.DEAD_LETTER_ALERT_INTERVAL):
        if cache.get(LOCK_KEY) == window:
            dead_letter_digest.apply_async(
                kwargs={"window": window}, countdown=_seconds_left(window, now) + FOLLOW_UP_MARGIN
            )
        return 0
    try:
        sent = dead_letter_digest_send()
    except BaseException:
        cache.delete(LOCK_KEY)  # the task's retry takes the window again
        raise
    if not sent:
        cache.delete(LOCK_KEY)  # nothing mailed: the next dead letter is mailed a minute later
    return sent


def dead_letter_digest_send() -> int:
    """Mails the pending dead letters that failed since the last digest, grouped by task and
    exception. Returns how many dead letters it reported (0: nothing sent)."""
    from django.core.mail import send_mail

    from jobs.models import DeadLetter

    recipients = jobs_settings.DEAD_LETTER_ALERT_EMAILS
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
    total: int = sum(g["count"] for g in groups)
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
