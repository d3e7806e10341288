"""Object-store access: the one module that touches credentials.

Credentials come from the job spec's `storage:` block or the standard AWS
environment variables, resolved once in the driver so that Ray workers on other
nodes get them inside the (pickled) filesystem rather than from their own
environment. They are typed as secrets and never printed.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pyarrow.fs as pafs

from pipelines.config.storage import StorageOptions
from pipelines.errors import InputError


def protocol_of(path: str) -> str:
    """`s3`, `gs`, ... or `file` for a local path."""
    return path.split("://", 1)[0] if "://" in path else "file"


def filesystem_for(path: str, options: StorageOptions) -> tuple[fsspec.AbstractFileSystem, str]:
    """The fsspec filesystem for `path` and the path as that filesystem names it."""
    protocol = protocol_of(path)
    if protocol == "file":
        return fsspec.filesystem("file"), os.path.abspath(path.removeprefix("file://"))
    return fsspec.core.url_to_fs(path, **options.fsspec_kwargs(protocol))


def arrow_filesystem(fs: fsspec.AbstractFileSystem) -> pafs.FileSystem:
    """The same filesystem as pyarrow (and so Ray Data) takes it."""
    if fs.protocol in ("file", ("file", "local")) or "file" in fs.protocol:
        return pafs.LocalFileSystem()
    return pafs.PyFileSystem(pafs.FSSpecHandler(fs))


def to_uri(path: str, protocol: str) -> str:
    """A filesystem path back as a URI (`bucket/key` -> `s3://bucket/key`)."""
    return path if protocol == "file" else f"{protocol}://{path}"


def join(base: str, *parts: str) -> str:
    """Join path parts with `/`, for local paths and URLs alike."""
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def read_bytes(uri: str, options: StorageOptions) -> bytes:
    """The whole object at `uri` (local path, `s3://`, `gs://`)."""
    fs, path = filesystem_for(uri, options)
    with fs.open(path, "rb") as f:
        return f.read()


def download_folder(uri: str, options: StorageOptions, dest: Path) -> None:
    """Copy every file under `uri` into the (existing, empty) local folder `dest`."""
    fs, root = filesystem_for(uri, options)
    root = root.rstrip("/")
    for path in fs.find(root):
        local = dest / path[len(root) :].lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        fs.get_file(path, str(local))


def input_files(uri: str, storage: StorageOptions, suffix: str, what: str) -> tuple[Any, str, list[str]]:
    """The files ending in `suffix` at `uri` (a file, or a folder searched recursively), sorted, with their
    filesystem and `uri` as it names it. Raises InputError naming the path when it is missing, unlistable or holds none (`what`)."""
    fs, root = filesystem_for(uri, storage)
    try:
        exists = fs.exists(root)
        is_dir = exists and fs.isdir(root)
        files = sorted(p for p in fs.find(root) if p.endswith(suffix)) if is_dir else [root]
    except Exception as exc:  # noqa: BLE001 - any store error is the user's to see, with the path
        raise InputError(f"input.path {uri}: cannot list it: {exc}") from None
    if not exists:
        raise InputError(f"input.path {uri}: no such file or folder")
    if not files:
        raise InputError(f"input.path {uri}: the folder holds no {what}")
    return fs, root, files


# Writes that readers see whole or not at all: the commit protocol, the ledger and the cost pass rely on them.


def replace_file(fs, path: str, write) -> None:
    """Write `path` whole through `write(file)`, so that readers see the old file or the new one, never a part."""
    from fsspec.implementations.local import LocalFileSystem

    if not isinstance(fs, LocalFileSystem):
        with fs.open(path, "wb") as f:  # one PUT: the object is replaced whole
            write(f)
        return
    tmp = f"{path}.{uuid.uuid4().hex}.tmp"
    with fs.open(tmp, "wb") as f:
        write(f)
    fs.mv(tmp, path)


def write_json_atomic(fs, path: str, payload: dict[str, Any], *, exclusive: bool = False) -> bool:
    """Write a small JSON object so that readers see all of it or nothing.

    With `exclusive`, only if `path` does not exist yet (S3's conditional
    `If-None-Match: *`, a hard link on a local disk), so that of two attempts
    racing on one run only one commits; returns False when it already existed.
    """
    from fsspec.implementations.local import LocalFileSystem

    data = (json.dumps(payload, indent=2, default=str) + "\n").encode()
    if isinstance(fs, LocalFileSystem):
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        tmp = f"{path}.{uuid.uuid4().hex}.tmp"
        fs.pipe_file(tmp, data)
        if not exclusive:
            fs.mv(tmp, path)
            return True
        try:
            os.link(tmp, path)  # fails if the path exists: an exclusive create that is also atomic
            return True
        except FileExistsError:
            return False
        finally:
            os.unlink(tmp)
    if not exclusive:
        fs.pipe_file(path, data)  # one PUT: the object appears whole
        return True
    try:
        fs.pipe_file(path, data, mode="create")
        return True
    except OSError as exc:
        if _precondition_failed(exc):
            return False
        raise


def _precondition_failed(exc: OSError) -> bool:
    """S3's answer to a conditional write that lost: 412 (the object changed or exists), or 409 (two conditional
    writes of one key at once, where AWS lets neither win); s3fs reports both as an OSError."""
    text = str(exc).lower()
    return isinstance(exc, FileExistsError) or any(
        s in text for s in ("pre-condition", "precondition", "conditionalrequestconflict"))


def read_versioned(fs, path: str) -> tuple[dict[str, Any], str] | None:
    """A small JSON object and its version, for `write_if_version`; None where there is none.

    The version is the object's ETag on S3 and a digest of its bytes on a local
    disk. S3 gives the ETag and the bytes in two requests, so the ETag is read
    on both sides of the bytes and the pair is kept only when they agree.
    """
    from fsspec.implementations.local import LocalFileSystem

    for _ in range(5):
        try:
            if isinstance(fs, LocalFileSystem):
                data = fs.cat_file(path)
                return json.loads(data), hashlib.sha256(data).hexdigest()
            before = fs.info(path, refresh=True).get("ETag")
            data = fs.cat_file(path)
            after = fs.info(path, refresh=True).get("ETag")
        except FileNotFoundError:
            return None
        if before is None or after is None:
            raise OSError(f"{path}: the store gives no ETag, so it cannot be written conditionally")
        if before == after:
            return json.loads(data), after
    raise OSError(f"{path}: changed on every one of 5 reads; another writer is busy on it")


def write_if_version(fs, path: str, payload: dict[str, Any], version: str | None) -> str | None:
    """Write a small JSON object only if it is still at `version` (None: only if it does not exist yet).

    Returns the new version, or None when the condition failed: another writer
    got there first. On S3 this is one PUT with `If-Match` (or `If-None-Match: *`),
    which the store decides; on a local disk a lock file serialises the check and
    the rename. Other stores have no conditional write that fsspec reaches, and are
    refused rather than raced.
    """
    from fsspec.implementations.local import LocalFileSystem

    data = (json.dumps(payload, indent=2, default=str) + "\n").encode()
    if isinstance(fs, LocalFileSystem):
        import fcntl

        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        with open(f"{path}.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, also when the process dies
            try:
                current = hashlib.sha256(Path(path).read_bytes()).hexdigest()
            except FileNotFoundError:
                current = None
            if current != version:
                return None
            tmp = f"{path}.{uuid.uuid4().hex}.tmp"
            Path(tmp).write_bytes(data)
            os.replace(tmp, path)
            return hashlib.sha256(data).hexdigest()
    if "s3" not in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,)):
        raise OSError(f"{path}: conditional writes are supported on S3 and local disks, not {fs.protocol}")
    condition = {"IfMatch": version} if version is not None else {"IfNoneMatch": "*"}
    try:
        out = fs.pipe_file(path, data, **condition)
    except OSError as exc:
        if _precondition_failed(exc):
            return None
        raise
    etag = out.get("ETag") if isinstance(out, dict) else None
    return etag or fs.info(path, refresh=True)["ETag"]


def read_json(fs, path: str) -> dict[str, Any] | None:
    try:
        return json.loads(fs.cat_file(path))
    except FileNotFoundError:
        return None
