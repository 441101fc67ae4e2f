"""The records of a LLaVA-format data set by index, without holding them as Python objects.

A LLaVA-style data set is large (LLaVA-665K's JSON is about 1 GB); parsed into dicts it
takes several times that in every rank, and DataLoader workers forked from a rank slowly
copy the whole list as reading it touches every object's reference count. RecordStore
keeps instead:

    JSON Lines  the byte offset and length of every non-blank line (16 bytes a record); a
                record is read with os.pread when it is wanted, and parsed then
    JSON list   every element's own JSON text, concatenated in one numpy byte buffer plus
                its offsets (the file's size, no per-object overhead, nothing that forked
                workers copy); the list is parsed element by element, so the whole list
                never exists as Python objects either

Either way `get(i)` gives record i parsed (None for a JSON Lines line that does not
parse: the caller counts it as bad_json), in any order, so an epoch can visit the records
in a shuffled order (epoch_order) and a rank or worker reads only its own.
"""
from __future__ import annotations

import codecs
import hashlib
import json
import os
from typing import List, Optional, Tuple

import numpy as np

from trainer.config import ConfigError

_SHUFFLE_SALT = 0x5F1E
_WHITESPACE = " \t\n\r"


def is_json_list(path: str) -> bool:
    """A JSON list (loaded element by element) rather than JSON Lines: not named .jsonl
    and its first non-blank character, after a UTF-8 byte-order mark, is "["."""
    if path.lower().endswith(".jsonl"):
        return False
    with open(path, "rb") as fh:
        head = fh.read(4096)
    head = head[len(codecs.BOM_UTF8):] if head.startswith(codecs.BOM_UTF8) else head
    return head.lstrip().startswith(b"[")


def _digest():
    return hashlib.blake2b(digest_size=16)


def _line_index(path: str) -> Tuple[np.ndarray, np.ndarray, str]:
    """(start, length) in bytes of every non-blank line (blank lines are not records),
    and the digest of the records' texts."""
    starts: List[int] = []
    lengths: List[int] = []
    digest = _digest()
    offset = 0
    with open(path, "rb") as fh:
        for line in fh:
            if line.strip():
                starts.append(offset)
                lengths.append(len(line))
                digest.update(line.rstrip(b"\r\n") + b"\n")
            offset += len(line)
    return (np.asarray(starts, dtype=np.int64), np.asarray(lengths, dtype=np.int64),
            digest.hexdigest())


def _skip_space(text: str, pos: int) -> int:
    while pos < len(text) and text[pos] in _WHITESPACE:
        pos += 1
    return pos


def _list_elements(path: str) -> Tuple[np.ndarray, np.ndarray]:
    """Every element of a JSON list as its own UTF-8 JSON text: (bytes buffer, offsets
    [n + 1]). A file that is not one valid JSON list is a ConfigError naming --data: unlike
    a bad JSON Lines line, no record of it can be trusted to be where it seems."""
    try:
        with open(path, encoding="utf-8-sig") as fh:
            text = fh.read()
    except UnicodeDecodeError as exc:
        raise ConfigError("--data", f"{path}: not valid JSON ({exc}); a JSON list of records "
                                    f"must parse as a whole") from None
    decoder = json.JSONDecoder()
    buffer, offsets = bytearray(), [0]   # one growing buffer: no list of pieces to join

    def broken(pos: int, why: str) -> ConfigError:
        return ConfigError("--data", f"{path}: not valid JSON ({why} at character {pos}); a "
                                     f"JSON list of records must parse as a whole (a "
                                     f"truncated copy?)")

    pos = _skip_space(text, 0)
    if not text.startswith("[", pos):
        raise ConfigError("--data", f"{path}: a JSON data set must be a list of records")
    pos = _skip_space(text, pos + 1)
    if text.startswith("]", pos):
        pos += 1
    else:
        while True:
            try:
                _, end = decoder.raw_decode(text, pos)
            except ValueError as exc:   # JSONDecodeError
                raise broken(pos, str(exc).split(":")[0]) from None
            except RecursionError:      # nesting deeper than the decoder's stack
                raise broken(pos, "nested too deeply to parse") from None
            buffer += text[pos:end].encode("utf-8")
            offsets.append(len(buffer))
            pos = _skip_space(text, end)
            if text.startswith("]", pos):
                pos += 1
                break
            if not text.startswith(",", pos):
                raise broken(pos, "expected ',' or ']'")
            pos = _skip_space(text, pos + 1)
    if _skip_space(text, pos) != len(text):
        raise broken(pos, "extra data after the list")
    return np.frombuffer(buffer, dtype=np.uint8), np.array(offsets, dtype=np.int64)


def _a_wrapper(record: object) -> bool:
    """A one-line object that holds records ({"data": [...]}) rather than being one."""
    return (isinstance(record, dict) and "conversations" not in record and "image" not in record
            and any(isinstance(v, list) for v in record.values()))


def _refuse_a_json_object(path: str) -> None:
    """A .json file whose first line does not parse may be one pretty-printed JSON object
    ({"data": [...]}): read as JSON Lines, every line of it would be skipped as bad_json,
    and the run would stop with "no usable sample" instead of naming the real problem.
    JSON Lines files (.jsonl) are left alone: their bad lines are counted, never fatal."""
    if path.lower().endswith(".jsonl"):
        return
    try:
        with open(path, encoding="utf-8-sig") as fh:
            whole = json.load(fh)
    except (ValueError, RecursionError):
        return            # not one JSON document either: JSON Lines with a bad first line
    if isinstance(whole, dict):
        keys = ", ".join(list(map(str, whole))[:5])
        raise ConfigError("--data", f"{path}: a JSON data set must be a list of records, "
                                    f"got one JSON object (keys: {keys}); write its list "
                                    f"of records to a file of its own")


class RecordStore:
    """Random access to a data set's records (see the module docstring). Picklable (a
    spawned DataLoader worker reopens the file)."""

    def __init__(self, path: str):
        self.path = path
        self.is_list = is_json_list(path)
        if self.is_list:
            self._buffer, self._offsets = _list_elements(path)
            self._starts = self._lengths = None
            digest = _digest()
            digest.update(self._buffer.tobytes())
            digest.update(self._offsets.tobytes())
            digest = digest.hexdigest()
        else:
            self._starts, self._lengths, digest = _line_index(path)
            self._buffer = self._offsets = None
        # What a checkpoint's data position points into: the records in their order (not
        # the file's blank lines or the list's layout). A resume checks it (RealSource).
        self.fingerprint = {"records": len(self), "digest": digest}
        self._fd: Optional[int] = None
        self._pid = -1
        if not self.is_list and len(self) and (self.get(0) is None or (
                len(self) == 1 and _a_wrapper(self.get(0)))):
            _refuse_a_json_object(path)


    def __len__(self) -> int:
        return len(self._offsets) - 1 if self.is_list else len(self._starts)

    def __getstate__(self):
        return {**self.__dict__, "_fd": None, "_pid": -1}

    def __del__(self):
        if getattr(self, "_fd", None) is not None and self._pid == os.getpid():
            os.close(self._fd)

    def raw(self, index: int) -> bytes:
        """Record `index`'s JSON text as stored (a JSON Lines line with its newline)."""
        if not 0 <= index < len(self):
            raise IndexError(f"record {index} of {len(self)}")
        if self.is_list:
            return self._buffer[self._offsets[index]:self._offsets[index + 1]].tobytes()
        if self._fd is None or self._pid != os.getpid():   # a forked worker opens its own
            self._fd, self._pid = os.open(self.path, os.O_RDONLY), os.getpid()
        return os.pread(self._fd, int(self._lengths[index]), int(self._starts[index]))

    def get(self, index: int) -> object:
        """Record `index` parsed; None when its JSON Lines line does not parse."""
        try:
            return json.loads(self.raw(index))
        except (ValueError, RecursionError):   # JSONDecodeError, UnicodeDecodeError; a
            return None                        # line like "[[[[..." nested past the stack


def epoch_order(count: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The record indices in the order epoch `epoch` visits them: a permutation drawn
    from (seed, epoch) when shuffling (every rank draws the same one, then takes its own
    positions of it), else file order."""
    if not shuffle:
        return np.arange(count, dtype=np.int64)
    return np.random.default_rng((_SHUFFLE_SALT, seed, epoch)).permutation(count)
