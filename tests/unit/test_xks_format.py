"""The XKS wire formats (kms/formats/xks.py): the spec's CDIV test vector, the HSM AAD layout,
the ciphertextMetadata encoding, the URI prefix rule (against botocore's own model of
AWS's XksProxyUriPath) and the audit detail."""

from __future__ import annotations

import base64
import re

import botocore.session
import pytest

from kms.formats import blob
from kms.formats import xks as fmt
from kms.formats.xks import RequestMetadata, XksKeyPolicy

# Spec v1.0.3, Appendix C.
SPEC_AAD = b"project=nile,department=marketing"
SPEC_MD = b"key_version=1"
SPEC_IV = base64.b64decode("HMrlRw85cAJUd5Ax")
SPEC_CT = base64.b64decode("ghxkK1txeDNn3q8Y")
SPEC_TAG = base64.b64decode("vBxN2ncH1oEkR8WVXpmyYQ==")
SPEC_CDIV = "qHA/ImC9h5HsLRXqCyPmWgYx7tzyoTplzILbP0fPXsc="


def test_cdiv_matches_the_spec_test_vector() -> None:
    value = fmt.cdiv(SPEC_AAD, SPEC_MD, SPEC_IV, SPEC_CT, SPEC_TAG)
    assert base64.b64encode(value).decode() == SPEC_CDIV
    assert value.hex().startswith("a8703f22") and value.hex().endswith("5ec7")


def test_cdiv_covers_every_field() -> None:
    base = fmt.cdiv(SPEC_AAD, SPEC_MD, SPEC_IV, SPEC_CT, SPEC_TAG)
    flipped = bytes([SPEC_TAG[0] ^ 1]) + SPEC_TAG[1:]
    assert fmt.cdiv(SPEC_AAD, SPEC_MD, SPEC_IV, SPEC_CT, flipped) != base
    assert fmt.cdiv(b"", SPEC_MD, SPEC_IV, SPEC_CT, SPEC_TAG) != base


def test_hsm_aad_is_the_spec_length_prefixed_layout() -> None:
    md = fmt.encode_metadata(7)
    assert fmt.hsm_aad(b"abc", md) == b"\x00\x03abc\x05\x01\x00\x00\x00\x07"
    assert fmt.hsm_aad(b"", b"") == b"\x00\x00\x00"
    # "no AAD, metadata X" and "AAD X, no metadata" must differ
    assert fmt.hsm_aad(b"", b"X") != fmt.hsm_aad(b"X", b"")
    big = fmt.hsm_aad(b"\xff" * 8192, md)
    assert big[:2] == b"\x20\x00" and big[2 : 2 + 8192] == b"\xff" * 8192


def test_hsm_aad_never_looks_like_a_native_blob_header() -> None:
    """Both faces use the same KEKs: the XKS AAD's first byte stays below the blob magic's."""
    longest = fmt.hsm_aad(b"a" * fmt.MAX_AAD_BYTES, fmt.encode_metadata(1))
    assert longest[0] <= 0x40 < blob.MAGIC[0]
    with pytest.raises(fmt.XksFormatError):
        fmt.hsm_aad(b"a" * (fmt.MAX_AAD_BYTES + 1), b"")
    with pytest.raises(fmt.XksFormatError):
        fmt.hsm_aad(b"", b"m" * 21)


def test_ciphertext_metadata_is_versioned_and_small() -> None:
    assert fmt.encode_metadata(1) == b"\x01\x00\x00\x00\x01"  # frozen: version 1 layout
    assert fmt.encode_metadata(2**32 - 1) == b"\x01\xff\xff\xff\xff"
    assert len(fmt.encode_metadata(123456)) <= fmt.MAX_CIPHERTEXT_METADATA_BYTES
    assert fmt.decode_metadata(fmt.encode_metadata(123456)) == 123456
    for bad in (b"", b"\x01\x00\x00\x01", b"\x02\x00\x00\x00\x01", b"\x01\x00\x00\x00\x00"):
        with pytest.raises(fmt.XksFormatError):
            fmt.decode_metadata(bad)
    for version in (0, 2**32):
        with pytest.raises(fmt.XksFormatError):
            fmt.encode_metadata(version)


AWS_URI_PATH = re.compile(
    botocore.session.get_session()
    .get_service_model("kms")
    .shape_for("CreateCustomKeyStoreRequest")
    .members["XksProxyUriPath"]
    .metadata["pattern"]
)


@pytest.mark.parametrize(
    "prefix", ["", "/example/uri/path/prefix", "/tenant-a", "/a_b/C-9", "/" + "p" * 116]
)
def test_valid_prefixes_make_paths_aws_accepts(prefix: str) -> None:
    assert fmt.check_uri_prefix(prefix) == prefix
    path = prefix + fmt.API_PATH
    assert AWS_URI_PATH.fullmatch(path) and 10 <= len(path) <= 128


@pytest.mark.parametrize(
    "prefix",
    [
        "tenant",  # no leading slash
        "/tenant/",  # trailing slash
        "//tenant",  # empty segment
        "/a//b",
        "/has space",
        "/dot.ted",
        "/tenant?x=1",
        "/" + "p" * 117,  # <prefix>/kms/xks/v1 over 128
        "/v1",  # this server's own paths
        "/metrics/x",
        "/dashboard",
    ],
)
def test_invalid_prefixes_are_refused(prefix: str) -> None:
    with pytest.raises(fmt.XksFormatError):
        fmt.check_uri_prefix(prefix)


def test_external_key_id_charset() -> None:
    assert fmt.EXTERNAL_KEY_ID.fullmatch("foo.bar_baz-9")
    assert fmt.EXTERNAL_KEY_ID.fullmatch("k" * 128)
    for bad in ("", "k" * 129, "a/b", "a b", "alias:x", "é"):
        assert not fmt.EXTERNAL_KEY_ID.fullmatch(bad)


def test_audit_detail_carries_the_metadata_within_256_characters() -> None:
    meta = RequestMetadata(
        "5112f4d6-db54-4af4-ae30-c55a22a8dfae",
        "Decrypt",
        "arn:aws:iam::123456789012:user/Alice",
        "arn:aws:kms:us-east-2:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab",
        "ebs",
    )
    detail = fmt.audit_detail(meta)
    assert detail == (
        "xks rid=5112f4d6-db54-4af4-ae30-c55a22a8dfae op=Decrypt "
        "principal=arn:aws:iam::123456789012:user/Alice "
        "key=arn:aws:kms:us-east-2:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab via=ebs"
    )
    failed = fmt.audit_detail(meta, "authentication failed (bad tag)")
    assert failed.endswith(" | authentication failed (bad tag)")
    health = RequestMetadata("r1", "KmsHealthCheck")
    assert fmt.audit_detail(health) == "xks rid=r1 op=KmsHealthCheck"


def test_audit_detail_shortens_long_arns_keeping_account_and_name() -> None:
    role = "arn:aws:sts::123456789012:assumed-role/" + "x" * 2000 + "/session-name"
    meta = RequestMetadata("r" * 300, "Op\x00\n" * 40, role, "arn:aws:kms:" + "k" * 2040, "v" * 99)
    detail = fmt.audit_detail(meta, "why" * 100)
    assert len(detail) <= 256
    assert all(" " <= c <= "~" for c in detail)
    principal = detail.split(" principal=")[1].split(" ")[0]
    assert principal.startswith("arn:aws:sts::123456789012:...")
    assert principal.endswith("/session-name") and len(principal) == 56


def test_policy_value_object() -> None:
    default = XksKeyPolicy()
    assert default.usage == {"encrypt", "decrypt"}
    assert default.principal_allowed(None) and default.operation_allowed("AnythingNew")
    policy = XksKeyPolicy(
        frozenset({"encrypt"}),
        ("arn:aws:iam::123456789012:role/app-*",),
        ("Encrypt", "GenerateDataKey"),
    )
    assert policy.principal_allowed("arn:aws:iam::123456789012:role/app-web")
    assert not policy.principal_allowed("arn:aws:iam::123456789012:role/admin")
    assert not policy.principal_allowed("ARN:AWS:IAM::123456789012:ROLE/APP-WEB")
    assert not policy.principal_allowed(None)
    assert policy.operation_allowed("Encrypt") and not policy.operation_allowed("Decrypt")
    assert policy.summary() == (
        "usage=encrypt kms_operations=Encrypt,GenerateDataKey "
        "aws_principals=arn:aws:iam::123456789012:role/app-*"
    )
    assert XksKeyPolicy(frozenset(), (), None).summary() == (
        "usage=none kms_operations=any aws_principals=none"
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"usage": frozenset({"sign"})},
        {"aws_principals": ("",)},
        {"aws_principals": ("arn\x00",)},
        {"aws_principals": ("a",) * 101},
        {"kms_operations": ("Decrypt; DROP",)},
        {"kms_operations": ("",)},
    ],
)
def test_policy_refuses_invalid_values(kwargs: dict[str, object]) -> None:
    with pytest.raises(fmt.XksFormatError):
        XksKeyPolicy(**kwargs)  # type: ignore[arg-type]
