"""`molting report`: one self-contained HTML page, opened in headless Chromium; `molting plot`'s evaluation curves."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from conftest import run_molting

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.fixture(scope="module")
def evaluated_run(tmp_path_factory):
    """A DPO run on the demo that evaluates during training (a held-out split) and before/after."""
    out = tmp_path_factory.mktemp("report") / "run"
    result = run_molting("run", "--plugin", "dpo", "--max-steps", "24", "--eval-split", "0.1", "--eval-steps", "8",
                         "--keep-best", "eval_loss", "--output-dir", str(out))
    assert result.returncode == 0, result.stderr[-3000:]
    return out


def test_the_report_holds_everything_and_loads_nothing(evaluated_run):
    result = run_molting("report", str(evaluated_run))
    assert result.returncode == 0, result.stderr[-2000:]
    page = (evaluated_run / "report.html").read_text()
    assert result.stdout.strip() == str(evaluated_run / "report.html")
    for heading in ("Training", "Held-out evaluation during training", "Before and after", "Held-out answers"):
        assert heading in page
    assert page.count('src="data:image/png;base64,') == 3  # training, evaluation curves, before/after
    assert "http://" not in page and "https://" not in page and "<link" not in page  # self-contained
    samples = [json.loads(line) for line in (evaluated_run / "eval_samples.jsonl").read_text().splitlines()]
    assert len(samples) == 32 and all({"prompt", "before", "after"} <= set(s) for s in samples)
    assert samples[0]["after"].replace("&", "&amp;") in page or samples[0]["after"] in page
    assert "Best eval_loss" in page


def test_plot_adds_the_evaluation_curves(evaluated_run, tmp_path):
    result = run_molting("plot", str(evaluated_run), "--out", str(tmp_path))
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval.png", "eval_curves.png", "training.png"]


def test_a_pipeline_s_report_has_a_section_per_step(tmp_path, evaluated_run):
    pipeline = tmp_path / "pipeline"
    for name in ("1-sft", "2-dpo"):
        shutil.copytree(evaluated_run, pipeline / name)
    run_molting("report", str(pipeline))
    page = (pipeline / "report.html").read_text()
    assert page.index("1-sft: dpo") < page.index("2-dpo: dpo")
    result = run_molting("report", str(tmp_path / "pipeline" / "1-sft" / "best"))
    assert result.returncode == 1 and "not a molting run directory" in result.stderr


@pytest.mark.skipif(not CHROMIUM and os.environ.get("CI") != "true",
                    reason="needs Chromium (apt-get install chromium); CI installs it")
def test_the_report_renders_in_headless_chromium(evaluated_run):
    from playwright.sync_api import sync_playwright

    run_molting("report", str(evaluated_run))
    errors: list[str] = []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(
            executable_path=CHROMIUM,
            args=["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                  "--disable-sync", "--no-first-run"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 900})
            page.on("pageerror", lambda error: errors.append(f"script error: {error}"))
            page.on("console", lambda message: errors.append(message.text) if message.type == "error" else None)
            page.on("requestfailed", lambda request: errors.append(f"failed to load {request.url}"))
            page.goto((evaluated_run / "report.html").as_uri())
            images = page.evaluate("Array.from(document.images).map(i => [i.alt, i.complete, i.naturalWidth])")
            assert len(images) == 3 and all(complete and width > 300 for _, complete, width in images), images
            rows = page.locator("table.samples tbody tr")
            assert rows.count() == 32
            prompt = page.locator("table.samples td.prompt").first.inner_text().split("\n")[0]
            page.fill("input[data-filter]", prompt)  # the filter box leaves the rows that mention it
            visible = page.evaluate("document.querySelectorAll('table.samples tbody tr:not([hidden])').length")
            assert 1 <= visible < 32
            assert page.title() == f"molting report: {evaluated_run.name}"
        finally:
            browser.close()
    assert errors == []
