"""Prepared datasets in the storage: finding the source files, the fingerprint, and the manifests.

A prepared dataset is a folder ``datasets/<fingerprint>/`` under a storage root (local or ``s3://``)::

    datasets/<fingerprint>/
      train-00000.bin …           the training token stream, cut into shards of ``data.shard_tokens``
      val-00000.bin …             the validation token stream (raw little-endian uint16 or uint32)
      tokenizer_files.json        the tokenizer the tokens come from, as ``{file name: text}``
      manifest.json               source files, tokenizer hash, counts, shards: written LAST, it is the
                                  completion marker (a folder without it is never used)

The fingerprint is a SHA-256 (first :data:`FINGERPRINT_CHARS` hex digits) over the source files (path,
size, modification time), the tokenizer (its settings and the ``tokenizers`` version, or the hash of a
given tokenizer folder) and every preparation setting that changes the tokens (``text_field``,
``on_bad_record``, ``validation_fraction``, ``max_chars``, ``tokenizer_sample_chars``, ``shard_tokens``,
:data:`DATA_FORMAT`). ``seq_len`` is not part of it: shards hold token streams, sequences are cut when
read, so jobs with different ``seq_len`` share a dataset. Touching or growing a source file gives a new
fingerprint (a new dataset); the old one stays until deleted.

This module is control-plane code (no Ray, no torch); the preparation itself runs on the cluster
(:mod:`zeroplane.runtime.train.prepare`).
"""

from __future__ import annotations

import fnmatch
import glob
import hashlib
import json
import os
import posixpath
from dataclasses import asdict, dataclass
from typing import Any, Dict, List, Optional, Tuple

from .errors import DamagedFileError, NotFoundError, SpecError
from .names import DATA_SUFFIXES

#: Folder of prepared datasets under a storage root.
DATASETS_DIR = "datasets"
#: The manifest; written last, so it is also the completion marker.
MANIFEST = "manifest.json"
#: The tokenizer of a dataset as ``{file name: text}``.
TOKENIZER_FILES = "tokenizer_files.json"
#: Bumped whenever the shard layout or how documents are split/tokenized changes.
DATA_FORMAT = 1
#: Hex digits of the SHA-256 kept as the dataset id (80 bits: no collision among any realistic number).
FINGERPRINT_CHARS = 20
#: File name endings a source may hold; others under a folder or prefix are ignored.
SUFFIXES = DATA_SUFFIXES
#: The built-in corpus.
BUILTIN_PYDOC = "builtin:pydoc"
#: The Ray Job entrypoint of ``zeroplane data prepare``, its job metadata kind, and its last log line's prefix
#: (``ZEROPLANE_DATASET {"id": …, "reused": …, "uri": …}``).
PREPARE_ENTRYPOINT = "python -m zeroplane.runtime.train.prepare"
META_KIND_DATA = "data"
DATASET_PREFIX = "ZEROPLANE_DATASET "


@dataclass(frozen=True)
class SourceFile:
    """One file of a corpus.

    Attributes:
        path: the path in its filesystem (a local absolute path, or ``bucket/key`` on S3).
        size: bytes.
        mtime_ns: modification time in nanoseconds since the epoch (S3: the object's LastModified).
    """

    path: str
    size: int
    mtime_ns: int

    @property
    def kind(self) -> str:
        """``txt`` | ``jsonl`` | ``parquet`` (from the name's ending)."""
        return kind_of(self.path)


def kind_of(path: str) -> str:
    """``txt``, ``jsonl`` (also ``.jsonl.gz`` / ``.jsonl.zst``) or ``parquet`` for a file name.

    Raises:
        SpecError: any other ending.
    """
    name = path.lower()
    if name.endswith(".txt"):
        return "txt"
    if name.endswith((".jsonl", ".jsonl.gz", ".jsonl.zst")):
        return "jsonl"
    if name.endswith(".parquet"):
        return "parquet"
    raise SpecError(f"data.source: {path!r} is not one of {', '.join(SUFFIXES)}; rename it or convert it")


def source_filesystem(source: str, endpoint_url: Optional[str] = None):
    """The ``pyarrow.fs`` filesystem serving ``source``: S3 (``endpoint_url`` or ``$AWS_ENDPOINT_URL``,
    credentials as for the storage) for ``s3://``, else the local one."""
    import pyarrow.fs as pafs

    if source.startswith("s3://"):
        from .storage import _s3_filesystem

        return _s3_filesystem(endpoint_url)
    return pafs.LocalFileSystem()


def list_source(source: str, endpoint_url: Optional[str] = None) -> Tuple[Any, List[SourceFile]]:
    """The files of ``data.source``, sorted by path.

    ``source``: a local file, folder (every file under it with one of :data:`SUFFIXES`, recursively) or
    glob; ``s3://bucket/key`` (one object), ``s3://bucket/prefix`` (every object under ``prefix/`` with
    one of the endings) or ``s3://bucket/prefix/*.jsonl`` (``fnmatch`` on the keys). ``builtin:pydoc`` has
    no files (``[]``).

    Returns:
        ``(filesystem, files)``: the ``pyarrow.fs`` filesystem and the files.

    Raises:
        SpecError: nothing matches (the source named, with what was looked for), a named file has an
            unsupported ending, or an S3 prefix cannot be listed (no such bucket, no permission: the
            storage's own message, secrets masked).
    """
    fs = source_filesystem(source, endpoint_url)
    if source == BUILTIN_PYDOC:
        return fs, []
    if source.startswith("s3://"):
        path = source[len("s3://"):].strip("/")
        try:
            files = _s3_files(fs, path)
        except SpecError:
            raise
        except Exception as e:  # noqa: BLE001 - pyarrow's OSError carries the S3 reason
            from .storage import Storage, storage_error

            st = Storage(uri="s3://" + path, fs=fs, root=path, endpoint_url=endpoint_url)
            raise SpecError(f"data.source = {source!r}: cannot be listed: "
                            + storage_error(st, "listing", e).split(": ", 1)[-1]
                            + "; check the bucket, the prefix and the credentials") from None
    else:
        from .spec.model import local_source_paths

        files = []
        for p in local_source_paths(source):
            st = os.stat(p)
            files.append(SourceFile(os.path.abspath(p), st.st_size, st.st_mtime_ns))
    if not files:
        raise SpecError(f"data.source = {source!r} matches no file; give a file, folder, glob or s3:// prefix "
                        f"holding {', '.join(SUFFIXES)} files, or builtin:pydoc")
    for f in files:
        kind_of(f.path)
    if len({f.kind for f in files}) > 1 and "parquet" in {f.kind for f in files}:
        raise SpecError(f"data.source = {source!r} mixes .parquet with text/JSONL files; give one kind")
    return fs, sorted(files, key=lambda f: f.path)


def _s3_files(fs, path: str) -> List[SourceFile]:
    """S3 objects for ``bucket/key``, ``bucket/prefix`` or ``bucket/prefix/<glob>``."""
    import pyarrow.fs as pafs

    def entry(info) -> SourceFile:
        return SourceFile(info.path, int(info.size or 0), int(info.mtime_ns or 0))

    if glob.has_magic(path):
        parts = path.split("/")
        base = "/".join(p for p in parts[: next(i for i, p in enumerate(parts) if glob.has_magic(p))])
        infos = fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True))
        return [entry(i) for i in infos if i.type == pafs.FileType.File and fnmatch.fnmatchcase(i.path, path)]
    info = fs.get_file_info(path)
    if info.type == pafs.FileType.File:
        return [entry(info)]
    infos = fs.get_file_info(pafs.FileSelector(path, recursive=True, allow_not_found=True))
    return [entry(i) for i in infos if i.type == pafs.FileType.File and i.path.lower().endswith(SUFFIXES)]


def tokenizer_identity(tokenizer, pretrained: Optional[str]) -> Dict[str, Any]:
    """What decides the tokenizer, for the fingerprint: the BPE settings and the ``tokenizers`` version
    (a trained BPE is a pure function of the sample and these), or the SHA-256 of the tokenizer files
    of a given folder (``tokenizer.path`` or ``model.pretrained``; weights and files over 64 MiB skipped).

    Raises:
        SpecError: no tokenizer configured, or the folder does not exist.
    """
    from importlib.metadata import version

    folder = tokenizer.path or pretrained
    if folder:
        folder = os.path.expanduser(folder)
        if not os.path.isdir(folder):
            raise SpecError(f"tokenizer.path / model.pretrained = {folder!r}: not a folder; give a local "
                            "Hugging Face tokenizer folder")
        h = hashlib.sha256()
        for name in sorted(os.listdir(folder)):
            p = os.path.join(folder, name)
            if (os.path.isfile(p) and not name.endswith((".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack"))
                    and os.path.getsize(p) <= 64 * 2**20):
                h.update(name.encode() + b"\0")
                with open(p, "rb") as f:
                    h.update(hashlib.sha256(f.read()).digest())
        return {"folder_sha256": h.hexdigest()}
    if tokenizer.train_bpe is None:
        raise SpecError("tokenizer: set tokenizer.train_bpe, tokenizer.path or model.pretrained")
    return {"train_bpe": tokenizer.train_bpe.model_dump(mode="json"), "tokenizers": version("tokenizers")}


def preparation_settings(data) -> Dict[str, Any]:
    """The ``data`` settings that change the prepared tokens (everything but ``source`` and ``seq_len``)."""
    return {"text_field": data.text_field, "on_bad_record": data.on_bad_record,
            "validation_fraction": data.validation_fraction, "max_chars": data.max_chars,
            "tokenizer_sample_chars": data.tokenizer_sample_chars, "shard_tokens": data.shard_tokens,
            "format": DATA_FORMAT}


def fingerprint(spec, files: List[SourceFile]) -> str:
    """The dataset id of ``spec`` (a JobSpec) over ``files`` (:func:`list_source`): see the module doc.

    ``builtin:pydoc`` is identified by the Python version (the text ships with it).

    Raises:
        SpecError: see :func:`tokenizer_identity`.
    """
    import sys

    doc = {
        "source": spec.data.source,
        "files": [[f.path, f.size, f.mtime_ns] for f in files],
        "python": list(sys.version_info[:3]) if spec.data.source == BUILTIN_PYDOC else None,
        "tokenizer": tokenizer_identity(spec.tokenizer, spec.model.pretrained),
        "settings": preparation_settings(spec.data),
    }
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:FINGERPRINT_CHARS]


def dataset_dir(dataset_id: str) -> str:
    """``datasets/<id>`` (relative to a storage root).

    Raises:
        SpecError: ``dataset_id`` is not hex digits (it becomes a folder name).
    """
    if not dataset_id or not all(c in "0123456789abcdef" for c in dataset_id) or len(dataset_id) > 64:
        raise SpecError(f"dataset id {dataset_id!r}: a dataset id is hex digits (see `zeroplane data list`)")
    return f"{DATASETS_DIR}/{dataset_id}"


def read_manifest(storage, dataset_id: str) -> Optional[Dict[str, Any]]:
    """The manifest of a complete dataset, or None when the folder has none (absent or unfinished) or its
    manifest is damaged (not a JSON object): such a dataset counts as unfinished and is prepared again,
    which writes a new manifest (a dataset is derived data; nothing else is lost).

    Raises:
        SpecError: a malformed id. Storage errors (OSError, boto3) as they come.
    """
    path = storage.path(dataset_dir(dataset_id), MANIFEST)
    if not storage.exists(path):
        return None
    try:
        m = storage.read_json(path)
    except DamagedFileError:
        return None
    return m if isinstance(m, dict) else None


@dataclass
class DatasetInfo:
    """One row of ``zeroplane data list``.

    Attributes:
        id: the fingerprint. complete: has its manifest. source: the spec's source.
        documents, tokens: over both splits (None when incomplete). shards: files of both splits.
        created_at: ISO time the manifest was written. uri: where it lives.
    """

    id: str
    complete: bool
    uri: str
    source: Optional[str] = None
    documents: Optional[int] = None
    tokens: Optional[int] = None
    shards: Optional[int] = None
    created_at: Optional[str] = None

    def to_dict(self) -> Dict[str, Any]:
        """JSON-ready dict."""
        return asdict(self)


def list_datasets(storage) -> List[DatasetInfo]:
    """Every dataset folder under ``datasets/`` of ``storage``, complete or not, by id."""
    out = []
    for name in storage.listdir(storage.path(DATASETS_DIR)):
        try:
            m = read_manifest(storage, name)
        except SpecError:
            continue  # not a dataset folder
        uri = storage.uri_of(storage.path(dataset_dir(name)))
        if m is None:
            out.append(DatasetInfo(id=name, complete=False, uri=uri))
            continue
        splits = m.get("splits", {})
        out.append(DatasetInfo(id=name, complete=True, uri=uri, source=m.get("source", {}).get("spec"),
                               documents=sum(s.get("documents", 0) for s in splits.values()),
                               tokens=sum(s.get("tokens", 0) for s in splits.values()),
                               shards=sum(len(s.get("shards", [])) for s in splits.values()),
                               created_at=m.get("created_at")))
    return out


def show_dataset(storage, dataset_id: str) -> Dict[str, Any]:
    """The manifest of ``dataset_id``.

    Raises:
        NotFoundError: no complete dataset of that id in ``storage``. SpecError: a malformed id.
    """
    m = read_manifest(storage, dataset_id)
    if m is None:
        where = storage.uri_of(storage.path(dataset_dir(dataset_id)))
        state = "is unfinished (no manifest)" if storage.exists(posixpath.dirname(
            storage.path(dataset_dir(dataset_id), MANIFEST))) else "does not exist"
        raise NotFoundError(f"dataset {dataset_id} {state} at {where}; see `zeroplane data list`")
    return m
