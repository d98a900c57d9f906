"""The documentation stays inside the repository: every relative link in README.md and docs/*.md names a file
or folder that exists, and the README's first links lead to the method and from there to the sphere step."""

import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.tier("unit")

REPO = Path(__file__).resolve().parent.parent
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def documents() -> list[Path]:
    return [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]


def relative_links(text: str, fragments: bool = False) -> list[str]:
    """Markdown link targets that are not URLs, without their #fragment (with it if ``fragments``); in-page
    anchors only with ``fragments``."""
    targets = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or (target.startswith("#") and not fragments):
            continue
        targets.append(target if fragments else target.split("#", 1)[0])
    return targets


def anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens (code blocks skipped)."""
    found, fence = set(), False
    for line in markdown.splitlines():
        if line.startswith("```"):
            fence = not fence
        elif not fence and (match := re.match(r"#{1,6} (.*)", line)):
            found.add(re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-"))
    return found


def broken_links(path: Path) -> list[str]:
    broken = []
    for target in relative_links(path.read_text(), fragments=True):
        name, _, fragment = target.partition("#")
        file = path if not name else path.parent / name
        if name.startswith("/") or not file.exists():
            broken.append(name)
        elif fragment and file.suffix == ".md" and fragment not in anchors(file.read_text()):
            broken.append(target)
    return broken


def test_every_relative_link_resolves():
    assert len(documents()) >= 5
    broken = {str(path.relative_to(REPO)): broken_links(path) for path in documents()}
    assert not any(broken.values()), {path: links for path, links in broken.items() if links}


def test_link_checker_finds_a_broken_link(tmp_path):
    """Control: a missing file, an absolute path and an anchor that no heading makes are reported; URLs and
    anchors that exist are not."""
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("x")
    (tmp_path / "there.md").write_text("# Title\n\n## 3. Part: one\n```\n# not a heading\n```\n")
    page.write_text("[a](there.md) [b](missing.md) [c](/etc/hosts) [d](https://example.org) [e](#top) "
                    "[f](there.md#3-part-one) [g](there.md#not-a-heading) [h](#title)\n# Top\n")
    assert broken_links(page) == ["missing.md", "/etc/hosts", "there.md#not-a-heading", "#title"]


def test_method_is_linked_and_leads_to_the_sphere_step():
    """README -> docs/method.md -> the code of the sphere step: three links."""
    docs_index = (REPO / "docs" / "README.md").read_text()
    method = (REPO / "docs" / "method.md").read_text()
    assert "method.md" in relative_links(docs_index)
    assert "../hyperp_megatron/optim/sphere_muon.py" in relative_links(method)
    assert "../hyperp_megatron/optim/sphere_batched.py" in relative_links(method)
