#!/usr/bin/env bash
# Checks that the documentation points at things that exist: every relative
# Markdown link ([text](path#anchor)) and every file path written as inline
# code (`devices/src/bus.rs`) in README.md, SECURITY.md and docs/**/*.md.
#
# * A link resolves against the Markdown file's directory; its #anchor must
#   be a heading of the target (GitHub's anchor rules).
# * A path in inline code resolves against the Markdown file's directory,
#   the repository root, or as the tail of a tracked path (the code map names
#   modules relative to their crate: `vstate/vm.rs`, `bridge.rs`).
# * URLs, absolute paths (/dev/kvm), globs, placeholders, paths in
#   git-ignored places (resources/out/), other projects' files and fenced
#   code blocks are not checked.
#
# Usage: resources/check-links.sh [FILE.md...]   (default: the files above)
# Exit status 1 and one line per broken reference if any is broken.
set -euo pipefail
cd "$(dirname "$0")/.."

exec python3 - "$@" <<'PY'
import os
import re
import subprocess
import sys

tracked = subprocess.run(
    ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
    check=True, capture_output=True, text=True,
).stdout.split("\n")
tracked = [t for t in tracked if t]
dirs = {os.path.dirname(t) for t in tracked}
for d in list(dirs):
    while d:
        dirs.add(d)
        d = os.path.dirname(d)

if len(sys.argv) > 1:
    docs = sys.argv[1:]
else:
    docs = [d for d in ("README.md", "SECURITY.md") if os.path.exists(d)]
    docs += sorted(t for t in tracked if t.startswith("docs/") and t.endswith(".md"))

CHECKED_EXTS = (".rs", ".md", ".sh", ".toml", ".py", ".json")
LINK = re.compile(r"(?<!!)\[(?:[^\]\[]|\[[^\]]*\])*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
CODE = re.compile(r"(?<!`)`([^`\n]+)`(?!`)")


def slug(heading):
    """GitHub's anchor of a heading."""
    text = re.sub(r"`|\*|_(?=\W)|(?<=\W)_", "", heading.strip()).lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


anchor_cache = {}


def anchors(path):
    if path not in anchor_cache:
        found, seen, fenced = set(), {}, False
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.lstrip().startswith("```"):
                    fenced = not fenced
                m = None if fenced else re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)
                if m:
                    s = slug(m.group(1))
                    n = seen.get(s, 0)
                    seen[s] = n + 1
                    found.add(s if n == 0 else f"{s}-{n}")
        anchor_cache[path] = found
    return anchor_cache[path]


def exists(p):
    p = os.path.normpath(p)
    return os.path.isfile(p) or p in dirs or os.path.isdir(p)


def check_link(doc, target):
    if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
        return None
    path, _, anchor = target.partition("#")
    full = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
    if path and not exists(full):
        return f"link to missing {path}"
    if anchor and full.endswith(".md") and os.path.isfile(full):
        if anchor not in anchors(full):
            return f"link to missing heading #{anchor} in {full}"
    return None


TOP = {t.split("/")[0] for t in tracked}


def looks_like_path(tok):
    """Inline code that names a file of this repository: it starts with one of the repository's
    top-level entries (`devices/src/bus.rs`, `resources/test.sh`) or is a Rust, Markdown, shell,
    TOML, Python or JSON file name (`vstate/vm.rs`). Other C files, commands, ratios such as
    `miss/f` and other projects' paths (DPDK's `lib/vhost/iotlb.c`) are left alone."""
    if not re.fullmatch(r"[\w.\-/]+", tok) or tok.startswith(("/", "-")) or "//" in tok:
        return False
    tok = tok.removeprefix("./")
    return tok.split("/")[0] in TOP or tok.endswith(CHECKED_EXTS)


def ignored(tok):
    """Whether `tok` lies in a git-ignored place (build output such as resources/out/)."""
    r = subprocess.run(["git", "check-ignore", "-q", "--no-index", tok], check=False)
    return r.returncode == 0


def check_path(doc, tok):
    tok = tok.removeprefix("./").rstrip("/")
    here = os.path.join(os.path.dirname(doc), tok)
    if exists(here) or exists(tok):
        return None
    tail = "/" + tok
    if any(t.endswith(tail) for t in tracked) or any(d.endswith(tail) for d in dirs):
        return None
    if ignored(tok):
        return None
    return f"path {tok} does not exist"


broken = 0
for doc in docs:
    fenced = False
    with open(doc, encoding="utf-8") as f:
        for no, line in enumerate(f, 1):
            if line.lstrip().startswith("```"):
                fenced = not fenced
                continue
            if fenced:
                continue
            problems = [check_link(doc, m.group(1)) for m in LINK.finditer(line)]
            # Inline code outside of links' targets.
            bare = LINK.sub(lambda m: m.group(0).split("](")[0], line)
            problems += [check_path(doc, m.group(1)) for m in CODE.finditer(bare)
                         if looks_like_path(m.group(1))]
            for p in filter(None, problems):
                print(f"{doc}:{no}: {p}")
                broken += 1

if broken:
    print(f"check-links: {broken} broken reference(s)", file=sys.stderr)
    sys.exit(1)
print(f"check-links: {len(docs)} files OK")
PY
