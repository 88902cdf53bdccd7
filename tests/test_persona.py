"""The persona workflow end to end: examples/persona/recipe.yaml runs sft -> sample-pairs -> dpo from one
conversation log, the pairs ranked over HTTP by a reference-guided pairwise judge (the scripted server)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from molting import demo

from conftest import run_molting
from judge_server import ScriptedServer

RECIPE = Path(__file__).resolve().parents[1] / "examples" / "persona" / "recipe.yaml"


def test_the_persona_recipe_runs_from_one_conversation_log(tmp_path):
    (tmp_path / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in demo.persona_logs("train", 20)))
    shutil.copy(RECIPE, tmp_path / "recipe.yaml")
    with ScriptedServer() as judge:
        result = run_molting("run", "--config", "recipe.yaml", "--max-steps", "2", "--judge-arg",
                             f"openai-pairwise.base_url={judge.url}", "--set", "num_samples=3", cwd=tmp_path,
                             timeout=900)
        assert result.returncode == 0, result.stderr[-4000:]
        asked = [body["messages"][-1]["content"] for body in judge.bodies]
    out = tmp_path / "persona-output"
    for step in ("1-sft", "2-sample-pairs", "3-dpo"):
        assert json.loads((out / step / "molting_run.json").read_text())["status"] == "completed", step
    assert "40 turns of 'captain' in 20 conversations (36 rows)" in result.stderr  # 2 held out
    pairs = [json.loads(line) for line in (out / "2-sample-pairs" / "data.jsonl").read_text().splitlines()]
    assert pairs and all(isinstance(p["prompt"], list) and p["chosen"][0]["role"] == "assistant" for p in pairs)
    held = json.loads((out / "1-sft" / "molting_run.json").read_text())["eval_data"]
    assert held["rows"] == 4
    # the judge compared candidates with the person's real reply to the same message
    assert asked and all("The person's reply: Arr! " in text and "Candidate A:" in text for text in asked)
    assert (out / "3-dpo" / "model.safetensors").exists()
