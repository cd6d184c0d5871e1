"""Domain logic: plain types in and out; never imports flask, pkcs11, sqlalchemy or redis."""
