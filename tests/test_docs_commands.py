"""Every documented command line of a script parses: the config files and --key=value overrides of
each `python SCRIPT.py ...` (also `.venv/bin/python`, `$PY`, `torchrun ... SCRIPT.py`) in the
README, docs/method.md, run.sh, run_gpu.sh and the comments of config/*.py are checked by
configurator.script_settings exactly as the script would check them, so a renamed setting or
config file cannot leave a stale command behind."""
import glob
import os
import re
import shlex

import pytest

from configurator import ConfigError, script_settings

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DOCS = ['README.md', 'docs/method.md', 'run.sh', 'run_gpu.sh'] + sorted(
    os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, 'config', '*.py')))
SCRIPTS = ('tokenizer', 'generator', 'finetune_decoder', 'sr', 'eval', 'bench', 'ablate')
# a launcher, torchrun's own options, the script, the rest of the line up to the end of inline code
COMMAND = re.compile(r'(?:python3?|\$PY|torchrun)(?:\s+--?[\w-]+(?:=\S+)?)*\s+(' + '|'.join(SCRIPTS)
                     + r')\.py(?=[\s`]|$)([^`\n]*)')
PLACEHOLDER = re.compile(r'[A-Z][A-Z0-9_]*')  # --max_minutes=N, --gen_ckpt=PATH: only the key is checked


def logical_lines(text):
    """(line number, line) with backslash continuations joined (in a comment, the next line's '#' too)."""
    lines, out, i = text.splitlines(), [], 0
    while i < len(lines):
        n, line = i + 1, lines[i]
        while line.rstrip().endswith('\\') and i + 1 < len(lines):
            i += 1
            line = line.rstrip()[:-1] + ' ' + lines[i].strip().lstrip('#').strip()
        out.append((n, line))
        i += 1
    return out


def commands(text):
    """[(line number, script, args)] of every command line in text; shell syntax after the command
    (a pipe, a redirection, "$@") and comments are left out."""
    found = []
    for n, line in logical_lines(text):
        for m in COMMAND.finditer(line):
            lex = shlex.shlex(m.group(2), posix=True, punctuation_chars='|&;<>')
            lex.whitespace_split, lex.commenters = True, '#'
            args = []
            for tok in lex:
                if set(tok) <= set('|&;<>'):
                    break
                if not tok.startswith('$'):
                    args.append(tok)
            found.append((n, m.group(1) + '.py', args))
    return found


def check(script, args):
    """Raise ConfigError where the script would refuse args; placeholders need only a valid key."""
    real = [a for a in args if not (a.startswith('--') and '=' in a and PLACEHOLDER.fullmatch(a.split('=', 1)[1]))]
    s = script_settings(script, real)
    for a in args:
        if a not in real and a[2:].split('=')[0] not in s:
            raise ConfigError(f"argument '{a}': unknown config key '{a[2:].split('=')[0]}'")
    if script == 'bench.py':  # its chain's config files, as the tokenizer and the generator read them
        script_settings('tokenizer.py', s['configs'].split() + s['tok_args'].split())
        script_settings('generator.py', s['configs'].split())


def documented():
    for doc in DOCS:
        with open(os.path.join(ROOT, doc)) as f:
            for n, script, args in commands(f.read()):
                yield pytest.param(script, args, id=f'{doc}:{n}')


@pytest.mark.parametrize('script, args', list(documented()))
def test_documented_command_parses(script, args, monkeypatch):
    monkeypatch.chdir(ROOT)  # config file paths are relative to the repository
    check(script, args)


def test_every_doc_has_its_commands():
    found = {doc: len(commands(open(os.path.join(ROOT, doc)).read())) for doc in DOCS}
    assert found['README.md'] >= 20 and found['run.sh'] >= 5 and found['run_gpu.sh'] >= 5, found
    assert found['config/hvar.py'] >= 5 and found['config/tiny.py'] >= 3, found


DOC = """
```bash
.venv/bin/python tokenizer.py config/tiny.py config/hvar.py   # plain multi-scale RQ
torchrun --nnodes=2 --rdzv_endpoint=HOST0:29500 \\
  generator.py config/paper.py --batch_size=8
```
Run `python eval.py --sr=chain --gen_ckpt=PATH` after it; not a command: `generator.py --width=8`.
$PY eval.py --sr=bicubic --out_json=out/eval/b.json | tail -4
#   python tokenizer.py config/tiny.py --hierarchical=True \\
#       --max_minutes=4   # a comment
python bench.py --mode=sr --configs="config/tiny.py config/tvq.py"
"""


def test_commands_are_found_and_a_typo_fails(monkeypatch):
    monkeypatch.chdir(ROOT)
    assert commands(DOC) == [
        (3, 'tokenizer.py', ['config/tiny.py', 'config/hvar.py']),
        (4, 'generator.py', ['config/paper.py', '--batch_size=8']),
        (7, 'eval.py', ['--sr=chain', '--gen_ckpt=PATH']),
        (8, 'eval.py', ['--sr=bicubic', '--out_json=out/eval/b.json']),
        (9, 'tokenizer.py', ['config/tiny.py', '--hierarchical=True', '--max_minutes=4']),
        (11, 'bench.py', ['--mode=sr', '--configs=config/tiny.py config/tvq.py'])]
    for _, script, args in commands(DOC):
        check(script, args)
    for bad in ('python tokenizer.py config/tiny.py --batch_sise=8',         # a misspelt setting
                'python generator.py config/generator_tiny.py',              # a config file that is gone
                'python sr.py --input=x.png --tile=PATH --scale=4',          # no such setting in sr.py
                'python eval.py --max_minutes=N',                            # a placeholder of a key eval.py lacks
                'python bench.py --configs=config/tiny.py --tok_args=--groupz=2',  # bench's tokenizer settings
                'python finetune_decoder.py config/tiny.py config/hvar.py --compile=yes'):  # a wrong type
        (_, script, args), = commands(bad)
        with pytest.raises(ConfigError):
            check(script, args)
