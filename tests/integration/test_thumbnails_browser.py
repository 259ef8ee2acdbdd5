"""The /thumbnails/ page in a real headless Chromium (Debian's, driven by Playwright), against a
real server (pytest-django's live_server) and a real worker."""

from __future__ import annotations

import pytest

from tests.thumbnails import images

pytestmark = [
    pytest.mark.django_db(transaction=True),
    pytest.mark.integration,
]


def natural_widths(page) -> list[int]:
    return page.eval_on_selector_all(
        "#images li.image:first-child .thumbs img", "imgs => imgs.map(i => i.naturalWidth)"
    )


def test_upload_through_the_page_shows_thumbnails(browser, live_server, start_worker, settings):
    start_worker(extra_env={"MEDIA_ROOT": str(settings.MEDIA_ROOT)}, queues="normal")
    page = browser.new_page()
    page.set_default_timeout(60_000)
    page.goto(f"{live_server.url}/thumbnails/")
    assert page.inner_text("#empty") == "Nothing uploaded yet."

    page.set_input_files(
        "#image-input", files=[{"name": "holiday.jpg", "mimeType": "image/jpeg", "buffer": images.jpeg((1200, 800))}]
    )
    page.click("#upload-button")

    # The card appears at once, then the thumbnails once the worker is done, without a reload.
    page.wait_for_selector("#images li.image:first-child")
    page.wait_for_selector("#images li.image[data-status=done]")
    page.wait_for_function(
        "() => { const imgs = document.querySelectorAll('#images li.image:first-child .thumbs img');"
        " return imgs.length === 3 && [...imgs].every(i => i.complete && i.naturalWidth > 0); }"
    )
    assert natural_widths(page) == [128, 256, 512]
    assert page.inner_text("#images li.image:first-child .status") == "done"
    assert page.inner_text("#upload-error") == ""

    # After a reload the server renders the same card.
    page.reload()
    page.wait_for_function(
        "() => [...document.querySelectorAll('#images li.image:first-child .thumbs img')]"
        ".filter(i => i.complete && i.naturalWidth > 0).length === 3"
    )
    assert natural_widths(page) == [128, 256, 512]


def test_refused_upload_is_shown_to_the_person(browser, live_server, settings):
    page = browser.new_page()
    page.set_default_timeout(30_000)
    page.goto(f"{live_server.url}/thumbnails/")
    page.set_input_files("#image-input", files=[{"name": "notes.jpg", "mimeType": "image/jpeg", "buffer": b"text"}])
    page.click("#upload-button")
    page.wait_for_function("() => document.querySelector('#upload-error').textContent.length > 0")
    assert "not an image" in page.inner_text("#upload-error")
    assert page.query_selector_all("#images li.image") == []
