"""`amqps://` takes the same TLS options in the URL as `rediss://`, in the shape py-amqp needs."""

from __future__ import annotations

import importlib
import ssl
import sys

import pytest
from django.core.exceptions import ImproperlyConfigured

BASE = "config.settings.base"


@pytest.fixture
def broker_options(monkeypatch):
    """Imports the base settings afresh with a given CELERY_BROKER_URL and returns its broker
    transport options; the settings this process runs with stay as they were."""
    saved = sys.modules.get(BASE)

    def load(url: str) -> dict:
        monkeypatch.setenv("CELERY_BROKER_URL", url)
        sys.modules.pop(BASE, None)
        return importlib.import_module(BASE).CELERY_BROKER_TRANSPORT_OPTIONS

    yield load
    sys.modules.pop(BASE, None)
    if saved is not None:
        sys.modules[BASE] = saved


def test_amqps_verifies_against_the_system_cas_and_the_host_name_by_default(broker_options):
    options = broker_options("amqps://app:pw@rabbit.internal:5671//")
    assert options["ssl"] == {"cert_reqs": ssl.CERT_REQUIRED, "server_hostname": "rabbit.internal"}
    assert options["confirm_publish"] is True


def test_amqps_takes_the_rediss_url_options(broker_options):
    options = broker_options(
        "amqps://app:pw@rabbit.internal:5671//?ssl_cert_reqs=required&ssl_ca_certs=/etc/ca.pem"
        "&ssl_certfile=/etc/client.pem&ssl_keyfile=/etc/client.key"
    )
    assert options["ssl"] == {
        "cert_reqs": ssl.CERT_REQUIRED,
        "ca_certs": "/etc/ca.pem",
        "certfile": "/etc/client.pem",
        "keyfile": "/etc/client.key",
        "server_hostname": "rabbit.internal",
    }


def test_amqps_failover_urls_take_the_first_urls_options(broker_options):
    options = broker_options("amqps://app:pw@a.internal:5671//?ssl_ca_certs=/etc/ca.pem;amqps://app:pw@b.internal//")
    assert options["ssl"] == {
        "cert_reqs": ssl.CERT_REQUIRED,
        "ca_certs": "/etc/ca.pem",
        "server_hostname": "a.internal",
    }


def test_amqps_verification_is_turned_off_only_when_asked(broker_options):
    assert broker_options("amqps://app:pw@rabbit:5671//?ssl_cert_reqs=none")["ssl"] == {"cert_reqs": ssl.CERT_NONE}
    no_name = broker_options("amqps://app:pw@10.0.0.5:5671//?ssl_check_hostname=false")["ssl"]
    assert no_name == {"cert_reqs": ssl.CERT_REQUIRED}  # the chain is still verified


@pytest.mark.parametrize(
    ("query", "message"),
    [("ssl_cert_reqs=maybe", "ssl_cert_reqs must be"), ("ssl_ca_cert=/etc/ca.pem", "unknown TLS options")],
)
def test_amqps_refuses_tls_options_it_cannot_honour(broker_options, query, message):
    with pytest.raises(ImproperlyConfigured, match=message):
        broker_options(f"amqps://app:pw@rabbit:5671//?{query}")


def test_plain_amqp_and_redis_get_no_tls_options(broker_options):
    assert "ssl" not in broker_options("amqp://app:pw@rabbit:5672//")
    assert "ssl" not in broker_options("rediss://:pw@redis:6380/0?ssl_cert_reqs=required")
