"""The thumbnail pipeline on S3, configured the way an operator does it: `STORAGE_BACKEND=s3`.

The bucket lives in moto's S3 server, started here in a thread on a free port: django-storages
and boto3 talk real HTTP to it (nothing in this process is patched), and the URLs the API hands
out are fetched over HTTP too.
"""

from __future__ import annotations

import importlib
import logging
import sys
import urllib.request
import uuid

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError
from django.core.files.storage import default_storage

from tests.thumbnails import images
from thumbnails import services
from thumbnails.exceptions import OriginalMissing, StorageUnavailable
from thumbnails.models import Image, Thumbnail
from thumbnails.tasks import generate

pytestmark = pytest.mark.django_db

API = "/api/thumbnails/"
FAKE_KEYS = {"AWS_ACCESS_KEY_ID": "testing-key-id", "AWS_SECRET_ACCESS_KEY": "testing-secret"}


@pytest.fixture(scope="module")
def s3_endpoint():
    """moto's S3 server on a free port of 127.0.0.1, for this module."""
    from moto.core.models import botocore_stubber
    from moto.server import ThreadedMotoServer

    # moto's in-process interception stays off: every request below crosses a socket.
    assert not getattr(botocore_stubber, "enabled", False)
    werkzeug_logger = logging.getLogger("werkzeug")
    level = werkzeug_logger.level
    werkzeug_logger.setLevel(logging.WARNING)  # one line per request otherwise
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()
    werkzeug_logger.setLevel(level)


@pytest.fixture
def aws_environment(monkeypatch, tmp_path):
    """Fake credentials where boto3 looks for them, and nothing of the developer's own AWS setup."""
    for name in (
        "AWS_PROFILE",
        "AWS_DEFAULT_PROFILE",
        "AWS_SESSION_TOKEN",
        "AWS_SECURITY_TOKEN",
        "AWS_S3_ACCESS_KEY_ID",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in FAKE_KEYS.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def storages_from_environment(monkeypatch, **environ: str) -> dict:
    """STORAGES as config/settings/base.py builds it from `environ` (imported afresh and put
    back afterwards, so the settings this process runs with stay as they are)."""
    for name, value in environ.items():
        monkeypatch.setenv(name, value)
    running = sys.modules.pop("config.settings.base", None)  # another test may have unloaded it
    try:
        return importlib.import_module("config.settings.base").STORAGES
    finally:
        if running is not None:
            sys.modules["config.settings.base"] = running
            sys.modules["config.settings"].base = running


class Bucket:
    """A bucket of the S3 stub, looked at with a plain boto3 client (not through Django)."""

    def __init__(self, endpoint: str) -> None:
        self.name = f"jobsite-test-{uuid.uuid4().hex[:12]}"
        self.client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
        self.client.create_bucket(Bucket=self.name)

    def objects(self) -> dict[str, dict]:
        """Key -> {"ETag", "Size"} of every object in the bucket."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.name)
        return {o["Key"]: {"ETag": o["ETag"], "Size": o["Size"]} for page in pages for o in page.get("Contents", [])}

    def get(self, key: str) -> dict:
        return self.client.get_object(Bucket=self.name, Key=key)

    def remove(self) -> None:
        for key in self.objects():
            self.client.delete_object(Bucket=self.name, Key=key)
        self.client.delete_bucket(Bucket=self.name)


@pytest.fixture
def bucket(s3_endpoint, aws_environment, monkeypatch, settings):
    """A fresh bucket, and Django's default storage pointed at it through the environment alone."""
    bucket = Bucket(s3_endpoint)
    storages = storages_from_environment(
        monkeypatch,
        STORAGE_BACKEND="s3",
        AWS_STORAGE_BUCKET_NAME=bucket.name,
        AWS_S3_REGION_NAME="us-east-1",
        AWS_S3_ENDPOINT_URL=s3_endpoint,
    )
    assert storages["default"]["BACKEND"] == "storages.backends.s3.S3Storage"
    settings.STORAGES = {**settings.STORAGES, "default": storages["default"]}
    yield bucket
    bucket.remove()


def s3_url_prefix(bucket: Bucket) -> str:
    return f"{bucket.client.meta.endpoint_url}/{bucket.name}"


def fetch(url: str) -> bytes:
    assert url.startswith("http://127.0.0.1:"), url  # the stub, never a real AWS endpoint
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - http URL checked above
        return response.read()


def test_default_storage_is_the_bucket(bucket):
    from storages.backends.s3 import S3Storage

    name = default_storage.save("probe/hello.txt", images.upload(b"hello", "hello.txt", "text/plain"))
    assert isinstance(default_storage._wrapped, S3Storage)
    assert name == "probe/hello.txt"
    assert [(key, meta["Size"]) for key, meta in bucket.objects().items()] == [(name, 5)]
    assert default_storage.open(name).read() == b"hello"
    assert bucket.get(name)["CacheControl"] == "max-age=31536000, immutable"
    default_storage.delete(name)
    assert bucket.objects() == {}


def test_upload_generate_redeliver_and_delete_on_s3(client, bucket, django_capture_on_commit_callbacks):
    # Upload through the API: the original goes to the bucket, the task waits for the commit.
    with django_capture_on_commit_callbacks() as callbacks:
        response = client.post(API, {"image": images.upload(images.jpeg((1200, 800)))})
    assert response.status_code == 202
    assert len(callbacks) == 1
    image = Image.objects.get(pk=response.json()["id"])
    assert list(bucket.objects()) == [image.original.name]
    assert image.original.name.startswith("originals/")
    assert bucket.get(image.original.name)["Body"].read() == images.jpeg((1200, 800))

    # The worker's task body, as a worker runs it.
    generate(image.pk)
    image.refresh_from_db()
    assert image.status == Image.Status.DONE
    rows = {t.size: t for t in image.thumbnails.all()}
    assert {size: (t.width, t.height) for size, t in rows.items()} == {128: (128, 85), 256: (256, 171), 512: (512, 341)}
    objects = bucket.objects()
    assert set(objects) == {image.original.name, *(t.file.name for t in rows.values())}
    for thumb in rows.values():
        stored = bucket.get(thumb.file.name)
        assert stored["ContentType"] == "image/jpeg"
        assert images.open_bytes(stored["Body"].read()).size == (thumb.width, thumb.height)

    # The API hands out the bucket's (signed) URLs, and they serve the thumbnails.
    body = client.get(f"{API}{image.pk}/").json()
    assert body["status"] == "done"
    for thumb in body["thumbnails"]:
        assert f"/{bucket.name}/thumbnails/{image.pk}/{thumb['size']}-" in thumb["url"]
        assert "Signature=" in thumb["url"]
        assert images.open_bytes(fetch(thumb["url"])).size == (thumb["width"], thumb["height"])
    assert fetch(body["original"]) == images.jpeg((1200, 800))
    page = client.get("/thumbnails/").content.decode()
    assert f'src="{s3_url_prefix(bucket)}/thumbnails/{image.pk}/128-' in page

    # A redelivery: same objects (same keys, same bytes), same rows, no duplicates.
    generate(image.pk)
    assert bucket.objects() == objects
    assert {t.size: (t.pk, t.file.name) for t in Thumbnail.objects.filter(image=image)} == {
        size: (t.pk, t.file.name) for size, t in rows.items()
    }
    assert Thumbnail.objects.count() == 3

    # Deleting the image deletes every object it had, once the deletion commits.
    with django_capture_on_commit_callbacks(execute=True):
        services.image_delete(image=image)
    assert bucket.objects() == {}
    assert not Thumbnail.objects.exists()


def test_leftover_of_a_crashed_attempt_is_replaced_on_s3(bucket, settings):
    image = services.image_create(upload=images.upload(images.png_alpha((600, 400))))
    generate(image.pk)
    first = bucket.objects()
    name = image.thumbnails.get(size=256).file.name
    Thumbnail.objects.filter(image=image).delete()  # the rows never committed, as after a crash ...
    bucket.client.put_object(Bucket=bucket.name, Key=name, Body=b"not the thumbnail")  # ... and a stray object
    generate(image.pk)
    assert image.thumbnails.get(size=256).file.name == name
    assert images.open_bytes(bucket.get(name)["Body"].read()).size == (256, 171)
    assert bucket.objects() == first


def test_without_overwrite_the_pipeline_still_writes_exact_names(bucket, settings):
    """An operator who sets file_overwrite=False gets the same names: the service removes the
    old object first and drops any suffixed copy django-storages would make."""
    default = settings.STORAGES["default"]
    settings.STORAGES = {
        **settings.STORAGES,
        "default": {**default, "OPTIONS": {**default["OPTIONS"], "file_overwrite": False}},
    }
    image = services.image_create(upload=images.upload(images.webp((500, 300))))
    generate(image.pk)
    Thumbnail.objects.filter(image=image).delete()
    generate(image.pk)
    keys = set(bucket.objects())
    assert keys == {image.original.name, *image.thumbnails.values_list("file", flat=True)}
    assert len(keys) == 4


def unreachable(settings, endpoint: str) -> None:
    """Points the default storage at `endpoint` with one attempt per request (botocore would
    otherwise retry with backoff first)."""
    default = settings.STORAGES["default"]
    config = Config(connect_timeout=2, read_timeout=2, retries={"mode": "standard", "max_attempts": 1})
    options = {**default["OPTIONS"], "endpoint_url": endpoint, "client_config": config}
    settings.STORAGES = {**settings.STORAGES, "default": {**default, "OPTIONS": options}}


def closed_port_url() -> str:
    """An endpoint that refuses connections: port 1, which nothing here listens on (a port found
    free a moment ago may be taken by a process of a test running beside this one)."""
    return "http://127.0.0.1:1"


def test_upload_while_s3_is_unreachable_is_503_and_stores_nothing(
    client, bucket, settings, django_capture_on_commit_callbacks
):
    unreachable(settings, closed_port_url())
    with django_capture_on_commit_callbacks() as callbacks:
        response = client.post(API, {"image": images.upload(images.jpeg((300, 200)))})
    assert response.status_code == 503
    assert response.json()["code"] == "storage_unavailable"
    assert response["Retry-After"] == "30"
    assert callbacks == []
    assert not Image.objects.exists()


def test_task_while_s3_is_unreachable_is_retried_not_failed(bucket, settings):
    image = services.image_create(upload=images.upload(images.jpeg((300, 200))))
    unreachable(settings, closed_port_url())
    with pytest.raises(StorageUnavailable) as caught:
        generate(image.pk)
    assert generate.classify(caught.value) == "transient"
    image.refresh_from_db()
    assert image.status == Image.Status.PROCESSING


@pytest.mark.parametrize(
    ("code", "status", "transient"),
    [
        ("SlowDown", 503, True),
        ("InternalError", 500, True),
        ("RequestTimeout", 400, True),
        ("AccessDenied", 403, False),
        ("NoSuchBucket", 404, False),
    ],
)
def test_s3_error_replies_are_sorted(code, status, transient):
    error = ClientError(
        {"Error": {"Code": code, "Message": "m"}, "ResponseMetadata": {"HTTPStatusCode": status}}, "PutObject"
    )
    assert services._storage_transient(error) is transient


def test_a_missing_bucket_is_not_retried(bucket, settings):
    """A configuration mistake fails loudly instead of being retried for hours."""
    image = services.image_create(upload=images.upload(images.jpeg((300, 200))))
    default = settings.STORAGES["default"]
    options = {**default["OPTIONS"], "bucket_name": "no-such-bucket-here"}
    settings.STORAGES = {**settings.STORAGES, "default": {**default, "OPTIONS": options}}
    result = generate.apply(args=[image.pk])  # through the tracer: the failure path runs
    assert isinstance(result.result, OriginalMissing)  # S3 answers 404 for an object of a missing bucket
    assert generate.classify(result.result) == "permanent"
    image.refresh_from_db()
    assert image.status == Image.Status.FAILED
