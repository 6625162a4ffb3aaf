"""Both storage backends behave the same (S3 through moto's in-process fake)."""
from __future__ import annotations

import urllib.parse

import boto3
import pytest
from moto import mock_aws

from svdforge.persistence.storage import LocalStorage, S3Storage, StorageError

DATA = bytes(range(256)) * 40  # 10240 bytes


@pytest.fixture(params=["local", "s3"])
def storage(request, tmp_path, monkeypatch):
    if request.param == "local":
        yield LocalStorage(tmp_path / "store")
        return
    for k, v in {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    with mock_aws():
        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="forge")
        yield S3Storage("forge", prefix="svdforge", region="us-east-1")


def test_put_read_ranges_delete(storage, tmp_path):
    src = tmp_path / "src.bin"
    src.write_bytes(DATA)
    storage.check()
    storage.put_file("artifacts/job_1/1/model.safetensors", src)
    storage.put_file("artifacts/job_1/1/config.json", src, content_type="application/json")
    storage.put_file("artifacts/job_10/1/config.json", src)  # shares the prefix text, not the folder
    assert src.exists()  # put without move keeps the source
    assert storage.size("artifacts/job_1/1/model.safetensors") == len(DATA)
    assert b"".join(storage.open_range("artifacts/job_1/1/model.safetensors")) == DATA
    assert b"".join(storage.open_range("artifacts/job_1/1/model.safetensors", 10, 19)) == DATA[10:20]
    assert b"".join(storage.open_range("artifacts/job_1/1/model.safetensors", 10000)) == DATA[10000:]
    out = tmp_path / "copy.bin"
    storage.download_to("artifacts/job_1/1/config.json", out)
    assert out.read_bytes() == DATA
    assert storage.delete_prefix("artifacts/job_1") == 2
    assert storage.delete_prefix("artifacts/job_1") == 0
    with pytest.raises(StorageError):
        storage.size("artifacts/job_1/1/model.safetensors")
    with pytest.raises(StorageError):
        storage.open_range("artifacts/job_1/1/config.json")
    assert storage.size("artifacts/job_10/1/config.json") == len(DATA)


def test_move_removes_the_source(storage, tmp_path):
    src = tmp_path / "m.bin"
    src.write_bytes(DATA)
    storage.put_file("uploads/file_1", src, move=True)
    assert not src.exists()
    assert b"".join(storage.open_range("uploads/file_1")) == DATA


@pytest.mark.parametrize("key", ["../escape", "/abs", "a//b", "a/./b", ""])
def test_keys_cannot_escape(storage, tmp_path, key):
    src = tmp_path / "x"
    src.write_bytes(b"x")
    with pytest.raises(StorageError):
        storage.put_file(key, src)


def test_presign(storage, tmp_path):
    src = tmp_path / "x"
    src.write_bytes(DATA)
    storage.put_file("artifacts/j/1/model.safetensors", src)
    url = storage.presign("artifacts/j/1/model.safetensors", 600, "model.safetensors")
    if isinstance(storage, LocalStorage):
        assert url is None
        return
    parsed = urllib.parse.urlparse(url)
    query = urllib.parse.parse_qs(parsed.query)
    assert parsed.path.endswith("/svdforge/artifacts/j/1/model.safetensors")
    assert query["X-Amz-Expires"] == ["600"] and "X-Amz-Signature" in query
    assert query["response-content-disposition"] == ['attachment; filename="model.safetensors"']
    import requests  # moto intercepts the presigned GET as well

    assert requests.get(url, timeout=10).content == DATA


def test_s3_check_fails_for_a_missing_bucket(monkeypatch):
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    with mock_aws(), pytest.raises(StorageError):
        S3Storage("nope", region="us-east-1").check()
