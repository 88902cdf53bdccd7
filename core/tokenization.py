"""Prompt and completion text to token ids, as every offline stage tokenizes them.

A completion is tokenized after its prompt and split off where the two
tokenizations part (:func:`split_ids`, as trl's trainers split them), with
``add_special_tokens=False`` (a chat template writes its own special
tokens); a plain string prompt gets the BOS its model was trained with
(:func:`molting.data.with_bos`) and a plain completion one EOS, a
chat-templated one none (its template ends the turn). A row longer than
``max_length`` is truncated (the end of the prompt kept) or dropped, and
every such row is counted and reported in one line.
"""

from __future__ import annotations

import contextlib
import functools
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from molting.data import Rows, column_names, is_dataset, with_bos
from molting.errors import DataError

if TYPE_CHECKING:  # pragma: no cover - typing only
    import datasets


def without_eos(text: Any, tokenizer: Any) -> Any:
    """``text`` without a trailing EOS token text (so the EOS id is appended once, as trl's ``add_eos``)."""
    eos = getattr(tokenizer, "eos_token", None)
    return text.removesuffix(eos) if eos and isinstance(text, str) else text


def tokenize_completions(
    rows: Rows,
    keys: tuple[str, ...],
    tokenizer: Any,
    max_length: int,
    overlong: str,
    source: str = "data",
    noun: str = "pair",
    carry: tuple[str, ...] = (),
    add_eos: bool = True,
    num_proc: int | None = None,
) -> datasets.Dataset:
    """Token ids of each row's ``prompt`` and of its completions ``keys`` (``KEY_ids``, EOS appended unless not
    ``add_eos`` or the row is ``templated``: written by a chat template, which ends a turn its own way).

    Shared by the preference stage (``keys`` chosen, rejected), the unpaired
    and SFT stages (``keys`` completion) and the reward-model stage. A row
    whose prompt plus longest completion exceeds ``max_length`` is truncated
    (the end of the prompt is kept, at least half of ``max_length`` when the
    completions are long, and the completions are cut to fit) or, with
    ``overlong="drop"``, dropped; either way they are counted and reported, in
    ``noun``s. Each example has ``index`` (its row in ``rows``), ``length``
    (prompt plus longest completion, for ``--group-by-length``),
    ``prompt_ids`` and ``KEY_ids``; ``carry`` names fields copied unchanged
    into each example (e.g. ``label``). The examples are a
    ``datasets.Dataset`` made by :func:`map_rows` (batched, ``num_proc``
    processes, cached).
    """
    ids = {name: ids_feature() for name in ("prompt_ids", *(f"{key}_ids" for key in keys))}
    tokenized = map_rows(rows, _tokenize_batch, f"tokenizing {noun}s", num_proc, features=ids, keys=keys,
                         columns=("prompt", *keys, "templated", *carry),
                         tokenizer=tokenizer, max_length=max_length, overlong=overlong, carry=carry, add_eos=add_eos)
    counts = {flag: _count(tokenized, flag) for flag in _FLAGS}
    total = len(tokenized)
    if counts["_merged"]:
        print(f"molting: {counts['_merged']} of {total} {noun}s in {source}: the prompt's last tokens merge with the "
              "completion's first, so the completion starts where the two tokenizations part (as in trl)",
              file=sys.stderr)
    if counts["_overlong"]:
        _report_overlong(counts["_overlong"], counts["_prompt_overlong"], total, noun, source, max_length, overlong)
    if counts["_kept"] < total:
        tokenized = tokenized.filter(_kept, input_columns="_kept", batched=True)
    if not len(tokenized):
        raise DataError(f"no {noun} of {source} fits in max_length={max_length}; raise --max-length")
    return tokenized.remove_columns(list(_FLAGS))


_FLAGS = ("_merged", "_overlong", "_prompt_overlong", "_kept")
"""Columns :func:`_tokenize_batch` marks each row with, counted and then removed."""


def _kept(flags: list[bool]) -> list[bool]:
    return flags


def ids_feature() -> Any:
    """The feature of a column of token ids: 32-bit (every vocabulary fits), half the bytes of Arrow's default."""
    import datasets

    return datasets.List(datasets.Value("int32"))


def _count(dataset: Any, column: str) -> int:
    import pyarrow.compute as pc

    return int(pc.sum(dataset.data.column(column)).as_py() or 0)


def _tokenize_batch(batch: dict[str, list], indices: list[int], *, keys: tuple[str, ...], tokenizer: Any,
                    max_length: int, overlong: str, carry: tuple[str, ...], add_eos: bool) -> dict[str, list]:
    """:func:`tokenize_completions` of one batch of formatted rows, every row kept and marked with :data:`_FLAGS`."""
    eos = [tokenizer.eos_token_id] if add_eos and tokenizer.eos_token_id is not None else []
    templated = [bool(t) for t in batch.get("templated") or [False] * len(indices)]
    prompts = [with_bos(prompt, tokenizer) for prompt in batch["prompt"]]
    texts = [[batch[key][row] if templated[row] else without_eos(batch[key][row], tokenizer) for key in keys]
             for row in range(len(indices))]
    out: dict[str, list] = {name: [] for name in ("index", "length", "prompt_ids", *(f"{k}_ids" for k in keys),
                                                 *carry, *_FLAGS)}
    for row, (prompt, completions, shortened) in enumerate(split_batch(tokenizer, prompts, texts)):
        if not templated[row]:  # a chat template's completion ends with its own end of turn
            completions = [c + eos for c in completions]
        too_long = len(prompt) + max(len(c) for c in completions) > max_length
        out["_prompt_overlong"].append(too_long and len(prompt) >= max_length)
        if too_long:
            prompt, completions = truncate(prompt, completions, max_length)
        # dropped, or no room left for a completion token: nothing to learn from this row
        out["_kept"].append(not (too_long and overlong == "drop") and all(completions))
        out["_merged"].append(shortened)
        out["_overlong"].append(too_long)
        out["index"].append(indices[row])
        out["length"].append(len(prompt) + max(len(c) for c in completions))
        out["prompt_ids"].append(prompt)
        for key, completion in zip(keys, completions):
            out[f"{key}_ids"].append(completion)
        for name in carry:
            out[name].append(batch[name][row])
    return out


#: Rows tokenized in one call of the tokenizer: a fast tokenizer encodes a batch in Rust, in parallel.
BATCH_ROWS = 1024


def map_rows(rows: Rows, function: Callable[..., dict[str, list]], desc: str, num_proc: int | None = None,
             features: dict[str, Any] | None = None, batch_size: int = BATCH_ROWS,
             columns: tuple[str, ...] | None = None, **kwargs: Any) -> datasets.Dataset:
    """``function(batch, indices, **kwargs)`` over the ``columns`` of ``rows`` (all when ``None``) a batch of
    ``batch_size`` at a time, as a new ``datasets.Dataset`` of the columns it returns (``features`` types some).

    A dataset goes through ``Dataset.map``: ``num_proc`` processes, a
    progress bar (above one batch), and, for data read from files, the
    fingerprint cache, so a second run on the same data, tokenizer and
    settings reads the result instead of computing it. The cache key hashes
    the input's fingerprint, ``function``, ``kwargs`` and molting's own code
    (:func:`code_version`): an upgrade never reads a result its predecessor
    computed. A list of rows (a registered dataset's, a test's) becomes an
    in-memory dataset of ``columns`` first (a column nobody reads is never
    converted, whatever it holds).
    """
    import datasets
    from datasets.fingerprint import Hasher

    if not is_dataset(rows):
        names = columns if columns is not None else column_names(rows)
        rows = datasets.Dataset.from_dict({name: [row.get(name) for row in rows] for name in names})
    elif columns is not None:
        rows = rows.select_columns([name for name in columns if name in rows.column_names])
    fingerprint = Hasher.hash([rows._fingerprint, function.__module__, function.__qualname__, kwargs, features,
                               batch_size, code_version()])
    typed = None
    if (features or _has_json(rows.features)) and len(rows):  # the columns' types as the function makes them
        first = rows[:1]
        made = function(first, [0], **kwargs)
        probe = datasets.Dataset.from_dict(made).features
        typed = datasets.Features({
            # a column carried through unchanged keeps its type; datasets would keep a JSON-typed input column's
            # type for an output of the same name even when the function made text of it (a templated message list)
            name: (features or {}).get(name) or (rows.features[name] if made[name] == first.get(name) else feature)
            for name, feature in probe.items()})
    with _progress_bars(len(rows) > batch_size):
        return rows.map(function, batched=True, with_indices=True, batch_size=batch_size, fn_kwargs=kwargs,
                        remove_columns=rows.column_names, num_proc=num_proc if num_proc and num_proc > 1 else None,
                        desc=f"molting: {desc}", new_fingerprint=fingerprint, features=typed)


def _has_json(features: Any) -> bool:
    """Whether a column holds values datasets stores as JSON (structs that differ from row to row: messages with
    and without ``tool_calls``)."""
    return "Json(" in repr(features)


@contextlib.contextmanager
def _progress_bars(shown: bool):
    """``datasets``' progress bars off while a map too small to need one runs (unless they are off already)."""
    from datasets.utils import logging as datasets_logging

    if shown or not datasets_logging.is_progress_bar_enabled():
        yield
        return
    datasets_logging.disable_progress_bar()
    try:
        yield
    finally:
        datasets_logging.enable_progress_bar()


@functools.cache
def code_version() -> str:
    """A digest of molting's version and of its modules' source, part of every :func:`map_rows` cache key."""
    import hashlib

    import molting

    digest = hashlib.sha256(molting.__version__.encode())
    for path in sorted(Path(molting.__file__).parent.glob("*.py")):
        digest.update(path.read_bytes())
    return digest.hexdigest()[:16]


def split_ids(tokenizer: Any, prompt: str, completions: list[str]) -> tuple[list[int], list[list[int]], bool]:
    """Token ids of ``prompt`` and of each completion, as the completion is tokenized after the prompt.

    Each completion is tokenized together with the prompt and takes the ids
    after the longest prefix shared with the prompt's own ids, as trl's
    trainers split them: a sentencepiece tokenizer (Llama 2, Mistral, Phi-3)
    would give a completion tokenized alone a word-start marker it does not
    have after the prompt. When tokens merge across the boundary the prompt
    loses its last ids (the third value says so). An empty prompt is the
    BOS token (else EOS): every sequence has a first position to predict from.
    """
    return split_batch(tokenizer, [prompt], [completions])[0]


def split_batch(tokenizer: Any, prompts: list[str],
                completions: list[list[str]]) -> list[tuple[list[int], list[list[int]], bool]]:
    """:func:`split_ids` of many rows (``completions[i]`` are ``prompts[i]``'s), in one tokenizer call per key."""
    prompt_ids = tokenizer(prompts, add_special_tokens=False)["input_ids"]
    joined = [tokenizer([p + c for p, c in zip(prompts, column)], add_special_tokens=False)["input_ids"]
              for column in zip(*completions)]
    start = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    results = []
    for row, ids in enumerate(prompt_ids):
        if not ids:  # an empty prompt: the completions alone, after the start token
            alone = tokenizer(list(completions[row]), add_special_tokens=False)["input_ids"]
            results.append(([start], alone, False))
            continue
        together = [column[row] for column in joined]
        cut = min(_shared_prefix(ids, t) for t in together)
        results.append((ids[:cut], [t[cut:] for t in together], cut < len(ids)))
    return results


def _shared_prefix(a: list[int], b: list[int]) -> int:
    """trl's ``common_prefix_length`` (the same value): kept here because trl's counts token by token, and on this
    path, once per completion of every row, that made tokenizing 18% slower (measured: 3,544 against 2,928 rows/s
    on 20,000 demo pairs). The common case, ``b`` starting with all of ``a``, is one list comparison in C."""
    if b[: len(a)] == a:
        return len(a)
    for position, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return position
    return min(len(a), len(b))


def truncate(prompt: list[int], completions: list[list[int]], max_length: int) -> tuple[list[int], list[list[int]]]:
    """The end of ``prompt`` (at least half of ``max_length``) and the ``completions`` cut to what is left: how
    an overlong row is truncated (the end of the prompt is where the answer starts)."""
    longest = max(len(c) for c in completions)
    keep = max(max_length - longest, max_length // 2, 1)
    prompt = prompt[len(prompt) - keep :] if len(prompt) > keep else prompt
    return prompt, [c[: max_length - len(prompt)] for c in completions]


def _report_overlong(too_long: int, prompt_too_long: int, total: int, noun: str, source: str, max_length: int,
                     overlong: str) -> None:
    action = "dropped" if overlong == "drop" else "truncated (prompt kept from its end, completions cut)"
    print(
        f"molting: {too_long} of {total} {noun}s in {source} are longer than max_length={max_length} "
        f"({prompt_too_long} with the prompt alone that long): {action}. "
        f"Use --max-length or --overlong {'truncate' if overlong == 'drop' else 'drop'} to change this.",
        file=sys.stderr,
    )


def token_count(examples: Rows, column: str) -> int:
    """The number of token ids in ``column`` over every example (read from Arrow, not row by row)."""
    if not is_dataset(examples):
        return sum(len(example[column]) for example in examples)
    import pyarrow.compute as pc

    table = examples.with_format("arrow")[:] if examples._indices is not None else examples.data
    return int(pc.sum(pc.list_value_length(table.column(column))).as_py() or 0)
