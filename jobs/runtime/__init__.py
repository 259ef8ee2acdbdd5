"""The Celery-facing runtime of `jobs`: the task base class (`task`), the worker's request,
consumer and bootsteps (`worker`), the Celery signal handlers (`handlers`), the beat scheduler
(`beat`), the task history and result backend (`results`), and the ledger that knows every
unfinished job (`outbox`, `ledger`).

Nothing here is imported by a project directly but the task base class, through `jobs.runtime.task`.
"""
