"""Build the bundled English prose corpus for autoencoder pretraining.

Sources are Debian documentation packages, fetched with ``apt-get download`` (or read
from ``--deb-dir``) and unpacked with ``dpkg-deb -x``; their HTML pages are turned into
plain paragraphs by a stdlib :class:`html.parser.HTMLParser` that drops navigation,
code blocks (``pre``), tables, API signatures and index pages. A prose filter then
drops paragraphs that are short or code-heavy, and exact duplicate paragraphs are
removed. One output record is one HTML page::

    {"text": "para 1\\n\\npara 2 ...", "source": "debian-handbook:en-US/apt.html", "title": "..."}

Run::

    python -m gmsa_rag.data.build_corpus --out data/ae-corpus/prose.jsonl.gz

The output is deterministic for given package versions (gzip header without a
timestamp); a ``.meta.json`` beside it records package versions and sizes.
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import re
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from pathlib import Path

from gmsa_rag.data import DEFAULT_AE_CORPUS


@dataclass(frozen=True)
class Source:
    """A Debian package and the HTML pages of it that go into the corpus."""

    package: str
    root: str  # folder inside the unpacked package
    include: tuple[str, ...]  # glob patterns relative to root
    exclude: tuple[str, ...] = ()  # regexes on the path relative to root
    licence: str = ""


SOURCES: tuple[Source, ...] = (
    Source(
        package="debian-handbook",
        root="usr/share/doc/debian-handbook/html/en-US",
        include=("*.html",),
        exclude=(r"^index\.html$",),
        licence="GPL-2.0+ or CC-BY-SA-3.0 (The Debian Administrator's Handbook)",
    ),
    Source(
        package="debian-reference-en",
        root="usr/share/debian-reference",
        include=("*.en.html",),
        exclude=(r"^index\.en\.html$",),
        licence="GPL-2+ (Debian Reference)",
    ),
    Source(
        package="developers-reference",
        root="usr/share/developers-reference",
        include=("*.html",),
        exclude=(r"^(index|search|developers-reference)\.html$",),
        licence="GPL-2+ (Debian Developer's Reference)",
    ),
    Source(
        package="python3.11-doc",
        root="usr/share/doc/python3.11/html",
        include=(
            "tutorial/*.html",
            "howto/*.html",
            "faq/*.html",
            "library/*.html",
            "reference/*.html",
            "using/*.html",
            "extending/*.html",
            "installing/*.html",
            "distributing/*.html",
            "whatsnew/*.html",
            "glossary.html",
        ),
        exclude=(r"(^|/)index\.html$", r"^whatsnew/changelog\.html$"),
        licence="PSF License Agreement (Python 3.11 documentation)",
    ),
)

# ------------------------------------------------------------------ HTML -> text

BLOCK_TAGS = frozenset(
    "p div li dd dt h1 h2 h3 h4 h5 h6 blockquote section article ul ol dl br hr "
    "figcaption caption title".split()
)
SKIP_TAGS = frozenset("head script style pre table nav form button select textarea svg".split())
VOID_TAGS = frozenset("area base br col embed hr img input link meta param source track wbr".split())
SKIP_CLASSES = frozenset(
    (
        # Sphinx
        "sphinxsidebar related footer headerlink highlight sig linenos mobile-nav "
        "menu-wrapper searchbox toctree-wrapper contents topic "
        # DocBook / Publican
        "navheader navfooter toc docnav programlisting screen synopsis cmdsynopsis "
        "legalnotice indexterm index table informaltable"
    ).split()
)


def _skip_element(tag: str, attrs: list[tuple[str, str | None]]) -> bool:
    if tag in SKIP_TAGS:
        return True
    for name, value in attrs:
        if name == "role" and value in ("navigation", "search"):
            return True
        if name == "class" and value:
            classes = value.split()
            if any(c in SKIP_CLASSES or c.startswith("highlight-") for c in classes):
                return True
    return False


class _TextExtractor(HTMLParser):
    """Collects the visible text of an HTML page as paragraphs."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.stack: list[tuple[str, bool]] = []  # (tag, skipped)
        self.skip_depth = 0
        self.paragraphs: list[str] = []
        self.current: list[str] = []
        self.title = ""
        self._in_title = False

    def _break(self) -> None:
        text = " ".join("".join(self.current).replace("\u00b6", " ").split())
        if text:
            self.paragraphs.append(text)
        self.current = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "title":
            self._in_title = True
        if tag in BLOCK_TAGS and not self.skip_depth:
            self._break()
        if tag in VOID_TAGS:
            return
        skipped = _skip_element(tag, attrs)
        self.stack.append((tag, skipped))
        self.skip_depth += skipped

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in BLOCK_TAGS and not self.skip_depth:
            self._break()

    def handle_endtag(self, tag: str) -> None:
        if tag == "title":
            self._in_title = False
        if not any(t == tag for t, _ in self.stack):
            return  # stray end tag
        while self.stack:
            open_tag, skipped = self.stack.pop()
            self.skip_depth -= skipped
            if open_tag == tag:
                break
        if tag in BLOCK_TAGS and not self.skip_depth:
            self._break()

    def handle_data(self, data: str) -> None:
        if self._in_title:
            self.title += data
        if not self.skip_depth:
            self.current.append(data)

    def close(self) -> None:
        super().close()
        self._break()


def html_to_paragraphs(html: str) -> tuple[str, list[str]]:
    """Return ``(title, paragraphs)`` of an HTML page."""
    parser = _TextExtractor()
    parser.feed(html)
    parser.close()
    return " ".join(parser.title.split()), parser.paragraphs


# ------------------------------------------------------------------ prose filter

_CODE_CHARS = re.compile(r"[{}\[\]=<>_|\\$#@`~^]|::|->|;\S|^--?\w|/\w+/|\w\(")
_STOPWORDS = frozenset("the a an is are of to and in that it for with as be this by or on can".split())


def is_prose(paragraph: str, min_words: int = 8) -> bool:
    """Heuristic: long enough, mostly letters, few code-like words, real sentences."""
    if paragraph.startswith((">>>", "$ ", "# ", "...", "%", "C:\\")):
        return False
    words = paragraph.split()
    if len(words) < min_words:
        return False
    non_space = sum(not c.isspace() for c in paragraph)
    letters = sum(c.isalpha() for c in paragraph)
    if letters < 0.75 * non_space:
        return False
    code_like = sum(bool(_CODE_CHARS.search(w)) for w in words)
    if code_like > 0.15 * len(words):
        return False
    stop = sum(w.lower() in _STOPWORDS for w in words)
    if stop < 0.15 * len(words):
        return False
    return paragraph[-1] in ".!?:;)\"'”" or len(words) >= 20


# -------------------------------------------------------------------- building


@dataclass
class BuildStats:
    """Counts reported in the ``.meta.json`` file."""

    documents: int = 0
    paragraphs: int = 0
    words: int = 0
    dropped_paragraphs: int = 0
    duplicate_paragraphs: int = 0
    per_source_words: dict[str, int] = field(default_factory=dict)
    package_versions: dict[str, str] = field(default_factory=dict)


def fetch_debs(packages: list[str], deb_dir: Path) -> dict[str, Path]:
    """``apt-get download`` the packages into ``deb_dir`` unless a .deb is already there."""
    deb_dir.mkdir(parents=True, exist_ok=True)
    found: dict[str, Path] = {}
    for package in packages:
        debs = sorted(deb_dir.glob(f"{package}_*.deb"))
        if not debs:
            subprocess.run(["apt-get", "download", package], cwd=deb_dir, check=True)
            debs = sorted(deb_dir.glob(f"{package}_*.deb"))
        if not debs:
            raise FileNotFoundError(f"no .deb for {package} in {deb_dir}")
        found[package] = debs[-1]
    return found


def deb_version(deb: Path) -> str:
    return subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Version"], check=True, capture_output=True, text=True
    ).stdout.strip()


def iter_source_pages(source: Source, unpacked: Path) -> Iterator[tuple[str, Path]]:
    """Yield ``(relative path, file)`` of the pages of one source, sorted."""
    root = unpacked / source.root
    pages = {p for pattern in source.include for p in root.glob(pattern) if p.is_file()}
    for page in sorted(pages):
        rel = page.relative_to(root).as_posix()
        if not any(re.search(rx, rel) for rx in source.exclude):
            yield rel, page


def build_records(sources: tuple[Source, ...], debs: dict[str, Path], work: Path, stats: BuildStats) -> list[dict[str, str]]:
    """Unpack each package, convert and filter its pages; one record per page."""
    seen: set[bytes] = set()
    records: list[dict[str, str]] = []
    for source in sources:
        unpacked = work / source.package
        unpacked.mkdir(parents=True, exist_ok=True)
        subprocess.run(["dpkg-deb", "-x", str(debs[source.package]), str(unpacked)], check=True)
        stats.package_versions[source.package] = deb_version(debs[source.package])
        source_words = 0
        for rel, page in iter_source_pages(source, unpacked):
            title, paragraphs = html_to_paragraphs(page.read_text(encoding="utf-8", errors="replace"))
            kept: list[str] = []
            for para in paragraphs:
                if not is_prose(para):
                    stats.dropped_paragraphs += 1
                    continue
                digest = hashlib.sha1(para.encode()).digest()
                if digest in seen:
                    stats.duplicate_paragraphs += 1
                    continue
                seen.add(digest)
                kept.append(para)
            words = sum(len(p.split()) for p in kept)
            if words < 50:
                continue
            records.append({"text": "\n\n".join(kept), "source": f"{source.package}:{rel}", "title": title})
            stats.documents += 1
            stats.paragraphs += len(kept)
            source_words += words
        stats.per_source_words[source.package] = source_words
        stats.words += source_words
    return records


def write_jsonl_gz(records: list[dict[str, str]], out: Path) -> None:
    """Write records as gzip'd JSON lines with a fixed gzip header (reproducible bytes)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0, compresslevel=9) as gz:
        for record in records:
            gz.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_AE_CORPUS, help="output .jsonl.gz")
    parser.add_argument("--deb-dir", type=Path, default=None, help="folder with (or for) the .deb files")
    args = parser.parse_args(argv)

    stats = BuildStats()
    with tempfile.TemporaryDirectory() as tmp:
        deb_dir = args.deb_dir or Path(tmp) / "debs"
        debs = fetch_debs([s.package for s in SOURCES], deb_dir)
        records = build_records(SOURCES, debs, Path(tmp) / "unpacked", stats)
    write_jsonl_gz(records, args.out)
    meta = {
        "output": args.out.name,
        "sources": [{"package": s.package, "licence": s.licence} for s in SOURCES],
        **stats.__dict__,
        "compressed_bytes": args.out.stat().st_size,
    }
    meta_path = args.out.with_name(args.out.name.removesuffix(".jsonl.gz") + ".meta.json")
    meta_path.write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(meta, indent=2), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
