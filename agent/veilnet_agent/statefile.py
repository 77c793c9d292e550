"""Read a desired-state file (JSON or YAML) into a validated ``NodeState``."""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from .errors import ValidationError
from .model import NodeState, parse_node_state

MAX_STATE_FILE_BYTES = 64 * 1024 * 1024


def load_state_file(path: Path) -> NodeState:
    try:
        size = path.stat().st_size
        if size > MAX_STATE_FILE_BYTES:
            raise ValidationError("state-file", str(path), f"is larger than {MAX_STATE_FILE_BYTES} bytes")
        text = path.read_text()
    except OSError as exc:
        raise ValidationError("state-file", str(path), f"cannot read: {exc.strerror}") from None
    if path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValidationError("state-file", str(path), f"not valid JSON: {exc}") from None
    else:
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise ValidationError("state-file", str(path), f"not valid YAML: {exc}") from None
    return parse_node_state(data)
