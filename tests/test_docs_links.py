"""Every relative link of the README and docs/*.md leads somewhere: the file exists, and a #fragment
names a heading of the target file, spelled as GitHub spells heading anchors (lower case, punctuation
dropped, spaces to hyphens, -1, -2 ... for repeats). A renamed section cannot leave a dead link."""
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ['README.md'] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'docs', '*.md')))
LINK = re.compile(r'\]\(([^)\s#]*)(?:#([^)\s]+))?\)')         # [text](path#fragment), either part may be empty


def heading_anchors(text):
    """The anchors GitHub gives the headings of a markdown text (not those inside ``` blocks)."""
    anchors, seen, code = set(), {}, False
    for line in text.splitlines():
        if line.startswith('```'):
            code = not code
        m = None if code else re.match(r'#{1,6}\s+(.*?)\s*#*\s*$', line)
        if m:
            slug = re.sub(r'[^\w\- ]', '', m.group(1).strip().lower()).replace(' ', '-')
            anchors.add(f'{slug}-{seen[slug]}' if slug in seen else slug)
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


def dead_links(doc, text):
    """[(doc, link, why)] for the relative links of `text` (the file `doc`, relative to ROOT)."""
    dead = []
    for path, fragment in LINK.findall(text):
        if re.match(r'[a-z]+:', path):                          # http(s):, mailto:
            continue
        target = os.path.normpath(os.path.join(os.path.dirname(doc), path)) if path else doc
        link = f'{path}#{fragment}' if fragment else path
        if not os.path.exists(os.path.join(ROOT, target)):
            dead.append((doc, link, f'{target} does not exist'))
        elif fragment and target.endswith('.md'):
            if path:
                with open(os.path.join(ROOT, target)) as f:
                    anchors = heading_anchors(f.read())
            else:                                                # a section of this text
                anchors = heading_anchors(text)
            if fragment not in anchors:
                dead.append((doc, link, f'no heading of {target} has the anchor #{fragment}'))
    return dead


def test_heading_anchors_as_github_spells_them():
    text = ("# Method\n## H-VAR's tiles: `hvar_sr` (x4)\n```\n# not a heading\n```\n## Tiles\n### Tiles\n")
    assert heading_anchors(text) == {'method', 'h-vars-tiles-hvar_sr-x4', 'tiles', 'tiles-1'}


def test_a_dead_link_is_found():
    text = ("# Here\n[a](docs/method.md#metrics) [b](docs/method.md#no-such-section) [c](docs/nothing.md) "
            "[d](#here) [e](#there) [f](method.md#metrics)")
    dead = dead_links('README.md', text)
    assert [d[1] for d in dead] == ['docs/method.md#no-such-section', 'docs/nothing.md', '#there',
                                    'method.md#metrics'], dead
    assert dead_links('docs/results.md', "[f](method.md#metrics) [g](../README.md)") == []


def test_every_relative_link_leads_somewhere():
    dead, n = [], 0
    for doc in DOCS:
        with open(os.path.join(ROOT, doc)) as f:
            text = f.read()
        n += len(LINK.findall(text))
        dead += dead_links(doc, text)
    assert n > 30, f"only {n} links found: the pattern no longer matches the docs' links"
    assert not dead, '\n'.join(f'{doc}: ({link}): {why}' for doc, link, why in dead)
