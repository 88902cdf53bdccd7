"""Reading rows from files, hub datasets and named sources, and checking them against a stage's schema.

Formats: ``.jsonl``, ``.json``, ``.csv``, ``.parquet``, directories saved
with ``datasets.Dataset.save_to_disk``, and Hugging Face hub datasets
(``ORG/NAME``, ``ORG/NAME@REV``; a subset and a split). JSON and CSV are
parsed with the standard library rather than ``datasets``: a malformed line
is then reported with its number, and CSV fields stay strings (no type
inference turning the answer " 2" into the integer 2). Parquet, saved
datasets and hub datasets go through ``datasets``; a hub dataset's files
are fetched into, or found in, huggingface_hub's cache (:mod:`molting.hub`),
so ``HF_HUB_OFFLINE=1`` reads one fetched before.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

from molting.errors import DataError

FORMATS = (".jsonl", ".json", ".csv", ".parquet", "a directory saved with datasets.save_to_disk")
HUB_DATA_FILES = ("*.parquet", "*.arrow", "*.jsonl", "*.json", "*.csv", "*.tsv", "*.txt", "*.gz", "*.zst", "*.bz2",
                  "*.xz", "README.md")
"""The files of a hub dataset's snapshot: its data files and the card whose metadata names its subsets and splits
(no loading scripts: ``datasets`` no longer runs them)."""


def read_rows(path: str | Path, split: str = "train") -> list[dict[str, Any]]:
    """All rows of a data file or saved ``datasets`` directory (its ``split``, when it holds several), as dicts."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path {path} does not exist")
    if path.is_dir():
        return _read_saved_dataset(path, split)
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        import datasets

        try:
            return datasets.Dataset.from_parquet(str(path), keep_in_memory=True).to_list()
        except Exception as exc:
            raise DataError(f"cannot read {path} as parquet: {exc}") from exc
    raise DataError(f"unsupported data file {path}: expected one of {', '.join(FORMATS)}")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(encoding="utf-8-sig") as handle:  # -sig: a byte-order mark is not part of the first key
        for number, line in enumerate(_decoded(handle, path), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}, line {number}: malformed JSON ({exc.msg} at column {exc.colno})") from exc
            if not isinstance(row, dict):
                raise DataError(f"{path}, line {number}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    return rows


def _read_csv(path: Path) -> list[dict[str, Any]]:
    # The csv module keeps every field a string; pandas-style type inference would turn " 2" into 2.
    import csv

    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(_decoded(handle, path))
        rows = []
        try:
            for row in reader:
                if None in row:
                    raise DataError(f"{path}, line {reader.line_num}: more fields than the header's {len(reader.fieldnames)}")
                rows.append(row)
        except csv.Error as exc:
            raise DataError(f"{path}, line {reader.line_num}: malformed CSV ({exc})") from exc
    return rows


def _decoded(handle: Any, path: Path):
    """The lines of a text file, with a clear error for bytes that are not UTF-8."""
    number = 0
    try:
        for number, line in enumerate(handle, start=1):
            yield line
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}, line {number + 1}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc


def _read_json(path: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from exc
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}, line {exc.lineno}: malformed JSON ({exc.msg} at column {exc.colno})") from exc
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if isinstance(data, dict) and data and all(isinstance(v, list) for v in data.values()):
        lengths = {len(v) for v in data.values()}
        if len(lengths) != 1:
            raise DataError(f"{path}: columns have different lengths {sorted(lengths)}")
        keys = list(data)
        data = [dict(zip(keys, values)) for values in zip(*data.values())]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of objects, a {{column: [values]}} mapping, or {{'data': [...]}}")
    for index, row in enumerate(data):
        if not isinstance(row, dict):
            raise DataError(f"{path}, row {index}: expected a JSON object, got {type(row).__name__}")
    return data


def _read_saved_dataset(path: Path, split: str) -> list[dict[str, Any]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"{path} is a directory but not a dataset saved with datasets.save_to_disk: {exc}") from exc
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path} holds the splits {', '.join(loaded)}, not {split!r}: choose one with --data-split")
        loaded = loaded[split]
    return loaded.to_list()


def read_hub_dataset(name: str, subset: str | None = None, split: str = "train") -> tuple[list[dict[str, Any]], Path]:
    """The rows of hub dataset ``name`` (``ORG/NAME`` or ``ORG/NAME@REV``) and its snapshot's directory.

    The snapshot (data files and card only) comes from huggingface_hub's
    cache or the hub; ``datasets.load_dataset`` reads it, with the subsets
    (``configs``) and splits its card declares, and keeps the prepared Arrow
    files in its own cache for the next run.
    """
    from molting.hub import snapshot

    repo_id, at, revision = name.partition("@")
    directory = Path(snapshot(repo_id, revision or None, list(HUB_DATA_FILES), "dataset", "dataset", DataError))
    return _load_snapshot(directory, f"hub dataset {name!r}", subset, split), directory


def _load_snapshot(directory: Path, what: str, subset: str | None, split: str) -> list[dict[str, Any]]:
    import datasets

    try:
        subsets = datasets.get_dataset_config_names(str(directory))
        if subset is not None and subset not in subsets:
            raise DataError(f"{what} has no subset {subset!r}; its subsets: {', '.join(subsets)} (--data-subset)")
        if subset is None and len(subsets) > 1 and "default" not in subsets:
            raise DataError(f"{what} has several subsets ({', '.join(subsets)}): choose one with --data-subset")
        splits = datasets.get_dataset_split_names(str(directory), subset)
        if split not in splits:
            raise DataError(f"{what}{f' (subset {subset!r})' if subset else ''} has the splits {', '.join(splits)}, "
                            f"not {split!r}: choose one with --data-split")
        return datasets.load_dataset(str(directory), subset, split=split).to_list()
    except DataError:
        raise
    except Exception as exc:  # datasets' own errors: files it cannot read, a card it cannot parse
        raise DataError(f"{what}: datasets cannot read it: {str(exc).splitlines()[0]}") from exc


def rename_columns(rows: list[dict[str, Any]], columns: dict[str, str], source: str) -> list[dict[str, Any]]:
    """``rows`` with each field ``new`` read from the column ``columns[new]`` (``--columns chosen=response_a``).

    A column already called ``new`` is replaced by the renamed one. Every
    row must have the columns named.
    """
    if not columns or not rows:
        return rows
    for index, row in enumerate(rows):
        missing = [old for old in columns.values() if old not in row]
        if missing:
            raise DataError(f"{source}, row {index}: no column {missing[0]!r} to read as "
                            f"{next(n for n, o in columns.items() if o == missing[0])!r} (--columns); its columns: "
                            f"{', '.join(sorted(row))}")
    renamed = set(columns.values())
    return [{**{k: v for k, v in row.items() if k not in renamed and k not in columns},
             **{new: row[old] for new, old in columns.items()}} for row in rows]


# --------------------------------------------------------------------------- validation


def is_messages(value: Any) -> bool:
    """A conversational value: a list of {"role": ..., "content": ...} dicts."""
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)
    )


def check_columns(rows: list[dict[str, Any]], schemas: Iterable[tuple[str, ...]], source: str, stage: str) -> tuple[str, ...]:
    """The first schema (a tuple of column names) row 0 satisfies, checked on every row, or a :class:`DataError`.

    Every row must have the schema's columns, and no row may have the
    columns of a schema listed before it that row 0 lacks (a file whose first
    row has no ``prompt`` while others have one would otherwise be read
    without prompts).
    """
    if not rows:
        raise DataError(f"{source} has no rows; the {stage} stage needs at least one")
    schemas = list(schemas)
    found = sorted(rows[0])
    for position, schema in enumerate(schemas):
        if all(column in rows[0] for column in schema):
            _check_rows_have(rows, schema, schemas[:position], source)
            unused = sorted({c for row in rows for c in row} - set(schema))
            if position > 0 and unused:  # e.g. a misspelt "promt" column: say so rather than train on the wrong thing
                import sys

                print(
                    f"molting: warning: {source} has no ({', '.join(schemas[0])}) columns; reading it as "
                    f"({', '.join(schema)}) and ignoring the column(s) {', '.join(unused)}",
                    file=sys.stderr,
                )
            return schema
    accepted = " or ".join("(" + ", ".join(s) + ")" for s in schemas)
    raise DataError(
        f"{source} has columns ({', '.join(found)}); the {stage} stage needs {accepted}. "
        "Values may be strings (standard format) or lists of {role, content} messages (conversational format)."
    )


def _check_rows_have(rows: list[dict[str, Any]], schema: tuple[str, ...], preferred: list[tuple[str, ...]],
                     source: str) -> None:
    """Every row has ``schema``'s columns, and none has a column of a ``preferred`` schema row 0 lacks."""
    extra = sorted({c for s in preferred for c in s} - set(schema) - set(rows[0]))
    for index, row in enumerate(rows):
        missing = [c for c in schema if c not in row]
        if missing:
            raise DataError(f"{source}, row {index}: missing column(s) {', '.join(missing)}")
        present = [c for c in extra if c in row]
        if present:
            raise DataError(
                f"{source}, row {index}: has the column(s) {', '.join(present)} that row 0 lacks; every row needs "
                "the same columns (add them to row 0, or drop them everywhere)"
            )


def check_text_fields(rows: list[dict[str, Any]], columns: tuple[str, ...], source: str,
                      allow_empty: tuple[str, ...] = ("prompt",)) -> bool:
    """Check each field is a non-empty string or a message list, all rows in one format.

    Fields in ``allow_empty`` may be empty strings (an offline stage trains
    on a completion with no prompt). Returns ``True`` for conversational data.
    """
    conversational = is_messages(rows[0][columns[-1]])
    for index, row in enumerate(rows):
        for column in columns:
            value = row[column]
            if conversational:
                ok = is_messages(value) and all(_is_text(m["role"]) and _is_content(m["content"]) for m in value)
                expected = "a list of {role, content} messages with text roles and contents, as in row 0"
            else:
                ok = _is_text(value) and (value != "" or column in allow_empty)
                expected = "a non-empty string, as in row 0"
            if not ok:
                shown = repr(value)
                shown = shown if len(shown) < 80 else shown[:77] + "..."
                raise DataError(f"{source}, row {index}, field {column!r}: expected {expected}; got {shown}")
    return conversational


def _is_content(value: Any) -> bool:
    """A message's content: text, or a list of ``{"type": "text", "text": ...}`` parts."""
    if isinstance(value, list):
        return all(isinstance(part, dict) and _is_text(part.get("text")) for part in value)
    return _is_text(value)


def _is_text(value: Any) -> bool:
    """A string that is Unicode text: no lone surrogate (JSON's ``"\\ud800"`` escapes one), which no tokenizer
    can encode."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_prompts(rows: list[dict[str, Any]], source: str, stage: str) -> bool:
    """The rows of an online stage: each has a ``prompt`` (a non-empty string, or a message list) to sample
    answers to. Returns ``True`` for conversational prompts."""
    check_columns(rows, [("prompt",)], source, stage)
    return check_text_fields(rows, ("prompt",), source, allow_empty=())


def with_bos(text: str, tokenizer: Any) -> str:
    """``text`` with the tokenizer's BOS token in front when the tokenizer adds one by default (Llama, Gemma, ...).

    Stages tokenize prompts with ``add_special_tokens=False`` (a chat template
    writes its own special tokens, and completions must not get any); a plain
    string prompt still needs the BOS the model was trained with, as trl's
    trainers give it. A text that already starts with it is left alone.
    """
    bos = getattr(tokenizer, "bos_token", None)
    if not bos or not isinstance(text, str) or text.startswith(bos):
        return text
    cached = getattr(tokenizer, "_molting_adds_bos", None)
    if cached is None:
        cached = tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
        try:
            tokenizer._molting_adds_bos = cached
        except AttributeError:
            pass
    return bos + text if cached else text
