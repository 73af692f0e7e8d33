"""Every relative link of the README and docs/*.md leads somewhere: the file exists, and a #fragment
names a heading of the target file, spelled as GitHub spells heading anchors (lower case, punctuation
dropped, spaces to hyphens, -1, -2 ... for repeats); so does every `docs/method.md#section` a code
comment points to. A renamed section cannot leave a dead link. And
every `module.name` the docs cite (`losses.hvar_losses`, `model.Tokenizer.decode`) is defined there:
a moved function cannot leave a reader searching the wrong file."""
import ast
import glob
import os
import re

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ['README.md'] + sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'docs', '*.md')))
LINK = re.compile(r'\]\(([^)\s#]*)(?:#([^)\s]+))?\)')         # [text](path#fragment), either part may be empty
CITE = re.compile(r'`(\w+)\.(\w+)(?:\.(\w+))?(?:\([^`]*\))?`')    # `module.name`, `module.Class.method(...)`


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


def test_every_section_the_code_points_to_exists():
    anchors = {}
    for name in ('method.md', 'results.md'):
        with open(os.path.join(ROOT, 'docs', name)) as f:
            anchors[name] = heading_anchors(f.read())
    sources = [p for pattern in ('*.py', '*.sh', 'config/*.py', 'tests/*.py')
               for p in glob.glob(os.path.join(ROOT, pattern))]
    dead, n = [], 0
    for path in sources:
        if os.path.basename(path) == 'test_docs_links.py':            # its own examples of dead links
            continue
        with open(path) as f:
            for i, line in enumerate(f, 1):
                for doc, anchor in re.findall(r'\b(method|results)\.md#([\w\-]+)', line):
                    n += 1
                    if anchor not in anchors[doc + '.md']:
                        dead.append(f'{os.path.relpath(path, ROOT)}:{i}: docs/{doc}.md#{anchor}')
    assert n > 50, f"only {n} pointers found: the pattern no longer matches the code's comments"
    assert not dead, 'no such section:\n' + '\n'.join(dead)


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


def top_level_names(source):
    """{name: the set of its methods (empty for a function or a global)} of a module's source."""
    names = {}
    for node in ast.parse(source).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names[node.name] = {n.name for n in node.body if isinstance(n, ast.FunctionDef)}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for t in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names.update({n.id: set() for n in ast.walk(t) if isinstance(n, ast.Name)})
    return names


def missing_citations(text, modules):
    """[citation] of `text`'s `module.name[.method]` whose module is one of `modules` ({module: its
    top_level_names}) but which it does not define; `module.py`, a file, is no citation."""
    missing = []
    for mod, name, method in CITE.findall(text):
        if name == 'py' or mod not in modules:                         # a file name (`mod.py`), or not ours
            continue
        if name not in modules[mod] or (method and method not in modules[mod][name]):
            missing.append(f"{mod}.{name}{'.' + method if method else ''}")
    return missing


def test_a_missing_citation_is_found():
    modules = top_level_names("X = 1\ndef f(): pass\nclass C:\n    def m(self): pass\n")
    assert set(modules) == {'X', 'f', 'C'} and modules['C'] == {'m'}
    text = "`mod.f` `mod.f(x, y)` `mod.C.m` `mod.X` `mod.g` `mod.C.n` `other.g` `mod.py` `torch.load`"
    assert missing_citations(text, {'mod': modules}) == ['mod.g', 'mod.C.n']


def test_every_cited_function_exists():
    modules = {}
    for path in glob.glob(os.path.join(ROOT, '*.py')):
        with open(path) as f:
            modules[os.path.basename(path)[:-3]] = top_level_names(f.read())
    missing, n = [], 0
    for doc in DOCS:
        with open(os.path.join(ROOT, doc)) as f:
            text = f.read()
        n += sum(m in modules and name != 'py' for m, name, _ in CITE.findall(text))
        missing += [f'{doc}: `{c}`' for c in missing_citations(text, modules)]
    assert n > 20, f"only {n} citations found: the pattern no longer matches the docs' citations"
    assert not missing, 'not defined where the docs say:\n' + '\n'.join(missing)
