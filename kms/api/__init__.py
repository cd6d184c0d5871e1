"""HTTP adapters: parse requests into plain values, call one service method, serialise.
Never imports pkcs11, sqlalchemy or redis."""
