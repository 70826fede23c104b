"""Names for the JSON-shaped values tunekit passes around, so that a signature says which one it
takes. They stay plain dicts on purpose: a data row holds whatever columns the user's file has,
and metrics.jsonl / run.json / eval.json are written and read back as JSON."""

from __future__ import annotations

from typing import Any

Row = dict[str, Any]  # one record of a data file: column -> JSON value (nested values included)
JsonObject = dict[str, Any]  # a JSON object tunekit writes or reads back: run.json, a metrics.jsonl line, a response body
Metrics = dict[str, Any]  # eval.json: metric name -> number (a count, or a baseline's name beside it)
