"""The only code that imports pkcs11, sqlalchemy or redis."""
