"""The upload page and the JSON API (see CONTRACT.md, HTTP)."""

from __future__ import annotations

from django.conf import settings
from django.core.files.uploadhandler import FileUploadHandler, StopUpload
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.csrf import csrf_exempt
from django.views.decorators.http import require_GET, require_POST

from jobs.context import get_request_id
from jobs.http import json_error
from thumbnails import processing, selectors, services
from thumbnails.exceptions import StorageUnavailable, UploadTooLarge
from thumbnails.models import Image

#: What a multipart body may carry beyond the file itself (boundaries, headers, small fields).
MULTIPART_ALLOWANCE = 64 * 1024
#: How many images the page lists.
PAGE_IMAGES = 24


class SizeLimitHandler(FileUploadHandler):
    """Stops reading an upload as soon as it passes the limit, so nothing big is spooled to disk."""

    def __init__(self, request: HttpRequest, limit: int) -> None:
        super().__init__(request)
        self.limit = limit
        self.exceeded = False

    def receive_data_chunk(self, raw_data: bytes, start: int) -> bytes:
        if start + len(raw_data) > self.limit:
            self.exceeded = True
            raise StopUpload(connection_reset=False)  # read and drop the rest, then answer 413
        return raw_data

    def file_complete(self, file_size: int) -> None:
        return None  # the next handler builds the file


def _too_large(limit: int) -> JsonResponse:
    return json_error(f"the file is too large; at most {limit} bytes are allowed", 413, max_bytes=limit)


def _absolute(request: HttpRequest, url: str) -> str:
    return request.build_absolute_uri(url)


def image_detail_data(request: HttpRequest, image: Image) -> dict:
    """The contract's JSON shape of one image."""
    return {
        "id": image.pk,
        "status": image.status,
        "original": _absolute(request, image.original.url) if image.original else None,
        "width": image.width,
        "height": image.height,
        "thumbnails": [
            {"size": t.size, "width": t.width, "height": t.height, "url": _absolute(request, t.file.url)}
            for t in sorted(image.thumbnails.all(), key=lambda t: t.size)
        ],
        "error": image.error or None,
    }


@csrf_exempt  # a public JSON API without sessions; CSRF protects cookie-authenticated forms
@require_POST
def api_image_create(request: HttpRequest) -> HttpResponse:
    limit = settings.MAX_UPLOAD_BYTES
    try:
        length = int(request.META.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return json_error("bad Content-Length", 400)
    if length > limit + MULTIPART_ALLOWANCE:  # refused before a byte of the body is read
        return _too_large(limit)
    handler = SizeLimitHandler(request, limit)
    request.upload_handlers.insert(0, handler)
    upload = request.FILES.get("image")
    if handler.exceeded:
        return _too_large(limit)
    if upload is None:
        return json_error('send the image as the multipart field "image"', 400)
    try:
        image = services.image_create(upload=upload, request_id=get_request_id())
    except UploadTooLarge:
        return _too_large(limit)
    except StorageUnavailable:
        # The media store (S3) did not answer; nothing was stored or queued, the client may retry.
        response = json_error("file storage is unavailable; try again shortly", 503, code="storage_unavailable")
        response["Retry-After"] = "30"
        return response
    except processing.TooManyPixels as exc:
        return json_error(f"the image has too many pixels: {exc}", 400, code="too_many_pixels")
    except processing.UnsupportedFormat as exc:
        return json_error(str(exc), 400, code="unsupported_format")
    except processing.ImageError as exc:
        return json_error(str(exc), 400, code="not_an_image")
    url = _absolute(request, reverse("thumbnails:api-detail", args=[image.pk]))
    response = JsonResponse({"id": image.pk, "status": image.status, "url": url}, status=202)
    response["Location"] = url
    return response


@require_GET
def api_image_detail(request: HttpRequest, image_id: int) -> HttpResponse:
    image = selectors.image_get(image_id=image_id)
    if image is None:
        return json_error("image not found", 404)
    return JsonResponse(image_detail_data(request, image))


@require_GET
def page(request: HttpRequest) -> HttpResponse:
    images = selectors.images_latest(limit=PAGE_IMAGES)
    context = {
        "images": images,
        "max_upload_bytes": settings.MAX_UPLOAD_BYTES,
        "sizes": settings.THUMBNAIL_SIZES,
    }
    return render(request, "thumbnails/page.html", context)
