"""Every `docs/design.md §n` the code cites is a section of docs/design.md."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_every_cited_section_exists():
    doc = (REPO / "docs" / "design.md").read_text(encoding="utf-8")
    sections = set(re.findall(r"^#{2,3} (\d+(?:\.\d+)?)\.? ", doc, flags=re.M))
    assert {"1", "1.3", "2.5", "3.6", "7"} <= sections  # the headings parse
    cited = {}
    for f in (REPO / "src" / "diffcoder").rglob("*"):
        if f.suffix in (".py", ".yaml"):
            text = f.read_text(encoding="utf-8")
            assert "DESIGN §" not in text, f"{f} cites DESIGN.md, which is outside the repository"
            for group in re.findall(r"docs/design\.md ((?:§[\d.]+(?:-[\d.]+)?(?:, )?)+)", text):
                for n in re.findall(r"[\d]+(?:\.\d+)*", group):
                    cited.setdefault(n.rstrip("."), []).append(f.name)
    assert cited, "no citation found: the pattern is wrong"
    missing = {n: files for n, files in cited.items() if n not in sections}
    assert not missing, f"cited sections missing from docs/design.md: {missing}"
