"""JobTask: how the errors a task raises are classified."""

from __future__ import annotations

import errno
import smtplib

import pytest
import requests

from jobs.exceptions import PermanentError


def _http_error(status: int) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = status
    return requests.HTTPError(f"{status}", response=response)


@pytest.mark.parametrize(
    ("exc", "kind"),
    [
        (OSError(errno.ENETUNREACH, "Network is unreachable"), "transient"),
        (OSError(errno.EHOSTUNREACH, "No route to host"), "transient"),
        (OSError(errno.ENOSPC, "No space left on device"), "unexpected"),
        (requests.ConnectionError("refused"), "transient"),
        (requests.ReadTimeout("slow"), "transient"),
        (_http_error(503), "transient"),
        (_http_error(429), "transient"),
        (_http_error(404), "unexpected"),
        (smtplib.SMTPResponseException(451, b"try later"), "transient"),
        (smtplib.SMTPResponseException(550, b"no such user"), "unexpected"),
        (PermanentError("bad input"), "permanent"),
        (ValueError("bug"), "unexpected"),
    ],
)
def test_network_errors_are_transient_for_every_task(exc, kind):
    from jobs.tasks import ping

    assert ping.classify(exc) == kind
