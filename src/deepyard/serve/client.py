"""`deepyard predict`: send a JSON file or a PNG image to a deployed model."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path
from typing import Any

from deepyard.errors import BadInput, JobFailed


def request_body(path: Path) -> dict[str, Any]:
    if path.is_dir():
        raise BadInput(f"--input {path}: a directory; give one JSON file or PNG image")
    if not path.is_file():
        raise BadInput(f"--input {path}: no such file")
    raw = path.read_bytes()
    if raw.startswith(b"\x89PNG"):
        return {"instances": [base64.b64encode(raw).decode()]}
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise BadInput(f"--input {path}: neither a PNG image nor JSON ({error})") from None
    return body if isinstance(body, dict) else {"instances": body}


def auth_headers() -> dict[str, str]:
    """The bearer token endpoints deployed with DEEPYARD_API_TOKEN expect (none if it is unset)."""
    token = os.environ.get("DEEPYARD_API_TOKEN")
    return {"Authorization": f"Bearer {token}"} if token else {}


def predict(name: str, path: Path, url: str) -> dict[str, Any]:
    import httpx

    headers = auth_headers()
    try:
        response = httpx.post(f"{url.rstrip('/')}/models/{name}/predict", json=request_body(path),
                              headers=headers, timeout=60)
    except httpx.HTTPError as error:
        raise JobFailed(f"could not reach {url}: {error}; is the model deployed (`deepyard endpoints`)?") from None
    answer = response.json() if response.headers.get("content-type", "").startswith("application/json") else {}
    if response.status_code >= 400:
        message = answer.get("error") or answer.get("detail") or response.text
        error = BadInput if response.status_code < 500 else JobFailed
        raise error(f"{name}: HTTP {response.status_code}: {message}")
    return answer
