"""Models by Hugging Face hub id, offline from a cache laid out as huggingface_hub lays it out.

The online errors (gated, private or unknown repositories, unknown
revisions) come from a local HTTP server answering as the hub's API does
(status and ``X-Error-Code`` header), with ``HF_ENDPOINT`` pointed at it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from hubcache import add_to_cache
from molting.errors import ModelError
from molting.models import _hub_snapshot, describe_model, load_causal_lm, resolve_model_path


@pytest.fixture
def hub_cache(tmp_path, monkeypatch, demo_model):
    """An offline hub cache holding the demo model as ``acme/tiny`` (main) and a second revision tagged ``v1``."""
    from huggingface_hub import constants

    cache = tmp_path / "hub"
    main = add_to_cache(cache, "acme/tiny", demo_model)
    other = tmp_path / "other"
    other.mkdir()
    for path in demo_model.iterdir():
        if path.is_file():
            (other / path.name).write_bytes(path.read_bytes())
    (other / "generation_config.json").write_text(json.dumps({"max_new_tokens": 7}))
    v1 = add_to_cache(cache, "acme/tiny", other, branch="v1")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    _hub_snapshot.cache_clear()  # a process asks the hub once per id; each test has a cache of its own
    return {"cache": cache, "main": main, "v1": v1}


def test_a_hub_id_resolves_offline_to_its_cached_snapshot(hub_cache):
    path = resolve_model_path("acme/tiny")
    assert path == hub_cache["cache"] / "models--acme--tiny" / "snapshots" / hub_cache["main"]
    assert describe_model(path) == f"acme/tiny@{hub_cache['main'][:12]}"
    model, tokenizer = load_causal_lm(path)
    assert model.config.model_type == "llama" and tokenizer.pad_token is not None


@pytest.mark.parametrize("given", ["acme/tiny@v1", ("acme/tiny", "v1"), "commit"])
def test_a_revision_is_a_branch_tag_or_commit(hub_cache, given):
    if given == "commit":
        given = f"acme/tiny@{hub_cache['v1']}"
    path = resolve_model_path(*given) if isinstance(given, tuple) else resolve_model_path(given)
    assert path.name == hub_cache["v1"]
    assert json.loads((path / "generation_config.json").read_text()) == {"max_new_tokens": 7}


def test_two_different_revisions_at_once_are_refused(hub_cache):
    with pytest.raises(ModelError, match="pins revision 'v1' but --model-revision is 'main': give one"):
        resolve_model_path("acme/tiny@v1", "main")


def test_an_id_not_in_the_cache_offline_names_the_id_and_the_fix(hub_cache):
    with pytest.raises(ModelError) as caught:
        resolve_model_path("acme/absent", "v2")
    message = str(caught.value)
    assert "model 'acme/absent' at revision 'v2' is not in the Hugging Face cache" in message
    assert str(hub_cache["cache"]) in message and "hf download acme/absent --revision v2" in message


def test_neither_a_directory_nor_an_id_is_a_clear_error(hub_cache, tmp_path):
    (tmp_path / "weights.bin").write_text("x")
    for given in ("a/b/c", "./missing", str(tmp_path / "weights.bin")):
        with pytest.raises(ModelError, match="is not a local directory .* nor a Hugging Face hub id"):
            resolve_model_path(given)


def test_a_hub_model_without_safetensors_is_refused(hub_cache, tmp_path, demo_model):
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    for path in demo_model.iterdir():
        if path.is_file() and path.suffix != ".safetensors":
            (pickled / path.name).write_bytes(path.read_bytes())
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    add_to_cache(hub_cache["cache"], "acme/pickled", pickled)
    with pytest.raises(ModelError, match=r"acme--pickled/snapshots/\w+ has no \.safetensors weights"):
        load_causal_lm(resolve_model_path("acme/pickled"))


class HubAPI(BaseHTTPRequestHandler):
    """Answers ``/api/models/ORG/NAME/revision/REV`` as the hub does for gated, private and unknown repos."""

    answers = {"acme/gated": (403, "GatedRepo"), "acme/private": (401, "RepoNotFound"),
               "acme/unknown": (404, "RepoNotFound")}

    def do_GET(self):  # noqa: N802 (http.server's name)
        parts = self.path.split("?")[0].strip("/").split("/")
        repo, revision = "/".join(parts[2:4]), parts[5] if len(parts) > 5 else "main"
        status, code = self.answers.get(repo, (404, "RevisionNotFound") if revision == "nope" else (500, ""))
        body = json.dumps({"error": f"{code or 'unexpected'} for {repo}"}).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        if code:
            self.send_header("X-Error-Code", code)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def hub_server(tmp_path, monkeypatch):
    from huggingface_hub import constants

    server = ThreadingHTTPServer(("127.0.0.1", 0), HubAPI)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    yield
    server.shutdown()


@pytest.mark.parametrize("given, message", [
    ("acme/gated", "model 'acme/gated' is gated on the Hugging Face hub: accept its terms on "
                   "https://huggingface.co/acme/gated and log in"),
    ("acme/private", "model 'acme/private': no such model on the Hugging Face hub, or it is private"),
    ("acme/unknown", "model 'acme/unknown': no such model on the Hugging Face hub, or it is private"),
    ("acme/real@nope", "model 'acme/real' at revision 'nope': the model has no such revision"),
])
def test_hub_refusals_are_one_line_naming_the_id_and_the_fix(hub_server, given, message):
    with pytest.raises(ModelError) as caught:
        resolve_model_path(given)
    assert message in str(caught.value) and "\n" not in str(caught.value)


def test_a_hub_id_is_asked_of_the_hub_once_per_process(hub_cache):
    _hub_snapshot.cache_clear()
    first = resolve_model_path("acme/tiny", what="judge 'reward-model': model")
    again = resolve_model_path("acme/tiny", what="judge 'reward-model': model")
    assert again == first and _hub_snapshot.cache_info().hits == 1


def test_judge_models_by_hub_id(hub_cache):
    from molting.plugins import llm_judge, reward_judge

    network, _ = llm_judge.load_judge_model("acme/tiny@v1")
    assert Path(network.name_or_path).name == hub_cache["v1"]
    with pytest.raises(ModelError, match=r"judge 'reward-model': model 'acme/tiny' is not a reward model"):
        reward_judge.load_reward_model("acme/tiny")
    with pytest.raises(ModelError, match=r"judge 'llm-pairwise': model 'acme/absent' is not in the Hugging Face"):
        llm_judge.load_judge_model("acme/absent")


def test_a_run_by_hub_id_offline_records_the_id_and_commit(hub_cache, tmp_path):
    """The CLI end to end in a fresh process with HF_HUB_OFFLINE=1: the run record and model card name the id."""
    out = tmp_path / "out"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(hub_cache["cache"])}
    done = subprocess.run([sys.executable, "-m", "molting", "run", "--plugin", "sft", "--model", "acme/tiny",
                           "--model-revision", "v1", "--max-steps", "2", "--eval", "off", "--output-dir", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    record = json.loads((out / "molting_run.json").read_text())
    assert record["model_hub"] == {"id": "acme/tiny", "revision": hub_cache["v1"]}
    assert record["config"]["model"] == "acme/tiny" and record["config"]["model_revision"] == "v1"
    card = (out / "README.md").read_text()
    assert "base_model: acme/tiny\n" in card and f"`acme/tiny` (hub revision `{hub_cache['v1']}`)" in card
    assert Path(out / "model.safetensors").is_file()
