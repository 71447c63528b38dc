"""The README's tables are the benchmark scripts' latest results (bench/results/<name>.md), not hand-typed."""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_readme_tables_are_the_bench_results():
    text = (REPO / "README.md").read_text()
    sections = re.findall(r"<!-- BEGIN (\S+) -->\n(.*?)\n?<!-- END \1 -->", text, flags=re.S)
    assert {name for name, _ in sections} >= {"accuracy", "finetune", "compress_speed", "inference_speed"}
    for name, body in sections:
        result = REPO / "bench" / "results" / f"{name}.md"
        assert result.exists(), f"README section {name} has no bench/results/{name}.md"
        assert body.strip() == result.read_text().strip(), \
            f"README section {name} differs from bench/results/{name}.md: run python scripts/update_readme.py"
