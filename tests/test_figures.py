"""Every figure in the README, the docs and the bench tables comes from a script in the repo, and every results
file records the commit it was measured at (issue 15 item 14)."""

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
BENCH = REPO / "bench"
sys.path.insert(0, str(BENCH))
import common  # noqa: E402

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
# a percentage or a ratio ("81.8%", "63.9x", "~30x"), not a shape ("3x3") or a flag value
FIGURE = re.compile(r"(?<![\w.-])~?\d[\d,]*(?:\.\d+)?(?:-\d+(?:\.\d+)?)?(?:\s?%|x\b)")


def _allowed() -> dict[str, bool]:
    """Figures that are definitions or the code's own constants, not measurements: phrase -> still true."""
    from onnxstack import analyse, augment

    return {
        "the 32x of binary networks": 8 * np.dtype(np.float32).itemsize == 32,  # 32-bit floats to 1-bit signs
        "a crop of 85-100% of each side": augment.AUGMENT_CROP == 0.85,
        "more than 1% of the weight": analyse.F16_LOSS == 0.01,
    }


def _outside_generated(text: str) -> str:
    """The text less the sections scripts/update_readme.py fills from bench/results."""
    return re.sub(r"<!-- BEGIN (\S+) -->\n.*?<!-- END \1 -->", "", text, flags=re.S)


@pytest.mark.parametrize("path", DOCS, ids=lambda p: p.name)
def test_docs_type_no_measured_figures(path):
    """A percentage or ratio typed into prose goes stale the next time a bench runs: figures belong in the
    generated sections (or, for a definition or a constant of the code, in _allowed with its check)."""
    allowed = _allowed()
    assert all(allowed.values()), {k: v for k, v in allowed.items() if not v}
    text = _outside_generated(path.read_text())
    for phrase in allowed:
        text = text.replace(phrase, "")
    typed = [(n + 1, m.group(0).strip(), line.strip()[:120]) for n, line in enumerate(text.splitlines())
             for m in FIGURE.finditer(line)]
    assert not typed, f"{path.name}: figures typed outside the generated sections: {typed}"


def test_figure_pattern_catches_the_old_limits_line():
    old = ("at 50x on fashion_cnn it kept 81.8% where the plain calibrated defaults at 63.9x kept 86.75%. "
           "Past ~30x, fine-tune")
    assert [m.group(0) for m in FIGURE.finditer(old)] == ["50x", "81.8%", "63.9x", "86.75%", "~30x"]
    assert not FIGURE.findall("Conv 1-32-64-128-128 (3x3), `--target-ratio 30`, d=16, m <= 64, kernel 1 x k")


def _string_constants(path: Path):
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            yield node.lineno, node.value


# what the old accuracy.py / finetune.py / reconstruct.py printed whatever their arguments
TYPED_COUNT = re.compile(r"(?<![\w.])\d[\d,]* (?:test |training |calibration |held-out )?(?:images|torch threads?|CPUs?)\b"
                         r"|\d+-core\b|shared \d")


@pytest.mark.parametrize("path", sorted(BENCH.glob("*.py")), ids=lambda p: p.name)
def test_bench_scripts_print_no_typed_counts(path):
    """Counts of images, threads and CPUs in a bench table are the run's, formatted from the values used."""
    typed = [(n, TYPED_COUNT.search(s).group(0)) for n, s in _string_constants(path) if TYPED_COUNT.search(s)]
    assert not typed, f"{path.name}: counts typed into strings: {typed}"


@pytest.mark.parametrize("path", sorted(BENCH.glob("*.py")), ids=lambda p: p.name)
def test_bench_scripts_write_results_through_common(path):
    """bench/results/*.json and *.md are written by common.write_results only (so they carry the commit)."""
    if path.name == "common.py":
        return
    calls = {(n.func.attr if isinstance(n.func, ast.Attribute) else getattr(n.func, "id", None))
             for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)}
    assert not calls & {"write_text", "write_bytes", "dump"}, f"{path.name} writes files itself"
    if "results" in path.read_text() and path.name not in {"plots.py", "zoo.py"}:
        assert "write_results" in calls, f"{path.name} mentions results but does not call write_results"


def _git(repo, *args):
    return subprocess.run(["git", *args], cwd=repo, capture_output=True, text=True, check=True).stdout.strip()


def test_write_results_records_the_commit(tmp_path):
    data = common.write_results("probe", {"results": [1, 2]}, "| a |\n|---|", results=tmp_path)
    written = json.loads((tmp_path / "probe.json").read_text())
    assert written == data and written["results"] == [1, 2]
    state = written["measured_at"]
    head = _git(REPO, "rev-parse", "HEAD")
    assert state["commit"] == head
    assert state["dirty"] == bool(_git(REPO, "status", "--porcelain", "--untracked-files=no"))
    assert re.fullmatch(r"\d{4}-\d{2}-\d{2}", state["date"])
    md = (tmp_path / "probe.md").read_text()
    assert md.startswith("| a |\n|---|\n\n")
    assert md.rstrip().splitlines()[-1] == common.measured_line(state)
    assert f"Measured at commit {head[:12]}" in md and state["date"] in md


def test_write_results_without_stamp_keeps_the_data(tmp_path):
    common.write_results("probe", {"runs": {"m": {"commit": "abc"}}}, "table", stamp=False, results=tmp_path)
    assert json.loads((tmp_path / "probe.json").read_text()) == {"runs": {"m": {"commit": "abc"}}}
    assert (tmp_path / "probe.md").read_text() == "table\n"


def test_git_state_flags_changes_to_tracked_files(tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "a.txt").write_text("one\n")
    _git(tmp_path, "add", "a.txt")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a")
    clean = common.git_state(tmp_path)
    assert clean == {"commit": _git(tmp_path, "rev-parse", "HEAD"), "dirty": False}
    (tmp_path / "untracked.txt").write_text("x\n")
    assert common.git_state(tmp_path)["dirty"] is False  # untracked files are not the code measured
    (tmp_path / "a.txt").write_text("two\n")
    assert common.git_state(tmp_path) == {**clean, "dirty": True}
    assert "(with uncommitted changes)" in common.measured_line({**clean, "dirty": True, "date": "2026-01-01"})


def test_accuracy_table_states_the_images_used():
    import accuracy

    row = {"method": "fp32 original", "conv_ratio": 1.0, "file_kb": 10.0, "accuracy": 0.9, "agreement": 1.0,
           "seconds": None, "drop_points": 0.0}
    md = accuracy.markdown({"m": [row]}, {"m": {"test_images": 1234, "calibration_images": 300}})
    assert "1,234 test images" in md and "calibration: 300 training images" in md
    assert "1,000" not in md and "2,000" not in md


def test_finetune_table_states_the_run_values():
    import finetune

    row = {"model": "m, labels 0.5", "setting": "s", "finetune_setting": "labels 0.5", "conv_ratio": 50.0,
           "accuracy_post_training": 0.8, "drop_post_training": 10.0, "accuracy_finetuned": 0.9, "drop_finetuned": 0.5,
           "finetune_minutes": 3.0, "heldout_accuracy_loop": 0.9, "heldout_accuracy_evaluate": 0.9,
           "bar": {"conv_ratio": 50, "max_drop_points": 1.0, "max_minutes": 7}, "meets_bar": True,
           "threads": 5, "test_samples": 321, "heldout_samples": 77, "train_samples": 700}
    md = finetune.markdown([row]).splitlines()[0]
    assert "5 torch thread" in md and "m 321" in md and "m 77" in md and "m 700" in md and "7 minutes" in md
    assert "2 torch threads" not in md and "2,000" not in md
    assert f"at most {finetune.HELDOUT_MAX:,} images, or {finetune.HELDOUT_PERCENT}% if fewer" in md


def test_reconstruct_table_states_the_run_values():
    import reconstruct

    data = {"threads": 3, "cpus": 7, "seed": 4, "load_average_start": (1.0,), "load_average_end": (2.0,),
            "images": {"m": {"test": 111, "calibration_compress": 22, "calibration_reconstruct": 33}}, "rows": []}
    md = reconstruct.markdown(data)
    assert "111 test images" in md and "22 for the fit" in md and "33 for reconstruction" in md
    assert "seed 4" in md and "3 torch thread(s)" in md and "7-core" in md


# results written before write_results recorded the commit (rerunning them takes hours or a data set this
# repo does not hold): shrink this set as they are rerun; a new results file must record its commit
UNSTAMPED = {"compress_speed", "finetune"}


def _commits(data) -> list[str]:
    if isinstance(data, dict) and "measured_at" in data:
        return [data["measured_at"]["commit"]]
    if isinstance(data, dict) and isinstance(data.get("runs"), dict):  # real_models.py: one run a model, merged
        return [r["commit"] for r in data["runs"].values()]
    if isinstance(data, dict) and "commit" in data:  # reconstruct.py before write_results stamped
        return [data["commit"]]
    return []


@pytest.mark.parametrize("path", sorted((BENCH / "results").glob("*.json")), ids=lambda p: p.stem)
def test_results_files_record_their_commit(path):
    commits = _commits(json.loads(path.read_text()))
    if path.stem in UNSTAMPED:
        assert not commits, f"{path.name} records its commit now: take it out of UNSTAMPED"
        return
    assert commits and all(re.match(r"[0-9a-f]{40}", c) for c in commits), f"{path.name} records no commit"
    md = path.with_suffix(".md")
    if md.exists():
        assert "Measured at commit" in md.read_text() or "Commit " in md.read_text()


def test_docs_cite_only_results_a_script_writes():
    """A results file named in the docs is one that a bench script in the repo writes (by name)."""
    written = {m for p in BENCH.glob("*.py") for m in re.findall(r"write_results\(\s*\"(\w+)\"", p.read_text())}
    written |= {"finetune"}  # finetune.py's name is its --results-name default
    for path in DOCS:
        for name in re.findall(r"bench/results/(\w+)\.(?:json|md|\{)", path.read_text()):
            assert name in written, f"{path.name} cites bench/results/{name}, which no bench script writes"
