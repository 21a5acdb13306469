"""The documents a newcomer reads: README within 10 KB, every cited heading and Markdown anchor
resolves inside the repository, config comments give reasons rather than results, and the project
text tells no history of how it was made."""

import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "CONTRIBUTING.md", *sorted((REPO / "docs").glob("*.md"))]
CITATION = re.compile(r"docs/(\w+\.md), \"([^\"]+)\"")
LINK = re.compile(r"\]\(([^)\s]+\.md)(?:#([^)\s]+))?\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def headings(path: Path) -> list[str]:
    lines, fenced = [], False
    for line in path.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(r"#{1,6} ", line):
            lines.append(line.lstrip("#").strip())
    return lines


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for heading in headings(path):
        base = slug(heading)
        count = seen.get(base, 0)
        out.add(base if count == 0 else f"{base}-{count}")
        seen[base] = count + 1
    return out


def sources() -> list[Path]:
    files = [*REPO.glob("dvos/**/*.py"), *REPO.glob("conf/**/*.yaml"), *REPO.glob("experiments/**/*")]
    return [path for path in files if path.is_file()] + [REPO / "Makefile"]


def test_readme_is_a_short_guide():
    assert (REPO / "README.md").stat().st_size <= 10 * 1024


def test_every_documents_the_repository_promises_exists():
    for name in ("README.md", "CONTRIBUTING.md", "docs/METHOD.md", "docs/DESIGN.md", "docs/LOG.md"):
        assert (REPO / name).is_file(), name


def test_cited_headings_exist():
    """Code and config cite `docs/METHOD.md, "Heading"`: the heading must be in that document."""
    missing = []
    for path in sources():
        for doc, heading in CITATION.findall(path.read_text(errors="replace")):
            target = REPO / "docs" / doc
            if not target.is_file() or heading not in headings(target):
                missing.append(f'{path.relative_to(REPO)}: docs/{doc}, "{heading}"')
        if "§" in path.read_text(errors="replace"):
            missing.append(f"{path.relative_to(REPO)}: a § section number (cite a heading instead)")
    assert not missing, "\n".join(missing)


@pytest.mark.parametrize("doc", DOCS, ids=[p.name for p in DOCS])
def test_markdown_links_and_anchors_resolve(doc):
    if not doc.is_file():
        pytest.skip(f"{doc.name} not written")
    broken = []
    for target, anchor in LINK.findall(doc.read_text()):
        if "://" in target:
            continue
        path = (doc.parent / target).resolve()
        if not path.is_file():
            broken.append(f"{target} (no such file)")
        elif anchor and anchor not in anchors(path):
            broken.append(f"{target}#{anchor} (no such heading)")
    assert not broken, f"{doc.name}: " + ", ".join(broken)


def test_config_comments_give_reasons_not_results():
    """A result (a number with three or more decimals, e.g. a J&F) belongs in docs/LOG.md."""
    found = []
    for path in REPO.glob("conf/**/*.yaml"):
        for number, line in enumerate(path.read_text().splitlines(), 1):
            comment = line.split("#", 1)[1] if "#" in line else ""
            if re.search(r"\b\d\.\d{3}", comment):
                found.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not found, "\n".join(found)


def test_project_text_tells_no_history():
    words = re.compile(r"\b(sessions?|earlier days|this machine)\b", re.IGNORECASE)
    texts = [*DOCS, *REPO.glob("conf/**/*.yaml"), *REPO.glob("experiments/**/*.yaml")]
    found = [str(p.relative_to(REPO)) for p in texts if p.is_file() and words.search(p.read_text())]
    assert not found, found
