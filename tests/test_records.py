"""RecordStore (trainer/records.py): a data set's records by index, compactly, from JSON
Lines and JSON lists alike, and the epoch order that shuffles them."""
from __future__ import annotations

import json
import pickle

import numpy as np
import pytest

from trainer.config import ConfigError
from trainer.records import RecordStore, epoch_order

RECORDS = [{"id": "a", "image": "a.png", "conversations": [{"from": "human", "value": "x"}]},
           {"id": "é-unicode ☃", "image": "sub/b.jpg", "nested": {"k": [1, 2, {"z": None}]}},
           "not an object", 7, [1, 2], {"id": "last", "text": "line\nbreak, and ] bracket"}]


def _all(store):
    return [store.get(i) for i in range(len(store))]


@pytest.mark.parametrize("indent", [None, 2])
def test_a_json_list_reads_back_every_element_by_index(tmp_path, indent):
    path = tmp_path / "train.json"
    path.write_text(json.dumps(RECORDS, indent=indent, ensure_ascii=False), encoding="utf-8")
    store = RecordStore(str(path))
    assert store.is_list and len(store) == len(RECORDS)
    assert _all(store) == RECORDS
    assert [store.get(i) for i in (5, 0, 3)] == [RECORDS[5], RECORDS[0], RECORDS[3]]
    # one byte buffer, no Python object per record
    assert isinstance(store._buffer, np.ndarray) and store._buffer.nbytes <= path.stat().st_size


def test_an_empty_json_list_has_no_records(tmp_path):
    path = tmp_path / "train.json"
    path.write_text(" [ ]\n")
    assert len(RecordStore(str(path))) == 0


def test_json_lines_are_indexed_blank_lines_skipped_and_bad_lines_none(tmp_path):
    path = tmp_path / "train.jsonl"
    lines = [json.dumps(RECORDS[0]), "", '{"id": "broken", "ima', "   ",
             json.dumps(RECORDS[1], ensure_ascii=False), json.dumps(RECORDS[5])]
    path.write_text("\n".join(lines) + "\n\n", encoding="utf-8")
    store = RecordStore(str(path))
    assert not store.is_list and len(store) == 4
    assert _all(store) == [RECORDS[0], None, RECORDS[1], RECORDS[5]]
    assert store.get(3) == RECORDS[5] and store.get(0) == RECORDS[0]   # any order
    with pytest.raises(IndexError):
        store.get(4)


def test_a_last_line_without_a_newline_is_a_record(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(RECORDS[0]) + "\n" + json.dumps(RECORDS[1]))
    assert _all(RecordStore(str(path))) == RECORDS[:2]


@pytest.mark.parametrize("name", ["train.json", "train.jsonl"])
def test_a_store_pickles_and_reads_in_the_unpickled_copy(tmp_path, name):
    # a spawned DataLoader worker gets a pickled copy: it must reopen the file itself
    path = tmp_path / name
    if name.endswith(".jsonl"):
        path.write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    else:
        path.write_text(json.dumps(RECORDS))
    store = RecordStore(str(path))
    store.get(0)   # opens the file here
    copy = pickle.loads(pickle.dumps(store))
    assert _all(copy) == RECORDS


@pytest.mark.parametrize("content", [b'[{"a": 1} {"b": 2}]', b'[{"a": 1},]', b'[{"a": 1}] x',
                                     b'[1, 2'])
def test_a_malformed_json_list_is_a_config_error_naming_data(tmp_path, content):
    path = tmp_path / "train.json"
    path.write_bytes(content)
    with pytest.raises(ConfigError, match="--data"):
        RecordStore(str(path))


def test_epoch_order_is_a_seeded_permutation_per_epoch():
    a = epoch_order(50, seed=3, epoch=0, shuffle=True)
    assert sorted(a.tolist()) == list(range(50)) and a.tolist() != list(range(50))
    assert a.tolist() == epoch_order(50, seed=3, epoch=0, shuffle=True).tolist()
    assert a.tolist() != epoch_order(50, seed=3, epoch=1, shuffle=True).tolist()
    assert a.tolist() != epoch_order(50, seed=4, epoch=0, shuffle=True).tolist()
    assert epoch_order(50, seed=3, epoch=1, shuffle=False).tolist() == list(range(50))
