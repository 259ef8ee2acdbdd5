"""The images admin through the test client, as staff use it."""

from __future__ import annotations

import pytest

from tests.thumbnails import images
from thumbnails import services
from thumbnails.models import Image

pytestmark = pytest.mark.django_db

CHANGELIST = "/admin/thumbnails/image/"


@pytest.fixture
def staff_client(client, django_user_model):
    user = django_user_model.objects.create_superuser("admin", "admin@example.com", "password")
    client.force_login(user)
    return client


@pytest.fixture
def done_image():
    image = services.image_create(upload=images.upload(images.jpeg()), request_id="rid-admin")
    services.thumbnails_generate(image=image)
    return image


def messages_of(response) -> list[str]:
    return [str(m) for m in response.context["messages"]]


def test_changelist_shows_previews_filters_and_search(staff_client, done_image):
    other = services.image_create(upload=images.upload(images.webp()))
    html = staff_client.get(CHANGELIST).content.decode()
    assert f"/media/{done_image.thumbnails.get(size=128).file.name}" in html
    assert "By status" in html
    filtered = staff_client.get(CHANGELIST, {"status__exact": "pending"}).context["cl"].result_list
    assert [i.pk for i in filtered] == [other.pk]
    found = staff_client.get(CHANGELIST, {"q": "rid-admin"}).context["cl"].result_list
    assert [i.pk for i in found] == [done_image.pk]


def test_change_page_shows_each_thumbnail(staff_client, done_image):
    response = staff_client.get(f"{CHANGELIST}{done_image.pk}/change/")
    assert response.status_code == 200
    html = response.content.decode()
    for thumb in done_image.thumbnails.all():
        assert f"/media/{thumb.file.name}" in html


def test_no_add(staff_client):
    assert staff_client.get(f"{CHANGELIST}add/").status_code == 403


def test_regenerate_action_queues_and_reports(staff_client, done_image, django_capture_on_commit_callbacks):
    other = services.image_create(upload=images.upload(images.png_alpha()))
    services.image_mark_failed(image_id=other.pk, error="boom")
    with django_capture_on_commit_callbacks() as callbacks:
        response = staff_client.post(
            CHANGELIST, {"action": "regenerate", "_selected_action": [done_image.pk, other.pk]}, follow=True
        )
    assert response.status_code == 200
    assert "Queued thumbnails of 2 images again." in messages_of(response)
    assert len(callbacks) == 2
    assert set(Image.objects.values_list("status", flat=True)) == {"pending"}

    with django_capture_on_commit_callbacks() as callbacks:
        response = staff_client.post(CHANGELIST, {"action": "regenerate", "_selected_action": [other.pk]}, follow=True)
    assert "Queued thumbnails of 1 image again." in messages_of(response)
    assert len(callbacks) == 1


def test_deleting_in_the_admin_removes_files(staff_client, done_image, settings, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=True):
        response = staff_client.post(
            CHANGELIST, {"action": "delete_selected", "_selected_action": [done_image.pk], "post": "yes"}
        )
    assert response.status_code == 302
    assert not Image.objects.exists()
    assert not list(settings.MEDIA_ROOT.rglob("*.jpg"))


def test_an_images_page_lists_the_dead_letters_of_its_thumbnails(staff_client, done_image):
    from jobs.models import DeadLetter

    dead = DeadLetter.objects.create(
        task_name="thumbnails.generate", task_id="t-1", args=[done_image.pk], reason=DeadLetter.Reason.PERMANENT_ERROR
    )
    page = staff_client.get(f"{CHANGELIST}{done_image.pk}/change/").content.decode()
    assert f'href="/admin/jobs/deadletter/{dead.pk}/change/"' in page
    back = staff_client.get(f"/admin/jobs/deadletter/{dead.pk}/change/").content.decode()
    assert f'href="/admin/thumbnails/image/{done_image.pk}/change/"' in back
