"""molting serve: the OpenAI-compatible server, as a user starts it, talked to by the official openai client.

The fixture starts ``molting serve`` on the demo model in a subprocess on a
free port of 127.0.0.1 and stops it with SIGTERM, checking that it stops
cleanly. Answers are compared with molting's own greedy sampling of the
same prompts in this process.
"""

from __future__ import annotations

import concurrent.futures
import json
import signal
import subprocess

import httpx
import pytest

from molting.sampling import sample
from molting.serve import spawn

from conftest import run_molting

def start_server(*args: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
    """``molting serve ARGS --port 0`` in a subprocess (molting.serve.spawn); its stderr is read when it stops."""
    return spawn(args[0], *args[1:], env=env)


def stop_server(process: subprocess.Popen, sig: int = signal.SIGTERM) -> str:
    process.send_signal(sig)
    process.wait(timeout=60)
    text = process.log_path.read_text()
    process.log_path.unlink()
    assert process.returncode == 0, text[-2000:]
    return text


@pytest.fixture(scope="module")
def served(demo_model):
    process, url = start_server(str(demo_model), "--model-name", "demo")
    yield url
    assert "server stopped" in stop_server(process)


@pytest.fixture(scope="module")
def local(demo_model):
    from molting.models import load_causal_lm

    return load_causal_lm(demo_model)


@pytest.fixture(scope="module")
def client(served):
    from openai import OpenAI

    return OpenAI(base_url=served, api_key="unused")


def greedy(local, prompts, max_new_tokens):
    model, tokenizer = local
    return sample(model, tokenizer, prompts, max_new_tokens=max_new_tokens, temperature=0).texts


def test_models_lists_the_served_name(client):
    assert [m.id for m in client.models.list().data] == ["demo"]


def test_chat_completion_is_molting_greedy_sampling(client, local):
    messages = [{"role": "user", "content": "Q: What is 21 + 16?\nA:"}]
    reply = client.chat.completions.create(model="demo", messages=messages, max_tokens=16, temperature=0)
    assert reply.choices[0].message.content == greedy(local, [messages], 16)[0]
    assert reply.choices[0].message.role == "assistant"
    assert reply.usage.completion_tokens <= 16 and reply.usage.prompt_tokens > 0


def test_completions_take_a_list_of_prompts(client, local):
    prompts = ["Q: What is 2 + 3?\nA:", "Q: What is 30 + 12?\nA:"]
    reply = client.completions.create(model="demo", prompt=prompts, max_tokens=12, temperature=0)
    assert [c.text for c in reply.choices] == greedy(local, prompts, 12)


def test_seed_n_and_max_tokens(client):
    ask = dict(model="demo", messages=[{"role": "user", "content": "Q: What is 7 + 9?\nA:"}], temperature=1.0,
               max_tokens=8, n=3)
    first, again = client.chat.completions.create(seed=5, **ask), client.chat.completions.create(seed=5, **ask)
    texts = [c.message.content for c in first.choices]
    assert texts == [c.message.content for c in again.choices] and len(texts) == 3
    short = client.chat.completions.create(**{**ask, "max_tokens": 2, "n": 1, "temperature": 0})
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 2


def test_stop_strings_cut_the_answer(client, local):
    prompt = "Q: What is 21 + 16?\nA:"
    full = greedy(local, [prompt], 16)[0]
    stop = full.strip().split()[1]
    reply = client.completions.create(model="demo", prompt=prompt, max_tokens=16, temperature=0, stop=[stop])
    assert reply.choices[0].text == full[: full.index(stop)] and reply.choices[0].finish_reason == "stop"


def test_concurrent_requests_share_generate_calls(served, local):
    prompts = [f"Q: What is {a} + {a + 3}?\nA:" for a in range(1, 13)]
    before = httpx.get(served.replace("/v1", "/health")).json()["batches"]

    def ask(prompt):
        body = {"model": "demo", "prompt": prompt, "max_tokens": 10, "temperature": 0}
        return httpx.post(f"{served}/completions", json=body, timeout=60).json()["choices"][0]["text"]

    with concurrent.futures.ThreadPoolExecutor(12) as pool:
        texts = list(pool.map(ask, prompts))
    batches = httpx.get(served.replace("/v1", "/health")).json()["batches"] - before
    assert batches < len(prompts)  # batched, not one generate call per request
    assert texts == greedy(local, prompts, 10)


def test_streaming_client_reads_the_answer(client, local):
    messages = [{"role": "user", "content": "Q: What is 3 + 4?\nA:"}]
    stream = client.chat.completions.create(model="demo", messages=messages, max_tokens=10, temperature=0,
                                            stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == greedy(local, [messages], 10)[0]


def test_bad_requests_get_openai_errors(served):
    wrong = httpx.post(f"{served}/chat/completions", json={"model": "gpt-4", "messages": [{"role": "user",
                                                                                          "content": "hi"}]})
    assert wrong.status_code == 404 and "serves `demo`" in wrong.json()["error"]["message"]
    empty = httpx.post(f"{served}/chat/completions", json={"model": "demo", "messages": []})
    assert empty.status_code == 400 and empty.json()["error"]["param"] == "messages"
    hot = httpx.post(f"{served}/completions", json={"model": "demo", "prompt": "hi", "temperature": 5})
    assert hot.status_code == 400 and "temperature" in hot.json()["error"]["message"]
    long = httpx.post(f"{served}/completions", json={"model": "demo", "prompt": "hi", "max_tokens": 100000})
    assert long.status_code == 400 and "maximum context length" in long.json()["error"]["message"]


def test_api_key_and_sigint(demo_model):
    process, url = start_server(str(demo_model), "--model-name", "demo", "--api-key-env", "SERVE_KEY",
                                env={"SERVE_KEY": "sk-local"})
    try:
        body = {"model": "demo", "prompt": "hi", "max_tokens": 2}
        assert httpx.post(f"{url}/completions", json=body).status_code == 401
        ok = httpx.post(f"{url}/completions", json=body, headers={"Authorization": "Bearer sk-local"})
        assert ok.status_code == 200
    finally:
        assert "server stopped" in stop_server(process, signal.SIGINT)


def test_unset_key_variable_and_missing_model_are_clear_errors(tmp_path):
    unset = run_molting("serve", "somewhere", "--api-key-env", "NOT_SET_ANYWHERE", env={"NOT_SET_ANYWHERE": ""})
    assert unset.returncode != 0 and "NOT_SET_ANYWHERE, which is not set" in unset.stderr
    missing = run_molting("serve", str(tmp_path / "nothing"))
    assert missing.returncode != 0 and "not a local directory" in missing.stderr


def test_serves_a_hub_id_from_the_cache(tmp_path, demo_model, local):
    from hubcache import add_to_cache

    cache = tmp_path / "hub"
    add_to_cache(cache, "molting-test/demo-chat", demo_model)
    process, url = start_server("molting-test/demo-chat", env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(cache)})
    try:
        models = httpx.get(f"{url}/models").json()
        assert models["data"][0]["id"] == "molting-test/demo-chat"
        body = {"model": "molting-test/demo-chat", "prompt": "Q: What is 2 + 3?\nA:", "max_tokens": 8, "temperature": 0}
        text = httpx.post(f"{url}/completions", json=body, timeout=60).json()["choices"][0]["text"]
        assert text == greedy(local, [body["prompt"]], 8)[0]
    finally:
        stop_server(process)


def test_serve_help_teaches(tmp_path):
    result = run_molting("serve", "--help")
    assert result.returncode == 0
    for needle in ("/v1/chat/completions", "--max-batch-size", "--api-key-env", "--judge openai", "curl"):
        assert needle in result.stdout, needle


# --------------------------------------------------------------------------- the openai sampler


def test_sample_pairs_draws_from_a_served_model(served, tmp_path, capsys):
    """One-shot sampling before offline training: sample-pairs with --sampler openai against molting serve."""
    from molting.discovery import load_plugins
    from molting.pipeline import run
    from molting.resolve import resolve_config

    from test_grpo import write_prompts

    host = load_plugins()
    before = httpx.get(served.replace("/v1", "/health")).json()["batches"]
    flags = {"data": str(write_prompts(tmp_path, n=6)), "output_dir": str(tmp_path / "run"), "eval": "off",
             "sampler": "openai", "sampler_args": {"base_url": served, "model": "demo"}, "num_samples": 4,
             "max_new_tokens": 12, "judges": {"rule": 1.0}}
    config, steps = resolve_config(host, ["sample-pairs"], flags=flags)
    run(config, steps, host)
    assert "(sampler openai)" in capsys.readouterr().err
    pairs = [json.loads(line) for line in (tmp_path / "run" / "data.jsonl").read_text().splitlines()]
    assert pairs and all(p["chosen"] != p["rejected"] for p in pairs)
    assert httpx.get(served.replace("/v1", "/health")).json()["batches"] > before


def test_the_openai_sampler_is_refused_by_stages_that_train_on_their_samples(tmp_path, served):
    import molting

    from test_grpo import run_stage

    with pytest.raises(molting.ConfigError, match="draws from a served model, not from the policy grpo trains"):
        run_stage(tmp_path, sampler="openai", sampler_args={"base_url": served, "model": "demo"})
    from molting.discovery import load_plugins
    from molting.sampling import sampler_for

    with pytest.raises(molting.ConfigError, match=r"invalid sampler_args for sampler 'openai'.*timeout must be"):
        sampler_for(load_plugins(), "openai", {"timeout": -1}, trains=False)


def test_a_dead_server_is_a_clear_sampling_error(tmp_path):
    from molting.demo import demo_model_dir, prompt_rows
    from molting.discovery import load_plugins
    from molting.errors import ModelError
    from molting.models import load_causal_lm
    from molting.sampling import sampler_for

    model, tokenizer = load_causal_lm(demo_model_dir())
    draw = sampler_for(load_plugins(), "openai", {"base_url": "http://127.0.0.1:9/v1", "model": "demo",
                                                 "max_retries": 1, "backoff": 0}, trains=False)
    with pytest.raises(ModelError, match=r"sampler 'openai': no completions of prompt 0 from http://127.0.0.1:9/v1: "
                                         r"ConnectError.*after 2 attempts"):
        draw(model, tokenizer, [r["prompt"] for r in prompt_rows("test", 2)], n=2, max_new_tokens=4)
