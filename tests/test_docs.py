"""The documentation's relative links and images point at files that exist.

Checks README.md and every Markdown file under docs/: each relative link
`[text](target)`, image `![alt](target)`, reference definition `[id]: target`
and HTML `<img src="target">` must name an existing file or folder, and a
`#anchor` into a Markdown file (or within the same file) must match one of its
headings, slugged as GitHub does. Links inside code spans and fenced code
blocks are not links and are ignored, as are http(s), mailto and other URLs
with a scheme. README.md stays a front door: at most 300 lines.
"""

import pathlib
import re
import urllib.parse

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
README_MAX_LINES = 300

_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")
_CODE_SPAN = re.compile(r"(`+)(?:(?!\1).)+?\1")
# `](target)` ends every inline link and image, nested ones included.
_INLINE = re.compile(r"\]\(\s*<?([^)\s>]*)>?(?:\s+(?:\"[^\"]*\"|'[^']*'))?\s*\)")
_REFERENCE = re.compile(r"^ {0,3}\[[^\]]+\]:\s*<?([^\s>]+)>?")
_IMG_SRC = re.compile(r"<img\b[^>]*?\bsrc\s*=\s*[\"']?([^\"'\s>]+)", re.IGNORECASE)
_HTML_ID = re.compile(r"<a\b[^>]*?\b(?:id|name)\s*=\s*[\"']([^\"']+)[\"']", re.I)
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def markdown_files(root: pathlib.Path = ROOT) -> list[pathlib.Path]:
    """README.md and every Markdown file under docs/."""
    return [root / "README.md", *sorted((root / "docs").rglob("*.md"))]


def _prose_lines(text: str, blank_code: bool = True) -> list[tuple[int, str]]:
    """(line number, line) outside fenced code blocks; code spans blanked
    (a link inside backticks is not a link) unless `blank_code` is False."""
    lines, fence = [], None
    for number, line in enumerate(text.splitlines(), start=1):
        match = _FENCE.match(line)
        if fence is None:
            if match:
                fence = match.group(1)
                continue
        else:
            closing = match and match.group(1)[0] == fence[0]
            if closing and len(match.group(1)) >= len(fence):
                fence = None
            continue
        lines.append((number, _CODE_SPAN.sub("code", line) if blank_code else line))
    return lines


def github_slug(heading: str) -> str:
    """The anchor GitHub gives a heading: `Latency: is it faster?` ->
    `latency-is-it-faster`."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # links -> text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = re.sub(r"[^\w\- ]", "", text.lower())
    return text.replace(" ", "-")


def anchors(path: pathlib.Path) -> set[str]:
    """The anchors a Markdown file defines: its headings' slugs (repeated
    headings get -1, -2, ... as on GitHub) and HTML `id`/`name` attributes.
    Lines starting with `#` inside fenced code blocks are not headings."""
    text = path.read_text(encoding="utf-8")
    found, seen = set(), {}
    for _, line in _prose_lines(text, blank_code=False):
        match = _HEADING.match(line)
        if match:
            slug = github_slug(match.group(2))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            found.add(slug if count == 0 else f"{slug}-{count}")
        found.update(_HTML_ID.findall(line))
    return found


def links(path: pathlib.Path) -> list[tuple[int, str]]:
    """(line number, target) of every link and image in a Markdown file."""
    found = []
    for number, line in _prose_lines(path.read_text(encoding="utf-8")):
        for pattern in (_INLINE, _REFERENCE, _IMG_SRC):
            found.extend((number, target) for target in pattern.findall(line))
    return found


def broken_links(files: list[pathlib.Path]) -> list[str]:
    """One message per relative link whose file or anchor does not exist."""
    problems = []
    for source in files:
        for number, target in links(source):
            if not target:
                problems.append(f"{source}:{number}: empty link target")
                continue
            if _SCHEME.match(target) or target.startswith("//"):
                continue  # http(s), mailto and other absolute URLs
            file_part, _, anchor = target.partition("#")
            file_part = urllib.parse.unquote(file_part)
            resolved = (source.parent / file_part).resolve() if file_part else source
            where = f"{source}:{number}: {target}"
            if not resolved.exists():
                problems.append(f"{where}: {resolved} does not exist")
                continue
            if anchor and resolved.is_file() and resolved.suffix == ".md":
                anchor = urllib.parse.unquote(anchor).lower()
                if anchor not in anchors(resolved):
                    problems.append(f"{where}: no heading #{anchor} in {resolved}")
    return problems


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= README_MAX_LINES, (
        f"README.md has {len(lines)} lines (at most {README_MAX_LINES}): "
        "move details into docs/"
    )


def test_docs_exist_and_have_links():
    files = markdown_files()
    names = {path.relative_to(ROOT).as_posix() for path in files}
    assert {"README.md", "docs/README.md"} <= names
    assert len(files) >= 3, names
    readme_targets = {target for _, target in links(ROOT / "README.md")}
    # The front door shows one accuracy and one latency plot, and maps docs/.
    assert "bench/results/accuracy_full.png" in readme_targets
    assert "bench/results/latency_cpu.png" in readme_targets
    assert "docs/README.md" in readme_targets
    assert sum(len(links(path)) for path in files) >= 50


def test_relative_links_and_images_resolve():
    problems = broken_links(markdown_files())
    assert not problems, "broken links:\n" + "\n".join(problems)


def test_github_slug():
    assert github_slug("Latency: is the shrunk model faster?") == (
        "latency-is-the-shrunk-model-faster"
    )
    assert github_slug("train.py") == "trainpy"
    assert github_slug("Several processes and machines (JAX)") == (
        "several-processes-and-machines-jax"
    )
    assert github_slug("Full setting, on a GPU (Keras on JAX, one NVIDIA H200)") == (
        "full-setting-on-a-gpu-keras-on-jax-one-nvidia-h200"
    )
    assert github_slug("The `l2_bn` criterion") == "the-l2_bn-criterion"
    assert github_slug("See [the guide](guide.md)") == "see-the-guide"


@pytest.mark.parametrize(
    "link, broken",
    [
        ("[ok](b.md)", False),
        ("[ok](b.md#second-part)", False),
        ("[ok](b.md#repeated-1)", False),
        ("[ok](#title)", False),
        ("![ok](img/x.png)", False),
        ('<img src="img/x.png" alt="ok">', False),
        ("[ok]: b.md#repeated", False),
        ("[ok](https://example.com/missing.md)", False),
        ("[ok](mailto:someone@example.com)", False),
        ("`[not a link](missing.md)`", False),
        ("[missing](missing.md)", True),
        ("[missing](b.md#no-such-heading)", True),
        ("[missing](b.md#in-code)", True),
        ("[missing](#no-such-heading)", True),
        ("![missing](img/missing.png)", True),
        ('<img src="img/missing.png">', True),
        ("[missing]: missing.md", True),
        ("[![nested](img/x.png)](missing.md)", True),
    ],
)
def test_checker_finds_broken_links(tmp_path, link, broken):
    (tmp_path / "img").mkdir()
    (tmp_path / "img" / "x.png").write_bytes(b"")
    (tmp_path / "b.md").write_text(
        "# B\n\n## Second part\n\n## Repeated\n\n## Repeated\n\n"
        "```python\n# In code\n```\n"
    )
    source = tmp_path / "a.md"
    source.write_text(f"# Title\n\n{link}\n\n```\n[x](missing.md)\n```\n")
    assert bool(broken_links([source])) is broken, broken_links([source])
