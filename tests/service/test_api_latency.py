"""What keeps the API's tail latency down (measured by bench/api_load.py, pinned here)."""
from __future__ import annotations

import gc

from fastapi.testclient import TestClient

from svdforge.api import limits
from svdforge.api.main import create_app


def test_startup_objects_are_frozen_out_of_the_collector_while_the_app_runs(settings, db):
    before = gc.get_freeze_count()
    with TestClient(create_app(settings)) as c:
        assert c.get("/healthz").status_code == 200
        assert gc.get_freeze_count() > before + 10_000  # the app's own objects, not just a few
    assert gc.get_freeze_count() == 0  # shutdown hands them back


def test_a_submission_looks_its_key_up_once(client, auth, monkeypatch):
    calls = []
    real = limits.find_key

    def counting(session, token):
        calls.append(token)
        return real(session, token)

    monkeypatch.setattr(limits, "find_key", counting)
    r = client.post("/v1/jobs", json={"model": "smollm2-135m", "ratio": 0.4}, headers=auth)
    assert r.status_code == 201, r.text
    assert len(calls) == 1
    calls.clear()
    assert client.get(f"/v1/jobs/{r.json()['id']}", headers=auth).status_code == 200
    assert len(calls) == 1


def test_a_revoked_key_is_refused_on_both_paths(client, auth, db, tokens):
    from svdforge.persistence.keys import find_key, revoke_key

    with db.begin() as s:
        key = find_key(s, tokens["alice"])
        assert revoke_key(s, key.id)
    assert client.post("/v1/jobs", json={"model": "smollm2-135m", "ratio": 0.4}, headers=auth).status_code == 401
    assert client.get("/v1/jobs", headers=auth).status_code == 401
