"""Keyholder KMS: HSM-backed envelope encryption with a tamper-evident audit trail."""

__version__ = "0.1.0"
