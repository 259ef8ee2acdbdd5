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
