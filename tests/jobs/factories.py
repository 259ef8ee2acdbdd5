"""Factories for jobs models."""

import factory
from django.utils import timezone

from jobs.models import DeadLetter


class DeadLetterFactory(factory.django.DjangoModelFactory):
    class Meta:
        model = DeadLetter

    task_name = "tests.permanent"
    task_id = factory.Faker("uuid4")
    queue = "normal"
    args = factory.LazyFunction(lambda: ["k"])
    kwargs = factory.LazyFunction(dict)
    exception_type = "PermanentError"
    exception_message = "cannot ever work"
    traceback = "Traceback (most recent call last):\n  ...\nPermanentError: cannot ever work"
    reason = DeadLetter.Reason.PERMANENT_ERROR
    failed_at = factory.LazyFunction(timezone.now)
