"""jobs.runtime.worker.install_worker: what every starting worker of any Celery app gets from jobs."""

from __future__ import annotations

from types import SimpleNamespace

from celery import Celery

from jobs.runtime.worker import JobConsumer, LedgerStep, LivenessStep, ShutdownLogStep, install_worker


def starting_worker(consumer_cls: object = "celery.worker.consumer:Consumer") -> SimpleNamespace:
    return SimpleNamespace(app=Celery("project", set_as_current=False), consumer_cls=consumer_cls)


def test_a_worker_gets_the_jobs_consumer_steps_and_a_soft_shutdown(settings):
    del settings.CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT  # a project that never set it
    settings.JOBS_SHUTDOWN_TIMEOUT = 25
    worker = starting_worker()
    install_worker(worker)
    assert worker.consumer_cls is JobConsumer
    assert {LedgerStep, ShutdownLogStep} <= worker.app.steps["worker"]
    assert LivenessStep in worker.app.steps["consumer"]
    assert worker.app.conf.worker_soft_shutdown_timeout == 25.0


def test_a_projects_own_consumer_and_soft_shutdown_are_kept(settings):
    settings.CELERY_WORKER_SOFT_SHUTDOWN_TIMEOUT = 7
    worker = starting_worker(consumer_cls="tests.jobs.runtime.test_worker_install:OwnConsumer")
    worker.app.conf.worker_soft_shutdown_timeout = 7.0
    install_worker(worker)
    assert worker.consumer_cls == "tests.jobs.runtime.test_worker_install:OwnConsumer"
    assert worker.app.conf.worker_soft_shutdown_timeout == 7.0


class OwnConsumer(JobConsumer):
    """A project's consumer (any class but Celery's default one)."""


def test_a_queue_paused_before_a_consumer_restart_is_resumed_after_it():
    """Celery rebuilds its task consumer without the queues it stopped consuming: the worker's
    own queues and those it paused are kept on the consumer, which outlives the restart."""
    from types import SimpleNamespace

    from jobs.runtime.pause import PauseSync

    calls: list[tuple[str, str]] = []
    consumer = SimpleNamespace(
        hostname="w@h",
        task_consumer=SimpleNamespace(queues=[SimpleNamespace(name=q) for q in ("high", "normal", "low")]),
        cancel_task_queue=lambda queue: calls.append(("cancel", queue)),
        add_task_queue=lambda queue: calls.append(("add", queue)),
    )
    sync = PauseSync(consumer)
    sync.wanted = {"low", "elsewhere"}
    sync.apply()
    consumer.task_consumer = SimpleNamespace(queues=[SimpleNamespace(name=q) for q in ("high", "normal")])
    after_restart = PauseSync(consumer)
    after_restart.wanted = set()
    after_restart.apply()
    assert calls == [("cancel", "low"), ("add", "low")]
    assert consumer.jobs_paused_queues == set()
