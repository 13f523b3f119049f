"""The documentation: README.md (the front page) and docs/*.md.

Every generated section is current (devtools/docs.py is the one generator), the README stays a front page,
and every relative link resolves: to an existing file and, for `file.md#anchor`, to a heading of that file
under GitHub's anchor rules.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from devtools import docs

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
README_MAX_LINES = 250

FENCE = re.compile(r"^(```|~~~).*?^\1\s*$", re.S | re.M)
CODE_SPAN = re.compile(r"(`+)(?!`).*?(?<!`)\1(?!`)", re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.*?)(?:[ \t]+#+)?[ \t]*$", re.M)
SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*:")
LWS_RELEASE = re.compile(r"kubernetes-sigs/lws/releases/download/(v[0-9.]+)/manifests\.yaml")


def prose(text: str) -> str:
    """The text outside fenced code blocks (links and headings in code are neither)."""
    return FENCE.sub("", text)


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: the rendered text, lower-cased, without punctuation but `-` and `_`,
    each space a hyphen."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link's text
    text = text.replace("`", "").replace("*", "")
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for m in HEADING.finditer(prose(path.read_text())):
        base = slug(m.group(2).strip())
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def links(path: Path) -> list[str]:
    return LINK.findall(CODE_SPAN.sub("", prose(path.read_text())))


def test_slug_follows_github():
    assert slug("Fast by default: packing and batching") == "fast-by-default-packing-and-batching"
    assert slug("5. Images: compressed and unpacked sizes") == "5-images-compressed-and-unpacked-sizes"
    assert slug("GPU check (`make gpu-check`)") == "gpu-check-make-gpu-check"
    assert slug("1. Merge: PEFT merge_and_unload + save_pretrained") == "1-merge-peft-merge_and_unload--save_pretrained"


def test_generated_sections_are_current():
    """Every marker section of README.md and docs/*.md, each written by devtools/docs.py (`make docs`)."""
    stale = [str(p.relative_to(REPO)) for p in docs.stale()]
    assert not stale, f"out of date: {', '.join(stale)}; run `make docs`"
    files = {f for f, _ in docs.SECTIONS}
    assert {"README.md", "docs/configuration.md", "docs/images.md", "docs/kubernetes.md"} <= files


def test_a_missing_or_unknown_section_is_an_error():
    with pytest.raises(docs.DocsError, match="lacks the markers of section 'exit-codes'"):
        docs.render("README.md", "# tuneserve\n")
    text = (REPO / "README.md").read_text() + "\n<!-- BEGIN nobody -->\n<!-- END nobody -->\n"
    with pytest.raises(docs.DocsError, match="nobody"):
        docs.render("README.md", text)


def test_readme_is_a_front_page():
    lines = (REPO / "README.md").read_text().count("\n")
    assert lines <= README_MAX_LINES, f"README.md has {lines} lines: move detail into docs/ and link it"


def test_readme_links_every_docs_page():
    linked = {
        (REPO / target.split("#")[0]).resolve()
        for target in links(REPO / "README.md")
        if not SCHEME.match(target) and not target.startswith("#")
    }
    missing = [p.name for p in PAGES[1:] if p.resolve() not in linked]
    assert not missing, f"README.md links no page {missing}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(page):
    broken = []
    for target in links(page):
        if SCHEME.match(target):
            continue
        file, _, anchor = target.partition("#")
        path = (page.parent / file).resolve() if file else page
        if not path.exists():
            broken.append(f"{target}: no file {path.relative_to(REPO) if path.is_relative_to(REPO) else path}")
        elif anchor and path.suffix == ".md" and anchor not in anchors(path):
            broken.append(f"{target}: no heading with anchor #{anchor} in {path.relative_to(REPO)}")
    assert not broken, f"{page.relative_to(REPO)}:\n" + "\n".join(broken)


def test_docs_install_one_leaderworkerset_release_the_one_vendored():
    """README.md and docs/kubernetes.md both install the LWS controller: the release whose CRD schema
    `make lint-k8s` validates against."""
    schema = json.loads((REPO / "k8s" / "schemas" / "leaderworkerset.x-k8s.io_v1_leaderworkerset.json").read_text())
    found = {p.name: set(LWS_RELEASE.findall(p.read_text())) for p in PAGES}
    assert found["kubernetes.md"], "docs/kubernetes.md no longer installs the LeaderWorkerSet release"
    assert set().union(*found.values()) == {schema["x-release"]}, found
