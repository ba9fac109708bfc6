"""Data preparation on the cluster: source files -> Ray Data -> token shards in ``datasets/<fingerprint>/``.

``python -m zeroplane.runtime.train.prepare`` (the entrypoint of ``zeroplane data prepare``) and the
training driver both call :func:`ensure_dataset`: when the storage holds a complete dataset for the
spec's fingerprint (:func:`zeroplane.datasets.fingerprint`) it is reused; otherwise

1. the tokenizer is trained on a bounded sample (:func:`tokenizer_sample`, ``data.tokenizer_sample_chars``)
   or loaded from its folder;
2. Ray Data reads the files (``read_binary_files`` for .txt/.jsonl[.gz|.zst], one row per file, so a
   bad line is named by file and line and invalid UTF-8 is replaced and counted; ``read_parquet`` for
   .parquet, the ``text_field`` column) and tokenizes them in parallel tasks (``map_batches`` with the
   tokenizer's own batch encoder), in the files' order (``preserve_order``);
3. this process streams the tokenized documents in that order into the train or validation stream
   (by a hash of each document's text), cutting each stream into shards of ``data.shard_tokens``
   tokens, each written atomically; then the tokenizer files; the manifest last.

A preparation that dies leaves no manifest; the next run starts it over and writes the same bytes
(every step is deterministic). Memory here is bounded by one shard buffer per split plus the blocks
Ray Data has in flight (one file's tokens for text/JSONL files), not by the corpus.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import re
import sys
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Callable, Dict, List, Optional, Tuple

import numpy as np

from ... import datasets as dsets
from ...errors import SpecError

#: Files the tokenizer sample is drawn from (evenly spread over the sorted source).
SAMPLE_FILES = 32
#: Documents per ``map_batches`` call for Parquet rows.
PARQUET_BATCH_ROWS = 4096
_PARAGRAPH_RE = re.compile(r"\n[ \t\r\f\v]*\n\s*")


# ------------------------------------------------------------------ documents (pure, no Ray)
def paragraphs(text: str) -> List[str]:
    """``text`` cut after each blank-line run (the separator stays with the paragraph before it), so
    ``"".join(paragraphs(t)) == t``; ``[]`` for an empty string."""
    out, start = [], 0
    for m in _PARAGRAPH_RE.finditer(text):
        out.append(text[start : m.end()])
        start = m.end()
    if start < len(text):
        out.append(text[start:])
    return out


def is_validation(text: str, fraction: float) -> bool:
    """Whether a document belongs to the validation split: the first 8 bytes of its BLAKE2b digest, as
    a number in [0, 1), fall below ``fraction``. A pure function of the text: the same document is in the
    same split however the corpus around it grows."""
    h = int.from_bytes(hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8).digest(), "big")
    return h / 2.0**64 < fraction


#: Leading bytes of a gzip member and of a zstd frame (RFC 1952, RFC 8878).
_MAGIC = {"gzip": b"\x1f\x8b", "zstd": b"\x28\xb5\x2f\xfd"}


def _decompress(path: str, raw: bytes) -> bytes:
    """``raw`` decompressed by the name's ending (.gz, .zst). Bytes without the codec's magic number are
    taken as already decompressed: Ray Data's file reader decompresses by extension itself."""
    import pyarrow as pa

    low = path.lower()
    codec = "gzip" if low.endswith(".gz") else "zstd" if low.endswith(".zst") else None
    if codec is None or not raw.startswith(_MAGIC[codec]):
        return raw
    try:
        return pa.input_stream(pa.BufferReader(raw), compression=codec).read()
    except Exception as e:  # noqa: BLE001 - pyarrow names the codec problem
        raise SpecError(f"{path}: cannot decompress as {codec} ({e}); fix or remove the file") from None


def _decode(raw: bytes) -> Tuple[str, int]:
    """UTF-8 text and how many replacement characters invalid bytes became (0 for valid UTF-8)."""
    try:
        return raw.decode("utf-8"), 0
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        return text, text.count("\ufffd")


def documents_of_file(path: str, raw: bytes, text_field: str, on_bad_record: str) -> Tuple[List[List[str]], Dict[str, int]]:
    """The documents of one source file.

    A .txt file is one document, cut into paragraphs (:func:`paragraphs`) for the validation hash; a
    .jsonl line is one document (one part) from the string field ``text_field``; blank lines are ignored.

    Returns:
        ``(documents, counts)``: each document a list of parts (end-of-text follows the last part);
        counts ``replaced_chars``, ``skipped_records``, ``empty_files``, ``invalid_utf8_files``.

    Raises:
        SpecError: (``on_bad_record="fail"``) an empty file, or a line that is not a JSON object with a
            string ``text_field``, naming the file and line; a file that does not decompress.
    """
    text, replaced = _decode(_decompress(path, raw))
    counts = {"replaced_chars": replaced, "skipped_records": 0, "empty_files": 0, "invalid_utf8_files": int(replaced > 0)}
    skip = on_bad_record == "skip"
    if not text.strip():
        if not skip:
            raise SpecError(f"{path}: empty file; remove it or set data.on_bad_record: skip")
        counts["empty_files"] = 1
        return [], counts
    if dsets.kind_of(path) == "txt":
        return [paragraphs(text)], counts
    docs = []
    for i, line in enumerate(text.split("\n"), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            problem = None
        except ValueError as e:
            rec, problem = None, f"not JSON ({getattr(e, 'msg', e)})"
        if problem is None:
            if not isinstance(rec, dict) or text_field not in rec:
                problem = f"no field {text_field!r} (set data.text_field)"
            elif not isinstance(rec[text_field], str):
                problem = f"field {text_field!r} is {type(rec[text_field]).__name__}, not a string"
        if problem:
            if not skip:
                raise SpecError(f"{path}: line {i}: {problem}; fix the line or set data.on_bad_record: skip")
            counts["skipped_records"] += 1
            continue
        if rec[text_field]:
            docs.append([rec[text_field]])
    return docs, counts


_TOKENIZERS: Dict[str, Any] = {}


def _tokenizer(tok_json: str):
    """A ``tokenizers.Tokenizer`` from its JSON, built once per process."""
    key = hashlib.sha256(tok_json.encode()).hexdigest()
    if key not in _TOKENIZERS:
        from tokenizers import Tokenizer

        _TOKENIZERS.clear()
        _TOKENIZERS[key] = Tokenizer.from_str(tok_json)
    return _TOKENIZERS[key]


def tokenize_documents(tok_json: str, eos_id: int, docs: List[List[str]], fraction: float,
                       counts: Dict[str, int]):
    """One ``pyarrow.Table`` row per document part, in order: ``ids`` (list<int32>; the end-of-text id
    appended to a document's last part), ``val`` (:func:`is_validation` of the part), ``chars``, and the
    file's ``counts`` on the first row (0 elsewhere). With no parts, one row with no ids carries the counts."""
    import pyarrow as pa

    parts = [p for d in docs for p in d]
    last = np.zeros(len(parts), dtype=bool)
    if parts:
        last[np.cumsum([len(d) for d in docs if d]) - 1] = True
    encs = _tokenizer(tok_json).encode_batch(parts, add_special_tokens=False) if parts else []
    ids = [e.ids + [eos_id] if is_last else e.ids for e, is_last in zip(encs, last)]  # each .ids builds a list
    lengths = np.fromiter(map(len, ids), dtype=np.int64, count=len(parts))
    flat = np.fromiter(itertools.chain.from_iterable(ids), dtype=np.int32, count=int(lengths.sum()))
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
    rows = max(len(parts), 1)
    if not parts:
        offsets = np.zeros(2, dtype=np.int32)
    cols = {"ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(flat)),
            "val": pa.array([is_validation(p, fraction) for p in parts] or [False]),
            "chars": pa.array([len(p) for p in parts] or [0], type=pa.int64())}
    for k in ("replaced_chars", "skipped_records", "empty_files", "invalid_utf8_files"):
        cols[k] = pa.array([counts.get(k, 0)] + [0] * (rows - 1), type=pa.int64())
    return pa.table(cols)


def _files_udf(batch: Dict[str, np.ndarray], tok_json: str, eos_id: int, settings: Dict[str, Any]):
    """Ray Data ``map_batches`` over ``read_binary_files`` rows (``path``, ``bytes``)."""
    import pyarrow as pa

    tables = []
    for path, raw in zip(batch["path"], batch["bytes"]):
        docs, counts = documents_of_file(str(path), bytes(raw), settings["text_field"], settings["on_bad_record"])
        tables.append(tokenize_documents(tok_json, eos_id, docs, settings["validation_fraction"], counts))
    return _with_node(pa.concat_tables(tables))


def _with_node(table):
    """``table`` plus a ``node`` column: the id of the Ray node whose task tokenized it (each row), so the
    manifest can say which nodes took part."""
    import pyarrow as pa
    import ray

    node = ray.get_runtime_context().get_node_id()
    return table.append_column("node", pa.array([node] * table.num_rows, type=pa.string()))


def _parquet_udf(batch, tok_json: str, eos_id: int, settings: Dict[str, Any]):
    """Ray Data ``map_batches`` over ``read_parquet`` rows (``text_field``, ``path``): one document per row."""
    field = settings["text_field"]
    docs, skipped = [], 0
    paths = batch.column("path").to_pylist() if "path" in batch.column_names else [None] * batch.num_rows
    for i, (value, path) in enumerate(zip(batch.column(field).to_pylist(), paths)):
        if not isinstance(value, str):
            if settings["on_bad_record"] != "skip":
                raise SpecError(f"{path}: a row has {field!r} = {type(value).__name__}, not a string; clean the "
                                "column or set data.on_bad_record: skip")
            skipped += 1
        elif value:
            docs.append([value])
    return _with_node(tokenize_documents(tok_json, eos_id, docs, settings["validation_fraction"],
                                         {"skipped_records": skipped}))


# ------------------------------------------------------------------ tokenizer sample
def pydoc_documents() -> List[str]:
    """The ``builtin:pydoc`` corpus: the topic texts of ``pydoc_data.topics``, sorted by topic name."""
    from pydoc_data.topics import topics

    return [topics[k] for k in sorted(topics)]


def _head_text(fs, f: dsets.SourceFile, budget: int, text_field: str) -> List[str]:
    """Up to ``budget`` characters of documents from the start of one file (bad lines ignored here: the
    full pass reports them)."""
    import pyarrow as pa

    if f.kind == "parquet":
        import pyarrow.parquet as pq

        out, n = [], 0
        with fs.open_input_file(f.path) as fh:
            for b in pq.ParquetFile(fh).iter_batches(columns=[text_field], batch_size=1024):
                for v in b.column(0).to_pylist():
                    if isinstance(v, str):
                        out.append(v[: budget - n])
                        n += len(out[-1])
                    if n >= budget:
                        return out
        return out
    low = f.path.lower()
    codec = "gzip" if low.endswith(".gz") else "zstd" if low.endswith(".zst") else None
    with fs.open_input_stream(f.path, compression=None) as raw:
        stream = pa.input_stream(raw, compression=codec) if codec else raw
        data = stream.read(4 * budget + 4)
    text = data.decode("utf-8", errors="replace")
    if f.kind == "txt":
        return [text[:budget]]
    out, n = [], 0
    for line in text.split("\n")[:-1] if len(data) > 4 * budget else text.split("\n"):
        try:
            v = json.loads(line).get(text_field) if line.strip() else None
        except (ValueError, AttributeError):
            v = None
        if isinstance(v, str):
            out.append(v[: budget - n])
            n += len(out[-1])
            if n >= budget:
                break
    return out


def tokenizer_sample(data, fs, files: List[dsets.SourceFile]) -> str:
    """The text a BPE tokenizer is trained on: at most ``data.tokenizer_sample_chars`` characters
    (``min`` with ``data.max_chars``), documents joined by end-of-text.

    From the beginnings of up to :data:`SAMPLE_FILES` files spread evenly over the sorted file list (each
    an equal share of the characters), or, with ``data.max_chars``, from the first files in order (the
    corpus is then their beginning). ``builtin:pydoc``: its documents in order. Deterministic: the same
    files give the same sample.
    """
    from .data import EOS

    budget = min(data.tokenizer_sample_chars, data.max_chars or data.tokenizer_sample_chars)
    if not files:
        docs = pydoc_documents()
    elif data.max_chars:
        docs = []
        for f in files:
            docs.extend(_head_text(fs, f, budget - sum(map(len, docs)), data.text_field))
            if sum(map(len, docs)) >= budget:
                break
    else:
        picks = sorted({round(i * (len(files) - 1) / max(SAMPLE_FILES - 1, 1)) for i in range(min(SAMPLE_FILES, len(files)))})
        share = budget // len(picks) - len(EOS)  # each file's share, its separator included
        docs = [EOS.join(_head_text(fs, files[i], share, data.text_field))[:share] for i in picks]
    return EOS.join(docs)[:budget]


# ------------------------------------------------------------------ shards
class ShardWriter:
    """Cuts one token stream into shard files of ``shard_tokens`` tokens (the last one shorter).

    Files ``<split>-NNNNN.bin``: raw little-endian ``dtype`` tokens, written whole through
    ``Storage.write_bytes`` (atomic: a rename locally, one PUT on S3). Holds at most one shard in memory.
    """

    def __init__(self, storage, folder: str, split: str, dtype: np.dtype, shard_tokens: int) -> None:
        self.storage, self.folder, self.split = storage, folder, split
        self.buf = np.empty(shard_tokens, dtype=dtype)
        self.fill, self.shards, self.tokens, self.documents = 0, [], 0, 0

    def add(self, ids: np.ndarray) -> None:
        """Append tokens (any integer array) to the stream."""
        while len(ids):
            n = min(len(ids), len(self.buf) - self.fill)
            self.buf[self.fill : self.fill + n] = ids[:n]
            self.fill, ids = self.fill + n, ids[n:]
            if self.fill == len(self.buf):
                self._flush()

    def _flush(self) -> None:
        if self.fill == 0:
            return
        name = f"{self.split}-{len(self.shards):05d}.bin"
        # Written from the buffer itself (no copy on a little-endian machine): a full shard's copies were
        # the one part of the driver's memory that still grew with the corpus.
        part = self.buf[: self.fill].astype(self.buf.dtype.newbyteorder("<"), copy=False)
        self.storage.write_bytes(self.storage.path(self.folder, name), part.data)
        self.shards.append({"file": name, "tokens": int(self.fill)})
        self.tokens += int(self.fill)
        self.fill = 0

    def close(self) -> Dict[str, Any]:
        """Write the last shard; returns the split's manifest entry (``documents``, ``tokens``, ``shards``)."""
        self._flush()
        return {"documents": self.documents, "tokens": self.tokens, "shards": self.shards}


def _spec_error_in(e: BaseException) -> Optional[SpecError]:
    """The SpecError a Ray task raised, wherever Ray Data wrapped it (``cause``, ``__cause__``)."""
    seen = set()
    stack = [e]
    while stack:
        x = stack.pop()
        if x is None or id(x) in seen:
            continue
        seen.add(id(x))
        if isinstance(x, SpecError) and type(x) is SpecError:
            return x
        cause = getattr(x, "cause", None)
        stack += [cause if isinstance(cause, BaseException) else None, x.__cause__, x.__context__]
    m = re.search(r"SpecError: (.+)", str(e))
    return SpecError(m.group(1).strip()) if m else None


@dataclass
class PreparedDataset:
    """A complete dataset: its id, folder (``fs`` path), manifest, tokenizer files and whether this call
    reused it (``reused``) or prepared it."""

    id: str
    path: str
    manifest: Dict[str, Any]
    tokenizer_files: Dict[str, str]
    reused: bool


def ensure_dataset(spec, storage, log: Callable[[str], None] = print) -> PreparedDataset:
    """The prepared dataset of ``spec`` (a JobSpec) in ``storage``: reused when complete, else prepared
    with Ray Data on the connected cluster (``ray.init`` done by the caller). See the module doc.

    Raises:
        SpecError: bad input (see :func:`documents_of_file`, :func:`zeroplane.datasets.list_source`),
            a tokenizer without an end-of-text token, or no tokens at all.
    """
    from .data import cached_bpe_tokenizer, make_tokenizer

    t0 = time.perf_counter()
    endpoint = spec.checkpoint.s3_endpoint_url
    fs, files = dsets.list_source(spec.data.source, endpoint)
    ds_id = dsets.fingerprint(spec, files)
    folder = dsets.dataset_dir(ds_id)
    manifest = dsets.read_manifest(storage, ds_id)
    if manifest is not None:
        tok_files = storage.read_json(storage.path(folder, dsets.TOKENIZER_FILES))
        log(f"[zeroplane] data: reusing prepared dataset {ds_id} ({_summary(manifest)}) at "
            f"{storage.uri_of(storage.path(folder))}")
        return PreparedDataset(ds_id, storage.path(folder), manifest, tok_files, reused=True)
    unfinished = storage.exists(storage.path(folder))
    what = f"{len(files)} files" if files else "the builtin corpus"
    log(f"[zeroplane] data: preparing dataset {ds_id} from {spec.data.source} ({what}"
        f"{', completing an unfinished preparation: starting over' if unfinished else ''})")
    if spec.tokenizer.path or spec.model.pretrained:
        tokenizer, tok_files, origin = make_tokenizer(spec.tokenizer, "", spec.model.pretrained, storage)
    else:
        sample = tokenizer_sample(spec.data, fs, files)
        tokenizer, tok_files, origin = cached_bpe_tokenizer(storage, spec.tokenizer.train_bpe, sample)
        origin += f" on a {len(sample):,}-character sample"
    if tokenizer.eos_token_id is None or not getattr(tokenizer, "is_fast", False):
        raise SpecError("tokenizer: needs a fast tokenizer (tokenizer.json) with an end-of-text (eos) token")
    tok_json = tokenizer.backend_tokenizer.to_str()
    vocab = len(tokenizer)
    dtype = np.dtype(np.uint16 if vocab <= 1 << 16 else np.uint32)
    t1 = time.perf_counter()
    try:
        stats = _tokenize_and_write(spec.data, fs, files, storage, folder, tok_json, int(tokenizer.eos_token_id), dtype)
    except Exception as e:
        spec_err = _spec_error_in(e)
        if spec_err is not None:
            raise SpecError(spec_err.message) from None
        raise
    splits, counts, nodes = stats
    if splits["train"]["tokens"] == 0 or splits["val"]["tokens"] == 0:
        raise SpecError(f"data.source = {spec.data.source!r}: {splits['train']['tokens']} training and "
                        f"{splits['val']['tokens']} validation tokens from {counts['documents']} documents; give "
                        "more documents or raise data.validation_fraction")
    storage.write_json(storage.path(folder, dsets.TOKENIZER_FILES), tok_files)
    elapsed = time.perf_counter() - t1
    total = splits["train"]["tokens"] + splits["val"]["tokens"]
    manifest = {
        "id": ds_id, "format": dsets.DATA_FORMAT, "created_at": datetime.now(timezone.utc).isoformat(),
        "source": {"spec": spec.data.source, "files": [{"path": f.path, "size": f.size, "mtime_ns": f.mtime_ns} for f in files]},
        "tokenizer": {"sha256": hashlib.sha256(tok_json.encode()).hexdigest(), "vocab_size": vocab,
                      "eos_id": int(tokenizer.eos_token_id), "origin": origin},
        "settings": dsets.preparation_settings(spec.data), "dtype": dtype.name, "splits": splits, "counts": counts,
        "tokenize_s": round(elapsed, 3), "tokens_per_s": round(total / elapsed, 1) if elapsed > 0 else None,
        "tokenize_nodes": nodes,
    }
    storage.write_json(storage.path(folder, dsets.MANIFEST), manifest)  # last: the completion marker
    log(f"[zeroplane] data: prepared dataset {ds_id} in {time.perf_counter() - t0:.1f}s ({_summary(manifest)}; "
        f"tokenizer: {origin}; tokenized on {len(nodes)} node{'s' if len(nodes) != 1 else ''})")
    return PreparedDataset(ds_id, storage.path(folder), manifest, tok_files, reused=False)


def _summary(m: Dict[str, Any]) -> str:
    s, c = m["splits"], m.get("counts", {})
    extra = [f"{c[k]:,} {k.replace('_', ' ')}" for k in ("skipped_records", "empty_files", "replaced_chars") if c.get(k)]
    return (f"{c.get('documents', 0):,} documents, {s['train']['tokens']:,} train / {s['val']['tokens']:,} val "
            f"tokens in {len(s['train']['shards']) + len(s['val']['shards'])} shards"
            + (f"; {', '.join(extra)}" if extra else ""))


def _tokenize_and_write(data, fs, files, storage, folder, tok_json, eos_id, dtype):
    """Run the Ray Data pipeline and write the shards; returns ``(splits, counts, nodes)``, ``nodes`` the sorted
    ids of the Ray nodes whose tasks tokenized."""
    import pyarrow.compute as pc
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.execution_options.preserve_order = True
    ctx.enable_progress_bars = False
    settings = {"text_field": data.text_field, "on_bad_record": data.on_bad_record,
                "validation_fraction": data.validation_fraction}
    kwargs = {"fn_kwargs": {"tok_json": tok_json, "eos_id": eos_id, "settings": settings}, "num_cpus": 1}
    if not files:  # builtin:pydoc
        items = [{"path": f"pydoc:{i}", "bytes": d.encode()} for i, d in enumerate(pydoc_documents())]
        ds = ray.data.from_items(items).map_batches(_pydoc_udf, batch_size=16, **kwargs)
    elif files[0].kind == "parquet":
        ds = ray.data.read_parquet([f.path for f in files], filesystem=fs, columns=[data.text_field],
                                   include_paths=True, shuffle=None)
        ds = ds.map_batches(_parquet_udf, batch_size=PARQUET_BATCH_ROWS, batch_format="pyarrow", **kwargs)
    else:
        ds = ray.data.read_binary_files([f.path for f in files], filesystem=fs, include_paths=True, shuffle=None)
        ds = ds.map_batches(_files_udf, batch_size=1, **kwargs)
    writers = {s: ShardWriter(storage, folder, s, dtype, data.shard_tokens) for s in ("train", "val")}
    counts = {"documents": 0, "chars": 0, "replaced_chars": 0, "skipped_records": 0, "empty_files": 0,
              "invalid_utf8_files": 0}
    nodes: set = set()
    for table in ds.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=1):
        nodes.update(pc.unique(table["node"]).to_pylist())
        for k in ("replaced_chars", "skipped_records", "empty_files", "invalid_utf8_files"):
            counts[k] += int(pc.sum(table[k]).as_py() or 0)
        ids = table["ids"].combine_chunks()
        lengths = pc.list_value_length(ids).to_numpy(zero_copy_only=False).astype(np.int64)
        keep = lengths > 0
        chars = table["chars"].to_numpy()
        if data.max_chars:  # whole documents until the limit is reached
            before = counts["chars"] + np.cumsum(chars) - chars
            keep &= before < data.max_chars
        if not keep.any():
            if data.max_chars and counts["chars"] >= data.max_chars:
                break
            continue
        flat = pc.list_flatten(ids).to_numpy(zero_copy_only=False)
        val = table["val"].to_numpy(zero_copy_only=False)
        tok_keep, tok_val = np.repeat(keep, lengths), np.repeat(val, lengths)
        writers["train"].add(flat[tok_keep & ~tok_val])
        writers["val"].add(flat[tok_keep & tok_val])
        writers["train"].documents += int((keep & ~val).sum())
        writers["val"].documents += int((keep & val).sum())
        counts["documents"] += int(keep.sum())
        counts["chars"] += int(chars[keep].sum())
        if data.max_chars and counts["chars"] >= data.max_chars:
            break
    return {s: w.close() for s, w in writers.items()}, counts, sorted(nodes)


def _pydoc_udf(batch: Dict[str, np.ndarray], tok_json: str, eos_id: int, settings: Dict[str, Any]):
    """Ray Data ``map_batches`` over the builtin topics: each a text document cut into paragraphs."""
    import pyarrow as pa

    return _with_node(pa.concat_tables([
        tokenize_documents(tok_json, eos_id, [paragraphs(bytes(raw).decode())], settings["validation_fraction"], {})
        for raw in batch["bytes"]]))


def main() -> int:
    """``zeroplane data prepare``'s job: prepare (or find) the dataset of ``$ZEROPLANE_SPEC_JSON`` and
    print its manifest as the last line (``ZEROPLANE_DATASET {json}``); 0 on success, 1 on failure."""
    import os

    import ray

    from ...names import ENV_SPEC_JSON
    from ...spec import parse_spec
    from ...storage import Storage

    spec = parse_spec(json.loads(os.environ[ENV_SPEC_JSON]), source=f"${ENV_SPEC_JSON}")
    storage = Storage.for_checkpoint_spec(spec.checkpoint)
    ray.init(log_to_driver=True)
    try:
        ds = ensure_dataset(spec, storage)
    except Exception as e:  # the job fails with the reason on its last log line
        print(f"[zeroplane] data preparation failed: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
        return 1
    print(dsets.DATASET_PREFIX + json.dumps({"id": ds.id, "reused": ds.reused, "uri": storage.uri_of(ds.path)}), flush=True)
    return 0


if __name__ == "__main__":
    from .driver import exit_now

    exit_now(main())
