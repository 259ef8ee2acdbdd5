"""The beat scheduler: django-celery-beat's database scheduler, one beat at a time.

- A lock with expiry in Redis (`SET NX PX`, renewed every tick) lets exactly one beat send
  tasks. A second beat started by mistake waits as a standby holding no lock, and takes over
  within `JOBS_BEAT_LOCK_TTL` seconds when the first one dies, re-reading the schedule (and the last run
  times its predecessor saved after every send) from the database first.
- Schedules live only in the database (`manage.py setup_schedules` seeds them); nothing from
  settings is written over what staff edited in the admin on beat start.
- A change of `TIME_ZONE` resets `last_run_at`, so schedules are not computed in the old zone.
- Every tick refreshes the beat's liveness file (for `manage.py probe beat`) and, while it
  leads, the beat heartbeat behind `/api/jobs/health/`.
- A tick sends every entry that is due (up to `BATCH`), not one: their new `last_run_at` and
  their messages (ledger rows, `jobs.runtime.outbox`) are written in one transaction, then published.
  So a standby that takes over never sends a tick its predecessor sent (the run time was
  committed with the message), and a tick whose publish failed is not lost (the ledger publishes
  it). Celery's scheduler instead sent one entry per tick, compared the whole schedule with itself
  before each, and saved each entry with two statements after its send: beat could not keep up
  with a few thousand schedules.
- A fencing token keeps a leader that Redis forgot from sending beside its successor. The lock
  alone cannot: Redis may lose it (a restart without persistence, a failover that dropped the
  last writes) and a leader learns that only at its next renewal, up to `JOBS_BEAT_LOCK_TTL`/10
  seconds later (longer after a pause), meanwhile a standby has taken the lock. So each beat,
  when it starts leading, takes the next token from the `jobs.models.BeatFence` row
  (`token = token + 1`, committed before it reads the schedule), and every batch it records
  first checks, in the same transaction, that the row still holds its token. Guarantee: once a
  newer leader has taken its token, an older one records, and therefore sends, nothing more (it
  logs `beat.fenced` and stands down); whatever the older one recorded before was committed
  before the newer one read the schedule, so the newer one does not send it again. The token
  lives in the database that records the batches, not in Redis (an INCR counter there starts
  again at 1 after a restart), so it never goes back; the row's update serializes a take against
  a recording (PostgreSQL's row lock, SQLite's single writer). What the fence cannot stop is a
  batch recorded just before the take and published just after: that is one send, not two.
"""

from __future__ import annotations

import contextlib
import heapq
import json
import os
import socket
import time
import uuid
from collections.abc import Callable, Container, Iterator
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, cast

import redis
from celery.beat import event_t
from celery.utils.time import maybe_make_aware
from django.conf import settings
from django.core.cache import cache
from django.db import DatabaseError, InterfaceError, OperationalError, transaction
from django.db.models import F
from django.utils import timezone
from django_celery_beat.models import PeriodicTask, PeriodicTasks
from django_celery_beat.schedulers import DatabaseScheduler, ModelEntry

from jobs.conf import jobs_settings
from jobs.fleet import fleet_forget, fleet_publish
from jobs.heartbeat import heartbeat_write, liveness_touch
from jobs.redis_client import redis_client

if TYPE_CHECKING:
    from jobs.models import OutboxMessage
from jobs.logging import get_logger

logger = get_logger("jobs.runtime.beat")

LOCK_KEY = "jobs:beat:leader"
STANDBY_POLL = 5.0
#: Seconds before the next tick after one failed (a paused broker, a restarting database).
RETRY_AFTER_ERROR = 2.0
TIME_ZONE_KEY = "jobs:beat:time_zone"
#: Celery settings `send_task` reads for every message it sends (five reads, with the task message's
#: build and the producer pool): `_send_settings_at_hand` keeps them in the first map Celery looks in.
SEND_SETTINGS = ("task_always_eager", "task_send_sent_event", "task_repr_maxlevels", "broker_pool_acquire_timeout")
#: Due entries one tick sends at most (one transaction; after a full one the next tick follows at once).
BATCH = 500
#: Seconds between two ticks at least: what came due meanwhile goes out together (a tick costs a
#: transaction, a lock renewal and a fencing check), at most this late. 10 000 schedules a minute
#: spread over it (2026-12-07): 0.1 s cost beat 0.53 core, lag p99 0.29 s; 0.25 s 0.35 core, 0.43 s.
TICK_SPACING = 0.25
#: Seconds between two looks at whether the schedules were edited (one query each).
CHANGE_CHECK_INTERVAL = 1.0
#: Seconds between two records of this beat's settings for `manage.py check` (jobs.fleet).
FLEET_INTERVAL = 60.0
#: The primary key of the one `BeatFence` row.
FENCE_ROW = 1

_RENEW = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('pexpire', KEYS[1], ARGV[2])
end
return 0
"""
_RELEASE = """
if redis.call('get', KEYS[1]) == ARGV[1] then
  return redis.call('del', KEYS[1])
end
return 0
"""


class Fenced(RuntimeError):
    """A newer leader has taken the fencing token: this beat must record and send nothing."""


def fence_take(holder: str) -> int:
    """The next fencing token, taken for `holder` (the beat's lock token) and committed: from now
    on a beat holding an older one can record no batch. Creates the row if it is missing."""
    from jobs.models import BeatFence

    now = timezone.now()
    rows = BeatFence.objects.filter(pk=FENCE_ROW)
    with transaction.atomic():
        if not rows.update(token=F("token") + 1, holder=holder[:255], at=now):
            # A concurrent first take may insert it too: whichever insert loses, both then increment.
            BeatFence.objects.bulk_create([BeatFence(pk=FENCE_ROW, token=0, at=now)], ignore_conflicts=True)
            rows.update(token=F("token") + 1, holder=holder[:255], at=now)
        return int(rows.values_list("token", flat=True).get())


def fence_hold(token: int | None) -> None:
    """Raises Fenced unless the fence still holds `token`. Called first in the transaction that
    records a batch: the update locks the row until that transaction ends, so a newer leader's
    take waits for it (and then reads what it recorded), or came first and fences it off."""
    from jobs.models import BeatFence

    rows = BeatFence.objects.filter(pk=FENCE_ROW)
    if token is None or not rows.filter(token=token).update(at=timezone.now()):
        newest = rows.values_list("token", "holder").first()
        raise Fenced(f"fencing token {token} is older than the newest, {newest}")


class BeatLock:
    """Leadership among beats: a Redis key holding the leader's token, with an expiry."""

    def __init__(self, url: str, ttl: float) -> None:
        self.client = redis_client(url, timeout=2)  # a redis:// or a sentinel:// URL
        self.ttl_ms = int(ttl * 1000)
        #: A lock renewed this recently is still held for most of its TTL: no round trip. (Beat
        #: ticks many times a second with thousands of schedules.)
        self.renew_every = ttl / 10
        self.token = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.held = False
        self.renewed_at = 0.0
        #: Counts the times this beat took the lock afresh (not by renewal): a new term, in which
        #: another beat may have led meanwhile.
        self.term = 0
        self.resting_until = 0.0  # monotonic: no try for the lock before then (see rest())

    def rest(self, seconds: float) -> None:
        """No try for the lock for `seconds`: after handing it over, the standbys get it first."""
        self.resting_until = time.monotonic() + seconds

    def acquire_or_renew(self) -> bool:
        """True while this beat leads. Any Redis error counts as not leading: better no beat for
        a moment than two."""
        now = time.monotonic()
        if self.held and now - self.renewed_at < self.renew_every:
            return True
        if now < self.resting_until:
            return False
        try:
            if self.held and self.client.eval(_RENEW, 1, LOCK_KEY, self.token, self.ttl_ms):
                self.renewed_at = now
                return True
            self.held = bool(self.client.set(LOCK_KEY, self.token, nx=True, px=self.ttl_ms))
            self.renewed_at = now
            if self.held:
                self.term += 1
        except (redis.RedisError, OSError) as exc:
            if self.held:
                logger.error("beat.lock_lost", extra={"error": str(exc)[:200]})
            self.held = False
        return self.held

    def release(self) -> None:
        if self.held:
            with contextlib.suppress(redis.RedisError, OSError):
                self.client.eval(_RELEASE, 1, LOCK_KEY, self.token)
            self.held = False

    def holder(self) -> str | None:
        value = cast("bytes | None", self.client.get(LOCK_KEY))  # no decode_responses: bytes (typed bytes | str)
        return value.decode() if value else None


class LockedDatabaseScheduler(DatabaseScheduler):  # type: ignore[misc]  # django-celery-beat has no types
    """`DatabaseScheduler` that sends only while it holds the beat lock."""

    # What this class uses of Celery's Scheduler and django-celery-beat's DatabaseScheduler (untyped).
    max_interval: float
    _schedule: dict[str, Any]
    _heap: list[event_t] | None
    _initial_read: bool
    _heap_invalidated: bool
    _when: Callable[[Any, float], float]  # a method: the UTC timestamp of an entry's next run

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        ttl = jobs_settings.BEAT_LOCK_TTL
        self.lock = BeatLock(jobs_settings.redis_url, ttl=ttl)
        self.standby_poll: float = min(STANDBY_POLL, ttl / 3)
        #: Seconds of failing ticks after which a leader hands the lock over.
        self.handover_after: float = ttl / 3
        self._failing_since: float | None = None  # monotonic: the first of the leader's failing ticks
        self._leading = False
        self._announced_standby = False
        self._term: int | None = None  # the lock term this beat last started leading in
        self._fence: int | None = None  # the fencing token taken in that term
        self._touched_at = 0.0  # liveness file and heartbeat, monotonic
        self._fleet_at = -FLEET_INTERVAL  # this beat's settings last recorded for jobs.fleet, monotonic
        self._checked_at = -CHANGE_CHECK_INTERVAL  # the last look for schedule edits, monotonic
        self._heap_source: dict[str, Any] | None = None  # the schedule the heap was built from
        super().__init__(*args, **kwargs)
        self.max_interval = min(self.max_interval, ttl / 3)

    def setup_schedule(self) -> None:
        # Deliberately no install_default_entries() / update_from_dict(beat_schedule): they
        # update_or_create rows on every start and would undo what staff edited in the admin.
        reset_schedules_if_time_zone_changed()

    def tick(self, *args: Any, **kwargs: Any) -> float:
        """One scheduler tick that never raises: Celery's beat loop (`Service.start`) catches only
        KeyboardInterrupt and SystemExit, so any error here (Redis paused or full, the database
        restarting) would end beat. It is logged and the tick tried again shortly."""
        try:
            delay = self._tick(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - see the docstring
            logger.warning("beat.tick_failed", extra={"error": f"{type(exc).__name__}: {exc}"[:500]})
            self._drop_database_connection()
            self._heap = None  # re-read the schedule from the database once it answers
            self._initial_read = True
            self._hand_over_if_failing()
            return RETRY_AFTER_ERROR
        self._failing_since = None
        return delay

    def _hand_over_if_failing(self) -> None:
        """A leader whose ticks have failed for `handover_after` seconds gives the lock back and
        stays out of the race for two standby polls: a leader cut from the database but not from
        Redis would otherwise keep renewing a lock it cannot use, and no beat would send. A standby
        that reaches the database takes over; if none does, this one leads again after its rest."""
        if not self.lock.held:
            return
        now = time.monotonic()
        if self._failing_since is None:
            self._failing_since = now
            return
        if now - self._failing_since < self.handover_after:
            return
        logger.error("beat.handing_over", extra={"failing_for": round(now - self._failing_since, 1)})
        self._failing_since = None
        self.lock.release()
        self.lock.rest(2 * self.standby_poll)
        self._leading = False  # stood down on purpose: no "lost the beat lock" on the next tick
        self._announced_standby = True
        self._fence = None

    def _drop_database_connection(self) -> None:
        from jobs.db import close_connection

        close_connection()

    def _tick(self, *args: Any, **kwargs: Any) -> float:
        leading = self.lock.acquire_or_renew()
        # The liveness file and the heartbeat once a second, however often beat ticks.
        now = time.monotonic()
        touch = now - self._touched_at >= 1.0 or leading != self._leading
        if touch:
            self._touched_at = now
            try:
                liveness_touch("beat", leading=leading)
            except OSError as exc:
                logger.warning("beat.liveness_write_failed", extra={"error": str(exc)[:200]})
        if touch and now - self._fleet_at >= FLEET_INTERVAL:  # leader or standby: either may send
            self._fleet_at = now
            try:
                fleet_publish("beat", self.lock.client)
            except (redis.RedisError, OSError) as exc:
                logger.info("fleet.publish_failed", extra={"error": f"{type(exc).__name__}: {exc}"[:200]})
        if not leading:
            self._fence = None
            if self._leading:
                logger.warning("beat.standby", extra={"reason": "lost the beat lock"})
                self._leading = False
            elif not self._announced_standby:
                logger.info("beat.standby", extra={"leader": self._holder()})
                self._announced_standby = True
            return self.standby_poll
        if not self._leading or self.lock.term != self._term:
            self._term = self.lock.term
            self._leading = True
            self._announced_standby = False
            self._fence = None
            # The previous leader may have sent tasks since we last read: start from the database.
            self._initial_read = True
            self._heap = None
        if self._fence is None:
            # Before the schedule is read: what an older leader recorded until now is in it, and
            # from now on it records nothing. (Failed, the tick fails and the next one tries again.)
            self._fence = fence_take(self.lock.token)
            logger.info("beat.leading", extra={"token": self.lock.token, "fence": self._fence})
        if touch:
            try:
                heartbeat_write("beat")
            except Exception as exc:  # noqa: BLE001 - the cache (Redis) paused: sending goes on
                logger.warning("beat.heartbeat_write_failed", extra={"error": f"{type(exc).__name__}: {exc}"[:200]})
        return min(self._send_due(), self.max_interval)

    # --- sending ----------------------------------------------------------------------------

    @property
    def schedule(self) -> dict[str, Any]:
        """django-celery-beat asks the database whether the schedules changed on every read of
        this property; here at most every `CHANGE_CHECK_INTERVAL` seconds (an edit in the admin
        reaches beat at its next tick after that: within `max_interval` when nothing is due)."""
        now = time.monotonic()
        if self._initial_read or now - self._checked_at >= CHANGE_CHECK_INTERVAL:
            self._checked_at = now
            return cast("dict[str, Any]", DatabaseScheduler.schedule.fget(self))  # django-celery-beat has no types
        return self._schedule

    def _refresh_heap(self) -> None:
        schedule = self.schedule
        if self._heap is None or schedule is not self._heap_source or self._heap_invalidated:
            self._heap_invalidated = False
            self._heap_source = schedule
            self.populate_heap()

    def _send_due(self) -> float:
        """Sends every entry due now (up to BATCH); returns the seconds until the next tick: none
        after a full batch, else until the next entry is due but at least TICK_SPACING."""
        self._refresh_heap()
        heap = self._heap
        due: list[Any] = []
        looked = 0
        while heap and len(due) < BATCH and looked < 2 * BATCH:
            when, priority, entry = heap[0]
            if when > self._when(entry, 0):
                break
            looked += 1
            try:
                is_due, next_time_to_run = self.is_due(entry)
            except Exception:  # noqa: BLE001 - one broken entry must not stop the others
                is_due, next_time_to_run = self._is_due_failed(entry)
            heapq.heappop(heap)
            if is_due:
                next_entry = self.reserve(entry)
                due.append(entry)
                heapq.heappush(heap, event_t(self._when(next_entry, next_time_to_run), priority, next_entry))
            else:
                delay = next_time_to_run if isinstance(next_time_to_run, int | float) else self.max_interval
                heapq.heappush(heap, event_t(self._when(entry, max(delay, 0.01)), priority, entry))
        if due:
            self._send(due)
        if len(due) >= BATCH and len({entry.name for entry in due}) == len(due):
            # More are due: the next tick at once (a burst's 10 000 would wait 2 s else). Not when
            # one entry came due twice in the batch (an interval shorter than a tick, which would
            # otherwise keep beat busy with nothing else).
            return 0.0
        if not heap:
            return self.max_interval
        return max(heap[0][0] - self._when(heap[0][2], 0), TICK_SPACING)

    def reserve(self, entry: Any) -> Any:
        """The entry's next run, in memory only: `_send` writes it together with its message.
        (django-celery-beat notes it for `sync()`, which would save a run time whose message was
        never written.) What django-celery-beat's `ModelEntry.__next__` does, but the next entry
        is a copy with the new run, not one built again from the row: that parsed the arguments,
        keyword arguments and headers from JSON again for every send (a tenth of beat's CPU in a
        burst of thousands)."""
        model = getattr(entry, "model", None)
        if model is None or type(entry).__next__ is not ModelEntry.__next__:
            return next(entry)
        model.last_run_at = entry._default_now()
        model.total_run_count += 1
        model.no_changes = True
        following = object.__new__(type(entry))  # (copy.copy goes through Celery's __reduce__)
        following.__dict__.update(entry.__dict__)
        following.last_run_at = model.last_run_at
        following.total_run_count = model.total_run_count
        return following

    def sync(self) -> None:
        """Nothing to save: every run time is written with its message, by `_send`."""

    def _send(self, due: list[Any]) -> None:
        """Records the entries' runs and their messages in one transaction, then publishes them.
        The database down: nothing is recorded or sent, the schedule is read again, the next tick
        tries again. An entry that cannot be built or recorded (arguments that fail to evaluate,
        a row the database refuses, an encoder's TypeError) is logged and left out, never holding
        back the others: anything but the database being unreachable costs that entry only."""
        from jobs.runtime.outbox import CLAIM_TTL, publish_claimed

        now = timezone.now()
        claim = uuid.uuid4().hex
        batch: list[tuple[Any, OutboxMessage]] = []
        for entry in due:
            try:
                batch.append((entry, self._ledger_row(entry, now=now, claim=claim, claimed_until=now + CLAIM_TTL)))
            except Exception as exc:  # noqa: BLE001 - arguments that cannot be evaluated, say
                self._unsendable(entry, exc)
        if not batch:
            return
        # Why the ledger cannot hold a message, by the row's id(): such a one is sent outside it.
        outside = {id(row): reason for _entry, row in batch if (reason := _ledger_refusal(row))}
        self._still_leading()
        fenced: Fenced | None = None
        try:
            try:
                rows = self._record(batch, outside)
            except (OperationalError, InterfaceError, Fenced):
                raise
            except Exception:  # noqa: BLE001 - one entry refused (DataError, ValueError...): find which
                rows, kept = [], []
                for pair in batch:
                    try:
                        rows += self._record([pair], outside)
                    except Fenced as exc:
                        # What was recorded before goes out: the newer leader read it as sent.
                        fenced = exc
                        break
                    except (OperationalError, InterfaceError):
                        raise
                    except Exception as exc:  # noqa: BLE001 - that entry only
                        self._unsendable(pair[0], exc)
                    else:
                        kept.append(pair)
                batch = kept
        except Fenced as exc:
            batch, rows, fenced = [], [], exc
        except DatabaseError:
            # Nothing more was recorded and nothing sent: read the schedule again (the entries
            # were advanced in memory only) and try on the next tick.
            self._initial_read = True
            self._heap = None
            raise
        if fenced is not None:
            self._stand_down(fenced)
        if not batch:
            return
        with _send_settings_at_hand(self.app.conf):
            published, _failed, unpublishable = publish_claimed(rows, batch_events=True)
        sent_outside = sum(
            self._send_outside_ledger(entry, row, reason=outside[id(row)]) for entry, row in batch if id(row) in outside
        )
        logger.info(
            "beat.sent",
            extra={
                "count": len(batch),
                "published": published + sent_outside,
                "left_to_the_ledger": len(rows) - published - unpublishable,
                "outside_ledger": sum(id(row) in outside for _entry, row in batch),
                "tasks": sorted({entry.task for entry, _row in batch})[:10],
            },
        )

    def _record(self, batch: list[tuple[Any, OutboxMessage]], outside: Container[int]) -> list[OutboxMessage]:
        """Writes the entries' runs, and the messages of those the ledger can hold (not in
        `outside`), in one transaction, if this beat still holds the newest fencing token (else
        Fenced, and nothing is written); returns the ledger rows written."""
        from jobs.runtime.store import jobs_add

        ledger = [row for _entry, row in batch if id(row) not in outside]
        # One run time for the batch (the tick's): one UPDATE, where bulk_update's CASE per row
        # cost beat a fifth of its CPU in a burst of thousands of schedules.
        ran_at = max(entry.model.last_run_at for entry, _row in batch)
        for entry, _row in batch:
            entry.model.last_run_at = ran_at
        with transaction.atomic():
            fence_hold(self._fence)
            PeriodicTask.objects.filter(pk__in=[entry.model.pk for entry, _row in batch]).update(
                last_run_at=ran_at, total_run_count=F("total_run_count") + 1
            )
            return jobs_add(ledger)

    def _send_outside_ledger(self, entry: Any, row: OutboxMessage, *, reason: str) -> bool:
        """Sends, straight to the broker, a message whose arguments plain JSON cannot hold (a
        Decimal, a datetime or a UUID, as django-celery-beat reads kombu's tagged JSON typed in
        the admin): Celery's serializer encodes them, as django-celery-beat's own scheduler sends
        them. Its run was recorded with the batch, so no standby sends it again; but no ledger row
        stands behind it: a broker that refuses or loses it loses this run (logged), as with
        Celery's own beat. True if the broker took it."""
        from jobs.outcomes import LEDGER_HEADER
        from jobs.runtime.outbox import PUBLISH_RETRY_POLICY

        options = dict(row.options)
        headers = {k: v for k, v in (options.pop("headers", None) or {}).items() if k != LEDGER_HEADER}
        fields = {"schedule": entry.name, "task": entry.task, "task_id": row.task_id}
        logger.warning("beat.entry_sent_outside_ledger", extra={**fields, "reason": reason})
        try:
            self.app.send_task(
                row.task_name,
                args=row.args,
                kwargs=row.kwargs,
                task_id=row.task_id,
                headers=headers,
                retry=True,
                retry_policy=PUBLISH_RETRY_POLICY,
                **options,
            )
        except Exception as exc:  # noqa: BLE001 - the broker down, or arguments Celery cannot encode
            logger.error("beat.entry_send_failed", extra={**fields, "error": f"{type(exc).__name__}: {exc}"[:500]})
            return False
        return True

    @staticmethod
    def _unsendable(entry: Any, exc: BaseException) -> None:
        logger.error(
            "beat.entry_unsendable",
            extra={"schedule": entry.name, "task": entry.task, "error": f"{type(exc).__name__}: {exc}"[:500]},
        )

    def _stand_down(self, exc: Fenced) -> None:
        """A newer leader fenced this one off: it gives the lock back (only if it still holds it)
        and waits as a standby; should it lead again, it takes a newer token first."""
        logger.error("beat.fenced", extra={"token": self.lock.token, "fence": self._fence, "error": str(exc)[:300]})
        self.lock.release()
        self._leading = False
        self._announced_standby = False
        self._fence = None
        self._initial_read = True
        self._heap = None

    def _still_leading(self) -> None:
        """Just before a batch is recorded: a lock not renewed for half its TTL (a long pause of
        this process) is renewed now, and a lock lost or taken afresh meanwhile stops the batch
        (another beat may have sent it): the tick fails and the schedule is read again."""
        lock = self.lock
        if time.monotonic() - lock.renewed_at < lock.renew_every * 5:
            return
        term = lock.term
        lock.renewed_at = 0.0
        if not lock.acquire_or_renew() or lock.term != term:
            raise RuntimeError("the beat lock was lost before the batch was recorded")

    def _ledger_row(self, entry: Any, *, now: datetime, claim: str, claimed_until: datetime) -> OutboxMessage:
        # Celery's private helpers, not in celery-types.
        from celery.beat import _evaluate_entry_args, _evaluate_entry_kwargs  # type: ignore[attr-defined]

        from jobs.models import OutboxMessage
        from jobs.outcomes import LEDGER_HEADER

        options = dict(entry.options)
        headers = {**(options.pop("headers", None) or {}), "celery_beat_task": True, LEDGER_HEADER: 1}
        # `meta` becomes the run's `request.meta`, which its task history row keeps: the dashboard
        # reads each run's lateness from it (its start minus the tick that found it due).
        headers["meta"] = {**(headers.get("meta") or {}), "due_at": now.isoformat()}
        expires = options.get("expires")
        if isinstance(expires, int | float):  # seconds from the tick, not from a later relay
            options["expires"] = (now + timedelta(seconds=expires)).isoformat()
        elif isinstance(expires, datetime):
            options["expires"] = maybe_make_aware(expires).isoformat()
        if not options.get("queue"):
            route = self.app.amqp.router.route({}, entry.task)
            queue = route.get("queue")
            options["queue"] = getattr(queue, "name", queue) or jobs_settings.default_queue
        return OutboxMessage(
            task_name=entry.task,
            task_id=str(uuid.uuid4()),
            args=list(_evaluate_entry_args(entry.args)),
            kwargs=dict(_evaluate_entry_kwargs(entry.kwargs)),
            options={**options, "headers": headers},
            created_at=now,
            claim=claim,
            claimed_until=claimed_until,
        )

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.lock.release()
            with contextlib.suppress(redis.RedisError, OSError):
                fleet_forget("beat", self.lock.client)

    def _holder(self) -> str | None:
        try:
            return self.lock.holder()
        except (redis.RedisError, OSError):
            return None


@contextlib.contextmanager
def _send_settings_at_hand(conf: Any) -> Iterator[None]:
    """Celery reads a setting through its chain of maps, the Django settings among them, where a
    setting the site did not set costs an AttributeError caught as a KeyError: 77 us for the five
    reads (of four settings) of each message, a tenth of beat's CPU in a burst of sends. For the length of one
    batch they are copied (same values) into the first map, `conf.changes` (14 us), then taken
    out again, so that a setting changed later (a test's override) is read as before. Beat is
    one thread: nothing else reads the configuration meanwhile."""
    changes = conf.changes
    before = {key: changes[key] for key in SEND_SETTINGS if key in changes}
    changes.update({key: conf[key] for key in SEND_SETTINGS})
    try:
        yield
    finally:
        for key in SEND_SETTINGS:
            if key in before:
                changes[key] = before[key]
            else:
                changes.pop(key, None)


def _ledger_refusal(row: OutboxMessage) -> str:
    """Why the ledger's JSON columns cannot hold the row's arguments or options ("" if they can).
    They are encoded as the JSONField encodes them, plain `json`; nor does PostgreSQL's jsonb take
    NaN or a NUL character, whatever the database: the same entry goes the same way on each."""
    try:
        encoded = json.dumps([row.args, row.kwargs, row.options], allow_nan=False)
    except (TypeError, ValueError, RecursionError) as exc:
        return f"{type(exc).__name__}: {exc}"[:200]
    if "\\u0000" in encoded:
        return "a NUL character (\\u0000), which PostgreSQL's jsonb refuses"
    return ""


def reset_schedules_if_time_zone_changed() -> bool:
    """Clears every `last_run_at` when `TIME_ZONE` differs from the one seen last; True if so."""
    try:
        previous = cache.get(TIME_ZONE_KEY)
        if previous and previous != settings.TIME_ZONE:
            count = PeriodicTask.objects.update(last_run_at=None)
            PeriodicTasks.update_changed()
            logger.warning(
                "beat.time_zone_changed",
                extra={"previous": previous, "current": settings.TIME_ZONE, "schedules_reset": count},
            )
            cache.set(TIME_ZONE_KEY, settings.TIME_ZONE, timeout=None)
            return True
        if previous != settings.TIME_ZONE:
            cache.set(TIME_ZONE_KEY, settings.TIME_ZONE, timeout=None)
    except Exception:
        logger.warning("beat.time_zone_check_failed", exc_info=True)
    return False
