"""Artifact and upload storage: a local folder (default) or an S3 bucket (boto3).

The interface is what the service needs and no more: put a file, read a byte range as a
stream (HTTP Range downloads), copy an object to a local path (the worker reads uploaded
data), delete by prefix (cancelled jobs leave nothing behind), presign where the backend
can, and a readiness check. Keys are relative, '/'-separated paths chosen by the service.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

from svdforge.persistence.settings import Settings

CHUNK = 1024 * 1024


class StorageError(Exception):
    """The backend could not do what was asked (missing object, unreachable service)."""


class Storage(Protocol):
    name: str

    def put_file(self, key: str, path: Path, *, content_type: str = "application/octet-stream",
                 move: bool = False) -> None: ...
    def size(self, key: str) -> int: ...
    def open_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]: ...
    def download_to(self, key: str, path: Path) -> None: ...
    def delete_prefix(self, prefix: str) -> int: ...
    def presign(self, key: str, expires_s: int, filename: str) -> str | None: ...
    def check(self) -> None: ...


def _check_key(key: str) -> str:
    parts = key.split("/")
    if not key or key.startswith("/") or any(p in ("", ".", "..") for p in parts):
        raise StorageError(f"invalid storage key {key!r}")
    return key


class LocalStorage:
    """Objects are files under `root`; writes go through a temporary file and a rename."""

    name = "local"

    def __init__(self, root: Path) -> None:
        self.root = Path(root).resolve()

    def _path(self, key: str) -> Path:
        return self.root / _check_key(key)

    def put_file(self, key: str, path: Path, *, content_type: str = "application/octet-stream",
                 move: bool = False) -> None:
        dest = self._path(key)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if move:
            try:
                os.replace(path, dest)
                return
            except OSError:  # another file system: fall back to a copy
                pass
        fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=".upload-")
        os.close(fd)
        try:
            shutil.copyfile(path, tmp)
            os.replace(tmp, dest)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise StorageError(f"no object {key!r}") from None

    def open_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        """Bytes start..end (inclusive). The file is opened now, so a missing one fails here."""
        try:
            f = self._path(key).open("rb")
        except FileNotFoundError:
            raise StorageError(f"no object {key!r}") from None
        return _read_range(f, start, end)

    def download_to(self, key: str, path: Path) -> None:
        try:
            shutil.copyfile(self._path(key), path)
        except FileNotFoundError:
            raise StorageError(f"no object {key!r}") from None

    def delete_prefix(self, prefix: str) -> int:
        target = self._path(prefix.rstrip("/"))
        count = 0
        if target.is_dir():
            count = sum(1 for p in target.rglob("*") if p.is_file())
            shutil.rmtree(target, ignore_errors=True)
        elif target.is_file():
            target.unlink()
            count = 1
        self._prune(target.parent)
        return count

    def _prune(self, folder: Path) -> None:
        """Remove folders left empty, as an object store has no folders to leave behind."""
        while folder != self.root and folder.is_relative_to(self.root):
            try:
                folder.rmdir()
            except OSError:  # not empty (or already gone and its parent is not)
                if folder.exists():
                    return
            folder = folder.parent

    def presign(self, key: str, expires_s: int, filename: str) -> str | None:
        return None  # nothing serves these files but the API itself

    def check(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        if not os.access(self.root, os.W_OK):
            raise StorageError(f"{self.root} is not writable")


def _read_range(f, start: int, end: int | None) -> Iterator[bytes]:
    with f:
        f.seek(start)
        remaining = None if end is None else end - start + 1
        while remaining is None or remaining > 0:
            chunk = f.read(CHUNK if remaining is None else min(CHUNK, remaining))
            if not chunk:
                return
            if remaining is not None:
                remaining -= len(chunk)
            yield chunk


class S3Storage:
    """Objects in a bucket (AWS S3, MinIO, SeaweedFS: set the endpoint URL)."""

    name = "s3"

    def __init__(self, bucket: str, prefix: str = "", endpoint_url: str | None = None,
                 region: str | None = None, client=None) -> None:
        import boto3
        from botocore.config import Config

        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.client = client or boto3.client(
            "s3", endpoint_url=endpoint_url, region_name=region,
            config=Config(retries={"max_attempts": 3, "mode": "standard"}, signature_version="s3v4"))

    def _key(self, key: str) -> str:
        return self.prefix + _check_key(key)

    def _errors(self):
        from botocore.exceptions import BotoCoreError, ClientError
        return (BotoCoreError, ClientError)

    def put_file(self, key: str, path: Path, *, content_type: str = "application/octet-stream",
                 move: bool = False) -> None:
        try:
            self.client.upload_file(str(path), self.bucket, self._key(key),
                                    ExtraArgs={"ContentType": content_type})
        except self._errors() as e:
            raise StorageError(f"upload of {key!r} failed: {e}") from e
        if move:
            Path(path).unlink(missing_ok=True)

    def size(self, key: str) -> int:
        try:
            return int(self.client.head_object(Bucket=self.bucket, Key=self._key(key))["ContentLength"])
        except self._errors() as e:
            raise StorageError(f"no object {key!r}: {e}") from e

    def open_range(self, key: str, start: int = 0, end: int | None = None) -> Iterator[bytes]:
        args = {"Bucket": self.bucket, "Key": self._key(key)}
        if start or end is not None:
            args["Range"] = f"bytes={start}-{'' if end is None else end}"
        try:
            body = self.client.get_object(**args)["Body"]
        except self._errors() as e:
            raise StorageError(f"no object {key!r}: {e}") from e
        return _stream_body(body)

    def download_to(self, key: str, path: Path) -> None:
        try:
            self.client.download_file(self.bucket, self._key(key), str(path))
        except self._errors() as e:
            raise StorageError(f"download of {key!r} failed: {e}") from e

    def delete_prefix(self, prefix: str) -> int:
        full = self._key(prefix.rstrip("/"))
        count = 0
        try:
            pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=full)
            for page in pages:
                keys = [{"Key": o["Key"]} for o in page.get("Contents", [])
                        if o["Key"] == full or o["Key"].startswith(full + "/")]
                if keys:
                    self.client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})
                    count += len(keys)
        except self._errors() as e:
            raise StorageError(f"delete of {prefix!r} failed: {e}") from e
        return count

    def presign(self, key: str, expires_s: int, filename: str) -> str | None:
        safe = filename.replace('"', "")
        return self.client.generate_presigned_url(
            "get_object", ExpiresIn=expires_s,
            Params={"Bucket": self.bucket, "Key": self._key(key),
                    "ResponseContentDisposition": f'attachment; filename="{safe}"'})

    def check(self) -> None:
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except self._errors() as e:
            raise StorageError(f"bucket {self.bucket!r} not reachable: {e}") from e


def _stream_body(body) -> Iterator[bytes]:
    try:
        yield from body.iter_chunks(CHUNK)
    finally:
        body.close()


def make_storage(settings: Settings) -> Storage:
    if settings.storage == "s3":
        return S3Storage(settings.s3_bucket, settings.s3_prefix, settings.s3_endpoint_url, settings.s3_region)
    assert settings.storage_dir is not None
    return LocalStorage(settings.storage_dir)
