"""Dead letters: tasks that failed for good, kept to be inspected, grouped and replayed."""

from __future__ import annotations

from django.conf import settings
from django.db import models
from django.db.models.fields.json import KT
from django.utils import timezone


class DeadLetter(models.Model):
    """One logical job that failed for good. A requeued job that dies again brings this same row
    back to `pending` (its id travels in the requeued message's headers)."""

    class Status(models.TextChoices):
        PENDING = "pending", "Pending"
        REQUEUED = "requeued", "Requeued"
        DISCARDED = "discarded", "Discarded"

    class Reason(models.TextChoices):
        RETRIES_EXHAUSTED = "retries_exhausted", "Retries exhausted"
        PERMANENT_ERROR = "permanent_error", "Permanent error"
        UNEXPECTED_ERROR = "unexpected_error", "Unexpected error"
        TIME_LIMIT = "time_limit", "Time limit"
        WORKER_LOST = "worker_lost", "Worker lost repeatedly (quarantined)"
        UNDECODABLE = "undecodable", "Message could not be decoded"
        UNPUBLISHABLE = "unpublishable", "The broker cannot take the message"
        RETRY_REFUSED = "retry_refused", "The retry could not be scheduled"
        REVOKED = "revoked", "Revoked"
        REJECTED = "rejected", "Rejected by the task"
        LOST_REPEATEDLY = "lost_repeatedly", "Lost by the broker too many times"
        CANCELLED = "cancelled", "Cancelled by an operator"

    task_name = models.CharField(max_length=200, db_index=True, help_text="The task's registered name.")
    task_id = models.CharField(max_length=64, db_index=True, help_text="Id of the latest attempt that failed.")
    queue = models.CharField(max_length=64, blank=True, db_index=True)
    args = models.JSONField(default=list, blank=True, help_text="Positional arguments, secrets redacted.")
    kwargs = models.JSONField(default=dict, blank=True, help_text="Keyword arguments, secrets redacted.")
    redacted = models.BooleanField(
        default=False, editable=False, help_text="Some argument was redacted; the job cannot be replayed as stored."
    )
    exception_type = models.CharField(max_length=200, blank=True, db_index=True)
    exception_message = models.TextField(blank=True)
    traceback = models.TextField(blank=True)
    retries = models.PositiveIntegerField(default=0, editable=False, help_text="Retries used by the last attempt.")
    reason = models.CharField(max_length=32, choices=Reason.choices, db_index=True)
    request_id = models.CharField(max_length=128, blank=True, db_index=True)
    worker = models.CharField(max_length=200, blank=True, help_text="Hostname of the worker that gave up.")
    raw_message = models.TextField(blank=True, help_text="The start of a message that could not be decoded.")

    status = models.CharField(max_length=16, choices=Status.choices, default=Status.PENDING, db_index=True)
    failure_count = models.PositiveIntegerField(default=1, editable=False, help_text="Times this job failed for good.")
    first_failed_at = models.DateTimeField(default=timezone.now, editable=False)
    failed_at = models.DateTimeField(default=timezone.now, db_index=True, help_text="When it last failed for good.")
    requeue_count = models.PositiveIntegerField(default=0, editable=False)
    requeued_at = models.DateTimeField(null=True, blank=True)
    requeued_by = models.CharField(max_length=150, blank=True)
    requeued_task_id = models.CharField(max_length=64, blank=True, help_text="Task id of the latest requeue.")
    discarded_at = models.DateTimeField(null=True, blank=True)
    discarded_by = models.CharField(max_length=150, blank=True)

    class Meta:
        ordering = ["-failed_at", "-id"]
        indexes = [
            models.Index(fields=["status", "-failed_at"], name="deadletter_status_failed"),
            models.Index(fields=["status", "task_name", "exception_type"], name="deadletter_group"),
        ]
        constraints = [
            # One pending row per failed attempt, however many processes report it.
            models.UniqueConstraint(
                fields=["task_id"],
                condition=models.Q(status="pending") & ~models.Q(task_id=""),
                name="deadletter_one_pending_per_task_id",
            )
        ]

    def __str__(self) -> str:
        return f"{self.task_name}[{self.task_id}] {self.exception_type}"


class DeadLetterEvent(models.Model):
    """The audit trail of a dead letter: each failure, requeue and discard, who and when."""

    class Action(models.TextChoices):
        FAILED = "failed", "Failed"
        REQUEUED = "requeued", "Requeued"
        DISCARDED = "discarded", "Discarded"
        REQUEUE_FAILED = "requeue_failed", "Requeue failed"

    dead_letter = models.ForeignKey(DeadLetter, on_delete=models.CASCADE, related_name="events")
    action = models.CharField(max_length=16, choices=Action.choices)
    actor = models.CharField(max_length=150, blank=True, help_text="User or process that acted.")
    at = models.DateTimeField(default=timezone.now)
    task_id = models.CharField(max_length=64, blank=True, db_index=True)
    note = models.TextField(blank=True)

    class Meta:
        ordering = ["-at", "-id"]

    def __str__(self) -> str:
        return f"{self.action} by {self.actor or 'system'} at {self.at:%Y-%m-%d %H:%M:%S}"


class DeadLetterPurge(models.Model):
    """One purge of dead letters (retention, or by hand): the rows and their own trail are gone,
    this says who removed how many, which statuses, older than what, and when."""

    at = models.DateTimeField(default=timezone.now, db_index=True)
    actor = models.CharField(max_length=150, blank=True, help_text="User or process that purged.")
    count = models.PositiveIntegerField()
    statuses = models.JSONField(default=list)
    older_than = models.DurationField()

    class Meta:
        ordering = ["-at", "-id"]

    def __str__(self) -> str:
        return f"{self.count} purged by {self.actor or 'system'} at {self.at:%Y-%m-%d %H:%M:%S}"


class DailyReport(models.Model):
    """The daily task report: counts by task and state, retries, dead letters, slowest tasks."""

    day = models.DateField(unique=True)
    created_at = models.DateTimeField(auto_now=True)
    data = models.JSONField(default=dict, editable=False)
    text = models.TextField(editable=False)

    class Meta:
        ordering = ["-day"]

    def __str__(self) -> str:
        return f"Task report {self.day:%Y-%m-%d}"


class OutboxMessage(models.Model):
    """The job table: one row per accepted job, from the moment it is accepted (written in the
    same transaction as the data it is about) until it has finished (the row is deleted; a job
    given up is kept as its dead letter). Every write goes through `jobs.runtime.store`.

    The broker carries the message; this row says what is true. A job is `scheduled` (waits here
    for its time), `available` (published, or to be published by the relay), `executing` (one run
    holds its start lease until `lease_until`, renewed while it runs) or `retryable` (failed,
    waits here for its next attempt). A copy of its message that finds the row finished, or
    leased by a live run, does nothing (see `jobs.runtime.store`).
    """

    class State(models.TextChoices):
        SCHEDULED = "scheduled", "Scheduled"
        AVAILABLE = "available", "Available"
        EXECUTING = "executing", "Executing"
        RETRYABLE = "retryable", "Retryable"
        THROTTLED = "throttled", "Throttled"

    task_name = models.CharField(max_length=200)
    task_id = models.CharField(max_length=64, unique=True)
    args = models.JSONField(default=list)
    kwargs = models.JSONField(default=dict)
    options = models.JSONField(default=dict, help_text="Publish options: queue, countdown, priority, headers.")
    created_at = models.DateTimeField(default=timezone.now, db_index=True)
    # Columns added after the first release carry a database default as well: a web or worker of
    # the previous release still inserts rows while the new one rolls out (docs/operations.md).
    state = models.CharField(
        max_length=16, choices=State.choices, default=State.AVAILABLE, db_default=State.AVAILABLE, editable=False
    )
    attempts = models.PositiveIntegerField(default=0, editable=False, help_text="Publishes the broker refused.")
    last_error = models.TextField(blank=True)
    published_at = models.DateTimeField(
        null=True, blank=True, editable=False, help_text="When the broker last took its message; empty: not yet."
    )
    not_before = models.DateTimeField(
        null=True, blank=True, editable=False, help_text="Not published before this (a retry waiting for its time)."
    )
    retries = models.PositiveIntegerField(default=0, editable=False, help_text="Retries the job has used.")
    postponed = models.PositiveIntegerField(
        default=0, editable=False, help_text="Of those, postponements that used none of the retry budget."
    )
    missing_since = models.DateTimeField(
        null=True, blank=True, editable=False, help_text="When a sweep first found its message gone from the broker."
    )
    republished = models.PositiveIntegerField(
        default=0, editable=False, help_text="Times the sweeper brought it back after the broker lost it."
    )
    claimed_until = models.DateTimeField(null=True, blank=True, editable=False)
    claim = models.CharField(max_length=32, blank=True, editable=False)
    lease_owner = models.CharField(
        max_length=200,
        blank=True,
        default="",
        db_default="",
        editable=False,
        help_text="The run holding the start lease: worker, process, run token.",
    )
    lease_until = models.DateTimeField(
        null=True, blank=True, editable=False, help_text="The start lease holds until then (database time)."
    )
    started_at = models.DateTimeField(null=True, blank=True, editable=False, help_text="When its latest run started.")
    runs = models.PositiveIntegerField(
        default=0, db_default=0, editable=False, help_text="Times its body was started, all attempts together."
    )
    crashes = models.PositiveIntegerField(
        default=0, db_default=0, editable=False, help_text="Runs whose lease lapsed (the process running it died)."
    )
    queue = models.CharField(
        max_length=64, blank=True, default="", db_default="", editable=False, help_text="The queue it goes to."
    )
    # NULL, not "": the partial unique index holds only the keys of unique jobs.
    unique_key = models.CharField(  # noqa: DJ001
        max_length=200,
        null=True,
        blank=True,
        default=None,
        editable=False,
        help_text="No other unfinished job holds this key (`enqueue(..., unique_key=...)`); empty: not unique.",
    )
    unique_until = models.DateTimeField(
        null=True, blank=True, editable=False, help_text="The key is free for a new job after this."
    )
    unique_while_running = models.BooleanField(
        default=True, db_default=True, editable=False, help_text="False: the key is freed when a run starts."
    )

    class Meta:
        ordering = ["created_at", "id"]
        verbose_name = "unfinished job"
        verbose_name_plural = "unfinished jobs (ledger)"
        indexes = [
            models.Index(fields=["published_at"], name="outbox_published_at"),
            models.Index(fields=["state", "not_before"], name="job_state_due"),
            models.Index(fields=["state", "lease_until"], name="job_state_lease"),
            # The jobs page's filters, each a page in id order read by index (jobs.admin.job).
            models.Index(fields=["queue", "state", "id"], name="job_queue_state"),
            models.Index(fields=["task_name", "id"], name="job_task"),
            # `jobs.selectors.jobs_of_request` filters on the same expression.
            models.Index(KT("options__headers__request_id"), name="job_request_id"),
        ]
        constraints = [
            # One unfinished job per unique key, enforced in the enqueue's own transaction.
            models.UniqueConstraint(
                fields=["unique_key"], condition=models.Q(unique_key__isnull=False), name="job_unique_key"
            )
        ]

    def __str__(self) -> str:
        return f"{self.task_name}[{self.task_id}]"

    @property
    def state_label(self) -> str:
        if self.state == self.State.EXECUTING:
            return "executing"
        if self.published_at is None:
            if self.not_before:
                return "retrying" if self.state == self.State.RETRYABLE else "waiting for its time"
            return "waiting to be published"
        return "missing from the broker" if self.missing_since else "published"


class Job(OutboxMessage):
    """The job table as operators see it (`/admin/jobs/job/`, `/api/jobs/jobs/`): the same rows,
    with the permissions an operator is given, `jobs.view_job` to look and `jobs.change_job` to
    cancel, run now, retry and pause queues. Its `job_state` is what the row means to them (see
    `jobs.selectors.JobState`)."""

    class Meta:
        proxy = True
        verbose_name = "job"
        verbose_name_plural = "jobs"


class JobAttempt(models.Model):
    """One attempt of a job that did not end it well: it failed and was retried, or the process
    running it died. (A job's last attempt is its end: its result, or its dead letter.) Written by
    `jobs.runtime.store` with the transition; kept `JOBS_ATTEMPT_RETENTION_DAYS`."""

    class Outcome(models.TextChoices):
        RETRIED = "retried", "Failed, retried"
        CRASHED = "crashed", "Its process died"
        STOPPED = "stopped", "Stopped (shutdown or revoke), given back"

    task_id = models.CharField(max_length=64, db_index=True)
    task_name = models.CharField(max_length=200)
    attempt = models.PositiveIntegerField(help_text="Retries the job had used when this attempt ran (0: the first).")
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(default=timezone.now, db_index=True)
    worker = models.CharField(max_length=200, blank=True, help_text="The run that held the lease: worker, process.")
    outcome = models.CharField(max_length=16, choices=Outcome.choices)
    error = models.TextField(blank=True)

    class Meta:
        ordering = ["finished_at", "id"]
        default_permissions = ("view",)

    def __str__(self) -> str:
        return f"{self.task_name}[{self.task_id}] attempt {self.attempt}: {self.outcome}"


class JobAction(models.Model):
    """The audit log of what operators did to jobs and queues: who, when, what, how many."""

    class Action(models.TextChoices):
        CANCEL = "cancel", "Cancel"
        RUN_NOW = "run_now", "Run now"
        RETRY = "retry", "Retry"
        PUBLISH_AGAIN = "publish_again", "Publish again"
        PAUSE_QUEUE = "pause_queue", "Pause queue"
        RESUME_QUEUE = "resume_queue", "Resume queue"
        PAUSE_SCHEDULE = "pause_schedule", "Pause schedule"
        RESUME_SCHEDULE = "resume_schedule", "Resume schedule"
        RUN_SCHEDULE = "run_schedule", "Run schedule now"

    at = models.DateTimeField(default=timezone.now, db_index=True)
    actor = models.CharField(max_length=150, help_text="Who: admin:<user>, api:<user>, a command.")
    action = models.CharField(max_length=20, choices=Action.choices, db_index=True)
    count = models.PositiveIntegerField(default=0, help_text="How many it changed.")
    target = models.CharField(max_length=200, blank=True, help_text="The queue or schedule acted on.")
    task_ids = models.JSONField(default=list, blank=True, help_text="The jobs it changed (the first 1000).")
    note = models.TextField(blank=True, help_text="What was asked and what was refused.")

    class Meta:
        ordering = ["-at", "-id"]
        default_permissions = ("view",)
        verbose_name = "job action (audit)"
        verbose_name_plural = "job actions (audit)"

    def __str__(self) -> str:
        return f"{self.get_action_display()} by {self.actor} at {self.at:%Y-%m-%d %H:%M:%S}"


class LimitHold(models.Model):
    """A job's place under one limit of its task (`jobs.limits.Limit`) for one key: waiting
    (`started_at` empty: its job is throttled, in order of `job_id`), or a start (the run `owner`
    holds a concurrency slot while its job's row is executing under that lease; a rate start
    counts until `per` seconds after `started_at`). Written and read only by
    `jobs.runtime.limits`; the job table says what is true, so a hold left behind (a crash, a
    cancelled job) counts for nothing and is purged by the sweeper."""

    class Kind(models.TextChoices):
        CONCURRENCY = "concurrency", "Concurrency"
        RATE = "rate", "Rate"

    name = models.CharField(max_length=100)
    key = models.CharField(max_length=200, blank=True)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    task_id = models.CharField(max_length=64, db_index=True)
    job_id = models.BigIntegerField(help_text="The job table's row: arrival order among the waiting.")
    owner = models.CharField(max_length=200, blank=True, default="")
    started_at = models.DateTimeField(null=True, blank=True)
    counts_until = models.DateTimeField(null=True, blank=True, help_text="A rate start counts until then.")

    class Meta:
        ordering = ["name", "key", "job_id"]
        default_permissions = ()
        indexes = [models.Index(fields=["name", "key", "started_at"], name="limit_hold_key")]

    def __str__(self) -> str:
        return f"{self.name}[{self.key}] {self.task_id}"


class PausedQueue(models.Model):
    """A queue no worker takes jobs from (`jobs.services.queue_pause`): its jobs stay queued.
    Every worker reads these rows every `JOBS_PAUSE_SYNC_SECONDS` and stops or starts consuming
    the queue; one that starts later reads them before it takes anything."""

    queue = models.CharField(max_length=64, unique=True)
    paused_at = models.DateTimeField(default=timezone.now)
    paused_by = models.CharField(max_length=150)

    class Meta:
        ordering = ["queue"]
        default_permissions = ()

    def __str__(self) -> str:
        return f"{self.queue} (paused by {self.paused_by})"


class ApiToken(models.Model):
    """A token for the staff API (`Authorization: Bearer <token>`), cheap to check: only its
    SHA-256 is stored and looked up (a token is 256 random bits, so no slow hash is needed, unlike
    a password). It acts as its user, who must stay an active staff member. Shown once, when an
    admin creates it."""

    user = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="api_tokens")
    name = models.CharField(max_length=100, help_text="What it is for: a script, a dashboard, a monitor.")
    key_hash = models.CharField(max_length=64, unique=True, editable=False)
    prefix = models.CharField(max_length=8, editable=False, help_text="The token's first characters, to tell it apart.")
    created_at = models.DateTimeField(default=timezone.now, editable=False)
    last_used_at = models.DateTimeField(null=True, blank=True, editable=False)
    revoked_at = models.DateTimeField(null=True, blank=True, editable=False)

    class Meta:
        ordering = ["-created_at", "-id"]
        verbose_name = "API token"

    def __str__(self) -> str:
        return f"{self.name} ({self.prefix}…)"


class Dashboard(models.Model):
    """No table: the admin's page for the operator's dashboard (`/admin/jobs/dashboard/`, listed
    with the app's models in the admin index). See `jobs.dashboard`."""

    class Meta:
        managed = False
        default_permissions = ()  # staff see it; acting on dead letters takes their own permissions
        verbose_name = "dashboard"
        verbose_name_plural = "dashboard"

    def __str__(self) -> str:
        return "dashboard"


class BeatFence(models.Model):
    """One row (`pk` 1): the fencing token of the beat that leads (jobs.runtime.beat). A beat takes
    the next token when it starts leading, and every batch it records first checks, in the same
    transaction, that the row still holds its token: a leader a newer one has fenced off (Redis
    forgot the lock, and it has not noticed yet) records and sends nothing. In the database, not in
    Redis, so that a Redis restart cannot turn it back."""

    token = models.BigIntegerField(default=0)
    holder = models.CharField(max_length=255, blank=True, default="", help_text="The beat that took the token.")
    at = models.DateTimeField(default=timezone.now, help_text="When the token was taken or last recorded a batch.")

    class Meta:
        default_permissions = ()
        verbose_name = "beat fence"

    def __str__(self) -> str:
        return f"beat fence {self.token} ({self.holder})"
