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


def relative_links(text: str) -> list[str]:
    """Markdown link targets that are not URLs or in-page anchors, without their #fragment."""
    targets = []
    for target in LINK.findall(text):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue
        targets.append(target.split("#", 1)[0])
    return targets


def broken_links(path: Path) -> list[str]:
    return [target for target in relative_links(path.read_text())
            if target.startswith("/") or not (path.parent / target).exists()]


def test_every_relative_link_resolves():
    assert len(documents()) >= 5
    broken = {str(path.relative_to(REPO)): broken_links(path) for path in documents()}
    assert not any(broken.values()), {path: links for path, links in broken.items() if links}


def test_link_checker_finds_a_broken_link(tmp_path):
    """Control: a missing file, an absolute path and a link outside the repository are reported; URLs and
    anchors are not."""
    page = tmp_path / "page.md"
    (tmp_path / "there.md").write_text("x")
    page.write_text("[a](there.md) [b](missing.md) [c](/etc/hosts) [d](https://example.org) [e](#top) "
                    "[f](there.md#part)")
    assert broken_links(page) == ["missing.md", "/etc/hosts"]


def test_method_is_linked_and_leads_to_the_sphere_step():
    """README -> docs/method.md -> the code of the sphere step: three links."""
    docs_index = (REPO / "docs" / "README.md").read_text()
    method = (REPO / "docs" / "method.md").read_text()
    assert "method.md" in relative_links(docs_index)
    assert "../hyperp_megatron/optim/sphere_muon.py" in relative_links(method)
    assert "../hyperp_megatron/optim/sphere_batched.py" in relative_links(method)
