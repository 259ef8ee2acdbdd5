"""The Django signals `jobs` sends. (Its Celery signal handlers are in `jobs.runtime.handlers`.)"""

from django.dispatch import Signal

#: Sent after a dead letter is written: `dead_letter` (the row) and `created` (False when a
#: requeued job failed again and its row came back to pending). Connect your own alerting here.
dead_letter_created = Signal()
