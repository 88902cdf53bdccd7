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
import weakref
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Union

from molting.errors import DataError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import datasets

FORMATS = (".jsonl", ".json", ".csv", ".parquet", "a directory saved with datasets.save_to_disk")
HUB_DATA_FILES = ("*.parquet", "*.arrow", "*.jsonl", "*.json", "*.csv", "*.tsv", "*.txt", "*.gz", "*.zst", "*.bz2",
                  "*.xz", "README.md")
"""The files of a hub dataset's snapshot: its data files and the card whose metadata names its subsets and splits
(no loading scripts: ``datasets`` no longer runs them)."""


Rows = Union["datasets.Dataset", list]
"""A stage's rows: a ``datasets.Dataset`` (read from a file, memory-mapped from the Arrow cache) or a list of dicts
(a registered dataset's, a test's). Either is a sequence of dict rows: ``len(rows)``, ``rows[i]``, iteration; the
checks below and the stages' formatting take both."""


def read_data(path: str | Path, split: str = "train") -> Rows:
    """The rows of a data file or saved ``datasets`` directory, as a ``datasets.Dataset`` where ``datasets`` can
    read it (memory-mapped from its cache, so a file larger than memory is fine and the stages' ``map`` results are
    cached), else as :func:`read_rows`'s list.

    JSONL goes through ``datasets``' JSON loader; a file it refuses (malformed
    JSON, text that is not UTF-8, a line that is not an object, ...) is read
    again with the standard library, whose errors name the line, and is
    used as a list when that succeeds. JSON and CSV files are read by
    :func:`read_rows` (their whole text is parsed at once anyway, and CSV
    fields stay strings).
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path {path} does not exist")
    if path.is_dir():
        return _read_saved_dataset(path, split)
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _read_parquet(path)
    if suffix == ".jsonl" and _starts_with_object(path):
        import datasets

        try:
            return datasets.load_dataset("json", data_files=str(path), split="train")
        except Exception:  # datasets says "an error occurred"; the standard library names the line
            return _read_jsonl(path)
    return read_rows(path, split)


def _starts_with_object(path: Path) -> bool:
    """Whether the first non-blank line of a JSONL file opens an object (``datasets`` reads a file of other JSON
    values as a ``text`` column instead of refusing it)."""
    with path.open("rb") as handle:
        for line in handle:
            line = line.lstrip(b"\xef\xbb\xbf").strip()
            if line:
                return line.startswith(b"{")
    return False


def _read_parquet(path: Path) -> Any:
    import datasets

    try:
        return datasets.Dataset.from_parquet(str(path))
    except Exception as exc:
        raise DataError(f"cannot read {path} as parquet: {exc}") from exc


def read_rows(path: str | Path, split: str = "train") -> list[dict[str, Any]]:
    """All rows of a data file or saved ``datasets`` directory (its ``split``, when it holds several), as dicts."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"data path {path} does not exist")
    if path.is_dir():
        return _read_saved_dataset(path, split).to_list()
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        return _read_jsonl(path)
    if suffix == ".json":
        return _read_json(path)
    if suffix == ".csv":
        return _read_csv(path)
    if suffix == ".parquet":
        return _read_parquet(path).to_list()
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


def _read_saved_dataset(path: Path, split: str) -> Any:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise DataError(f"{path} is a directory but not a dataset saved with datasets.save_to_disk: {exc}") from exc
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DataError(f"{path} holds the splits {', '.join(loaded)}, not {split!r}: choose one with --data-split")
        loaded = loaded[split]
    return loaded


def read_hub_dataset(name: str, subset: str | None = None, split: str = "train") -> tuple[datasets.Dataset, Path]:
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


def _load_snapshot(directory: Path, what: str, subset: str | None, split: str) -> datasets.Dataset:
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
        return datasets.load_dataset(str(directory), subset, split=split)
    except DataError:
        raise
    except Exception as exc:  # datasets' own errors: files it cannot read, a card it cannot parse
        raise DataError(f"{what}: datasets cannot read it: {str(exc).splitlines()[0]}") from exc


def rename_columns(rows: Rows, columns: dict[str, str], source: str) -> Rows:
    """``rows`` with each field ``new`` read from the column ``columns[new]`` (``--columns chosen=response_a``).

    A column already called ``new`` is replaced by the renamed one. Every
    row must have the columns named.
    """
    if not columns or not len(rows):
        return rows
    if is_dataset(rows):
        return _rename_dataset_columns(rows, columns, source)
    for index, row in enumerate(rows):
        missing = [old for old in columns.values() if old not in row]
        if missing:
            raise DataError(f"{source}, row {index}: no column {missing[0]!r} to read as "
                            f"{next(n for n, o in columns.items() if o == missing[0])!r} (--columns); its columns: "
                            f"{', '.join(sorted(row))}")
    renamed = set(columns.values())
    return [{**{k: v for k, v in row.items() if k not in renamed and k not in columns},
             **{new: row[old] for new, old in columns.items()}} for row in rows]


def _rename_dataset_columns(rows: datasets.Dataset, columns: dict[str, str], source: str) -> datasets.Dataset:
    missing = [old for old in columns.values() if old not in rows.column_names]
    if missing:
        new = next(n for n, o in columns.items() if o == missing[0])
        raise DataError(f"{source}: no column {missing[0]!r} to read as {new!r} (--columns); its columns: "
                        f"{', '.join(sorted(rows.column_names))}")
    replaced = [name for name in columns if name in rows.column_names and name not in columns.values()]
    return rows.remove_columns(replaced).rename_columns({old: new for new, old in columns.items() if old != new})


# --------------------------------------------------------------------------- rows, lists or Arrow


def hold_out(rows: Rows, fraction: float, seed: int, source: str) -> tuple[Rows, Rows]:
    """``rows`` split into the rows to train on and ``fraction`` of them held out, shuffled with ``seed``: the same
    data, fraction and seed hold out the same rows (``datasets``' ``train_test_split`` for a Dataset).

    Rows with a ``conversation`` column (turns of one conversation log, :mod:`molting.conversations`) are held
    out by conversation: ``fraction`` of the conversations, all their rows, so none of a held-out
    conversation's turns is trained on."""
    import random

    if "conversation" in column_names(rows):
        return _hold_out_conversations(rows, fraction, seed, source)
    held = round(len(rows) * fraction)
    if not 0 < held < len(rows):
        raise DataError(f"--eval-split {fraction} of {source}'s {len(rows)} rows leaves no rows to "
                        f"{'evaluate on' if held == 0 else 'train on'}; use a larger fraction or more data")
    if is_dataset(rows):
        parts = rows.train_test_split(test_size=held, seed=seed, shuffle=True)
        return parts["train"], parts["test"]
    order = list(range(len(rows)))
    random.Random(seed).shuffle(order)
    return [rows[i] for i in sorted(order[held:])], [rows[i] for i in sorted(order[:held])]


def _hold_out_conversations(rows: Rows, fraction: float, seed: int, source: str) -> tuple[Rows, Rows]:
    import random

    ids = [row["conversation"] for row in iter_rows(rows, ["conversation"])]
    unique = sorted(set(ids))
    held = round(len(unique) * fraction)
    if not 0 < held < len(unique):
        raise DataError(f"--eval-split {fraction} of {source}'s {len(unique)} conversations leaves none to "
                        f"{'evaluate on' if held == 0 else 'train on'}; use a larger fraction or more conversations")
    random.Random(seed).shuffle(unique)
    kept = set(unique[:held])
    train = [i for i, c in enumerate(ids) if c not in kept]
    test = [i for i, c in enumerate(ids) if c in kept]
    if is_dataset(rows):
        return rows.select(train), rows.select(test)
    return [rows[i] for i in train], [rows[i] for i in test]


def is_dataset(rows: Any) -> bool:
    """Whether ``rows`` is a ``datasets.Dataset`` (rather than a list of dicts)."""
    return hasattr(rows, "column_names") and hasattr(rows, "map")


def column_names(rows: Rows) -> list[str]:
    """Every column any row has (a dataset's columns; the keys of a list's rows, in order of appearance)."""
    if is_dataset(rows):
        return list(rows.column_names)
    return list(dict.fromkeys(key for row in rows for key in row))


def iter_rows(rows: Rows, columns: Iterable[str] | None = None, size: int = 4096) -> Iterator[dict[str, Any]]:
    """Each row of ``rows`` as a dict of ``columns`` (all when ``None``) that the row has, read from a dataset a
    batch at a time (far faster than indexing it row by row).

    A dataset holds ``None`` where a file's row had no such key (or a JSON
    ``null``): such a value is left out, so a dataset's row reads as the
    file's row did.
    """
    if not is_dataset(rows):
        for row in rows:
            yield row if columns is None else {c: row[c] for c in columns if c in row}
        return
    table = rows if columns is None else rows.select_columns([c for c in columns if c in rows.column_names])
    for batch in table.iter(batch_size=size):
        names = list(batch)
        for values in zip(*batch.values()):
            yield {name: value for name, value in zip(names, values) if value is not None}


def batches(rows: Rows, size: int, columns: Iterable[str] | None = None) -> Iterator[list[dict[str, Any]]]:
    """``rows`` (their ``columns``) as lists of at most ``size`` row dicts, in order."""
    batch: list[dict[str, Any]] = []
    for row in iter_rows(rows, columns, size=size):
        batch.append(row)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def first_row(rows: Rows) -> dict[str, Any]:
    """Row 0, as :func:`iter_rows` gives it."""
    return next(iter_rows(rows[:1] if not is_dataset(rows) else rows.select(range(1))))


# --------------------------------------------------------------------------- validation


def is_messages(value: Any) -> bool:
    """A conversational value: a list of {"role": ..., "content": ...} dicts."""
    return (
        isinstance(value, list)
        and len(value) > 0
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in value)
    )


def check_columns(rows: Rows, schemas: Iterable[tuple[str, ...]], source: str, stage: str) -> tuple[str, ...]:
    """The first schema (a tuple of column names) row 0 satisfies, checked on every row, or a :class:`DataError`.

    Every row must have the schema's columns, and no row may have the
    columns of a schema listed before it that row 0 lacks (a file whose first
    row has no ``prompt`` while others have one would otherwise be read
    without prompts).
    """
    if not len(rows):
        raise DataError(f"{source} has no rows; the {stage} stage needs at least one")
    schemas = list(schemas)
    first = first_row(rows)
    for position, schema in enumerate(schemas):
        if all(column in first for column in schema):
            _check_rows_have(rows, first, schema, schemas[:position], source)
            unused = sorted(set(_present_columns(rows)) - set(schema))
            if position > 0 and unused:  # e.g. a misspelt "promt" column: say so rather than train on the wrong thing
                import sys

                print(
                    f"molting: warning: {source} has no ({', '.join(schemas[0])}) columns; reading it as "
                    f"({', '.join(schema)}) and ignoring the column(s) {', '.join(unused)}",
                    file=sys.stderr,
                )
            return schema
    for schema in schemas if is_dataset(rows) else ():  # the columns are there, row 0 holds nulls in some
        if all(column in rows.column_names for column in schema):
            null = next(column for column in schema if column not in first)
            raise DataError(f"{source}, row 0, field {null!r}: missing or null; the {stage} stage needs a value")
    accepted = " or ".join("(" + ", ".join(s) + ")" for s in schemas)
    raise DataError(
        f"{source} has columns ({', '.join(sorted(first))}); the {stage} stage needs {accepted}. "
        "Values may be strings (standard format) or lists of {role, content} messages (conversational format)."
    )


def _present_columns(rows: Rows) -> list[str]:
    """The columns some row has a value in."""
    if not is_dataset(rows):
        return column_names(rows)
    return [name for name in rows.column_names if rows.data.column(name).null_count < rows.data.num_rows]


def _check_rows_have(rows: Rows, first: dict[str, Any], schema: tuple[str, ...], preferred: list[tuple[str, ...]],
                     source: str) -> None:
    """Every row has ``schema``'s columns, and none has a column of a ``preferred`` schema row 0 lacks."""
    extra = sorted({c for s in preferred for c in s} - set(schema) - set(first))
    for index, row in enumerate(iter_rows(rows, (*schema, *extra))):
        missing = [c for c in schema if c not in row]
        if missing:  # in a dataset: a file's row without the key, or with null (a dataset holds None for both)
            null = " (absent or null)" if is_dataset(rows) else ""
            raise DataError(f"{source}, row {index}: missing column(s) {', '.join(missing)}{null}")
        present = [c for c in extra if c in row]
        if present:
            raise DataError(
                f"{source}, row {index}: has the column(s) {', '.join(present)} that row 0 lacks; every row needs "
                "the same columns (add them to row 0, or drop them everywhere)"
            )


def check_text_fields(rows: Rows, columns: tuple[str, ...], source: str,
                      allow_empty: tuple[str, ...] = ("prompt",),
                      adapt: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> bool:
    """Check each field is a non-empty string or a message list, all rows in one format.

    Fields in ``allow_empty`` may be empty strings (an offline stage trains
    on a completion with no prompt). ``adapt`` turns each row into what is
    checked (e.g. a text prompt before conversations into a message).
    Returns ``True`` for conversational data.
    """
    adapt = adapt or (lambda row: row)
    conversational = is_messages(adapt(first_row(rows)).get(columns[-1]))
    for index, row in enumerate(iter_rows(rows, columns)):
        row = adapt(row)
        for column in columns:
            value = row.get(column)
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


def check_prompts(rows: Rows, source: str, stage: str) -> bool:
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
    return bos + text if adds_bos(tokenizer) else text


_ADDS_BOS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def adds_bos(tokenizer: Any) -> bool:
    """Whether ``tokenizer`` puts its BOS token first by default, remembered per tokenizer (not as an attribute of
    it: that would change the tokenizer's hash, and with it the ``datasets`` cache key of every ``map`` it is in)."""
    try:
        return _ADDS_BOS[tokenizer]
    except (KeyError, TypeError):
        pass
    adds = getattr(tokenizer, "bos_token_id", None) is not None and tokenizer("a")["input_ids"][:1] == [tokenizer.bos_token_id]
    try:
        _ADDS_BOS[tokenizer] = adds
    except TypeError:  # not weakly referenceable: ask again next time
        pass
    return adds
