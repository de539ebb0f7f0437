"""The benchmark compares like with like, and its command runs end to end."""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys

import pytest
import torch

from utils import models, train
from utils.tooling import bench


def _randomised_bridge(name: str, seed: int = 0):
    """A bridge model whose trainable weights are random and large enough for sharp attention."""
    bridge = models.build_model(name, seed=seed)
    g = torch.Generator().manual_seed(seed)
    std = 2.0 / math.sqrt(models.spec(name).config["d_model"])
    with torch.no_grad():
        for p in bridge.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)
    return bridge


@pytest.mark.parametrize("name", ["max_of_list", "addition"])
def test_plain_module_matches_bridge_forward(name):
    cfg = models.spec(name).config
    bridge = _randomised_bridge(name)
    plain = bench.PlainTransformer.from_config(cfg)
    with torch.no_grad():  # copy the weights by hand, in TransformerLens's shapes
        plain.W_E.copy_(bridge.W_E)
        plain.W_pos.copy_(bridge.W_pos)
        plain.W_U.copy_(bridge.W_U)
        for wname in ("W_Q", "W_K", "W_V", "W_O", "W_in", "W_out"):
            if getattr(plain.blocks[0], wname) is not None:
                getattr(plain.blocks[0], wname).copy_(getattr(bridge, wname)[0])
    assert (plain.blocks[0].W_in is None) == bool(cfg.get("attn_only"))
    # same trainable weights: the bridge's extra parameters are only its frozen zero biases
    assert sum(p.numel() for p in plain.parameters()) == sum(p.numel() for p in bridge.parameters() if p.requires_grad)

    g = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, cfg["d_vocab"], (256, cfg["n_ctx"]), generator=g)
    with torch.no_grad():
        expected, got = bridge(tokens), plain(tokens)
    assert got.shape == expected.shape == (256, cfg["n_ctx"], cfg["d_vocab"])
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)

    # the comparison has teeth: attention and the causal mask both change the logits
    with torch.no_grad():
        plain.blocks[0].W_K.mul_(1.01)
        assert (plain(tokens) - expected).abs().max() > 1e-3
        plain.blocks[0].W_K.div_(1.01)
        plain.blocks[0].future.zero_()
        assert (plain(tokens) - expected).abs().max() > 1e-3


@pytest.mark.parametrize("name", ["bigram", "max_of_list", "addition", "fibonacci"])
def test_same_training_trajectory(name):
    """build_pair starts both from the same weights and train() moves them identically."""
    bridge, plain = bench.build_pair(name)
    assert [n for n, p in plain.named_parameters() if not p.requires_grad] == (["W_pos"] if name == "bigram" else [])
    recipe = dataclasses.replace(models.spec(name).recipe, steps=5, batch_size=min(64, models.spec(name).recipe.batch_size or 64))
    lb = train.train(bridge, name, recipe, progress=False)
    lp = train.train(plain, name, recipe, progress=False)
    assert lb == pytest.approx(lp, abs=1e-4)
    tokens = torch.randint(0, models.spec(name).config["d_vocab"], (32, models.spec(name).config["n_ctx"]))
    with torch.no_grad():
        torch.testing.assert_close(plain(tokens), bridge(tokens), atol=1e-4, rtol=0)
    if name == "bigram":  # evaluate() works on the plain module, bigram KL included
        assert models.evaluate(plain, name)["kl"] == pytest.approx(models.evaluate(bridge, name)["kl"], abs=1e-5)


def test_main_prints_a_table(tmp_path, capsys):
    out_json = tmp_path / "bench.json"
    assert bench.main(["--models", "bigram", "--no-notebooks", "--class-size", "0", "--steps", "20",
                       "--json", str(out_json)]) == 0
    out = capsys.readouterr().out
    assert "TRAINING" in out and "MEMORY" in out
    for impl in ("bridge", "plain", "ratio"):
        assert any(line.split()[:2] == ["bigram", impl] for line in out.splitlines()), out
    assert "not reached in 20 steps" in out  # 20 steps are far too few for the KL target
    data = json.loads(out_json.read_text())
    assert data["training"][0]["model"] == "bigram"
    assert data["training"][0]["bridge"]["steps"] == 20
    assert data["bench_peak_rss"] > 0
    assert data["notebooks"] is None and "grading" not in data and "GRADING" not in out
    # the split checkpoints' held-out accuracy is reported, not retrained
    assert "GENERALIZATION" in out and set(data["held_out"]) == {"addition_split", "fibonacci_split"}
    assert all(0.9 < report["held_out_accuracy"] <= 1.0 for report in data["held_out"].values())


@pytest.mark.slow  # starts Jupyter kernels (a few seconds)
def test_notebook_runner_reports_pass_fail_and_empty_folder(tmp_path, capsys):
    nbformat = pytest.importorskip("nbformat")
    good, bad = tmp_path / "good.ipynb", tmp_path / "bad.ipynb"
    cells = [nbformat.v4.new_code_cell("import os\nassert os.path.exists('good.ipynb')")]  # cwd = its folder
    nbformat.write(nbformat.v4.new_notebook(cells=cells), good)
    cells = [nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("raise ValueError('boom')")]
    nbformat.write(nbformat.v4.new_notebook(cells=cells), bad)

    ok = bench.run_notebook(good, timeout=60)
    assert ok["passed"] and ok["error"] is None and ok["ok"]
    assert 0 < ok["final_rss"] <= ok["peak_rss"]
    failed = bench.run_notebook(bad, timeout=60)
    assert not failed["passed"] and not failed["ok"]
    assert failed["error"] == "ValueError: boom"
    assert failed["final_rss"] is None  # not "after Run All": the run stopped early

    empty = tmp_path / "empty"
    empty.mkdir()
    assert bench.main(["--models", "--notebooks", str(empty), "--class-size", "0"]) == 0
    assert "none found" in capsys.readouterr().out


@pytest.mark.slow  # starts Jupyter kernels (a few seconds)
def test_notebook_runner_reads_what_the_kernel_still_holds_after_the_last_cell(tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    big = 256 * 2**20
    held, freed = tmp_path / "held.ipynb", tmp_path / "freed.ipynb"
    fill = f"block = b'x' * {big}"  # written bytes, so resident
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(fill)]), held)
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(fill + "\ndel block")]), freed)

    # the time target is not what this test is about, and a loaded CI machine can take long to start a kernel
    monkeypatch.setattr(bench, "NOTEBOOK_TARGET_SECONDS", 600.0)
    # a process this one started earlier (a test runner's leftover kernel) holds memory of its own: not the notebook's
    bystander = subprocess.Popen([sys.executable, "-c", f"import sys, time\nblock = b'x' * {big}\nprint(flush=True)\n"
                                  "time.sleep(120)"], stdout=subprocess.PIPE)
    try:
        bystander.stdout.readline()  # its block is written
        kept, released = bench.run_notebook(held, timeout=60), bench.run_notebook(freed, timeout=60)
    finally:
        bystander.kill()
        bystander.wait()
    assert kept["passed"] and released["passed"], (kept, released)
    assert kept["final_rss"] - released["final_rss"] > 0.8 * big  # held memory counts, freed does not
    assert released["peak_rss"] - released["final_rss"] > 0.8 * big  # ... though the peak saw it
    assert released["final_rss"] < 0.5 * big and kept["peak_rss"] < 2 * big  # the bystander counts in neither
    assert kept["ok"], kept

    monkeypatch.setattr(bench, "NOTEBOOK_TARGET_FINAL_RSS", big // 2)  # below what `held` keeps
    again = bench.run_notebook(held, timeout=60)
    assert again["passed"] and again["peak_rss"] <= bench.NOTEBOOK_TARGET_RSS and not again["ok"]


def test_the_memory_monitor_leaves_out_a_child_caught_between_fork_and_exec():
    """A child that has forked but not yet exec'd shows this whole process's memory; a kernel launched from a large
    test worker is such a child for a moment, and it put the notebook runner's peak over its target on CI."""
    import time

    block = b"x" * (300 * 2**20)  # written bytes, so resident in this process and its fresh fork
    monitor = bench._ChildMemoryMonitor(interval=0.05)
    monitor.start()
    child = subprocess.Popen([sys.executable, "-c", "pass"], preexec_fn=lambda: time.sleep(1.0))
    child.wait()
    peak = monitor.stop()
    assert len(block) and peak < 150 * 2**20, peak


class _FakeMaxModel(torch.nn.Module):
    """Predicts the running maximum, except on lists of length `wrong_length` that start with 0."""

    def __init__(self, wrong_length: int | None = None):
        super().__init__()
        self.wrong_length = wrong_length

    def forward(self, tokens):
        pred = tokens.cummax(dim=-1).values
        if tokens.shape[-1] == self.wrong_length:
            pred = torch.where(tokens[:, :1] == 0, (pred + 1) % 64, pred)
        return torch.nn.functional.one_hot(pred, 64).float()


def test_max_of_list_screen_agrees_with_evaluate():
    screen = bench.MaxOfListScreen()
    perfect, flawed = _FakeMaxModel(), _FakeMaxModel(wrong_length=6)  # ~1.6% wrong at length 6
    assert screen.could_pass(perfect) and models.meets_target("max_of_list", models.evaluate(perfect, "max_of_list"))
    assert not screen.could_pass(flawed)
    assert not models.meets_target("max_of_list", models.evaluate(flawed, "max_of_list"))


def _notebooks_result(seconds: list[float], final_mb: list[int] | None = None) -> dict:
    final_mb = final_mb or [500] * len(seconds)
    runs = [{"notebook": f"solutions/0{i}_x.ipynb", "passed": True, "seconds": s, "peak_rss": 800 * 2**20,
             "final_rss": f * 2**20, "ok": f * 2**20 <= bench.NOTEBOOK_TARGET_FINAL_RSS, "error": None}
            for i, (s, f) in enumerate(zip(seconds, final_mb))]
    return {"env": {}, "training": [], "bench_peak_rss": None, "notebooks": {"source": "solutions/", "results": runs}}


def test_report_shows_each_notebooks_memory_after_the_run_next_to_its_peak():
    lines = bench.format_report(_notebooks_result([10.0, 10.0], final_mb=[600, 700])).splitlines()
    header = next(line for line in lines if line.startswith("notebook"))
    assert header.split()[:7] == ["notebook", "result", "seconds", "peak", "RSS", "after", "run"]
    first, second = (next(line for line in lines if line.startswith(f"solutions/0{i}_x.ipynb")) for i in (0, 1))
    assert first.split()[3:7] == ["800", "MB", "600", "MB"] and first.split()[-1] == "ok"
    assert second.split()[3:7] == ["800", "MB", "700", "MB"] and second.split()[-1] == "OVER"
    assert "after <= 650 MB" in first  # the target is printed beside the figure
    [course] = [line for line in lines if line.startswith("whole course")]
    assert course.split()[4:8] == ["800", "MB", "700", "MB"]  # the worst chapter


def test_report_adds_up_the_whole_course_against_its_target():
    [quick] = [line for line in bench.format_report(_notebooks_result([40.0, 50.0])).splitlines() if line.startswith("whole course")]
    assert "90.0" in quick and quick.split()[-1] == "ok"
    [slow] = [line for line in bench.format_report(_notebooks_result([200.0, 150.0])).splitlines() if line.startswith("whole course")]
    assert "350.0" in slow and slow.split()[-1] == "OVER"


def test_class_grading_reports_seconds_and_whether_the_scores_came_out_right(monkeypatch):
    """bench.grade_class hands grade_all copies of chapter 03, solved and untouched in turn, and reads the scores
    back (grading itself, in kernels, is tests/tooling/test_grade.py's: here grade_all is stood in for)."""
    from utils.tooling import grade

    graded_paths = []

    def grade_all(paths, jobs=1, timeout=600, progress=None):
        graded_paths.extend(paths)
        reports = []
        for path in paths:
            solved = "BEGIN SOLUTION" in path.read_text()
            exercises = [grade.Exercise(f"3.{i}", f"Exercise 3.{i}", "id", passed=solved) for i in range(1, 7)]
            reports.append(grade.Report(str(path), exercises=exercises))
            if progress:
                progress(len(reports), path, reports[-1])
        return reports

    monkeypatch.setattr(grade, "grade_all", grade_all)
    graded = bench.grade_class(size=3, jobs=2)
    assert [p.parent.name for p in graded_paths] == ["learner00", "learner01", "learner02"]
    assert graded["submissions"] == 3 and graded["solved"] == 2 and graded["scores_as_expected"], graded
    assert 0 <= graded["seconds"] < 60
    monkeypatch.setattr(grade, "grade_all", lambda paths, **kw: [grade.Report(str(p), exercises=[
        grade.Exercise("3.1", "Exercise 3.1", "id", passed=False)]) for p in paths])
    assert not bench.grade_class(size=1, jobs=1)["scores_as_expected"]  # the solved copy scored 0: noticed
    graded = dict(graded, submissions=2, solved=1)
    line = next(ln for ln in bench.format_report({"env": {}, "training": [], "notebooks": None, "grading": graded})
                .splitlines() if ln.startswith("GRADING"))
    assert "2 chapter-03 submissions (1 solved" in line and "target <= 300 s" in line and "as expected" in line
    wrong = dict(graded, scores_as_expected=False, ok=False)
    line = next(ln for ln in bench.format_report({"env": {}, "training": [], "notebooks": None, "grading": wrong})
                .splitlines() if ln.startswith("GRADING"))
    assert "NOT as expected" in line and line.endswith("OVER")
