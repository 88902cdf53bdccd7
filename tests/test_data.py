"""Reading data files and the errors bad data gets."""

from __future__ import annotations

import json

import pytest

from molting.data import check_columns, check_text_fields, read_rows
from molting.errors import DataError
from molting.pairs import SCHEMAS

ROWS = [
    {"prompt": "Q: What is 1 + 1?\nA:", "chosen": " 2", "rejected": " 3"},
    {"prompt": "Q: What is 2 + 2?\nA:", "chosen": " 4", "rejected": " 5"},
]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("fmt", ["jsonl", "json", "json-columns", "csv", "parquet", "saved"])
def test_every_format_reads_the_same_rows(tmp_path, fmt):
    import datasets

    if fmt == "jsonl":
        path = write_jsonl(tmp_path / "d.jsonl", ROWS)
    elif fmt == "json":
        path = tmp_path / "d.json"
        path.write_text(json.dumps(ROWS))
    elif fmt == "json-columns":
        path = tmp_path / "d.json"
        path.write_text(json.dumps({k: [r[k] for r in ROWS] for k in ROWS[0]}))
    elif fmt == "csv":
        path = tmp_path / "d.csv"
        datasets.Dataset.from_list(ROWS).to_csv(str(path), index=False)
    elif fmt == "parquet":
        path = tmp_path / "d.parquet"
        datasets.Dataset.from_list(ROWS).to_parquet(str(path))
    else:
        path = tmp_path / "saved"
        datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(path))
    assert read_rows(path) == ROWS


def test_malformed_json_line_names_file_and_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n" + '{"prompt": "x", "chosen": \n')
    with pytest.raises(DataError, match=r"pairs.jsonl, line 3: malformed JSON"):
        read_rows(path)


def test_non_object_line(tmp_path):
    path = tmp_path / "pairs.jsonl"
    path.write_text("[1, 2]\n")
    with pytest.raises(DataError, match=r"line 1: expected a JSON object, got list"):
        read_rows(path)


def test_unsupported_extension_lists_formats(tmp_path):
    path = tmp_path / "pairs.txt"
    path.write_text("hello")
    with pytest.raises(DataError, match=r"unsupported data file .*pairs.txt: expected one of .jsonl, .json, .csv"):
        read_rows(path)


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        read_rows(tmp_path / "nope.jsonl")


def test_missing_column_lists_found_columns_and_accepted_formats():
    rows = [{"question": "q", "chosen": "a"}]
    with pytest.raises(DataError) as err:
        check_columns(rows, SCHEMAS, "pairs.jsonl", "preference")
    message = str(err.value)
    assert "pairs.jsonl has columns (chosen, question)" in message
    assert "(prompt, chosen, rejected) or (chosen, rejected)" in message
    assert "conversational" in message


def test_missing_column_in_a_later_row_names_the_row():
    rows = [ROWS[0], {"prompt": "p", "chosen": "c"}]
    with pytest.raises(DataError, match=r"pairs.jsonl, row 1: missing column\(s\) rejected"):
        check_columns(rows, SCHEMAS, "pairs.jsonl", "preference")


def test_empty_data_set():
    with pytest.raises(DataError, match="pairs.jsonl has no rows; the preference stage needs at least one"):
        check_columns([], SCHEMAS, "pairs.jsonl", "preference")


def test_wrong_type_names_row_and_field():
    rows = [ROWS[0], {"prompt": "p", "chosen": 3, "rejected": "r"}]
    with pytest.raises(DataError, match=r"pairs.jsonl, row 1, field 'chosen': expected a non-empty string"):
        check_text_fields(rows, SCHEMAS[0], "pairs.jsonl")


def test_mixed_formats_are_rejected():
    rows = [
        {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
         "rejected": [{"role": "assistant", "content": "b"}]},
        ROWS[0],
    ]
    with pytest.raises(DataError, match=r"row 1, field 'prompt': expected a list of \{role, content\} messages"):
        check_text_fields(rows, SCHEMAS[0], "pairs.jsonl")
