"""HSM configuration: SoftHSM bootstrap for development and tests, and the key templates
(PKCS#11 attributes) the KMS requires of its HSM objects on any token."""
