"""``zeroplane data list|show`` on a local storage holding one complete and one unfinished dataset."""

from __future__ import annotations

import json

from click.testing import CliRunner

from zeroplane.cli.main import main
from zeroplane.datasets import MANIFEST, TOKENIZER_FILES


def _dataset(root, ds_id: str, complete: bool) -> None:
    folder = root / "datasets" / ds_id
    folder.mkdir(parents=True)
    (folder / "train-00000.bin").write_bytes(b"\x01\x00" * 100)
    if complete:
        (folder / TOKENIZER_FILES).write_text("{}")
        (folder / MANIFEST).write_text(json.dumps({
            "id": ds_id, "source": {"spec": "/corpus/*.jsonl", "files": []}, "created_at": "2026-11-30T00:00:00+00:00",
            "counts": {"documents": 7}, "dtype": "uint16",
            "splits": {"train": {"documents": 6, "tokens": 100, "shards": [{"file": "train-00000.bin", "tokens": 100}]},
                       "val": {"documents": 1, "tokens": 10, "shards": [{"file": "val-00000.bin", "tokens": 10}]}}}))


def test_data_list_and_show(tmp_path):
    _dataset(tmp_path, "aaaa1111", complete=True)
    _dataset(tmp_path, "bbbb2222", complete=False)
    runner = CliRunner()
    res = runner.invoke(main, ["data", "list", "--storage", str(tmp_path), "-o", "json"])
    assert res.exit_code == 0, res.output
    rows = {r["id"]: r for r in json.loads(res.stdout)}
    assert rows["aaaa1111"]["complete"] and rows["aaaa1111"]["tokens"] == 110 and rows["aaaa1111"]["shards"] == 2
    assert rows["aaaa1111"]["documents"] == 7 and rows["aaaa1111"]["source"] == "/corpus/*.jsonl"
    assert rows["bbbb2222"]["complete"] is False and rows["bbbb2222"]["tokens"] is None
    res = runner.invoke(main, ["data", "show", "aaaa1111", "--storage", str(tmp_path)])
    assert res.exit_code == 0 and json.loads(res.stdout)["splits"]["val"]["tokens"] == 10
    res = runner.invoke(main, ["data", "show", "bbbb2222", "--storage", str(tmp_path)])
    assert res.exit_code == 1 and "unfinished (no manifest)" in res.output
    res = runner.invoke(main, ["data", "show", "../etc", "--storage", str(tmp_path)])
    assert res.exit_code == 2 and "dataset id '../etc'" in res.output
