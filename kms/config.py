"""Settings read from ``KMS_*`` environment variables, validated once at start.

``KMS_DATA_DIR`` (what ``kms init`` creates) supplies defaults for the database, the
SoftHSM configuration and the PIN file; every other variable overrides one setting. The
reference of every setting is docs/configuration.md.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from hsm_config import profiles
from kms.services.change_model import GROUP_RE
from kms.services.rate_limits import (
    RatePolicy,
    parse_audit_budget,
    parse_blind_rewrap_failures,
    parse_rate_limits,
)

DEFAULT_MODULE = "/usr/lib/softhsm/libsofthsm2.so"
CONF_FILE = "kms.conf"


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names it."""


@dataclass(frozen=True)
class Settings:
    database_url: str
    pkcs11_module: str
    token_label: str
    pin: str = field(repr=False)
    softhsm2_conf: str | None = None
    root_key_label: str = "kms-root"
    audit_key_label: str = "kms-audit-signing"
    kek_cache_size: int = 1024
    # KMS_HSM_PROFILE, KMS_HSM_WRAP_MECHANISM, KMS_HSM_GCM_IV: the mechanism profile and
    # its overrides (hsm_config/profiles.py, hsm_config/README.md)
    hsm_profile: str = "softhsm"
    hsm_wrap_mechanism: str = "CKM_AES_KEY_WRAP_PAD"
    hsm_gcm_iv: str = "caller"
    hsm_unwrap_template: bool = True
    hsm_anchor_object: str = "data"
    max_body_bytes: int = 8 * 1024 * 1024
    sqlite_synchronous: str = "FULL"
    log_level: str = "INFO"
    auth_cache_seconds: int = 5
    lookup_cache_seconds: int = 60
    audit_checkpoint_records: int = 1000
    audit_checkpoint_seconds: int = 60
    audit_max_unsigned_records: int = 10000
    audit_max_unsigned_seconds: int = 600
    scheduler_seconds: int = 300
    escrow_quorum: int = 2
    escrow_required_groups: frozenset[str] = frozenset()
    escrow_veto_groups: frozenset[str] = frozenset()
    escrow_waiting_period_seconds: int = 86400
    escrow_approval_ttl_seconds: int = 7 * 86400
    escrow_endorsed_enrolment: bool = True
    escrow_groups: frozenset[str] = frozenset()
    escrow_webhook_url: str | None = None
    escrow_webhook_secret: bytes = field(default=b"", repr=False)
    # KMS_DASHBOARD_SECURE_COOKIE (0/1): the dashboard session cookie is Secure (https only)
    dashboard_secure_cookie: bool = True
    # KMS_DASHBOARD_SESSION_SECONDS: absolute lifetime of a dashboard login
    dashboard_session_seconds: int = 1800
    # KMS_AWS_REGION, KMS_AWS_ACCOUNT_ID: the region and account of the key ARNs the AWS KMS
    # face answers with (arn:aws:kms:<region>:<account>:key/<key id>); SigV4 requests to it
    # must be scoped to this region. Checked when the app is created (kms/api/aws_shapes.py).
    aws_region: str = "us-east-1"
    aws_account_id: str = "000000000000"
    # KMS_XKS_REGION (default: KMS_AWS_REGION): the AWS region whose KMS calls the XKS
    # face; its SigV4 requests must be scoped to it (the region of the external key store)
    xks_region: str = "us-east-1"
    # KMS_XKS_URI_PREFIX: the XKS proxy API answers under <prefix>/kms/xks/v1 (empty: at
    # /kms/xks/v1); "/tenant-a" etc., AWS's XksProxyUriPath rules (kms/formats/xks.py)
    xks_uri_prefix: str = ""
    # KMS_TLS_CERT_FILE, KMS_TLS_KEY_FILE (PEM, both or neither; the key file chmod 600):
    # `kms serve` terminates TLS itself (gunicorn --certfile/--keyfile)
    tls_cert_file: str | None = None
    tls_key_file: str | None = None
    # KMS_TLS_CLIENT_CA_FILE (PEM CA certificates; needs KMS_TLS_CERT_FILE): mutual TLS,
    # every client must present a certificate issued by one of these CAs; its subject CN
    # names the principal (kms/api/peer.py)
    tls_client_ca_file: str | None = None
    # KMS_REDIS_URL (redis://, rediss:// or unix://; may hold a password, never logged):
    # rate limits, SigV4 nonces, scheduler lease and cache invalidation shared by all
    # nodes (kms/services/cluster.py); KMS_REDIS_TIMEOUT_MS bounds each Redis call
    redis_url: str | None = field(default=None, repr=False)
    redis_timeout_ms: int = 250
    # KMS_RATE_LIMITS: "service=20000/second,principal:batch=100000/second,..." over the
    # defaults (kms/services/rate_limits.py)
    rate_limits: RatePolicy = field(default_factory=lambda: parse_rate_limits(""))
    # KMS_AUDIT_BUDGET: chained audit records per principal, same syntax over its own
    # defaults (kms/services/audit_budget.py); KMS_AUDIT_ALERT_RECORDS_PER_MINUTE: log an
    # error and raise kms_audit_growth_alert past this many records a minute (0: never)
    audit_budget: RatePolicy = field(default_factory=lambda: parse_audit_budget(""))
    audit_alert_records_per_minute: int = 60000
    # KMS_BLIND_REWRAP_FAILURES: failed rewraps per principal of blobs it may not decrypt
    # (a rewrap grant without decrypt: each is a test of a guessed context), same syntax
    # over "service=100/hour"; over it such rewraps are refused (kms/services/crypto.py)
    blind_rewrap_failures: RatePolicy = field(
        default_factory=lambda: parse_blind_rewrap_failures("")
    )
    # KMS_TOKEN_MAX_LIFETIME: "admin=8h,service=90d" (units s, m, h, d): the longest a
    # bearer token issued to that role lives (kms/services/principals.py); unset: no cap
    token_max_lifetimes: dict[str, int] = field(default_factory=dict)
    # Dual control (kms/services/changes.py), the policy pinned in the sealed state at the
    # first start (later edits here change nothing: the policy changes only through an
    # approved change). KMS_CONTROL_MODE: "dual" (default) or "single-operator"
    # (development: changes apply at once); KMS_CHANGE_QUORUM approvals; from each of
    # KMS_CHANGE_REQUIRED_GROUPS (default: the escrow required and veto groups); a change
    # expires after KMS_CHANGE_TTL_SECONDS
    control_mode: str = "dual"
    change_quorum: int = 2
    change_required_groups: frozenset[str] | None = None
    change_ttl_seconds: int = 7 * 86400


def _int(env: Mapping[str, str], name: str, default: int, low: int, high: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError as e:
        raise ConfigError(f"{name} must be an integer") from e
    if not low <= value <= high:
        raise ConfigError(f"{name} must be between {low} and {high}")
    return value


def read_pin(env: Mapping[str, str], data_dir: Path | None) -> str:
    """The HSM user PIN from ``KMS_HSM_PIN_FILE`` (or DATA_DIR/hsm.pin) or ``KMS_HSM_PIN``."""
    pin_file = env.get("KMS_HSM_PIN_FILE") or (str(data_dir / "hsm.pin") if data_dir else None)
    if pin_file and Path(pin_file).exists():
        if Path(pin_file).stat().st_mode & 0o077:
            raise ConfigError(f"{pin_file} must be readable by its owner only (chmod 600)")
        pin = Path(pin_file).read_text().strip()
    elif env.get("KMS_HSM_PIN"):
        pin = env["KMS_HSM_PIN"]
    else:
        raise ConfigError("no HSM PIN: set KMS_HSM_PIN_FILE (or KMS_DATA_DIR) or KMS_HSM_PIN")
    if not pin:
        raise ConfigError("the HSM PIN is empty")
    return pin


def read_conf_file(path: Path) -> dict[str, str]:
    """``KMS_NAME=value`` lines (``#`` comments allowed), as written by ``kms init``."""
    out: dict[str, str] = {}
    for number, line in enumerate(path.read_text().splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.partition("=")
        if not sep or not name.strip().startswith("KMS_"):
            raise ConfigError(f"{path}:{number}: expected KMS_NAME=value")
        out[name.strip()] = value.strip()
    return out


def _hsm_profile(env: Mapping[str, str]) -> profiles.Profile:
    """KMS_HSM_PROFILE with KMS_HSM_WRAP_MECHANISM and KMS_HSM_GCM_IV applied over it."""
    try:
        chosen = profiles.profile(env.get("KMS_HSM_PROFILE") or "softhsm")
    except ValueError as e:
        raise ConfigError(f"KMS_HSM_PROFILE: {e}") from None
    wrap = env.get("KMS_HSM_WRAP_MECHANISM") or chosen.wrap_mechanism
    try:
        profiles.mechanism_number(wrap)
    except ValueError as e:
        raise ConfigError(f"KMS_HSM_WRAP_MECHANISM: {e}") from None
    iv = env.get("KMS_HSM_GCM_IV") or chosen.gcm_iv
    if iv not in profiles.IV_SOURCES:
        raise ConfigError("KMS_HSM_GCM_IV must be caller or hsm")
    return replace(chosen, wrap_mechanism=wrap, gcm_iv=iv)


def from_env(env: Mapping[str, str] | None = None) -> Settings:
    """Build and validate Settings from the environment over DATA_DIR/kms.conf; raises
    ConfigError naming the bad variable."""
    env = dict(os.environ if env is None else env)
    data_dir = Path(env["KMS_DATA_DIR"]) if env.get("KMS_DATA_DIR") else None
    if data_dir and (data_dir / CONF_FILE).exists():
        env = {**read_conf_file(data_dir / CONF_FILE), **env}
    database_url = env.get("KMS_DATABASE_URL") or (
        f"sqlite:///{data_dir / 'kms.sqlite3'}" if data_dir else None
    )
    if not database_url:
        raise ConfigError("set KMS_DATABASE_URL or KMS_DATA_DIR")
    softhsm_conf = env.get("KMS_SOFTHSM2_CONF") or (
        str(data_dir / "softhsm2.conf")
        if data_dir and (data_dir / "softhsm2.conf").exists()
        else None
    )
    sync = env.get("KMS_SQLITE_SYNCHRONOUS", "FULL").upper()
    if sync not in {"FULL", "NORMAL"}:
        raise ConfigError("KMS_SQLITE_SYNCHRONOUS must be FULL or NORMAL")
    level = env.get("KMS_LOG_LEVEL", "INFO").upper()
    if level not in {"DEBUG", "INFO", "WARNING", "ERROR"}:
        raise ConfigError("KMS_LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR")
    hsm = _hsm_profile(env)
    return Settings(
        database_url=database_url,
        pkcs11_module=env.get("KMS_PKCS11_MODULE", DEFAULT_MODULE),
        token_label=env.get("KMS_HSM_TOKEN_LABEL", "kms"),
        pin=read_pin(env, data_dir),
        softhsm2_conf=softhsm_conf,
        root_key_label=env.get("KMS_ROOT_KEY_LABEL", "kms-root"),
        audit_key_label=env.get("KMS_AUDIT_KEY_LABEL", "kms-audit-signing"),
        kek_cache_size=_int(env, "KMS_KEK_CACHE_SIZE", 1024, 1, 1_000_000),
        hsm_profile=hsm.name,
        hsm_wrap_mechanism=hsm.wrap_mechanism,
        hsm_gcm_iv=hsm.gcm_iv,
        hsm_unwrap_template=hsm.unwrap_template,
        hsm_anchor_object=hsm.anchor_object,
        max_body_bytes=_int(env, "KMS_MAX_BODY_BYTES", 8 * 1024 * 1024, 1024, 64 * 1024 * 1024),
        sqlite_synchronous=sync,
        log_level=level,
        auth_cache_seconds=_int(env, "KMS_AUTH_CACHE_SECONDS", 5, 0, 300),
        lookup_cache_seconds=_int(env, "KMS_KEK_MATERIAL_CACHE_SECONDS", 60, 0, 3600),
        audit_checkpoint_records=_int(env, "KMS_AUDIT_CHECKPOINT_RECORDS", 1000, 0, 10**9),
        audit_checkpoint_seconds=_int(env, "KMS_AUDIT_CHECKPOINT_SECONDS", 60, 0, 86400),
        audit_max_unsigned_records=_int(env, "KMS_AUDIT_MAX_UNSIGNED_RECORDS", 10000, 2000, 10**9),
        audit_max_unsigned_seconds=_int(env, "KMS_AUDIT_MAX_UNSIGNED_SECONDS", 600, 60, 86400),
        scheduler_seconds=_int(env, "KMS_SCHEDULER_SECONDS", 300, 0, 86400),
        escrow_quorum=_int(env, "KMS_ESCROW_QUORUM", 2, 1, 16),
        escrow_required_groups=_groups(env, "KMS_ESCROW_REQUIRED_GROUPS"),
        escrow_veto_groups=_groups(env, "KMS_ESCROW_VETO_GROUPS"),
        escrow_waiting_period_seconds=_int(
            env, "KMS_ESCROW_WAITING_PERIOD_SECONDS", 86400, 0, 90 * 86400
        ),
        escrow_approval_ttl_seconds=_int(
            env, "KMS_ESCROW_APPROVAL_TTL_SECONDS", 7 * 86400, 60, 90 * 86400
        ),
        escrow_endorsed_enrolment=_int(env, "KMS_ESCROW_ENDORSED_ENROLMENT", 1, 0, 1) == 1,
        escrow_groups=_groups(env, "KMS_ESCROW_GROUPS"),
        dashboard_secure_cookie=_int(env, "KMS_DASHBOARD_SECURE_COOKIE", 1, 0, 1) == 1,
        dashboard_session_seconds=_int(env, "KMS_DASHBOARD_SESSION_SECONDS", 1800, 1, 86400),
        aws_region=env.get("KMS_AWS_REGION") or "us-east-1",
        aws_account_id=env.get("KMS_AWS_ACCOUNT_ID") or "000000000000",
        xks_region=_xks_region(env),
        xks_uri_prefix=_xks_prefix(env),
        **_tls(env),
        **_webhook(env),
        **_redis(env),
        token_max_lifetimes=_lifetimes(env.get("KMS_TOKEN_MAX_LIFETIME", "")),
        **_control(env),
    )


def _control(env: Mapping[str, str]) -> dict[str, Any]:
    mode = env.get("KMS_CONTROL_MODE", "dual")
    if mode not in ("dual", "single-operator"):
        raise ConfigError("KMS_CONTROL_MODE must be dual or single-operator")
    groups = _groups(env, "KMS_CHANGE_REQUIRED_GROUPS")
    if len(groups) > 16 or not all(GROUP_RE.fullmatch(g) for g in groups):
        raise ConfigError(
            "KMS_CHANGE_REQUIRED_GROUPS: at most 16 group names of 1-64 letters, digits, _ or -"
        )
    return {
        "control_mode": mode,
        "change_quorum": _int(env, "KMS_CHANGE_QUORUM", 2, 1, 16),
        "change_required_groups": groups if "KMS_CHANGE_REQUIRED_GROUPS" in env else None,
        "change_ttl_seconds": _int(env, "KMS_CHANGE_TTL_SECONDS", 7 * 86400, 300, 30 * 86400),
    }


def _xks_prefix(env: Mapping[str, str]) -> str:
    from kms.formats import xks

    try:
        return xks.check_uri_prefix(env.get("KMS_XKS_URI_PREFIX", ""))
    except xks.XksFormatError as e:
        raise ConfigError(f"KMS_XKS_URI_PREFIX {e}") from None


def _xks_region(env: Mapping[str, str]) -> str:
    from kms.formats import sigv4

    name = "KMS_XKS_REGION" if env.get("KMS_XKS_REGION") else "KMS_AWS_REGION"
    region = env.get(name) or "us-east-1"
    if not sigv4.REGION.fullmatch(region):
        raise ConfigError(f"{name} must look like an AWS region (e.g. eu-west-3)")
    return region


def _tls(env: Mapping[str, str]) -> dict[str, Any]:
    cert, key = env.get("KMS_TLS_CERT_FILE") or None, env.get("KMS_TLS_KEY_FILE") or None
    client_ca = env.get("KMS_TLS_CLIENT_CA_FILE") or None
    if client_ca is not None:
        import ssl

        if cert is None:
            raise ConfigError("KMS_TLS_CLIENT_CA_FILE needs KMS_TLS_CERT_FILE and KMS_TLS_KEY_FILE")
        try:
            ssl.create_default_context(cafile=client_ca)
        except OSError as e:  # missing file, or no PEM certificate in it (ssl.SSLError)
            raise ConfigError(
                f"KMS_TLS_CLIENT_CA_FILE: no PEM CA certificate in {client_ca}"
            ) from e
        return {**_tls({**env, "KMS_TLS_CLIENT_CA_FILE": ""}), "tls_client_ca_file": client_ca}
    if cert is None and key is None:
        return {}
    if cert is None or key is None:
        raise ConfigError("set both KMS_TLS_CERT_FILE and KMS_TLS_KEY_FILE, or neither")
    for name, path in (("KMS_TLS_CERT_FILE", cert), ("KMS_TLS_KEY_FILE", key)):
        if not Path(path).is_file():
            raise ConfigError(f"{name}: no such file {path}")
    if Path(key).stat().st_mode & 0o077:
        raise ConfigError(f"{key} must be readable by its owner only (chmod 600)")
    return {"tls_cert_file": cert, "tls_key_file": key}


def _redis(env: Mapping[str, str]) -> dict[str, Any]:
    url = env.get("KMS_REDIS_URL") or None
    if url is not None and urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        raise ConfigError("KMS_REDIS_URL must be a redis://, rediss:// or unix:// URL")
    try:
        limits = parse_rate_limits(env.get("KMS_RATE_LIMITS", ""))
    except ValueError as e:
        raise ConfigError(f"KMS_RATE_LIMITS: {e}") from None
    try:
        budget = parse_audit_budget(env.get("KMS_AUDIT_BUDGET", ""))
    except ValueError as e:
        raise ConfigError(f"KMS_AUDIT_BUDGET: {e}") from None
    try:
        blind = parse_blind_rewrap_failures(env.get("KMS_BLIND_REWRAP_FAILURES", ""))
    except ValueError as e:
        raise ConfigError(f"KMS_BLIND_REWRAP_FAILURES: {e}") from None
    return {
        "audit_budget": budget,
        "blind_rewrap_failures": blind,
        "audit_alert_records_per_minute": _int(
            env, "KMS_AUDIT_ALERT_RECORDS_PER_MINUTE", 60000, 0, 10**9
        ),
        "redis_url": url,
        "redis_timeout_ms": _int(env, "KMS_REDIS_TIMEOUT_MS", 250, 10, 10_000),
        "rate_limits": limits,
    }


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}
ROLES = ("admin", "service", "auditor", "custodian", "requester")


def _lifetimes(raw: str) -> dict[str, int]:
    """KMS_TOKEN_MAX_LIFETIME's ``role=<n><unit>`` items, in seconds."""
    out: dict[str, int] = {}
    for item in filter(None, (x.strip() for x in raw.split(","))):
        role, _, value = item.partition("=")
        role, value = role.strip(), value.strip()
        unit = _UNITS.get(value[-1:])
        if role not in ROLES or unit is None or not value[:-1].isdigit():
            raise ConfigError(
                f"KMS_TOKEN_MAX_LIFETIME: {item!r} is not <role>=<n><s|m|h|d> "
                f"(roles: {', '.join(ROLES)})"
            )
        seconds = int(value[:-1]) * unit
        if not 60 <= seconds <= 10 * 365 * 86400:
            raise ConfigError(f"KMS_TOKEN_MAX_LIFETIME: {item!r} must be 1 minute to 10 years")
        out[role] = seconds
    return out


def _groups(env: Mapping[str, str], name: str) -> frozenset[str]:
    return frozenset(g.strip() for g in env.get(name, "").split(",") if g.strip())


def _webhook(env: Mapping[str, str]) -> dict[str, Any]:
    url = env.get("KMS_ESCROW_WEBHOOK_URL") or None
    if url is None:
        return {}
    parts = urlsplit(url)
    loopback = parts.hostname in ("127.0.0.1", "::1", "localhost")
    if parts.scheme != "https" and not (parts.scheme == "http" and loopback):
        raise ConfigError("KMS_ESCROW_WEBHOOK_URL must be https (http only on loopback)")
    secret_file = env.get("KMS_ESCROW_WEBHOOK_SECRET_FILE")
    if not secret_file or not Path(secret_file).exists():
        raise ConfigError("KMS_ESCROW_WEBHOOK_URL needs KMS_ESCROW_WEBHOOK_SECRET_FILE")
    if Path(secret_file).stat().st_mode & 0o077:  # as the HSM PIN file (read_pin)
        raise ConfigError(f"{secret_file} must be readable by its owner only (chmod 600)")
    secret = Path(secret_file).read_bytes().strip()
    if len(secret) < 16:
        raise ConfigError("the webhook secret must be at least 16 bytes")
    return {"escrow_webhook_url": url, "escrow_webhook_secret": secret}
