"""The ceiling: the smallest Flask JSON endpoint, served like the KMS (bench/run.py)."""

from flask import Flask, request

app = Flask(__name__)


@app.post("/echo")
def echo() -> dict[str, bool]:
    request.get_json(force=True)
    return {"ok": True}
