"""Copy the tables that bench/ scripts wrote (bench/results/<name>.md) into README.md.

README.md marks each place with `<!-- BEGIN name -->` ... `<!-- END name -->`; everything between
the markers is replaced by the file's content. Run after a bench script: python scripts/update_readme.py
"""

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    readme = REPO / "README.md"
    text = readme.read_text()
    for name in re.findall(r"<!-- BEGIN (\S+) -->", text):
        src = REPO / "bench" / "results" / f"{name}.md"
        if not src.exists():
            print(f"skip {name}: {src.relative_to(REPO)} missing")
            continue
        body = src.read_text().strip()
        text, count = re.subn(rf"(<!-- BEGIN {name} -->\n).*?(<!-- END {name} -->)",
                              lambda m: m.group(1) + body + "\n" + m.group(2), text, flags=re.S)
        if count != 1:
            raise SystemExit(f"README.md: no '<!-- BEGIN {name} -->' line followed by '<!-- END {name} -->'")
        print(f"updated {name}")
    readme.write_text(text)


if __name__ == "__main__":
    main()
