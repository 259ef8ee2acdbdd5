"""The site's own pages: the front page, and the admin's name."""

from __future__ import annotations

import re

import pytest

pytestmark = pytest.mark.django_db


def test_the_front_page_says_what_this_is_and_links_everywhere_a_newcomer_goes(client):
    response = client.get("/")
    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/html")
    html = response.content.decode()
    assert "<h1>jobsite</h1>" in html
    links = set(re.findall(r'href="([^"]+)"', html))
    assert {"/thumbnails/", "/admin/", "/admin/jobs/dashboard/", "/admin/jobs/deadletter/", "#api"} <= links
    assert 'id="api"' in html
    for endpoint in ("POST /api/thumbnails/", "POST /api/emails/", "GET /api/jobs/health/", "GET /healthz, /readyz"):
        assert endpoint in html


def test_every_endpoint_the_front_page_lists_exists(client):
    from django.urls import Resolver404, resolve

    from config.views import ENDPOINTS

    for endpoint, _who, _what in ENDPOINTS:
        for path in endpoint.split(" ", 1)[1].split(", "):
            concrete = path.replace("<id>", "1")
            try:
                resolve(concrete)
            except Resolver404:
                pytest.fail(f"the front page lists {path}, which does not exist")


def test_the_front_page_takes_get_and_head_only(client):
    assert client.post("/").status_code == 405
    assert client.head("/").status_code == 200  # uptime checks that send HEAD


def test_the_admin_carries_the_sites_name(admin_client):
    html = admin_client.get("/admin/").content.decode()
    assert "jobsite administration" in html
    assert "Django administration" not in html
    assert 'href="/"' in html  # "View site" leads to the front page, which exists


def test_the_favicon_is_an_icon_not_a_404(client):
    import io

    from PIL import Image

    response = client.get("/favicon.ico")
    assert response.status_code == 200
    assert response["Content-Type"] == "image/x-icon"
    assert "max-age=86400" in response["Cache-Control"]
    with Image.open(io.BytesIO(response.content)) as icon:
        assert (icon.format, icon.size) == ("ICO", (32, 32))
    assert client.post("/favicon.ico").status_code == 405
