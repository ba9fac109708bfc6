"""Local folders and ``s3://`` buckets behind one small interface (``pyarrow.fs``).

Ray Train persists checkpoints through ``pyarrow.fs``; zeroplane reads and writes the same storage
through the same filesystem objects, so a local path and an S3 prefix behave alike. The S3 endpoint
comes from ``AWS_ENDPOINT_URL`` (S3-compatible servers) and credentials from the standard AWS chain.

The folder and file names under a storage root are :mod:`zeroplane.layout`'s.
"""

from __future__ import annotations

import json
import os
import posixpath
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List, Optional

from .errors import ZeroplaneError


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

    @classmethod
    def from_uri(cls, uri: str, endpoint_url: Optional[str] = None) -> "Storage":
        """Open a storage root.

        Args:
            uri: a local folder or ``s3://bucket/prefix``.
            endpoint_url: S3-compatible endpoint (``http://host:port``) for ``s3://`` roots; default
                ``$AWS_ENDPOINT_URL_S3`` / ``$AWS_ENDPOINT_URL``, else AWS. Ignored for local folders.

        Raises:
            ZeroplaneError: an unsupported scheme (only local paths and s3:// are supported).
        """
        import pyarrow.fs as pafs

        if uri.startswith("s3://"):
            root = uri[len("s3://"):].strip("/")
            if not root:
                raise ZeroplaneError(f"storage_path {uri!r} names no bucket; use s3://bucket/prefix")
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
        """A path inside ``fs`` under the root."""
        return posixpath.join(self.root, *parts) if parts else self.root

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
        """Parse a JSON file."""
        return json.loads(self.read_bytes(path))

    def write_bytes(self, path: str, data: bytes) -> None:
        """Write a file atomically: readers see the old file or the whole new one, never a part.

        Local: write a temp file next to it and rename. S3: a PUT is atomic already.
        """
        if self.is_local:
            write_file_atomic(path, data)
        else:
            with self.fs.open_output_stream(path) as f:
                f.write(data)

    def write_json(self, path: str, obj: Any) -> None:
        """Write ``obj`` as indented JSON, atomically."""
        self.write_bytes(path, (json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n").encode())

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

    def delete_dir(self, path: str) -> None:
        """Delete a folder and everything in it (missing is fine)."""
        if self.exists(path):
            self.fs.delete_dir(path)


def storage_error(storage: Storage, what: str, e: BaseException) -> str:
    """One line: ``storage <uri> (bucket B at endpoint E) <what>: <first line of e>``.

    Secret values from the environment are blanked in case a library echoes them back; the text is cut
    at 300 characters.
    """
    text = " ".join(str(e).split()) or type(e).__name__
    for k in ("AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_ACCESS_KEY_ID"):
        if len(os.environ.get(k) or "") >= 8:  # shorter values would blank ordinary letters
            text = text.replace(os.environ[k], "***")
    if len(text) > 300:
        text = text[:300] + "…"
    where = "" if storage.is_local else (
        f" (bucket {storage.bucket!r} at endpoint {storage.endpoint_url or 'AWS default'})")
    return f"storage {storage.uri}{where} {what}: {text}"
