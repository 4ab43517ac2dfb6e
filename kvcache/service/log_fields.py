"""LogFields: a log message made of named fields, for the server's one JSON line per call."""

from __future__ import annotations

import json


class LogFields(dict):
    """A log message of named fields. Its text (record.getMessage()) is their JSON object; a formatter that knows it
    (kvcache.service.serve_cli.JsonLines) takes the fields as they are instead of parsing that text back."""

    __slots__ = ()

    def __str__(self) -> str:
        return json.dumps(self)
