"""Data at scale: rows read into ``datasets`` (Arrow, memory-mapped), formatted and tokenized with a batched
``map`` over ``--num-proc`` processes, and the fingerprint cache that spares a second run the tokenizing."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from molting.data import is_dataset, read_data, read_rows
from molting.errors import DataError
from molting.pairs import format_pairs, tokenize_pairs


@pytest.fixture(scope="module")
def tokenizer(demo_model):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model)


def write_pairs(path, n=300):
    with path.open("w") as handle:
        for i in range(n):
            handle.write(json.dumps({"prompt": f"Q: what is {i} plus {i % 7}?\nA:", "chosen": f" {i + i % 7}, matey",
                                     "rejected": f" {i * 3} or so" + " and so on" * (i % 5)}) + "\n")
    return path


def test_a_jsonl_file_becomes_an_arrow_dataset_tokenized_into_int32_columns_as_the_rows_are(tmp_path, tokenizer):
    import datasets

    path = write_pairs(tmp_path / "pairs.jsonl")
    rows = read_data(path)
    assert is_dataset(rows) and rows.cache_files  # memory-mapped from datasets' cache, not Python objects
    examples = tokenize_pairs(format_pairs(rows, tokenizer, str(path)), tokenizer, 64, "truncate", str(path))
    assert examples.cache_files
    assert examples.features["chosen_ids"] == datasets.List(datasets.Value("int32"))
    from_list = tokenize_pairs(format_pairs(read_rows(path), tokenizer, str(path)), tokenizer, 64, "truncate",
                               str(path))
    assert not from_list.cache_files  # a list of rows is mapped in memory
    assert examples.to_list() == from_list.to_list()
    assert examples[0]["index"] == 0 and len(examples) == 300


def test_num_proc_gives_the_same_examples(tmp_path, tokenizer):
    path = write_pairs(tmp_path / "pairs.jsonl", n=2500)  # three batches, split over two processes
    one = tokenize_pairs(format_pairs(read_data(path), tokenizer, str(path)), tokenizer, 48, "drop", str(path))
    two = tokenize_pairs(format_pairs(read_data(path), tokenizer, str(path), num_proc=2), tokenizer, 48, "drop",
                         str(path), num_proc=2)
    assert len(one) < 2500  # some pairs are longer than 48 tokens and dropped, in both
    assert one.to_list() == two.to_list()


def test_a_row_refused_inside_a_worker_process_is_a_data_error_naming_it(tmp_path, tokenizer):
    refusing = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    refusing.chat_template = ("{% for m in messages %}{% if m['content'] == 'boom' %}{{ raise_exception('no boom') }}"
                              "{% endif %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    path = tmp_path / "chat.jsonl"
    with path.open("w") as handle:
        for i in range(2100):
            prompt = "boom" if i == 1500 else f"hello {i}"
            handle.write(json.dumps({"prompt": [{"role": "user", "content": prompt}],
                                     "chosen": [{"role": "assistant", "content": "yes"}],
                                     "rejected": [{"role": "assistant", "content": "no"}]}) + "\n")
    with pytest.raises(DataError, match=r"chat\.jsonl, row 1500: the model's chat template refuses it: no boom"):
        format_pairs(read_data(path), refusing, str(path), num_proc=2)


def test_messages_read_from_arrow_render_as_the_files_rows_do(tmp_path, tokenizer):
    """Arrow keeps one struct type per column: a message without the ``name`` another message has reads back with
    ``name: None``, which a chat template would render as a name."""
    import datasets

    named = tokenizer.__class__.from_pretrained(tokenizer.name_or_path)
    named.chat_template = ("{% for m in messages %}{% if 'name' in m %}[{{ m['name'] }}] {% endif %}"
                           "{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}")
    rows = [{"prompt": [{"role": "user", "content": "hi", "name": "ann"}],
             "chosen": [{"role": "assistant", "content": "yes"}], "rejected": [{"role": "assistant", "content": "no"}]},
            {"prompt": [{"role": "user", "content": "hey"}],
             "chosen": [{"role": "assistant", "content": "ok"}], "rejected": [{"role": "assistant", "content": "nay"}]}]
    path = tmp_path / "chat.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(path))
    arrow = read_data(path)
    assert arrow[1]["prompt"][0]["name"] is None  # what Arrow gives back
    formatted = format_pairs(arrow, named, str(path))
    assert formatted["prompt"] == format_pairs(rows, named, "rows")["prompt"]
    assert formatted[0]["prompt"].startswith("[ann] user: hi") and "[" not in formatted[1]["prompt"]


CACHED_RUN = textwrap.dedent("""
    import json, os, sys
    from transformers import AutoTokenizer
    from molting.data import read_data
    from molting.demo import demo_model_dir
    from molting.pairs import format_pairs, tokenize_pairs

    path, max_length = sys.argv[1], int(sys.argv[2])
    tokenizer = AutoTokenizer.from_pretrained(demo_model_dir())
    examples = tokenize_pairs(format_pairs(read_data(path), tokenizer, path), tokenizer, max_length, "truncate", path)
    [cache] = examples.cache_files
    print(json.dumps({"file": cache["filename"], "mtime": os.stat(cache["filename"]).st_mtime_ns,
                      "first": examples[0]["chosen_ids"]}))
""")


def test_a_second_run_reads_the_tokenized_pairs_from_the_cache_and_other_settings_miss_it(tmp_path):
    path = write_pairs(tmp_path / "pairs.jsonl")
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "cache")}

    def run(max_length: int) -> dict:
        done = subprocess.run([sys.executable, "-c", CACHED_RUN, str(path), str(max_length)], env=env,
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    first, second, other = run(64), run(64), run(32)
    assert second == first  # the same cache file, not written again
    assert other["file"] != first["file"]  # max_length is part of the key
