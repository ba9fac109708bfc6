"""Tokenizers, the shard reader and the deterministic batch order.

The corpus is tokenized once into token shards by :mod:`.prepare`; each worker reads the sequences it
trains on from them (:class:`TokenSequences`). The batch order is a pure function of ``(seed, micro-batch
index, rank)``, so a resumed job continues with exactly the batches an uninterrupted job would have seen
next (including across epoch and shard boundaries). :func:`load_text` and :func:`tokenize_split` are the
whole-corpus-in-one-process path, kept for small experiments and tests.
"""

from __future__ import annotations

import glob
import json
import os
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Dict, Optional, Tuple

import numpy as np

from ... import layout
from ...errors import SpecError
from ...spec.model import DataSpec, TokenizerSpec

if TYPE_CHECKING:
    from ...storage import Storage

#: The end-of-text token of trained BPE tokenizers (GPT-2's name for it).
EOS = "<|endoftext|>"
#: The files ``save_pretrained`` writes for a trained BPE tokenizer.
BPE_FILES = frozenset({"tokenizer.json", "tokenizer_config.json"})


def load_text(data: DataSpec) -> str:
    """Read the training text named by ``data.source``.

    Sources: ``builtin:pydoc`` (the topic texts in ``pydoc_data.topics``, sorted by topic name and
    joined by EOS), a local file or glob of ``.txt`` / ``.jsonl`` (``data.text_field``), or ``s3://``.
    Documents are joined with the EOS token. Truncated to ``data.max_chars`` when set.

    Raises:
        SpecError: the source matches no readable file, or a .jsonl record lacks the text field.
    """
    if data.source == "builtin:pydoc":
        from pydoc_data.topics import topics

        docs = [topics[k] for k in sorted(topics)]
    elif data.source.startswith("s3://"):
        from ...storage import Storage

        bucket_key = data.source[len("s3://"):]
        st = Storage.from_uri("s3://" + bucket_key.split("/", 1)[0])
        raw = st.read_bytes(bucket_key).decode("utf-8")
        docs = _docs_from(raw, data.source, data.text_field)
    else:
        pattern = os.path.expanduser(data.source)
        paths = sorted(glob.glob(pattern)) if any(c in pattern for c in "*?[") else [pattern]
        paths = [p for p in paths if os.path.isfile(p)]
        if not paths:
            raise SpecError(
                f"data.source = {data.source!r}: no such file; give builtin:pydoc, a .txt/.jsonl path or glob, or s3://"
            )
        docs = []
        for p in paths:
            docs.extend(_docs_from(Path(p).read_text(encoding="utf-8"), p, data.text_field))
    text = EOS.join(docs)
    if data.max_chars:
        text = text[: data.max_chars]
    return text


def _docs_from(raw: str, name: str, text_field: str) -> list[str]:
    if not name.endswith(".jsonl"):
        return [raw]
    docs = []
    for i, line in enumerate(raw.splitlines()):
        if not line.strip():
            continue
        rec = json.loads(line)
        if text_field not in rec:
            raise SpecError(f"{name}: line {i + 1} has no field {text_field!r}; set data.text_field")
        docs.append(str(rec[text_field]))
    return docs


def train_bpe_tokenizer(text: str, vocab_size: int, min_frequency: int = 2):
    """Train a byte-level BPE (``tokenizers``) on ``text`` and wrap it as a transformers tokenizer.

    The tokenizer has ``<|endoftext|>`` as bos/eos/unk and, like GPT-2's, no pad token.

    Returns:
        ``transformers.PreTrainedTokenizerFast``.
    """
    from tokenizers import ByteLevelBPETokenizer
    from transformers import PreTrainedTokenizerFast

    bpe = ByteLevelBPETokenizer()
    chunks = (text[i : i + 10_000] for i in range(0, len(text), 10_000))
    bpe.train_from_iterator(chunks, vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=[EOS],
                            show_progress=False)
    return PreTrainedTokenizerFast(tokenizer_object=bpe._tokenizer, bos_token=EOS, eos_token=EOS, unk_token=EOS)


def bpe_tokenizer_from_files(files: Dict[str, str]):
    """Rebuild a tokenizer that :func:`train_bpe_tokenizer` made from its saved files (``{name: text}``,
    :data:`BPE_FILES`).

    For those files the same tokenizer as ``AutoTokenizer.from_pretrained`` gives (``tokenizer.json`` plus
    ``<|endoftext|>`` as bos/eos/unk, which is all their ``tokenizer_config.json`` says), without importing
    AutoTokenizer's machinery: in a process that has not loaded transformers' model code (the job driver)
    that import alone takes ~2 s on this machine, more than training the default corpus's BPE.

    Raises:
        KeyError: no ``tokenizer.json`` in ``files``. TypeError: it is not text. Exception (from
        ``tokenizers``): it does not parse.
    """
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(files["tokenizer.json"]),
                                   bos_token=EOS, eos_token=EOS, unk_token=EOS)


def tokenizer_files(tokenizer) -> Dict[str, str]:
    """Serialise a tokenizer to ``{file name: text}`` (what ``save_pretrained`` writes)."""
    with tempfile.TemporaryDirectory() as d:
        tokenizer.save_pretrained(d)
        return {p.name: p.read_text(encoding="utf-8") for p in Path(d).iterdir() if p.is_file()}


def load_tokenizer_files(files: Dict[str, str], into: str):
    """Write ``files`` into folder ``into`` and load them with ``AutoTokenizer``."""
    from transformers import AutoTokenizer

    os.makedirs(into, exist_ok=True)
    for name, body in files.items():
        Path(into, name).write_text(body, encoding="utf-8")
    return AutoTokenizer.from_pretrained(into)


def make_tokenizer(spec_tok: TokenizerSpec, text: str, pretrained: Optional[str],
                   storage: "Storage") -> Tuple[object, Dict[str, str], str]:
    """The job's tokenizer: a given folder, the pretrained model's, or a BPE trained on ``text`` (through
    :func:`cached_bpe_tokenizer`, in ``storage``).

    Returns:
        ``(tokenizer, files, origin)``: the transformers tokenizer, its files as ``{name: text}`` and where
        it came from (for the job log).

    Raises:
        SpecError: neither ``tokenizer.train_bpe``, ``tokenizer.path`` nor ``model.pretrained`` is set.
    """
    if spec_tok.path or pretrained:
        from transformers import AutoTokenizer  # ~2 s of imports in a process without model code

        folder = spec_tok.path or pretrained
        tokenizer = AutoTokenizer.from_pretrained(os.path.expanduser(folder))
        return tokenizer, tokenizer_files(tokenizer), f"tokenizer of {folder}"
    if spec_tok.train_bpe is None:
        raise SpecError("tokenizer: set tokenizer.train_bpe, tokenizer.path or model.pretrained")
    return cached_bpe_tokenizer(storage, spec_tok.train_bpe, text)


#: Bumped whenever how the BPE is trained or saved changes, so older cache entries are not used.
BPE_CACHE_FORMAT = 1


def cached_bpe_tokenizer(storage: "Storage", train_bpe, text: str) -> Tuple[object, Dict[str, str], str]:
    """The BPE tokenizer ``train_bpe`` trains on ``text``, from the storage's tokenizer cache when there.

    BPE training time grows with the corpus (under a second for the 466 k-character default corpus here,
    minutes for hundreds of MB) and its result is a pure function of the text and the settings (byte-level
    BPE training in ``tokenizers`` is deterministic), so it is cached under
    ``<storage>/cache/tokenizers/<key>.json``, ``key`` = SHA-256 over the length-prefixed text and
    ``[vocab_size, min_frequency, end-of-text token, tokenizers version, transformers version,
    BPE_CACHE_FORMAT]``. The file holds the ``save_pretrained`` files as ``{name: text}`` and is written
    atomically (``Storage.write_bytes``), so concurrent jobs at worst both train and write the same bytes.
    An entry that cannot be read, does not hold exactly the expected files as text, or does not load is
    ignored and rewritten; a cache that cannot be written only costs the next job the training.

    Args:
        storage: The job's checkpoint storage (local folder or S3).
        train_bpe: ``spec.tokenizer.train_bpe`` (``vocab_size``, ``min_frequency``).
        text: The whole training text.

    Returns:
        ``(tokenizer, files, origin)``: the ``transformers.PreTrainedTokenizerFast``, built from ``files``
        on a hit and a miss alike; its files as ``{name: text}`` (what ``save_pretrained`` wrote after
        training; byte-identical on a hit); and whether it came from the cache.
    """
    import hashlib

    import tokenizers
    import transformers

    data = text.encode("utf-8")
    h = hashlib.sha256(len(data).to_bytes(8, "big") + data)
    h.update(json.dumps([train_bpe.vocab_size, train_bpe.min_frequency, EOS, tokenizers.__version__,
                         transformers.__version__, BPE_CACHE_FORMAT]).encode())
    key = h.hexdigest()
    path = storage.path(layout.tokenizer_cache_file(key))
    try:
        files = storage.read_json(path) if storage.exists(path) else None
        if files is not None:
            if not isinstance(files, dict) or set(files) != BPE_FILES or not all(isinstance(v, str) for v in files.values()):
                raise ValueError(f"expected the files {sorted(BPE_FILES)} as text")
            return bpe_tokenizer_from_files(files), files, f"BPE from cache {key[:12]}"
    except Exception as e:  # noqa: BLE001 - a damaged cache entry is retrained, never fatal
        print(f"[zeroplane] tokenizer cache {storage.uri_of(path)} unreadable ({type(e).__name__}: {e}); "
              "training the BPE again", flush=True)
    t = time.perf_counter()
    files = tokenizer_files(train_bpe_tokenizer(text, train_bpe.vocab_size, train_bpe.min_frequency))
    origin = f"BPE trained in {time.perf_counter() - t:.1f}s"
    try:
        if set(files) == BPE_FILES:  # what a hit accepts (another transformers might save more files)
            storage.write_json(path, files)
    except Exception as e:  # noqa: BLE001 - the cache is an optimisation
        print(f"[zeroplane] could not write the tokenizer cache {storage.uri_of(path)}: {e}", flush=True)
    return bpe_tokenizer_from_files(files), files, origin


def tokenize_split(tokenizer, text: str, seq_len: int, validation_fraction: float) -> Tuple[np.ndarray, np.ndarray]:
    """Tokenize ``text`` and cut it into sequences.

    Returns:
        ``(train, val)``: int32 arrays of shape ``[n_train, seq_len]`` and ``[n_val, seq_len]``; the
        validation set is the tail ``validation_fraction`` of the token stream.

    Raises:
        SpecError: too little text for one training and one validation sequence.
    """
    ids = np.asarray(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=np.int32)
    n_val_tokens = max(int(len(ids) * validation_fraction), seq_len)
    train_ids, val_ids = ids[:-n_val_tokens], ids[-n_val_tokens:]
    n_train, n_val = len(train_ids) // seq_len, len(val_ids) // seq_len
    if n_train < 1 or n_val < 1:
        raise SpecError(
            f"data: {len(ids)} tokens give {n_train} training and {n_val} validation sequences of "
            f"seq_len={seq_len}; lower data.seq_len or give more text"
        )
    return (train_ids[: n_train * seq_len].reshape(n_train, seq_len),
            val_ids[: n_val * seq_len].reshape(n_val, seq_len))


class BatchOrder:
    """Deterministic micro-batch order over ``n`` training sequences for ``world_size`` ranks.

    The global stream of sequence indices is the concatenation of per-epoch permutations
    (``numpy.random.default_rng(seed + epoch).permutation(n)``). Global micro-batch ``k`` for rank
    ``r`` takes stream positions ``[(k*world_size + r)*micro, … + micro)``. Nothing depends on
    process state, so resuming at micro-batch ``k`` reproduces the remaining order exactly.
    """

    def __init__(self, n: int, micro: int, world_size: int, rank: int, seed: int) -> None:
        self.n, self.micro, self.world, self.rank, self.seed = n, micro, world_size, rank, seed
        self._perms: Dict[int, np.ndarray] = {}

    def _perm(self, epoch: int) -> np.ndarray:
        if epoch not in self._perms:
            self._perms = {epoch: np.random.default_rng(self.seed + epoch).permutation(self.n)}
        return self._perms[epoch]

    def indices(self, k: int) -> np.ndarray:
        """Sequence indices (shape ``[micro]``) of global micro-batch ``k`` for this rank."""
        start = (k * self.world + self.rank) * self.micro
        first, last = start // self.n, (start + self.micro - 1) // self.n
        if first == last:  # the common case: one slice of one epoch's permutation
            off = start - first * self.n
            return self._perm(first)[off : off + self.micro].astype(np.int64)
        pos = np.arange(start, start + self.micro)
        out = np.empty(self.micro, dtype=np.int64)
        for epoch in range(first, last + 1):  # spans an epoch boundary (several when micro > n)
            sel = pos // self.n == epoch
            out[sel] = self._perm(epoch)[pos[sel] % self.n]
        return out

    def epoch_of(self, k: int) -> float:
        """Fractional epoch reached after global micro-batch ``k`` (all ranks)."""
        return (k + 1) * self.world * self.micro / self.n


class TokenSequences:
    """The sequences of one split of a prepared dataset, read from its shards on demand.

    The split's token stream is its shards concatenated (``manifest["splits"][split]["shards"]``); sequence
    ``i`` is stream tokens ``[i*seq_len, (i+1)*seq_len)``, so a sequence may span two shards and the tail
    shorter than ``seq_len`` is never used. Local storage (or a shared filesystem): every shard is a
    read-only ``numpy.memmap``, so only the pages of the sequences read are touched. ``s3://``: one ranged
    GET per shard piece of a sequence (``pyarrow`` ``RandomAccessFile.read_at``); nothing else is held.

    Indexing with an integer array gives ``int32`` ``[len(idx), seq_len]``, like the arrays it replaces.
    """

    def __init__(self, storage: "Storage", folder: str, manifest: Dict, split: str, seq_len: int) -> None:
        shards = manifest["splits"][split]["shards"]
        self.storage, self.seq_len, self.dtype = storage, seq_len, np.dtype(manifest["dtype"]).newbyteorder("<")
        self.paths = [f"{folder}/{s['file']}" for s in shards]
        self.sizes = np.array([s["tokens"] for s in shards], dtype=np.int64)
        self.starts = np.concatenate([[0], np.cumsum(self.sizes)])
        self.n = int(self.starts[-1] // seq_len)
        self._open: Dict[int, object] = {}

    def __len__(self) -> int:
        return self.n

    def _shard(self, k: int):
        if k not in self._open:
            if self.storage.is_local:
                self._open[k] = np.memmap(self.paths[k], dtype=self.dtype, mode="r", shape=(int(self.sizes[k]),))
            else:
                self._open[k] = self.storage.fs.open_input_file(self.paths[k])
        return self._open[k]

    def _read(self, start: int, count: int) -> np.ndarray:
        out, pos = [], start
        while count > 0:
            k = int(np.searchsorted(self.starts, pos, side="right") - 1)
            off = pos - int(self.starts[k])
            n = min(count, int(self.sizes[k]) - off)
            src = self._shard(k)
            if isinstance(src, np.ndarray):
                out.append(src[off : off + n])
            else:
                raw = src.read_at(n * self.dtype.itemsize, off * self.dtype.itemsize)
                out.append(np.frombuffer(raw, dtype=self.dtype))
            pos, count = pos + n, count - n
        return out[0] if len(out) == 1 else np.concatenate(out)

    def __getitem__(self, idx) -> np.ndarray:
        idx = np.atleast_1d(np.asarray(idx, dtype=np.int64))
        if len(idx) and (idx.min() < 0 or idx.max() >= self.n):
            raise IndexError(f"sequence index out of range 0..{self.n - 1}")
        out = np.empty((len(idx), self.seq_len), dtype=np.int32)
        for row, i in enumerate(idx):
            out[row] = self._read(int(i) * self.seq_len, self.seq_len)
        return out


def open_split(config: Dict, split: str, storage: "Storage") -> "TokenSequences | np.ndarray":
    """The ``train`` or ``val`` sequences a training loop config names: :class:`TokenSequences` over
    ``config["dataset"]`` (``folder``: fs path, ``manifest``: splits + dtype), or an in-memory
    ``[n, seq_len]`` array when the config carries one under ``split`` (benchmarks compare the two)."""
    if config.get(split) is not None:
        return config[split]
    d = config["dataset"]
    return TokenSequences(storage, d["folder"], d["manifest"], split, config["spec"]["data"]["seq_len"])
