"""Services and the task body, called directly (no worker)."""

from __future__ import annotations

import base64
import json
import os
import re

import pytest
from django.core.files.storage import default_storage

from jobs.exceptions import InvalidTaskArguments
from jobs.models import DeadLetter
from tests.thumbnails import images
from thumbnails import processing, services
from thumbnails.exceptions import CorruptImage, OriginalMissing, StorageUnavailable, UploadTooLarge
from thumbnails.models import Image, Thumbnail
from thumbnails.tasks import generate

pytestmark = pytest.mark.django_db


def create(data: bytes, name: str = "photo.jpg", request_id: str | None = "rid-1", capture=None) -> Image:
    return services.image_create(upload=images.upload(data, name), request_id=request_id)


def media_files(settings) -> list[str]:
    root = settings.MEDIA_ROOT
    return sorted(os.path.relpath(os.path.join(d, f), root) for d, _, files in os.walk(root) for f in files)


def test_image_create_stores_under_generated_name_and_queues_on_commit(settings, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks() as callbacks:
        image = create(images.png_alpha((300, 200)), name="../../etc/passwd.jpg")
    assert len(callbacks) == 1
    image.refresh_from_db()
    assert (image.format, image.width, image.height, image.status) == ("PNG", 300, 200, Image.Status.PENDING)
    assert image.request_id == "rid-1"
    assert image.original.name.startswith("originals/")
    assert image.original.name.endswith(".png")  # from the content, not the client's ".jpg"
    assert "passwd" not in image.original.name
    assert ".." not in image.original.name
    assert media_files(settings) == [image.original.name]
    assert default_storage.open(image.original.name).read() == images.png_alpha((300, 200))


def test_the_queued_callback_sends_the_task_with_the_id(django_capture_on_commit_callbacks, redis_client):
    with django_capture_on_commit_callbacks(execute=True):
        image = create(images.jpeg())
    raw = redis_client.lindex("normal", 0)
    assert raw is not None
    message = json.loads(raw)
    assert message["headers"]["task"] == "thumbnails.generate"
    args, kwargs, _embed = json.loads(base64.b64decode(message["body"]))
    assert (args, kwargs) == ([image.pk], {})


@pytest.mark.parametrize(
    ("data", "error"),
    [
        (b"hello, I am text", processing.NotAnImage),
        (images.bmp(), processing.UnsupportedFormat),
    ],
)
def test_image_create_refuses_bad_content_and_stores_nothing(settings, django_capture_on_commit_callbacks, data, error):
    with django_capture_on_commit_callbacks() as callbacks, pytest.raises(error):
        create(data)
    assert callbacks == []
    assert not Image.objects.exists()
    assert media_files(settings) == []


def test_image_create_refuses_too_many_pixels(settings, django_capture_on_commit_callbacks):
    settings.MAX_IMAGE_PIXELS = 100 * 100
    with django_capture_on_commit_callbacks() as callbacks, pytest.raises(processing.TooManyPixels):
        create(images.jpeg((101, 100)))
    assert callbacks == []
    assert media_files(settings) == []


def test_image_create_refuses_too_large(settings, django_capture_on_commit_callbacks):
    data = images.jpeg()
    settings.MAX_UPLOAD_BYTES = len(data) - 1
    with django_capture_on_commit_callbacks() as callbacks, pytest.raises(UploadTooLarge):
        create(data)
    assert callbacks == []
    assert media_files(settings) == []


def test_generate_makes_every_size(settings):
    image = create(images.jpeg((1200, 800)))
    rows = services.thumbnails_generate(image=image)
    image.refresh_from_db()
    assert image.status == Image.Status.DONE
    assert image.error == ""
    assert [(r.size, r.width, r.height) for r in rows] == [(128, 128, 85), (256, 256, 171), (512, 512, 341)]
    for row in rows:
        assert re.fullmatch(rf"thumbnails/{image.pk}/{row.size}-[0-9a-f]{{16}}\.jpg", row.file.name)
    for row in rows:
        assert images.open_bytes(default_storage.open(row.file.name).read()).size == (row.width, row.height)


def test_generate_twice_gives_the_same_files_and_no_duplicate_rows(settings):
    image = create(images.png_alpha())
    first = {r.size: (r.pk, r.file.name) for r in services.thumbnails_generate(image=image)}
    contents = {name: default_storage.open(name).read() for _, name in first.values()}
    files = media_files(settings)

    generate(image.pk)  # the task again, as after a redelivery

    second = {r.size: (r.pk, r.file.name) for r in Thumbnail.objects.filter(image=image)}
    assert second == first
    assert Thumbnail.objects.count() == 3
    assert media_files(settings) == files
    assert {name: default_storage.open(name).read() for name in contents} == contents
    assert all(name.endswith(".png") for _, name in first.values())


def test_generate_replaces_leftovers_of_a_crashed_attempt(settings):
    image = create(images.jpeg())
    made = {t.size: t for t in processing.make_thumbnails(images.jpeg(), [128, 256, 512], max_pixels=10**8)}
    half_written = services.thumbnail_name(image_id=image.pk, size=256, extension="jpg", data=made[256].data)
    default_storage.save(half_written, images.upload(b"\xff\xd8 half a file"))
    services.thumbnails_generate(image=image)
    row = image.thumbnails.get(size=256)
    assert row.file.name == half_written
    assert images.open_bytes(default_storage.open(half_written).read()).size == (256, 171)
    assert len(media_files(settings)) == 4


def test_regenerate_with_new_sizes_drops_stale_rows_and_files(settings, django_capture_on_commit_callbacks):
    image = create(images.jpeg())
    services.thumbnails_generate(image=image)
    settings.THUMBNAIL_SIZES = [64, 256]
    with django_capture_on_commit_callbacks(execute=True):
        services.thumbnails_generate(image=image)
    assert sorted(image.thumbnails.values_list("size", flat=True)) == [64, 256]
    expected = [image.original.name, *(row.file.name for row in image.thumbnails.all())]
    assert media_files(settings) == sorted(expected)
    assert len(expected) == 3


def test_deleting_an_image_deletes_its_files(settings, django_capture_on_commit_callbacks):
    image = create(images.jpeg())
    services.thumbnails_generate(image=image)
    assert len(media_files(settings)) == 4
    with django_capture_on_commit_callbacks(execute=True):
        services.image_delete(image=image)
    assert media_files(settings) == []
    assert not Thumbnail.objects.exists()


def test_bulk_delete_deletes_files_too(settings, django_capture_on_commit_callbacks):
    for _ in range(2):
        services.thumbnails_generate(image=create(images.jpeg((300, 200))))
    with django_capture_on_commit_callbacks(execute=True):
        Image.objects.all().delete()
    assert media_files(settings) == []


def test_images_regenerate_resets_status_and_queues_each(django_capture_on_commit_callbacks):
    one, two = create(images.jpeg()), create(images.webp())
    Image.objects.update(status=Image.Status.FAILED, error="boom")
    with django_capture_on_commit_callbacks() as callbacks:
        count = services.images_regenerate(images=Image.objects.all())
    assert count == 2
    assert len(callbacks) == 2
    assert set(Image.objects.values_list("status", "error")) == {(Image.Status.PENDING, "")}
    assert {one.pk, two.pk} == set(Image.objects.values_list("pk", flat=True))


def _run_as_a_worker_would(image_id: int):
    """Runs the task through Celery's tracer (`apply`): the failure path runs, not only the body."""
    return generate.apply(args=[image_id], task_id=f"t-{image_id}")


def test_a_corrupt_upload_fails_the_image_for_its_user_without_a_dead_letter():
    """The uploader's file, not the system: the image says so in words, nobody is paged."""
    image = create(images.truncated_jpeg())
    result = _run_as_a_worker_would(image.pk)
    assert isinstance(result.result, CorruptImage)
    assert not DeadLetter.objects.exists()
    image.refresh_from_db()
    assert image.status == Image.Status.FAILED
    assert image.error == CorruptImage.USER_MESSAGE  # not "CorruptImage: ... (1 bytes not processed)"
    assert generate.classify(CorruptImage("x")) == "user"
    assert not image.thumbnails.exists()


def test_task_marks_failed_when_the_original_is_missing():
    image = create(images.jpeg())
    default_storage.delete(image.original.name)
    assert isinstance(_run_as_a_worker_would(image.pk).result, OriginalMissing)
    image.refresh_from_db()
    assert image.status == Image.Status.FAILED
    assert "missing" in image.error


def test_storage_timeout_is_transient_and_does_not_fail_the_image(settings):
    image = create(images.jpeg())
    settings.STORAGES = {**settings.STORAGES, "default": {"BACKEND": "tests.thumbnails.storage.TimingOutStorage"}}
    with pytest.raises(StorageUnavailable) as caught:
        generate(image.pk)
    assert generate.classify(caught.value) == "transient"
    image.refresh_from_db()
    assert image.status == Image.Status.PROCESSING  # retried later, not failed


def test_task_fails_for_good_when_the_image_is_gone():
    with pytest.raises(InvalidTaskArguments, match="image 987654 does not exist") as info:
        generate(987654)
    assert generate.classify(info.value) == "permanent"


@pytest.mark.parametrize("bad", ["12", 1.5, None, True, [1]])
def test_task_refuses_arguments_that_are_not_an_id(bad):
    with pytest.raises(InvalidTaskArguments):
        generate(bad)


def test_a_remote_backends_own_timeout_is_transient_too(settings):
    image = create(images.jpeg())
    settings.STORAGES = {**settings.STORAGES, "default": {"BACKEND": "tests.thumbnails.storage.RemoteTimingOutStorage"}}
    with pytest.raises(StorageUnavailable) as caught:
        generate(image.pk)
    assert "Read timeout" in str(caught.value)
    assert generate.classify(caught.value) == "transient"
