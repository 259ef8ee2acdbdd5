"""Thumbnails end to end: uploads through the API, a real worker, a real Redis."""

from __future__ import annotations

import os

import pytest
from django.core.files.storage import default_storage

from jobs.models import DeadLetter
from tests.integration.conftest import wait_for as _wait_for
from tests.thumbnails import images
from thumbnails.exceptions import CorruptImage
from thumbnails.models import Image, Thumbnail
from thumbnails.tasks import generate

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.integration]

API = "/api/thumbnails/"


@pytest.fixture
def worker(start_worker, settings):
    """A worker that sees this test's MEDIA_ROOT."""
    return start_worker(extra_env={"MEDIA_ROOT": str(settings.MEDIA_ROOT)}, queues="normal")


def upload(client, data: bytes, name: str) -> int:
    response = client.post(API, {"image": images.upload(data, name)})
    assert response.status_code == 202, response.content
    return response.json()["id"]


def finished(client, image_id: int) -> dict | None:
    body = client.get(f"{API}{image_id}/").json()
    return body if body["status"] in ("done", "failed") else None


def thumbnail_pixels(body: dict, size: int):
    thumb = next(t for t in body["thumbnails"] if t["size"] == size)
    name = thumb["url"].split("/media/", 1)[1]
    image = images.open_bytes(default_storage.open(name).read())
    assert image.size == (thumb["width"], thumb["height"])
    return thumb, image


def test_every_kind_of_image_gets_correct_thumbnails(worker, client):
    uploads = {
        "jpeg": upload(client, images.jpeg((1200, 800)), "a.jpg"),
        "png_alpha": upload(client, images.png_alpha((900, 600)), "b.png"),
        "webp": upload(client, images.webp((1000, 600)), "c.webp"),
        "cmyk": upload(client, images.jpeg_cmyk((1000, 700)), "d.jpg"),
        "rotated": upload(client, images.jpeg_rotated((1200, 800), orientation=6), "e.jpg"),
    }
    bodies = {
        kind: wait_for(lambda image_id=image_id: finished(client, image_id)) for kind, image_id in uploads.items()
    }
    assert {kind: body["status"] for kind, body in bodies.items()} == dict.fromkeys(uploads, "done")
    dims = {kind: [(t["size"], t["width"], t["height"]) for t in body["thumbnails"]] for kind, body in bodies.items()}
    assert dims == {
        "jpeg": [(128, 128, 85), (256, 256, 171), (512, 512, 341)],
        "png_alpha": [(128, 128, 85), (256, 256, 171), (512, 512, 341)],
        "webp": [(128, 128, 77), (256, 256, 154), (512, 512, 307)],
        "cmyk": [(128, 128, 90), (256, 256, 179), (512, 512, 358)],
        "rotated": [(128, 85, 128), (256, 171, 256), (512, 341, 512)],
    }

    _, jpeg = thumbnail_pixels(bodies["jpeg"], 256)
    assert images.close_to(jpeg.getpixel((128, 5)), images.RED)
    assert images.close_to(jpeg.getpixel((128, 165)), images.BLUE)

    thumb, png = thumbnail_pixels(bodies["png_alpha"], 256)
    assert thumb["url"].endswith(".png")
    assert png.mode == "RGBA"
    assert png.getpixel((128, 5))[3] == 255
    assert png.getpixel((128, 165))[3] == 0

    _, cmyk = thumbnail_pixels(bodies["cmyk"], 256)
    assert cmyk.mode == "RGB"
    assert images.close_to(cmyk.getpixel((128, 5)), (255, 0, 0), tolerance=60)

    _, rotated = thumbnail_pixels(bodies["rotated"], 256)
    assert images.close_to(rotated.getpixel((165, 128)), images.RED)  # the stored top is now on the right
    assert images.close_to(rotated.getpixel((5, 128)), images.BLUE)
    assert dict(rotated.getexif()) == {}

    assert Thumbnail.objects.count() == 15


def test_a_truncated_upload_fails_with_a_message_for_its_user_and_pages_nobody(worker, client):
    """The uploader's broken file is theirs to fix: the image says so in words, the job is counted
    as a user error, and no dead letter (which alerts the operator) is written."""
    image_id = upload(client, images.truncated_jpeg(), "broken.jpg")
    body = wait_for(lambda: finished(client, image_id))
    assert body["status"] == "failed"
    assert body["error"] == CorruptImage.USER_MESSAGE
    assert body["thumbnails"] == []
    wait_for(lambda: '"job.user_error"' in worker.log())
    assert not DeadLetter.objects.exists()
    # Nothing at ERROR (alerting on ERROR would page someone): Celery's own line says "expected".
    wait_for(lambda: "raised expected: CorruptImage" in worker.log())
    assert not [line for line in worker.log().splitlines() if '"level": "ERROR"' in line]


def test_running_the_task_again_is_harmless(worker, client, settings):
    image_id = upload(client, images.jpeg((1600, 1200)), "a.jpg")
    wait_for(lambda: finished(client, image_id))
    before = {t.size: (t.pk, t.file.name) for t in Thumbnail.objects.filter(image_id=image_id)}
    contents = {name: default_storage.open(name).read() for _, name in before.values()}
    files = sorted(os.listdir(settings.MEDIA_ROOT / "thumbnails" / str(image_id)))

    # Redelivered twice at once (two worker processes) and once more afterwards.
    results = [generate.delay(image_id), generate.delay(image_id)]
    for result in results:
        result.get(timeout=60)
    generate.delay(image_id).get(timeout=60)

    after = {t.size: (t.pk, t.file.name) for t in Thumbnail.objects.filter(image_id=image_id)}
    assert after == before
    assert Thumbnail.objects.filter(image_id=image_id).count() == 3
    assert sorted(os.listdir(settings.MEDIA_ROOT / "thumbnails" / str(image_id))) == files
    assert files == sorted(os.path.basename(name) for _, name in after.values())
    assert {name: default_storage.open(name).read() for name in contents} == contents
    assert Image.objects.get(pk=image_id).status == Image.Status.DONE
    assert not DeadLetter.objects.exists()


def test_a_worker_killed_mid_write_leaves_nothing_half_done(start_worker, client, settings, redis_client):
    """The first attempt writes half of a thumbnail and its process dies; the redelivered
    message (late ack, reject on worker lost) finishes the job with whole files and one row
    per size."""
    from PIL import Image as PILImage

    from tests.integration import tasks

    image_id = upload(client, images.jpeg((1600, 1200)), "a.jpg")
    for queued in redis_client.keys("normal*"):  # the upload's own task: this test sends its own
        redis_client.delete(queued)
    key = f"k-{image_id}-{os.getpid()}"
    tasks.generate_dies_midway.apply_async((key, image_id), queue="normal")
    start_worker(extra_env={"MEDIA_ROOT": str(settings.MEDIA_ROOT)}, queues="normal", concurrency=1)

    wait_for(lambda: Image.objects.get(pk=image_id).status == Image.Status.DONE, timeout=60)
    assert int(redis_client.get(f"{key}:attempt")) == 2  # died once, redelivered once
    rows = list(Thumbnail.objects.filter(image_id=image_id))
    assert sorted(row.size for row in rows) == sorted(settings.THUMBNAIL_SIZES)
    folder = settings.MEDIA_ROOT / "thumbnails" / str(image_id)
    assert sorted(os.listdir(folder)) == sorted(os.path.basename(row.file.name) for row in rows)
    for row in rows:
        with default_storage.open(row.file.name) as handle, PILImage.open(handle) as picture:
            picture.load()  # a half-written file would fail here
            assert max(picture.size) == row.size
    assert not DeadLetter.objects.exists()


def test_a_task_for_a_deleted_image_fails_for_good_with_the_reason(worker, client):
    image_id = upload(client, images.jpeg(), "a.jpg")
    wait_for(lambda: finished(client, image_id))
    Image.objects.filter(pk=image_id).delete()
    result = generate.delay(image_id)
    with pytest.raises(Exception, match="does not exist"):
        result.get(timeout=60)
    row = wait_for(lambda: DeadLetter.objects.filter(task_id=result.id).first())
    assert row.exception_message == f"image {image_id} does not exist"
    assert row.failure_count == 1


def test_refusals_queue_nothing(client, settings, redis_client):
    settings.MAX_IMAGE_PIXELS = 100_000
    settings.MAX_UPLOAD_BYTES = 200_000
    refusals = [
        (b"plain text", "a.jpg", 400),
        (images.bmp(), "a.png", 400),
        (images.jpeg((400, 300)), "a.jpg", 400),  # 120 000 pixels
        (os.urandom(300_000), "a.jpg", 413),
        (os.urandom(210_000), "a.jpg", 413),
    ]
    for data, name, code in refusals:
        response = client.post(API, {"image": images.upload(data, name)})
        assert response.status_code == code, (name, response.content)
        assert "error" in response.json()
    assert redis_client.llen("normal") == 0
    assert not Image.objects.exists()
    assert not [f for _, _, files in os.walk(settings.MEDIA_ROOT) for f in files]


def wait_for(predicate, timeout=60.0, interval=0.1):
    return _wait_for(predicate, timeout=timeout, interval=interval)
