"""Throw-away TLS certificates for the brokers the TLS tests start (trustme, never a real CA)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class Certificates:
    ca: Path  # the CA a client must trust
    cert: Path  # the server's certificate, for the names it was issued for
    key: Path  # its private key

    def other_ca(self) -> Path:
        """A CA that signed nothing the server has: trusting only it must fail the handshake."""
        trustme = pytest.importorskip("trustme")
        path = self.ca.with_name("other-ca.pem")
        trustme.CA().cert_pem.write_to_path(str(path))
        return path


def issue_certificates(directory: Path, names: tuple[str, ...] = ("127.0.0.1", "localhost")) -> Certificates:
    """A fresh CA and a server certificate it signed for `names`, written as PEM files into
    `directory`; the calling test is skipped when trustme is not installed."""
    trustme = pytest.importorskip("trustme")
    ca = trustme.CA()
    server = ca.issue_cert(*names)
    certificates = Certificates(ca=directory / "ca.pem", cert=directory / "cert.pem", key=directory / "key.pem")
    ca.cert_pem.write_to_path(str(certificates.ca))
    server.cert_chain_pems[0].write_to_path(str(certificates.cert))
    server.private_key_pem.write_to_path(str(certificates.key))
    return certificates
