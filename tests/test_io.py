"""trust_fast.io: results are written whole or not at all."""
import csv
import os

import pytest

from trust_fast.io import atomic_path, write_csv_atomic, write_json_atomic


def _rows(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_atomic_path_keeps_the_old_file_when_the_writer_fails(tmp_path):
    path = tmp_path / "result.txt"
    path.write_text("old")
    with pytest.raises(RuntimeError, match="writer broke"):
        with atomic_path(str(path)) as tmp, open(tmp, "w") as f:
            f.write("half")
            raise RuntimeError("writer broke")
    assert path.read_text() == "old"
    assert os.listdir(tmp_path) == ["result.txt"]  # no temp file left behind


def test_write_csv_atomic_writes_and_appends(tmp_path):
    path = str(tmp_path / "sub" / "t.csv")
    write_csv_atomic([{"set": "a", "ms": 1.5}, {"set": "b", "ms": 2}], path)
    assert _rows(path) == [{"set": "a", "ms": "1.5"}, {"set": "b", "ms": "2"}]
    write_csv_atomic([{"set": "c", "ms": 3}], path, append=True)
    assert [r["set"] for r in _rows(path)] == ["a", "b", "c"]
    write_csv_atomic([{"set": "d", "ms": 4}], path)  # without append: replaced
    assert _rows(path) == [{"set": "d", "ms": "4"}]
    assert oct(os.stat(path).st_mode & 0o777) == oct(0o644)


def test_write_csv_atomic_refuses_other_columns_and_leaves_the_file(tmp_path):
    path = str(tmp_path / "t.csv")
    write_csv_atomic([{"set": "a", "ms": 1}], path)
    before = open(path).read()
    with pytest.raises(ValueError, match=r"has columns \['set', 'ms'\].*\['set', 'us'\]"):
        write_csv_atomic([{"set": "b", "us": 2}], path, append=True)
    with pytest.raises(ValueError, match="no rows to write"):
        write_csv_atomic([], path)
    assert open(path).read() == before
    assert sorted(os.listdir(tmp_path)) == ["t.csv"]


def test_write_json_atomic(tmp_path):
    import json

    path = str(tmp_path / "r.json")
    write_json_atomic({"ua": 0.0}, path)
    assert json.load(open(path)) == {"ua": 0.0}
