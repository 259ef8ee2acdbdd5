"""The JSON API and the page, through Django's test client."""

from __future__ import annotations

import os
import re

import pytest

from tests.thumbnails import images
from thumbnails import services
from thumbnails.models import Image

pytestmark = pytest.mark.django_db

API = "/api/thumbnails/"


def post(client, data: bytes, name: str = "photo.jpg", **extra):
    return client.post(API, {"image": images.upload(data, name)}, **extra)


def media_files(settings) -> list[str]:
    return [f for _, _, files in os.walk(settings.MEDIA_ROOT) for f in files]


def test_upload_is_accepted_and_queued(client, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks() as callbacks:
        response = post(client, images.jpeg((640, 480)), HTTP_X_REQUEST_ID="upload-rid-1")
    assert response.status_code == 202
    body = response.json()
    image = Image.objects.get()
    assert body == {"id": image.pk, "status": "pending", "url": f"http://testserver/api/thumbnails/{image.pk}/"}
    assert response["Location"] == body["url"]
    assert len(callbacks) == 1
    assert image.request_id == "upload-rid-1"
    assert (image.format, image.width, image.height) == ("JPEG", 640, 480)


def test_upload_works_without_a_csrf_token(django_capture_on_commit_callbacks):
    from django.test import Client

    client = Client(enforce_csrf_checks=True)
    with django_capture_on_commit_callbacks() as callbacks:
        response = post(client, images.webp((200, 100)))
    assert response.status_code == 202
    assert len(callbacks) == 1


@pytest.mark.parametrize(
    ("data", "name", "code"),
    [
        (b"just some text, not a picture", "photo.jpg", "not_an_image"),
        (images.bmp(), "photo.png", "unsupported_format"),
        (images.encode(images.halves((20, 20)), "TIFF"), "photo.webp", "unsupported_format"),
    ],
)
def test_not_an_allowed_image_is_400_and_queues_nothing(
    client, settings, django_capture_on_commit_callbacks, data, name, code
):
    with django_capture_on_commit_callbacks() as callbacks:
        response = post(client, data, name)
    assert response.status_code == 400
    assert response.json()["code"] == code
    assert response.json()["error"]
    assert callbacks == []
    assert not Image.objects.exists()
    assert media_files(settings) == []


def test_too_many_pixels_is_400_and_queues_nothing(client, settings, django_capture_on_commit_callbacks):
    settings.MAX_IMAGE_PIXELS = 10_000
    with django_capture_on_commit_callbacks() as callbacks:
        response = post(client, images.jpeg((200, 100)))
    assert response.status_code == 400
    assert response.json()["code"] == "too_many_pixels"
    assert "pixels" in response.json()["error"]
    assert callbacks == []
    assert media_files(settings) == []


def test_too_large_is_413_while_reading_and_queues_nothing(client, settings, django_capture_on_commit_callbacks):
    data = images.jpeg((1200, 800))
    settings.MAX_UPLOAD_BYTES = len(data) - 10  # within the multipart allowance: caught while reading
    with django_capture_on_commit_callbacks() as callbacks:
        response = post(client, data)
    assert response.status_code == 413
    assert response.json()["max_bytes"] == settings.MAX_UPLOAD_BYTES
    assert callbacks == []
    assert not Image.objects.exists()
    assert media_files(settings) == []


def test_too_large_is_413_from_content_length_alone(client, settings, django_capture_on_commit_callbacks):
    settings.MAX_UPLOAD_BYTES = 1000
    with django_capture_on_commit_callbacks() as callbacks:
        response = post(client, os.urandom(200_000))
    assert response.status_code == 413
    assert "too large" in response.json()["error"]
    assert callbacks == []
    assert media_files(settings) == []


def test_missing_field_is_400(client, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks() as callbacks:
        response = client.post(API, {"file": images.upload(images.jpeg())})
    assert response.status_code == 400
    assert "image" in response.json()["error"]
    assert callbacks == []


def test_get_on_the_collection_is_a_json_405(client):
    response = client.get(API)
    assert response.status_code == 405
    assert "error" in response.json()


def test_detail_of_a_pending_image(client):
    image = services.image_create(upload=images.upload(images.jpeg((640, 480))))
    response = client.get(f"{API}{image.pk}/")
    assert response.status_code == 200
    assert response.json() == {
        "id": image.pk,
        "status": "pending",
        "original": f"http://testserver/media/{image.original.name}",
        "width": 640,
        "height": 480,
        "thumbnails": [],
        "error": None,
    }


def test_detail_of_a_done_image(client):
    image = services.image_create(upload=images.upload(images.png_alpha((900, 600))))
    services.thumbnails_generate(image=image)
    body = client.get(f"{API}{image.pk}/").json()
    assert body["status"] == "done"
    base = f"http://testserver/media/thumbnails/{image.pk}"
    assert [(t["size"], t["width"], t["height"]) for t in body["thumbnails"]] == [
        (128, 128, 85),
        (256, 256, 171),
        (512, 512, 341),
    ]
    for thumb in body["thumbnails"]:
        assert re.fullmatch(rf"{base}/{thumb['size']}-[0-9a-f]{{16}}\.png", thumb["url"])
    assert body["error"] is None


def test_detail_of_a_failed_image_carries_the_error(client):
    image = services.image_create(upload=images.upload(images.jpeg()))
    services.image_mark_failed(image_id=image.pk, error="CorruptImage: truncated")
    body = client.get(f"{API}{image.pk}/").json()
    assert (body["status"], body["error"]) == ("failed", "CorruptImage: truncated")


def test_unknown_image_is_a_json_404(client):
    response = client.get(f"{API}424242/")
    assert response.status_code == 404
    assert response.json() == {"error": "image not found"}


def test_page_lists_latest_images_with_thumbnails_and_status(client):
    done = services.image_create(upload=images.upload(images.jpeg()))
    services.thumbnails_generate(image=done)
    pending = services.image_create(upload=images.upload(images.webp()))
    failed = services.image_create(upload=images.upload(images.gif_animated()))
    services.image_mark_failed(image_id=failed.pk, error="broken <b>file</b>")
    response = client.get("/thumbnails/")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/html")
    html = response.content.decode()
    assert 'id="upload-form"' in html
    assert 'enctype="multipart/form-data"' in html
    assert 'name="csrfmiddlewaretoken"' in html
    assert f'data-id="{pending.pk}" data-status="pending"' in html
    assert f'data-id="{done.pk}" data-status="done"' in html
    assert f"/media/{done.thumbnails.get(size=128).file.name}" in html
    assert "broken &lt;b&gt;file&lt;/b&gt;" in html
    assert html.index(f'data-id="{failed.pk}"') < html.index(f'data-id="{done.pk}"')  # newest first


def test_empty_page(client):
    html = client.get("/thumbnails/").content.decode()
    assert "Nothing uploaded yet." in html
