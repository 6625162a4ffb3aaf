"""Security guarantees of the service, each by a test that fails when the guarantee breaks.

1. Model and data references cannot reach files outside what the operator allowed:
   `..`, absolute paths outside SVDFORGE_MODEL_ROOT, symlinks leaving it, hub-id-shaped
   names that exist relative to the server's working folder, file ids that are not the
   caller's uploads. The API answers 422 problem+json; the worker checks again.
2. Uploads over SVDFORGE_MAX_UPLOAD_BYTES are refused with 413 problem+json while the body
   streams in, not after it was read.
3. API keys are stored only as a sha256 and never appear in logs.
4. Pickle weights and remote code are refused unless the operator enables them.
"""
from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import shutil
import uuid
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import inspect, select, text

from svdforge.api.main import create_app
from svdforge.core.errors import UserError
from svdforge.persistence.keys import create_key, revoke_key
from svdforge.persistence.settings import Settings
from svdforge.persistence.tables import ApiKey
from svdforge.worker.config import build_config

from .conftest import TINY_REQUEST_OPTIONS, make_settings
from .test_api_files import TEXT, upload
from .test_api_jobs import MINIMAL, PROBLEM, assert_problem


def post_job(client, auth, **fields):
    return client.post("/v1/jobs", json={**MINIMAL, **fields}, headers=auth)


# --- 1. model paths --------------------------------------------------------------------
@pytest.mark.parametrize("model", [
    "../../etc", "../../../../../../etc/passwd", "~/.ssh", "./x/../../etc",
    "/etc", "/etc/passwd", "/", "{root}/../../etc", "{root}/..", "{root}/tiny/../../../etc/passwd",
    "{root}/../outside.gguf", "org/..", "../org/name",
])
def test_model_path_traversal_is_422(client, auth, settings, model):
    (settings.model_root / "tiny").mkdir(exist_ok=True)
    assert_problem(post_job(client, auth, model=model.format(root=settings.model_root)), 422,
                   "validation_error", field="model")


@pytest.mark.parametrize("target", ["folder", "file", "parent", "chain"])
def test_symlinks_escaping_the_model_root_are_422(client, auth, settings, tmp_path, target):
    outside = tmp_path / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "config.json").write_text("{}")
    (outside / "model.safetensors").write_bytes(b"x")
    root = settings.model_root
    if target == "folder":
        link, dest = root / "sneaky", outside
    elif target == "file":
        link, dest = root / "sneaky.gguf", outside / "model.safetensors"
    elif target == "parent":  # a link to the root's own parent, then a path through it
        link, dest = root / "up", root.parent
    else:  # a link inside the root to another link inside the root that leaves it
        (root / "hop").symlink_to(outside)
        link, dest = root / "chain", root / "hop"
    link.symlink_to(dest)
    model = str(link / "outside") if target == "parent" else str(link)
    body = assert_problem(post_job(client, auth, model=model), 422, field="model")
    assert "outside the allowed model root" in body["detail"]


def test_symlink_swapped_after_acceptance_is_refused_by_the_worker(client, auth, settings, tmp_path):
    """The API's check is not the last one: the worker resolves the path again before loading."""
    inside = settings.model_root / "m"
    inside.mkdir()
    r = post_job(client, auth, model=str(inside))
    assert r.status_code == 201, r.text
    shutil.rmtree(inside)
    (tmp_path / "elsewhere").mkdir()
    inside.symlink_to(tmp_path / "elsewhere")
    with pytest.raises(UserError, match="outside the allowed model root"):
        build_config(r.json()["request"], {}, settings)


def test_hub_id_naming_a_relative_folder_is_refused(client, auth, settings, tmp_path, monkeypatch):
    """`org/name` is a hub id, but transformers loads `./org/name` when it exists: that would
    read a folder outside the model root, relative to the server's working folder."""
    (tmp_path / "cwd" / "org" / "name").mkdir(parents=True)
    monkeypatch.chdir(tmp_path / "cwd")
    body = assert_problem(post_job(client, auth, model="org/name"), 422, field="model")
    assert "relative to the server's working folder" in body["detail"]
    with pytest.raises(UserError, match="working folder"):  # the worker, in its own working folder
        build_config({**MINIMAL, "model": "org/name"}, {}, settings)
    assert post_job(client, auth, model="org/other").status_code == 201  # a real hub id still passes


def test_local_paths_need_a_model_root(tmp_path, db, auth):
    settings = make_settings(tmp_path, model_root=None, data_dir=db.settings.data_dir)
    with TestClient(create_app(settings)) as c:
        body = assert_problem(post_job(c, auth, model=str(tmp_path)), 422, field="model")
    assert "SVDFORGE_MODEL_ROOT" in body["detail"]


# --- 1. data paths ---------------------------------------------------------------------
@pytest.mark.parametrize("file_id", ["../../etc/passwd", "/etc/passwd", "uploads/../../x", "file_..", "."])
@pytest.mark.parametrize("where", ["calibration", "evaluation", "adapter.data"])
def test_data_file_ids_that_are_paths_are_422(client, auth, file_id, where):
    spec = {"source": "file", "file_id": file_id}
    fields = {"adapter": {"type": "lora", "data": spec}} if where == "adapter.data" else {where: spec}
    assert_problem(post_job(client, auth, **fields), 422, "validation_error", field=f"{where}.file_id")


def test_another_keys_upload_cannot_be_named(client, auth, other_auth):
    file_id = upload(client, other_auth).json()["id"]
    r = post_job(client, auth, calibration={"source": "file", "file_id": file_id})
    assert_problem(r, 422, field="calibration.file_id")


def test_upload_names_never_choose_where_bytes_go(client, auth, settings, tmp_path):
    before = {p for p in tmp_path.rglob("*")}
    for name in ("../../../escape.txt", "/tmp/escape.txt", "..", "a/../../b.txt", "..\\..\\c.txt"):
        r = upload(client, auth, name=name)
        assert r.status_code == 201, r.text
        f = r.json()
        assert "/" not in f["filename"] and "\\" not in f["filename"] and f["filename"] not in (".", "..")
        assert (settings.storage_dir / "uploads" / f["id"]).read_bytes() == TEXT
    new = {p for p in tmp_path.rglob("*")} - before
    assert new and all(p.is_relative_to(settings.data_dir) for p in new), new
    assert not (tmp_path / "escape.txt").exists() and not Path("/tmp/escape.txt").exists()


@pytest.mark.parametrize("dataset", ["org/..", "a/./b", "data"])
def test_hf_dataset_names_cannot_be_local_paths(client, auth, tmp_path, monkeypatch, dataset):
    (tmp_path / "data").mkdir(exist_ok=True)  # `data` exists in the working folder: datasets would read it
    monkeypatch.chdir(tmp_path)
    r = post_job(client, auth, calibration={"source": "hf", "dataset": dataset})
    assert_problem(r, 422, field="calibration.dataset")
    from svdforge.worker.config import data_spec

    with pytest.raises(UserError, match="dataset"):
        data_spec({"source": "hf", "dataset": dataset}, {}, "calibration")


# --- 2. upload size --------------------------------------------------------------------
@pytest.fixture
def small_limit(tmp_path, db):
    """An app whose operator configured a 1000-byte upload limit."""
    settings = make_settings(tmp_path, data_dir=db.settings.data_dir, max_upload_bytes=1000)
    return create_app(settings), settings


def test_configured_upload_limit_is_413_problem(small_limit, auth):
    app, settings = small_limit
    with TestClient(app) as c:
        assert upload(c, auth, content=b"a" * 1000).status_code == 201
        body = assert_problem(upload(c, auth, content=b"a" * 1001), 413, "content_too_large")
        assert body["limit_bytes"] == 1000
        assert_problem(upload(c, auth, content=b"a" * 10_000_000), 413, "content_too_large")
    leftovers = [p for p in (settings.work_dir / "uploads").glob("*")]
    assert leftovers == []


def _asgi_post(app, path: str, headers: list[tuple[bytes, bytes]], chunks, total: int) -> tuple[int, dict, int]:
    """POST `total` bytes in chunks straight through the ASGI app; returns (status, body, bytes read)."""
    read = 0
    sent = iter(chunks)
    messages: list[dict] = []

    async def receive() -> dict:
        nonlocal read
        chunk = next(sent, None)
        if chunk is None:
            return {"type": "http.request", "body": b"", "more_body": False}
        read += len(chunk)
        return {"type": "http.request", "body": chunk, "more_body": read < total}

    async def send(message: dict) -> None:
        messages.append(message)

    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
             "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "", "query_string": b"",
             "headers": headers, "client": ("127.0.0.1", 1), "server": ("testserver", 80), "state": {}}

    asyncio.run(app(scope, receive, send))
    start = next(m for m in messages if m["type"] == "http.response.start")
    body = b"".join(m.get("body", b"") for m in messages if m["type"] == "http.response.body")
    if start["status"] >= 400:
        assert dict(start["headers"])[b"content-type"] == PROBLEM.encode()
    return start["status"], json.loads(body) if body else {}, read


def test_chunked_upload_is_refused_while_streaming(small_limit, tokens):
    """No Content-Length (chunked): the body is counted as it arrives and refused past the limit,
    long before a 50 MB body has been read."""
    app, settings = small_limit
    boundary = "b0undary"
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"purpose\"\r\n\r\ncalibration\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.txt\"\r\n"
            "Content-Type: text/plain\r\n\r\n").encode()
    total = 50 * 1024 * 1024
    chunk = 16 * 1024

    def chunks():
        yield head
        while True:
            yield b"a" * chunk

    headers = [(b"authorization", f"Bearer {tokens['alice']}".encode()),
               (b"content-type", f"multipart/form-data; boundary={boundary}".encode()),
               (b"transfer-encoding", b"chunked")]
    status, body, read = _asgi_post(app, "/v1/files", headers, chunks(), total)
    assert status == 413 and body["code"] == "content_too_large"
    assert read <= settings.max_upload_bytes + 64 * 1024 + chunk + len(head), read  # stopped early
    assert not (settings.work_dir / "uploads").exists() or list((settings.work_dir / "uploads").iterdir()) == []


def test_declared_length_over_the_limit_reads_nothing(small_limit, tokens):
    app, _ = small_limit
    headers = [(b"authorization", f"Bearer {tokens['alice']}".encode()),
               (b"content-type", b"multipart/form-data; boundary=x"), (b"content-length", b"999999999")]
    status, body, read = _asgi_post(app, "/v1/files", headers, iter([b"x" * 1024] * 10), 10 * 1024)
    assert (status, body["code"], read) == (413, "content_too_large", 0)


@pytest.mark.parametrize("authorization", [None, b"Bearer svdf_" + b"A" * 43, b"Basic abc", b"Bearer"])
@pytest.mark.parametrize("path", ["/v1/files", "/v1/jobs"])
def test_anonymous_bodies_are_refused_before_they_are_read(app, tokens, authorization, path):
    """FastAPI parses a body (spooling an upload to disk) before the key is checked: a request
    without a valid key is answered 401 before its body is read."""
    headers = [(b"content-type", b"multipart/form-data; boundary=b" if path == "/v1/files" else b"application/json")]
    if authorization is not None:
        headers.append((b"authorization", authorization))
    status, body, read = _asgi_post(app, path, headers, iter([b"x" * 1000] * 60), 60_000)
    assert (status, body["code"], read) == (401, "unauthorized", 0)


def test_a_revoked_key_cannot_send_a_body(app, db, tokens):
    with db.begin() as s:
        revoke_key(s, s.scalar(select(ApiKey).where(ApiKey.name == "alice")).id)
    headers = [(b"authorization", f"Bearer {tokens['alice']}".encode()), (b"content-type", b"application/json")]
    status, _, read = _asgi_post(app, "/v1/jobs", headers, iter([b"{}"]), 2)
    assert (status, read) == (401, 0)


def test_job_bodies_have_their_own_small_limit(app, tokens):
    headers = [(b"authorization", f"Bearer {tokens['alice']}".encode()), (b"content-type", b"application/json")]
    big = (b'{"model": "smollm2-135m", "ratio": 0.4, "metadata": {"a": "' + b"x" * (4 * 1024 * 1024) + b'"}}')
    status, body, read = _asgi_post(app, "/v1/jobs", headers, (big[i:i + 65536] for i in range(0, len(big), 65536)),
                                    len(big))
    assert (status, body["code"]) == (413, "content_too_large") and read < 2 * 1024 * 1024


# --- 3. API keys -----------------------------------------------------------------------
def _all_values(db) -> list[str]:
    """Every value of every column of every table, as text."""
    out = []
    with db.session() as s:
        for table in inspect(s.connection()).get_table_names():
            for row in s.execute(text(f'SELECT * FROM "{table}"')):
                out.extend(str(v) for v in row)
    return out


def test_database_keeps_only_the_hash_of_a_key(client, db, settings, tokens, auth):
    assert post_job(client, auth).status_code == 201
    assert upload(client, auth).status_code == 201
    values = _all_values(db)
    with db.session() as s:
        rows = {k.name: k for k in s.scalars(select(ApiKey))}
    for name, token in tokens.items():
        secret = token[len(rows[name].prefix):]  # what the shown prefix does not give away
        assert len(secret) >= 32
        assert rows[name].key_hash == hashlib.sha256(token.encode()).hexdigest()
        assert not any(token in v or secret in v for v in values), name
    if settings.is_sqlite:  # the file itself, write-ahead log included
        for f in settings.data_dir.glob("svdforge.db*"):
            data = f.read_bytes()
            assert all(t.encode() not in data and t[12:].encode() not in data for t in tokens.values()), f


def test_keys_never_reach_the_logs(settings, db, caplog, capfd):
    """Everything logs at DEBUG (SQLAlchemy's statements and parameters included) while a key is
    created, used, refused, revoked; neither the key nor a wrong one appears anywhere."""
    caplog.set_level(logging.DEBUG)
    for name in ("sqlalchemy", "uvicorn", "celery", "kombu", "svdforge"):  # SQLAlchemy sets its own to WARN
        caplog.set_level(logging.DEBUG, logger=name)
    with db.begin() as s:
        key, token = create_key(s, "logged")
    wrong = "svdf_" + "A" * 43
    with TestClient(create_app(settings)) as c:
        good = {"Authorization": f"Bearer {token}"}
        assert c.get("/v1/jobs", headers=good).status_code == 200
        assert post_job(c, good).status_code == 201
        assert post_job(c, good, model="/etc").status_code == 422
        for bad in (wrong, token + "x", token[:-1], "not-a-key " + token):
            r = c.get("/v1/jobs", headers={"Authorization": f"Bearer {bad}"})
            assert_problem(r, 401, "unauthorized")
            assert bad not in r.text and token not in r.text
            assert_problem(post_job(c, {"Authorization": f"Bearer {bad}"}), 401)
        with db.begin() as s:
            revoke_key(s, key.id)
        assert_problem(c.get("/v1/jobs", headers=good), 401)
    out, err = capfd.readouterr()
    logged = caplog.text + "".join(str(r.args) for r in caplog.records) + out + err
    assert key.key_hash in logged  # logging was on, SQL parameters included
    for secret in (token, token[12:], wrong):
        assert secret not in logged


def test_keys_cli_prints_the_key_once_on_stdout_only(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from svdforge.cli import service_cmds  # noqa: F401 - registers the commands
    from svdforge.cli.main import app

    from .conftest import TEST_DATABASE_URL, fresh_database

    if TEST_DATABASE_URL:
        monkeypatch.setenv("SVDFORGE_DATABASE_URL", TEST_DATABASE_URL)
        fresh_database(make_settings(tmp_path)).dispose()
    runner = CliRunner()
    data = tmp_path / "data"
    created = runner.invoke(app, ["keys", "create", "--name", "ops", "--data-dir", str(data)])
    assert created.exit_code == 0, created.output
    token = created.stdout.strip()
    assert token.startswith("svdf_") and created.stdout.count(token) == 1 and token not in created.stderr
    listed = runner.invoke(app, ["keys", "list", "--data-dir", str(data)])
    assert listed.exit_code == 0 and token[12:] not in listed.output


# --- 4. pickle weights and remote code -------------------------------------------------
def _pickled_model(root: Path, name: str = "pickled") -> Path:
    d = root / name
    d.mkdir()
    (d / "config.json").write_text('{"model_type": "llama"}')
    (d / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    return d


def test_pickle_weights_are_refused_by_default(client, auth, settings):
    d = _pickled_model(settings.model_root)
    body = assert_problem(post_job(client, auth, model=str(d)), 422, field="model")
    assert "pickle" in body["detail"] and "SVDFORGE_ALLOW_PICKLE" in body["detail"]
    assert_problem(post_job(client, auth, model=str(d / "pytorch_model.bin")), 422, field="model")
    (settings.model_root / "weights.pt").write_bytes(b"\x80\x04")
    assert_problem(post_job(client, auth, model=str(settings.model_root / "weights.pt")), 422, field="model")
    (d / "model.safetensors").write_bytes(b"{}")  # safetensors next to the pickle: those are loaded
    assert post_job(client, auth, model=str(d)).status_code == 201


def test_operator_can_allow_pickle_and_remote_code(tmp_path, db, auth):
    settings = make_settings(tmp_path, data_dir=db.settings.data_dir, allow_pickle=True, trust_remote_code=True)
    d = _pickled_model(settings.model_root)
    with TestClient(create_app(settings)) as c:
        r = post_job(c, auth, model=str(d))
    assert r.status_code == 201, r.text
    config = build_config(r.json()["request"], {}, settings)
    assert config.allow_pickle and config.trust_remote_code
    only_pickle = build_config(r.json()["request"], {}, make_settings(tmp_path, allow_pickle=True))
    assert only_pickle.allow_pickle and not only_pickle.trust_remote_code
    default = build_config({**MINIMAL}, {}, make_settings(tmp_path))
    assert not default.allow_pickle and not default.trust_remote_code


def test_settings_read_the_operator_switches_from_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("SVDFORGE_DATA_DIR", str(tmp_path))
    assert not Settings().allow_pickle and not Settings().trust_remote_code
    monkeypatch.setenv("SVDFORGE_ALLOW_PICKLE", "true")
    monkeypatch.setenv("SVDFORGE_TRUST_REMOTE_CODE", "1")
    assert Settings().allow_pickle and Settings().trust_remote_code


def _remote_code_model(root: Path, tiny: Path, marker: Path) -> Path:
    """The tiny llama, renamed to an architecture transformers does not know, with its own code
    whose import writes `marker`: the marker's existence says the code ran."""
    d = root / f"custom_{uuid.uuid4().hex[:8]}"
    shutil.copytree(tiny, d)
    cfg = json.loads((d / "config.json").read_text())
    # a supported model_type with its own code, as hub models have (an unknown one is refused at submission)
    cfg.update(model_type="llama", auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                                             "AutoModelForCausalLM": "modeling_custom.CustomLM"})
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "configuration_custom.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
        "from transformers import LlamaConfig\n\n\nclass CustomConfig(LlamaConfig):\n"
        f"    model_type = {cfg['model_type']!r}\n")
    (d / "modeling_custom.py").write_text(
        "raise RuntimeError('remote code ran')\n")
    return d


@pytest.mark.parametrize("trusted", [False, True])
def test_remote_code_runs_only_when_the_operator_trusts_it(tmp_path, db, tokens, tiny_model_root, trusted):
    from svdforge.persistence.storage import make_storage
    from svdforge.worker.runner import JobRunner

    root = tmp_path / "models"
    root.mkdir(exist_ok=True)
    marker = tmp_path / "marker"
    model = _remote_code_model(root, tiny_model_root / "tiny", marker)
    settings = make_settings(tmp_path, data_dir=db.settings.data_dir, model_root=root, trust_remote_code=trusted)
    auth = {"Authorization": f"Bearer {tokens['alice']}"}
    with TestClient(create_app(settings)) as c:
        job = post_job(c, auth, model=str(model), **TINY_REQUEST_OPTIONS).json()
        status = JobRunner(db, make_storage(settings), settings).run(job["id"])
        error = c.get(f"/v1/jobs/{job['id']}", headers=auth).json()["error"]
    assert marker.exists() is trusted, error
    # untrusted, transformers' own Llama is used and the folder's code never runs; trusted, it runs (and raises)
    assert status == ("failed" if trusted else "succeeded"), error


@pytest.mark.parametrize("model_type,words", [("gpt2", "Conv1D"), ("mixtral", "experts"), ("bert", "not supported"),
                                              ("svdforge_llama", "already an svdforge artifact")])
def test_an_architecture_svdforge_does_not_compress_is_refused_at_submission(client, auth, settings,
                                                                             model_type, words):
    d = settings.model_root / model_type
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": model_type}))
    (d / "model.safetensors").write_bytes(b"{}")
    body = assert_problem(post_job(client, auth, model=str(d)), 422, field="model")
    assert words in body["detail"]
    if model_type != "svdforge_llama":
        assert "Supported model_type values: llama, mistral, qwen2, phi3, gemma2, gpt_neox" in body["detail"]
