"""How a project publishes a job so that it is never lost: `enqueue(task, args=[...])`.

The job is written to the database ledger in the caller's transaction and published to the broker
after commit; the row stays until the job has finished, so a job the broker refused or lost is
published again (same task id) by the sweeper every worker runs. (It lives in `jobs.runtime.outbox`
with the rest of the ledger; this is its public address.)
"""

from jobs.runtime.outbox import enqueue

__all__ = ["enqueue"]
