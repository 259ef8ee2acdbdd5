"""Migrations that change what is stored, run forwards over rows of the release before."""

from __future__ import annotations

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor


@pytest.mark.django_db(transaction=True)
def test_jobs_accepted_before_the_queue_column_get_their_queue():
    executor = MigrationExecutor(connection)
    executor.migrate([("jobs", "0010_beat_fencing")])
    try:
        old = executor.loader.project_state([("jobs", "0010_beat_fencing")]).apps
        Outbox = old.get_model("jobs", "OutboxMessage")
        Outbox.objects.create(task_name="jobs.ping", task_id="routed", options={})
        Outbox.objects.create(task_name="jobs.ping", task_id="chosen", options={"queue": "high"})
        executor = MigrationExecutor(connection)
        executor.migrate([("jobs", "0011_job_views")])
        new = executor.loader.project_state([("jobs", "0011_job_views")]).apps
        queues = dict(new.get_model("jobs", "OutboxMessage").objects.values_list("task_id", "queue"))
        assert queues == {"routed": "low", "chosen": "high"}  # jobs.ping is routed to `low`
    finally:
        executor = MigrationExecutor(connection)
        executor.migrate(executor.loader.graph.leaf_nodes())
