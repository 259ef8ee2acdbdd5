"""Views that fail in each way the JSON error middleware must translate."""

from django.core.exceptions import PermissionDenied, RequestDataTooBig, SuspiciousOperation
from django.http import Http404
from django.urls import path


def _raiser(exc):
    def view(request):
        raise exc

    return view


urlpatterns = [
    path("api/missing/", _raiser(Http404("gone"))),
    path("api/denied/", _raiser(PermissionDenied())),
    path("api/too-big/", _raiser(RequestDataTooBig())),
    path("api/suspicious/", _raiser(SuspiciousOperation("odd"))),
    path("api/broken/", _raiser(ValueError("boom"))),
    path("page/broken/", _raiser(ValueError("boom"))),
]
