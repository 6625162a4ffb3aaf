"""Schemathesis against the app (in process): no server errors, every response conforms to
the OpenAPI document (status code, content type, headers, body schema), for generated
valid and invalid requests. Few examples per operation (2-core CI), but every operation.

The app is built at import time (schemathesis reads the schema when the module loads) in
its own temporary data folder, with one job and one upload so that ids can resolve.
"""
from __future__ import annotations

import atexit
import os
import shutil
import tempfile
from pathlib import Path

import schemathesis
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, settings
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance

from svdforge.api.main import create_app
from svdforge.persistence.keys import create_key

from .conftest import fresh_database, make_settings

_root = Path(tempfile.mkdtemp(prefix="svdforge-schemathesis-"))
atexit.register(shutil.rmtree, _root, True)
_settings = make_settings(_root)
_db = fresh_database(_settings)
with _db.begin() as _s:
    _, TOKEN = create_key(_s, "schemathesis")
app = create_app(_settings)
with TestClient(app) as _c:  # something for generated ids to point at
    _h = {"Authorization": f"Bearer {TOKEN}"}
    _c.post("/v1/jobs", json={"model": "smollm2-135m", "ratio": 0.4}, headers=_h)
    _c.post("/v1/files", files={"file": ("a.txt", b"some text\n")}, data={"purpose": "evaluation"}, headers=_h)

schema = schemathesis.openapi.from_asgi("/openapi.json", app)


@schema.auth()
class BearerKey:
    """A valid key on every request that the schema says needs one (negative tests may drop it)."""

    def get(self, case, ctx):
        return TOKEN

    def set(self, case, data, ctx):
        case.headers = {**(case.headers or {}), "Authorization": f"Bearer {data}"}


EXAMPLES = int(os.environ.get("SVDFORGE_SCHEMATHESIS_EXAMPLES", "20"))  # per operation; 200 for a deeper run


@schema.parametrize()
@settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck))
def test_api_conforms_to_its_schema(case):
    # Every default check runs (no 5xx, status codes, content types, headers and bodies as
    # documented, schema-violating input refused) except "schema-valid input is accepted":
    # some valid-looking requests are refused by rules JSON Schema cannot state (max_tokens >=
    # seq_len, the model-path policy, a reused Idempotency-Key), each a documented 422.
    excluded = [positive_data_acceptance]
    if case.operation.label == "POST /v1/files":
        # A multipart file part is bytes: a "boolean" file is the four bytes `true`, a valid
        # text file, so schemathesis's negative cases for it are not negative (see test_api_files).
        excluded.append(negative_data_rejection)
    case.call_and_validate(excluded_checks=excluded)
