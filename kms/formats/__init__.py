"""Pure wire formats: no I/O, no framework imports. Every layout is pinned by test vectors."""
