"""/v1/files: upload a UTF-8 text file for calibration, training or evaluation data."""
from __future__ import annotations

import codecs
import hashlib
import os
import re
import tempfile
from pathlib import Path
from typing import Annotated, Literal

from fastapi import APIRouter, File, Form, Request, Response, UploadFile
from sqlalchemy import select

from svdforge.api.deps import CurrentKey, SessionDep, SettingsDep, StorageDep
from svdforge.api.json_body import JsonRoute
from svdforge.api.limits import too_large
from svdforge.api.problems import ProblemError, field_error
from svdforge.api.routes.common import After, Limit, cursor, file_out, list_response, page, problems
from svdforge.api.schemas import FileDeleted, FileList, FileOut
from svdforge.persistence.ids import new_id
from svdforge.persistence.storage import StorageError
from svdforge.persistence.tables import File as FileRow

router = APIRouter(prefix="/files", tags=["files"], route_class=JsonRoute)  # JSON bodies, if any, parsed as the others

CHUNK = 1024 * 1024


def _safe_filename(name: str | None) -> str:
    """The client's name, kept as a label only (storage keys are ours): no folders, no `.`/`..`."""
    base = re.sub(r"[\x00-\x1f\x7f\"\\/]", "_", os.path.basename(name or "")).strip()
    return base[:255] if base.strip(".") else "upload.txt"


def _spool(upload: UploadFile, folder: Path, max_bytes: int) -> tuple[Path, int, str]:
    """Copy the upload to a local file, checking its size and that it is UTF-8 text."""
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".upload-")
    digest, size = hashlib.sha256(), 0
    decoder = codecs.getincrementaldecoder("utf-8")()
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := upload.file.read(CHUNK):
                size += len(chunk)
                if size > max_bytes:
                    raise too_large(max_bytes)
                decoder.decode(chunk)
                digest.update(chunk)
                out.write(chunk)
            decoder.decode(b"", final=True)
    except UnicodeDecodeError:
        Path(tmp).unlink(missing_ok=True)
        raise field_error("file", "the file is not UTF-8 text") from None
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    if size == 0:
        Path(tmp).unlink(missing_ok=True)
        raise field_error("file", "the file is empty")
    return Path(tmp), size, digest.hexdigest()


@router.post("", status_code=201, operation_id="upload_file", response_model=FileOut,
             responses=problems(400, 401, 413, 422, 503), summary="Upload a text file (UTF-8, one paragraph per line)",
             description="Use the returned id as `{\"source\": \"file\", \"file_id\": ...}` in a job's calibration, "
                         "adapter.data or evaluation. Files over the server's limit get a 413.")
def upload_file(file: Annotated[UploadFile, File(description="UTF-8 text, not empty.",
                                                 json_schema_extra={"minLength": 1, "format": "binary"})],
                purpose: Annotated[Literal["calibration", "training", "evaluation"], Form()],
                request: Request, response: Response, session: SessionDep, key: CurrentKey, settings: SettingsDep,
                storage: StorageDep) -> FileOut:
    tmp, size, sha = _spool(file, settings.work_dir / "uploads", settings.max_upload_bytes)
    file_id = new_id("file")
    storage_key = f"uploads/{file_id}"
    try:
        storage.put_file(storage_key, tmp, content_type="text/plain; charset=utf-8", move=True)
    except StorageError:
        raise ProblemError(503, "storage_unavailable", "the file store is unavailable; try again") from None
    finally:
        tmp.unlink(missing_ok=True)
    row = FileRow(id=file_id, owner_id=key.id, filename=_safe_filename(file.filename), purpose=purpose, bytes=size,
               sha256=sha, storage_key=storage_key)
    session.add(row)
    try:
        session.commit()
    except BaseException:
        storage.delete_prefix(storage_key)
        raise
    response.headers["Location"] = str(request.url_for("get_file", file_id=file_id))
    return file_out(row)


def _owned_file(session, file_id: str, key) -> FileRow:
    f = session.get(FileRow, file_id)
    if f is None or f.owner_id != key.id:
        raise ProblemError(404, "not_found", f"no file {file_id}")
    return f


@router.get("", operation_id="list_files", response_model=FileList, responses=problems(401, 422),
            summary="List your uploaded files, newest first")
def list_files(session: SessionDep, key: CurrentKey, after: After = None, limit: Limit = 20) -> FileList:
    q = select(FileRow).where(FileRow.owner_id == key.id)
    if cursor(after, "file"):
        q = q.where(FileRow.id < after)
    rows, more = page(list(session.scalars(q.order_by(FileRow.id.desc()).limit(limit + 1))), limit)
    data = [file_out(f) for f in rows]
    return list_response(FileList, data, more)


@router.get("/{file_id}", operation_id="get_file", response_model=FileOut, responses=problems(401, 404, 422),
            summary="Get an uploaded file's metadata")
def get_file(file_id: str, session: SessionDep, key: CurrentKey) -> FileOut:
    return file_out(_owned_file(session, file_id, key))


@router.delete("/{file_id}", operation_id="delete_file", response_model=FileDeleted,
               responses=problems(401, 404, 422), summary="Delete an uploaded file",
               description="Queued jobs that name the file will fail with `invalid_input` when they start.")
def delete_file(file_id: str, session: SessionDep, key: CurrentKey, storage: StorageDep) -> FileDeleted:
    f = _owned_file(session, file_id, key)
    session.delete(f)
    session.commit()
    try:
        storage.delete_prefix(f.storage_key)
    except StorageError:
        pass  # the row is gone, so the object is unreachable; a sweep can remove it later
    return FileDeleted(id=file_id)
