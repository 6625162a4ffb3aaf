"""The OpenAPI contract (operation ids, tags, problem+json errors) and the service CLI."""
from __future__ import annotations

from typer.testing import CliRunner

OPERATIONS = {
    ("post", "/v1/jobs"): "create_job", ("get", "/v1/jobs"): "list_jobs",
    ("get", "/v1/jobs/{job_id}"): "get_job", ("post", "/v1/jobs/{job_id}/cancel"): "cancel_job",
    ("get", "/v1/jobs/{job_id}/events"): "list_job_events", ("get", "/v1/jobs/{job_id}/report"): "get_job_report",
    ("get", "/v1/jobs/{job_id}/artifacts"): "list_job_artifacts",
    ("get", "/v1/jobs/{job_id}/artifacts/{artifact_id}"): "get_job_artifact",
    ("get", "/v1/jobs/{job_id}/artifacts/{artifact_id}/content"): "download_job_artifact",
    ("post", "/v1/files"): "upload_file", ("get", "/v1/files"): "list_files",
    ("get", "/v1/files/{file_id}"): "get_file", ("delete", "/v1/files/{file_id}"): "delete_file",
    ("post", "/v1/webhooks"): "create_webhook", ("get", "/v1/webhooks"): "list_webhooks",
    ("get", "/v1/webhooks/{webhook_id}"): "get_webhook", ("delete", "/v1/webhooks/{webhook_id}"): "delete_webhook",
    ("get", "/v1/webhooks/{webhook_id}/deliveries"): "list_webhook_deliveries",
    ("get", "/healthz"): "healthz", ("get", "/readyz"): "readyz",
}


def test_operation_ids_and_tags(client):
    schema = client.get("/openapi.json").json()
    found = {(m, p): op["operationId"] for p, ops in schema["paths"].items() for m, op in ops.items()}
    assert found == OPERATIONS
    for p, ops in schema["paths"].items():
        for op in ops.values():
            assert op["tags"] and op["tags"][0] in {"jobs", "files", "webhooks", "health"}
            if p.startswith("/v1/"):
                assert op["security"] == [{"ApiKey": []}]
                assert "401" in op["responses"] and "422" in op["responses"]


def test_errors_are_declared_as_problem_json(client):
    schema = client.get("/openapi.json").json()
    assert "HTTPValidationError" not in schema["components"]["schemas"]
    for ops in schema["paths"].values():
        for op in ops.values():
            for status, response in op["responses"].items():
                if status[0] in "45":
                    assert list(response["content"]) == ["application/problem+json"], (op["operationId"], status)
                    assert response["content"]["application/problem+json"]["schema"] == {
                        "$ref": "#/components/schemas/Problem"}


def test_schema_documents_the_defaults(client):
    """Every default the schema shows is the one of core's dataclasses (svdforge.core.config)."""
    from svdforge.core.config import DataSpec, EvalConfig, RecoverConfig

    schemas = client.get("/openapi.json").json()["components"]["schemas"]
    # `ratio` or `ratios` (a sweep): exactly one, checked by the model (tests/service/test_sweep.py)
    assert schemas["JobCreate"]["required"] == ["model"]
    assert {"ratio", "ratios"} <= set(schemas["JobCreate"]["properties"])
    assert schemas["JobCreate"]["additionalProperties"] is False

    def defaults(name: str) -> dict:
        return {k: v.get("default") for k, v in schemas[name]["properties"].items()}  # null: not shown

    data, evaluation, recover = DataSpec(), EvalConfig(), RecoverConfig()
    for name in ("BuiltinData", "FileData", "HfData"):
        assert defaults(name).items() >= {"samples": data.samples, "seq_len": data.seq_len, "seed": data.seed}.items()
    for name in ("BuiltinEvaluation", "FileEvaluation", "HfEvaluation"):
        assert defaults(name).items() >= {k: getattr(evaluation, k) for k in (
            "enabled", "seq_len", "max_tokens", "batch_size", "throughput", "prompts", "sample_tokens")}.items()
    training = ("update", "update_mix", "epochs", "max_steps", "lr", "batch_size", "objective", "alpha")
    assert defaults("LoraAdapter").items() >= {k: getattr(recover, k) for k in (*training, "rank", "dropout")}.items()
    assert defaults("AdaLoraAdapter").items() >= {k: getattr(recover, k) for k in (*training, "init_r", "target_r")
                                                  }.items()
    assert defaults("UpdateAdapter")["mix"] == recover.update_mix  # the public name of core's update_mix


def test_keys_cli(tmp_path, monkeypatch):
    from fastapi.testclient import TestClient

    from svdforge.api.main import create_app
    from svdforge.cli import service_cmds  # noqa: F401 - registers the commands
    from svdforge.cli.main import app

    from .conftest import TEST_DATABASE_URL, fresh_database, make_settings

    if TEST_DATABASE_URL:  # the CLI reads the database URL from the environment
        monkeypatch.setenv("SVDFORGE_DATABASE_URL", TEST_DATABASE_URL)
        fresh_database(make_settings(tmp_path)).dispose()
    runner = CliRunner()
    data = tmp_path / "data"
    created = runner.invoke(app, ["keys", "create", "--name", "ci", "--data-dir", str(data)])
    assert created.exit_code == 0, created.output
    token = created.stdout.strip().splitlines()[0]
    assert token.startswith("svdf_") and len(token) > 40
    listed = runner.invoke(app, ["keys", "list", "--data-dir", str(data)])
    assert "ci" in listed.stdout and token not in listed.stdout and token[:12] in listed.stdout
    key_id = listed.stdout.split()[0]
    with TestClient(create_app(make_settings(tmp_path))) as c:
        assert c.get("/v1/jobs", headers={"Authorization": f"Bearer {token}"}).status_code == 200
        assert runner.invoke(app, ["keys", "revoke", key_id, "--data-dir", str(data)]).exit_code == 0
        assert c.get("/v1/jobs", headers={"Authorization": f"Bearer {token}"}).status_code == 401
    bad = runner.invoke(app, ["keys", "create", "--name", " ", "--data-dir", str(data)])
    assert bad.exit_code != 0
    assert runner.invoke(app, ["keys", "revoke", "key_nope", "--data-dir", str(data)]).exit_code != 0


def test_embedded_prepare_creates_one_local_key(tmp_path):
    from svdforge.cli.embedded import prepare
    from svdforge.persistence.keys import find_key

    from .conftest import make_settings

    settings = make_settings(tmp_path)
    db, key_file, created = prepare(settings)
    token = key_file.read_text().strip()
    assert created and key_file.stat().st_mode & 0o777 == 0o600
    db2, key_file2, created2 = prepare(settings)  # a restart keeps the key
    assert not created2 and key_file2.read_text().strip() == token
    with db.session() as s:
        assert find_key(s, token) is not None
    db.dispose()
    db2.dispose()
