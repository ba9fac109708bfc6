"""Local folders and ``s3://`` buckets behind one small interface (``pyarrow.fs``).

Ray Train persists checkpoints through ``pyarrow.fs``; zeroplane reads and writes the same storage
through the same filesystem objects, so a local path and an S3 prefix behave alike. The S3 endpoint
comes from ``AWS_ENDPOINT_URL`` (S3-compatible servers) and credentials from the standard AWS chain.
The two writes that race other writers (:meth:`Storage.create_exclusive`, :meth:`Storage.update_json`)
use ``O_EXCL`` and a file lock locally, and boto3's conditional PUTs on S3 (pyarrow has none).
Every path under a root goes through :meth:`Storage.path`, which refuses one outside the root; every
URL printed goes through :func:`mask_url`.

The folder and file names under a storage root are :mod:`zeroplane.layout`'s.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, List, Optional
from urllib.parse import urlsplit

from .errors import DamagedFileError, ZeroplaneError

#: ``scheme://userinfo@`` in any text: what :func:`mask_url` blanks.
_USERINFO_RE = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<userinfo>[^/@\s]+)@")
#: How often a conditional S3 write is tried again after another writer changed the object first.
_S3_CONDITIONAL_TRIES = 20


def mask_url(url: Optional[str]) -> Optional[str]:
    """``url`` with its userinfo (``user:password@``) replaced by ``***@``; other URLs and None unchanged.

    E.g. ``http://key:secret@minio:9000`` -> ``http://***@minio:9000``. Use it on every URL that is
    printed: an endpoint may carry credentials.
    """
    return url if not url else _USERINFO_RE.sub(r"\g<scheme>***@", url)


def s3_endpoint(endpoint_url: Optional[str] = None) -> Optional[str]:
    """The S3 endpoint URL in effect: ``endpoint_url``, else ``$AWS_ENDPOINT_URL_S3``, else
    ``$AWS_ENDPOINT_URL``; None means AWS itself."""
    return endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL") or None


def _s3_filesystem(endpoint_url: Optional[str] = None, bucket_region: Optional[str] = None):
    """A ``pyarrow.fs.S3FileSystem`` for an S3 or S3-compatible endpoint.

    Static credentials in the environment (``AWS_ACCESS_KEY_ID`` + ``AWS_SECRET_ACCESS_KEY`` [+
    ``AWS_SESSION_TOKEN``]) are given to the filesystem explicitly, so the object keeps working when Ray
    pickles it into processes that do not share this environment (Ray Train's controller and workers).
    Without them pyarrow uses the default AWS chain (instance roles, ``~/.aws``) wherever it runs.
    """
    import pyarrow.fs as pafs

    kwargs: dict[str, Any] = {}
    endpoint = s3_endpoint(endpoint_url)
    if endpoint:
        scheme, _, host = endpoint.partition("://")
        kwargs["endpoint_override"] = host.rstrip("/") if host else endpoint
        kwargs["scheme"] = scheme if host else "https"
    region = bucket_region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        kwargs["region"] = region
    key, secret = os.environ.get("AWS_ACCESS_KEY_ID"), os.environ.get("AWS_SECRET_ACCESS_KEY")
    if key and secret:
        kwargs.update(access_key=key, secret_key=secret)
        if os.environ.get("AWS_SESSION_TOKEN"):
            kwargs["session_token"] = os.environ["AWS_SESSION_TOKEN"]
    return pafs.S3FileSystem(**kwargs)


def write_file_atomic(path: str | os.PathLike, data: bytes, mode: Optional[int] = None) -> None:
    """Write a local file so that readers see the old file or the whole new one, never a part.

    The bytes go to a temporary file in the same folder (created if missing), are flushed to disk, and
    the temporary file is renamed over ``path`` (``os.replace`` is atomic within one filesystem, POSIX
    rename(2)). On any error the temporary file is removed and ``path`` is left as it was.

    Args:
        path: the destination.
        data: the whole content.
        mode: permission bits for the new file (e.g. ``0o600``), set before the rename; default: the
            process umask's.
    """
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=str(path.parent))
    try:
        with os.fdopen(fd, "wb") as f:
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            else:
                umask = os.umask(0)
                os.umask(umask)
                os.fchmod(f.fileno(), 0o666 & ~umask)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


@dataclass
class Storage:
    """A storage root: a local folder or ``s3://bucket/prefix``.

    Attributes:
        uri: the root as given by the user, with ``~`` expanded for local paths.
        fs: the ``pyarrow.fs.FileSystem`` serving it.
        root: the root path inside ``fs`` (absolute local path, or ``bucket/prefix``).
    """

    uri: str
    fs: Any
    root: str
    endpoint_url: Optional[str] = None

    def __repr__(self) -> str:
        # the endpoint may carry user:password@; a repr ends up in logs and tracebacks
        return f"Storage(uri={self.uri!r}, root={self.root!r}, endpoint_url={mask_url(self.endpoint_url)!r})"

    @classmethod
    def from_uri(cls, uri: str, endpoint_url: Optional[str] = None) -> "Storage":
        """Open a storage root.

        Args:
            uri: a local folder or ``s3://bucket/prefix``.
            endpoint_url: S3-compatible endpoint (``http://host:port``) for ``s3://`` roots; default
                ``$AWS_ENDPOINT_URL_S3`` / ``$AWS_ENDPOINT_URL``, else AWS. Ignored for local folders.

        Raises:
            ZeroplaneError: an unsupported scheme (only local paths and s3:// are supported), or an
                ``s3://`` root without a bucket or with a ``.``/``..`` segment.
        """
        import pyarrow.fs as pafs

        if uri.startswith("s3://"):
            root = uri[len("s3://"):].strip("/")
            if not root:
                raise ZeroplaneError(f"storage_path {uri!r} names no bucket; use s3://bucket/prefix")
            if {".", ".."} & set(root.split("/")):
                # keys are literal on S3: 'b/../x' would not mean 'x', and would defeat the check in path()
                raise ZeroplaneError(f"storage_path {uri!r}: '.' and '..' are not allowed in an s3:// path")
            return cls(uri="s3://" + root, fs=_s3_filesystem(endpoint_url), root=root,
                       endpoint_url=s3_endpoint(endpoint_url))
        if "://" in uri and not uri.startswith("file://"):
            raise ZeroplaneError(
                f"storage_path {uri!r}: unsupported scheme; use a local folder or s3://bucket/prefix"
            )
        path = str(Path(os.path.expanduser(uri.removeprefix("file://"))).resolve())
        return cls(uri=path, fs=pafs.LocalFileSystem(), root=path)

    @classmethod
    def for_checkpoint_spec(cls, checkpoint) -> "Storage":
        """The storage of a job spec's ``checkpoint`` section (``storage_path`` + ``s3_endpoint_url``)."""
        return cls.from_uri(checkpoint.storage_path, getattr(checkpoint, "s3_endpoint_url", None))

    @property
    def bucket(self) -> Optional[str]:
        """The bucket of an ``s3://`` root (None for local folders)."""
        return None if self.is_local else self.root.split("/", 1)[0]

    @property
    def is_local(self) -> bool:
        """True for a local folder."""
        return not self.uri.startswith("s3://")

    def path(self, *parts: str) -> str:
        """A path inside ``fs`` under the root: the root joined with ``parts`` by ``/``.

        Raises:
            ZeroplaneError: the result is not the root or below it (an absolute part, or ``..`` that
                climbs out); callers validate user-given names first, this is the last line of defence.
        """
        if not parts:
            return self.root
        joined = posixpath.join(self.root, *parts)
        norm = posixpath.normpath(joined)
        if norm != self.root and not norm.startswith(self.root.rstrip("/") + "/"):
            raise ZeroplaneError(f"path {'/'.join(parts)!r} is outside the storage root {self.uri}; "
                                 "names under a storage root may not be absolute or contain '..'")
        return joined

    def uri_of(self, path: str) -> str:
        """The user-facing URI of an ``fs`` path (``s3://…`` or the local path)."""
        return path if self.is_local else "s3://" + path

    def relative(self, path: str) -> str:
        """Path relative to the root."""
        return posixpath.relpath(path, self.root)

    def exists(self, path: str) -> bool:
        """Whether a file or folder exists."""
        import pyarrow.fs as pafs

        return self.fs.get_file_info(path).type != pafs.FileType.NotFound

    def isdir(self, path: str) -> bool:
        """Whether ``path`` is a folder (S3: a prefix with objects under it)."""
        import pyarrow.fs as pafs

        return self.fs.get_file_info(path).type == pafs.FileType.Directory

    def listdir(self, path: str) -> List[str]:
        """Names of the direct children of ``path``; ``[]`` when it does not exist."""
        import pyarrow.fs as pafs

        if not self.exists(path):
            return []
        infos = self.fs.get_file_info(pafs.FileSelector(path, recursive=False, allow_not_found=True))
        return sorted(posixpath.basename(i.path.rstrip("/")) for i in infos)

    def list_files(self, path: str) -> dict[str, int]:
        """All files under ``path`` (recursive) as ``{relative path: size in bytes}``."""
        import pyarrow.fs as pafs

        if not self.exists(path):
            return {}
        infos = self.fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
        base = path.rstrip("/")
        return {
            posixpath.relpath(i.path, base): i.size
            for i in infos
            if i.type == pafs.FileType.File
        }

    def read_bytes(self, path: str) -> bytes:
        """Whole file contents."""
        with self.fs.open_input_stream(path) as f:
            return f.read()

    def read_json(self, path: str) -> Any:
        """Parse a JSON file.

        Raises:
            DamagedFileError: the file is not valid JSON (named, with the parser's position).
        """
        return self._parse(path, self.read_bytes(path))

    def _parse(self, path: str, data: bytes) -> Any:
        try:
            return json.loads(data)
        except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
            raise DamagedFileError(f"{self.uri_of(path)} is not valid JSON ({e}): the file is damaged; restore it "
                                   "from a backup, or move it aside to start it afresh") from None

    def write_bytes(self, path: str, data: bytes | memoryview) -> None:
        """Write a file atomically: readers see the old file or the whole new one, never a part. ``data``:
        bytes or any contiguous buffer (a ``memoryview``), written without a copy.

        Local: write a temp file next to it and rename. S3: a PUT is atomic already.
        """
        if self.is_local:
            write_file_atomic(path, data)
        else:
            with self.fs.open_output_stream(path) as f:
                f.write(data)

    def write_json(self, path: str, obj: Any) -> None:
        """Write ``obj`` as indented JSON, atomically."""
        self.write_bytes(path, _json_bytes(obj))

    # -------------------------------------------------------------- writes that race other writers
    def _s3_client(self):
        """A boto3 S3 client for this root's endpoint: pyarrow's filesystem cannot make conditional
        writes, boto3 can (PutObject ``If-None-Match`` / ``If-Match``)."""
        import boto3

        region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
        return boto3.client("s3", endpoint_url=self.endpoint_url, region_name=region)

    def _s3_key(self, path: str) -> tuple[str, str]:
        bucket, _, key = path.partition("/")
        return bucket, key

    def _s3_put_if(self, client, path: str, data: bytes, etag: Optional[str]) -> int:
        """PUT ``data`` only if the object is absent (``etag`` None) or still has ``etag``.

        Returns:
            200 when written; 412 when the condition failed (the object exists, or changed); 409 when
            another conditional write of the key was in flight (S3 asks to try again).
        """
        from botocore.exceptions import ClientError

        bucket, key = self._s3_key(path)
        cond = {"IfMatch": etag} if etag else {"IfNoneMatch": "*"}
        try:
            client.put_object(Bucket=bucket, Key=key, Body=data, **cond)
        except ClientError as e:
            status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            if status in (409, 412):
                return status
            raise
        return 200

    def create_exclusive(self, path: str, data: bytes) -> bool:
        """Create the file ``path`` holding ``data`` unless something is there already.

        Atomic against every other ``create_exclusive`` of the same path, in any process or machine
        sharing the storage: exactly one of them returns True. Local: ``open(O_CREAT | O_EXCL)``
        (parent folders are created); S3: ``PutObject`` with ``If-None-Match: *``.

        Returns:
            True when this call created the file, False when it existed.

        Raises:
            OSError, botocore.exceptions.ClientError: the storage could not be written.
        """
        if self.is_local:
            os.makedirs(posixpath.dirname(path), exist_ok=True)
            try:
                fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                return False
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            return True
        client = self._s3_client()
        for _ in range(_S3_CONDITIONAL_TRIES):
            status = self._s3_put_if(client, path, data, None)
            if status != 409:
                return status == 200
            time.sleep(0.05)  # 409: another create of this key is in flight; ask again once it settled
        raise ZeroplaneError(f"{self.uri_of(path)}: S3 reported a conflicting write {_S3_CONDITIONAL_TRIES} "
                             "times in a row; try again")

    def update_json(self, path: str, change: Callable[[Any], Any]) -> Any:
        """Read-modify-write the JSON file ``path`` without losing a concurrent writer's update.

        ``change`` gets the parsed document (None when the file does not exist) and returns the new
        document, or None to leave the file as it is; it may be called more than once (S3 retries), so
        it must not have effects other than computing the result. Local: the whole update holds an
        exclusive ``fcntl.flock`` on ``<path>.lock`` (created next to the file, never deleted, so that
        every writer locks the same file), and the write is atomic (rename). S3: the object is read with
        its ETag and written with ``If-Match`` (``If-None-Match: *`` when absent); when another writer
        got there first (412) the update starts again from a fresh read.

        Returns:
            The document as read back after the write (or as found, when ``change`` returned None).

        Raises:
            ZeroplaneError: the S3 object kept changing under every one of 20 attempts.
            Whatever ``change`` raises (nothing is written then); OSError or a boto3 error from the storage.
        """
        if self.is_local:
            with _locked(path + ".lock"):
                new = change(self.read_json(path) if self.exists(path) else None)
                if new is not None:
                    self.write_json(path, new)
                return self.read_json(path) if self.exists(path) else None
        from botocore.exceptions import ClientError

        client = self._s3_client()
        bucket, key = self._s3_key(path)
        for _ in range(_S3_CONDITIONAL_TRIES):
            try:
                obj = client.get_object(Bucket=bucket, Key=key)
                doc, etag = self._parse(path, obj["Body"].read()), obj["ETag"]
            except ClientError as e:
                if e.response.get("Error", {}).get("Code") not in ("NoSuchKey", "404"):
                    raise
                doc, etag = None, None
            new = change(doc)
            if new is None:
                return doc
            status = self._s3_put_if(client, path, _json_bytes(new), etag)
            if status == 200:
                return self.read_json(path)
            if status == 409:
                time.sleep(0.05)  # another conditional write of this key is in flight; read again once it settled
        raise ZeroplaneError(f"{self.uri_of(path)} was changed by other writers during each of "
                             f"{_S3_CONDITIONAL_TRIES} attempts to update it; try again")

    def download_dir(self, path: str, local_dir: str | os.PathLike) -> Path:
        """Copy the folder ``path`` to ``local_dir`` (created); returns the local path."""
        import pyarrow.fs as pafs

        local = Path(local_dir)
        local.mkdir(parents=True, exist_ok=True)
        pafs.copy_files(path, str(local), source_filesystem=self.fs, destination_filesystem=pafs.LocalFileSystem())
        return local

    def upload_dir(self, local_dir: str | os.PathLike, path: str, skip: tuple[str, ...] = ()) -> None:
        """Copy the local folder to ``path`` file by file, leaving out names in ``skip``."""
        import pyarrow.fs as pafs

        base = Path(local_dir)
        for f in sorted(base.rglob("*")):
            if f.is_file() and f.name not in skip:
                rel = f.relative_to(base).as_posix()
                dest = posixpath.join(path, rel)
                if self.is_local:
                    os.makedirs(posixpath.dirname(dest), exist_ok=True)
                pafs.copy_files(str(f), dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=self.fs)

    def delete_file(self, path: str) -> None:
        """Delete one file (missing is fine)."""
        if self.exists(path):
            self.fs.delete_file(path)

    def delete_dir(self, path: str) -> None:
        """Delete a folder and everything in it (missing is fine)."""
        if self.exists(path):
            self.fs.delete_dir(path)


def _json_bytes(obj: Any) -> bytes:
    """``obj`` as indented, key-sorted JSON with a final newline (the one format of every JSON file)."""
    return (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode()


@contextlib.contextmanager
def _locked(lock_path: str) -> Iterator[None]:
    """Hold an exclusive ``fcntl.flock`` on ``lock_path`` (created if missing) for the ``with`` body.

    The lock is released when the file is closed, also when the process dies, so a crash never leaves
    it held.
    """
    import fcntl

    os.makedirs(posixpath.dirname(lock_path), exist_ok=True)
    with open(lock_path, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX)
        yield


def storage_error(storage: Storage, what: str, e: BaseException) -> str:
    """One line: ``storage <uri> (bucket B at endpoint E) <what>: <first line of e>``.

    Secret values from the environment are blanked in case a library echoes them back, and so is the
    userinfo (``user:password@``) of the endpoint and of any URL in the text (:func:`mask_url`); the
    text is cut at 300 characters.
    """
    text = mask_url(" ".join(str(e).split()) or type(e).__name__)
    blank = [v for k in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID")
             if len(v := os.environ.get(k) or "") >= 8]  # shorter values would blank ordinary letters
    userinfo = urlsplit(storage.endpoint_url or "").netloc.rpartition("@")[0]  # a library may echo it bare
    password = userinfo.partition(":")[2]
    blank += [userinfo] + ([password] if len(password) >= 4 else [])
    for secret in filter(None, blank):
        text = text.replace(secret, "***")
    if len(text) > 300:
        text = text[:300] + "…"
    where = "" if storage.is_local else (
        f" (bucket {storage.bucket!r} at endpoint {mask_url(storage.endpoint_url) or 'AWS default'})")
    return f"storage {storage.uri}{where} {what}: {text}"
