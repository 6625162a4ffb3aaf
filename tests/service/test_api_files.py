"""Uploads: size cap (413), UTF-8 check, ownership, and use as a job's data."""
from __future__ import annotations

import hashlib

from .test_api_jobs import MINIMAL, assert_problem

TEXT = b"To be, or not to be, that is the question.\nWhether 'tis nobler in the mind to suffer.\n"


def upload(client, headers, content=TEXT, purpose="calibration", name="corpus.txt"):
    return client.post("/v1/files", files={"file": (name, content, "text/plain")}, data={"purpose": purpose},
                       headers=headers)


def test_upload_get_list_delete(client, auth, settings):
    r = upload(client, auth)
    assert r.status_code == 201, r.text
    f = r.json()
    assert f["object"] == "file" and f["bytes"] == len(TEXT) and f["sha256"] == hashlib.sha256(TEXT).hexdigest()
    assert f["filename"] == "corpus.txt" and f["purpose"] == "calibration"
    assert r.headers["location"].endswith(f"/v1/files/{f['id']}")
    stored = settings.storage_dir / "uploads" / f["id"]
    assert stored.read_bytes() == TEXT
    assert client.get(f"/v1/files/{f['id']}", headers=auth).json() == f
    assert [x["id"] for x in client.get("/v1/files", headers=auth).json()["data"]] == [f["id"]]
    d = client.delete(f"/v1/files/{f['id']}", headers=auth)
    assert d.json() == {"object": "file.deleted", "id": f["id"], "deleted": True}
    assert not stored.exists()
    assert_problem(client.get(f"/v1/files/{f['id']}", headers=auth), 404)


def test_upload_over_the_limit_is_413(client, auth, settings):
    big = b"a" * (settings.max_upload_bytes + 1)
    assert_problem(upload(client, auth, big), 413, "content_too_large")
    way_too_big = b"a" * (settings.max_upload_bytes + 200 * 1024)  # refused from Content-Length alone
    assert_problem(upload(client, auth, way_too_big), 413, "content_too_large")
    for folder in (settings.storage_dir / "uploads", settings.work_dir / "uploads"):  # nothing left behind
        assert not folder.exists() or list(folder.iterdir()) == []
    assert client.get("/v1/files", headers=auth).json()["data"] == []


def test_upload_must_be_utf8_text(client, auth):
    assert_problem(upload(client, auth, b"\xff\xfe\x00binary"), 422, field="file")
    assert_problem(upload(client, auth, b""), 422, field="file")
    assert_problem(upload(client, auth, purpose="fun"), 422, field="purpose")
    r = client.post("/v1/files", data={"purpose": "calibration"}, headers=auth)
    assert_problem(r, 422, field="file")


def test_filename_is_sanitised(client, auth):
    r = upload(client, auth, name="../../etc/passwd")
    assert r.status_code == 201 and r.json()["filename"] == "passwd"
    assert upload(client, auth, name="..\\evil.txt").json()["filename"] == ".._evil.txt"


def test_files_are_private(client, auth, other_auth):
    file_id = upload(client, auth).json()["id"]
    assert_problem(client.get(f"/v1/files/{file_id}", headers=other_auth), 404)
    assert_problem(client.delete(f"/v1/files/{file_id}", headers=other_auth), 404)
    assert client.get("/v1/files", headers=other_auth).json()["data"] == []
    # and another key cannot point a job at it
    r = client.post("/v1/jobs", json={**MINIMAL, "calibration": {"source": "file", "file_id": file_id}},
                    headers=other_auth)
    assert_problem(r, 422, field="calibration.file_id")


def test_jobs_can_use_uploaded_files(client, auth):
    file_id = upload(client, auth).json()["id"]
    body = {**MINIMAL, "calibration": {"source": "file", "file_id": file_id, "samples": 2, "seq_len": 16},
            "adapter": {"type": "lora", "data": {"source": "file", "file_id": file_id}},
            "evaluation": {"source": "file", "file_id": file_id, "seq_len": 16, "max_tokens": 64}}
    r = client.post("/v1/jobs", json=body, headers=auth)
    assert r.status_code == 201, r.text
    assert r.json()["request"]["adapter"]["data"]["file_id"] == file_id
    missing = {**MINIMAL, "evaluation": {"source": "file", "file_id": "file_nope"}}
    assert_problem(client.post("/v1/jobs", json=missing, headers=auth), 422, field="evaluation.file_id")
    missing = {**MINIMAL, "adapter": {"type": "lora", "data": {"source": "file", "file_id": "file_nope"}}}
    assert_problem(client.post("/v1/jobs", json=missing, headers=auth), 422, field="adapter.data.file_id")


def test_file_pagination(client, auth):
    ids = [upload(client, auth).json()["id"] for _ in range(3)]
    p1 = client.get("/v1/files", params={"limit": 2}, headers=auth).json()
    assert [f["id"] for f in p1["data"]] == [ids[2], ids[1]] and p1["has_more"]
    p2 = client.get("/v1/files", params={"limit": 2, "after": p1["last_id"]}, headers=auth).json()
    assert [f["id"] for f in p2["data"]] == [ids[0]] and not p2["has_more"]
    for after in ("garbage", "file_", ids[0][:-1], ids[0].replace("file_", "job_")):
        assert_problem(client.get("/v1/files", params={"after": after}, headers=auth), 422, "validation_error", "after")
