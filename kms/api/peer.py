"""Who is calling: the bearer token and, under mutual TLS, the client certificate.

With ``KMS_TLS_CLIENT_CA_FILE`` set, ``kms serve`` makes gunicorn require a client
certificate (``--cert-reqs 2 --ca-certs FILE``): a TLS handshake completes only with a
client whose certificate chains to one of those CAs and is within its validity period, so
an expired certificate, one from another CA, or none at all never reaches the app. The
certificate the handshake verified is read from the connection (gunicorn gives each
request its socket as ``environ["gunicorn.socket"]``): its subject common name (CN) names
the principal, which must exist with exactly that name; its role and grants apply as for
a token.

- verified certificate, no ``Authorization`` header: the CN's principal;
- verified certificate and a bearer token: both must name the same principal, else 401;
- no certificate (plain HTTP, TLS without client certificates): the bearer token alone.

Identity is never taken from a header: a TLS-terminating proxy in front of the KMS must
pass the TLS connection through (or the clients keep using tokens).
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Mapping
from typing import Any, cast

from kms.errors import Unauthenticated
from kms.services.model import Principal
from kms.services.principals import PrincipalService

log = logging.getLogger("kms.api")


def authenticate(
    principals: PrincipalService, environ: Mapping[str, Any], authorization: str | None
) -> Principal:
    """The caller's principal from its verified client certificate and/or its bearer token
    (rules above); Unauthenticated if they are missing, unknown or disagree."""
    name = certificate_name(environ)
    token = _bearer(authorization)
    if name is None:
        return principals.authenticate(token)
    try:
        principal = principals.by_certificate_name(name)
        if authorization is not None and principals.authenticate(token).id != principal.id:
            raise Unauthenticated(detail="token and client certificate name other principals")
    except Unauthenticated as e:
        log.warning("client certificate refused", extra={"principal": name, "detail": e.detail})
        raise
    return principal


def certificate_name(environ: Mapping[str, Any]) -> str | None:
    """The subject CN of the client certificate this connection's TLS handshake verified;
    None when there is none. Unauthenticated if it has no CN or several."""
    sock = environ.get("gunicorn.socket")
    if not isinstance(sock, ssl.SSLSocket):
        return None
    try:
        cert = sock.getpeercert()  # {} or None unless the handshake verified a certificate
    except (ValueError, OSError):
        return None
    if not cert:
        return None
    subject = cast("tuple[tuple[tuple[str, str], ...], ...]", cert.get("subject", ()))
    names = [value for rdn in subject for key, value in rdn if key == "commonName"]
    if len(names) != 1:
        log.warning("client certificate refused", extra={"detail": "not exactly one CN"})
        raise Unauthenticated(detail="client certificate without exactly one CN")
    return names[0]


def _bearer(authorization: str | None) -> str | None:
    scheme, _, token = (authorization or "").partition(" ")
    return token.strip() if scheme.lower() == "bearer" else None
