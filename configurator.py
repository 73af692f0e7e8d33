"""
Poor man's configurator, nanoGPT-style, but strict. Each stage script keeps its settings as plain
module globals and then calls

    from configurator import configure
    config = configure(globals())

which reads sys.argv:

    python tokenizer.py config/tiny.py --batch_size=8 --compile=False
    python tokenizer.py config/tiny.py config/hvar.py         # a size file, then a method file

- Arguments without `--` are config files, applied in order: plain Python, each run in a namespace
  that holds `stage` (the script's name without .py: 'tokenizer', 'generator', 'finetune_decoder';
  for script_settings(), the script it reads) and every setting so far (the script's defaults, then
  what earlier files set). Every name a file assigns must be a setting of that script; names
  starting with '_' and imported modules are left out. So one file can hold the settings of every
  stage, each under `if stage == ...:` (lines under another stage's branch never run, so they are
  never checked against this script), and a later file can build on an earlier one's values, e.g.
  `rq_steps = {16: ..., 32: ...}[crop_size // patch]` (config/hvar.py after config/tiny.py).
- `--key=value` overrides a setting; the value is parsed as a Python literal, falling back to a
  plain string (so `--out_dir=out/x` needs no quotes).
- Unknown keys and wrong types are refused, naming the valid keys (and the file). An int is accepted
  where a float is expected (`--learning_rate=1` means 1.0), a list where a tuple is, and a single
  value where a tuple of such values is (`--scales=4` means (4,)); nothing else is coerced. An
  error while a config file runs (a misspelt name it reads, a syntax error) is refused naming the
  file and line.

A setting is any global whose name does not start with '_', is not all capitals (a constant, e.g.
one imported from model.py) and whose value is an int, float, bool, str, tuple, dict or None.
configure() returns the resolved settings as a dict (to be printed and saved in the checkpoint).
config_from_settings() builds one of model.py's configs from those settings; ModelConfig, their base,
holds the field checks every config runs (types, ranges, choices), each error naming the field.
"""
import ast
import copy
import os
import sys
import traceback
from dataclasses import fields

SETTING_TYPES = (bool, int, float, str, tuple, dict, type(None))


class ConfigError(ValueError):
    pass


def settings_of(g):
    return {k: v for k, v in g.items()
            if not k.startswith('_') and not k.isupper() and type(v) in SETTING_TYPES}


def _check(key, value, current, valid, origin):
    if key not in valid:
        raise ConfigError(f"{origin}: unknown config key '{key}'. Valid keys: {', '.join(sorted(valid))}")
    old = current[key]
    if old is None or value is None:  # a None default means "any type, or unset"
        return value
    if type(old) is float and type(value) is int:  # int -> float is the one allowed widening
        return float(value)
    if type(old) is tuple and type(value) is list:
        value = tuple(value)
    if type(old) is tuple and old and type(value) is type(old[0]):  # --scales=4 means (4,)
        value = (value,)
    if type(value) is not type(old):
        raise ConfigError(f"{origin}: config key '{key}' expects {type(old).__name__} "
                          f"(default {old!r}), got {type(value).__name__} {value!r}")
    return value


def _parse_value(text):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare string such as out/tokenizer or cuda


def read_config_file(path, stage, settings):
    """The settings a config file sets: it runs in a namespace holding `stage` and the settings so far
    (see the module docstring), and every name it binds to a new value is returned, names starting
    with '_' and imported modules left out. Unchecked: configure() checks them against the script."""
    try:
        with open(path) as f:
            src = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config file '{path}': {e.strerror}") from None
    before = dict(copy.deepcopy(settings), stage=stage)  # copies: a file may change a dict in place
    scope = dict(before)
    try:
        exec(compile(src, path, 'exec'), scope)
    except Exception as e:  # a SyntaxError, or a NameError / KeyError / ... raised by a line of the file
        line = e.lineno if isinstance(e, SyntaxError) else next(
            (fr.lineno for fr in reversed(traceback.extract_tb(e.__traceback__)) if fr.filename == path), '?')
        raise ConfigError(f"config file '{path}', line {line}: {type(e).__name__}: {e}") from None
    return {k: v for k, v in scope.items() if not k.startswith('_') and type(v).__name__ != 'module'
            and (k not in before or v is not before[k] or v != settings.get(k, v))}


def fail(msg):
    """Stop a script before any work with one clear line on stderr (no traceback), exit code 1."""
    sys.exit(f"config error: {msg}")


def configure(g, argv=None, verbose=True, stage=None):
    """Apply config files and --key=value overrides from argv to the globals dict g, in place.
    With argv=None (a script's command line) a bad setting ends the program via fail();
    with an explicit argv it raises ConfigError. stage: what config files see as `stage`
    (default: the running script's name without .py)."""
    if stage is None:
        stage = os.path.splitext(os.path.basename(sys.argv[0]))[0]
    if argv is None:
        try:
            return configure(g, sys.argv[1:], verbose, stage)
        except ConfigError as e:
            fail(str(e))
    current = settings_of(g)
    valid = set(current)
    for arg in argv:
        if not arg.startswith('--'):  # a config file
            for key, value in read_config_file(arg, stage, current).items():
                current[key] = _check(key, value, current, valid, f"config file '{arg}'")
        else:
            if '=' not in arg:
                raise ConfigError(f"argument '{arg}' must look like --key=value")
            key, text = arg[2:].split('=', 1)
            current[key] = _check(key, _parse_value(text), current, valid, f"argument '{arg}'")
    g.update(current)
    # the resolved config, one grep-able line (scripts also save it with each checkpoint); under
    # torchrun only rank 0 prints it
    if verbose and os.environ.get('RANK', '0') == '0':
        print('config: ' + ' '.join(f'{k}={current[k]!r}' for k in sorted(current)))
    return dict(current)


def script_settings(script, argv=()):
    """A stage script's settings without running it: its top-level assignments of literal values
    (everything above `config = configure(globals())`, also inside `if __name__ == '__main__':` as in
    sr.py and eval.py), then config files and --key=value overrides from argv, checked exactly as the
    script would check them (config files see `stage` = the script's name without .py). bench.py and
    the tests build their models through this, so they can never drift from the scripts' defaults."""
    path = script if os.path.isabs(script) else os.path.join(os.path.dirname(os.path.abspath(__file__)), script)
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    body = []
    for node in tree.body:
        main = isinstance(node, ast.If) and ast.unparse(node.test) == "__name__ == '__main__'"
        body += node.body if main else [node]
    g = {}
    for node in body:
        if isinstance(node, (ast.Assign, ast.Expr)) and ast.unparse(node.value) == 'configure(globals())':
            break
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            continue
        try:
            g[node.targets[0].id] = ast.literal_eval(node.value)
        except ValueError:
            pass  # not a setting (an expression computed at run time)
    return configure(g, list(argv), verbose=False, stage=os.path.splitext(os.path.basename(path))[0])


def config_from_settings(cls, settings, **derived):
    """The one path from a stage script's flat settings to a model config (used by the scripts,
    bench.py and the tests): every field of the dataclass cls takes the setting of the same name,
    except the fields given in `derived` (values an earlier stage's checkpoint or the prior fixes).
    Validation happens once, in cls.__post_init__ (ValueError naming the field)."""
    names = [f.name for f in fields(cls)]
    missing = [n for n in names if n not in derived and n not in settings]
    if missing:
        raise ValueError(f"{cls.__name__}: no setting for {missing}")
    return cls(**{n: derived[n] if n in derived else settings[n] for n in names})


class ModelConfig:
    """Base of model.py's configs (TokenizerConfig, GeneratorConfig, NextScaleConfig): fields have no
    defaults there, the stage scripts hold them (one place per default). Built from a script's flat
    settings by config_from_settings (above), or from a checkpoint's model_args by from_dict;
    __post_init__ validates either way with the checks below, each naming the field."""

    def bad(self, key, want):
        raise ValueError(f"{type(self).__name__}.{key}={getattr(self, key)!r}: {want}")

    def check_types(self):
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, (int, float) if f.type is float else f.type) or (
                    isinstance(v, bool) and f.type is not bool):
                self.bad(f.name, f"expected {f.type.__name__}")

    def check_positive(self, *keys, minimum=1):
        for key in keys:
            if getattr(self, key) < minimum:
                self.bad(key, f"must be >= {minimum}")

    def check_choice(self, key, *options):
        if getattr(self, key) not in options:
            self.bad(key, f"expected {', '.join(map(repr, options[:-1]))} or {options[-1]!r}")

    def check_heads(self, *keys):
        """A transformer's shape: keys = width, heads[, width, heads, ...], each width split into heads
        of a size divisible by 4 (2D RoPE); and mlp_ratio > 0."""
        for width_key, heads_key in zip(keys[::2], keys[1::2]):
            width, heads = getattr(self, width_key), getattr(self, heads_key)
            if width % heads or (width // heads) % 4:
                self.bad(heads_key, f"must divide {width_key}={width} into heads of a size divisible by 4 (2D RoPE)")
        if self.mlp_ratio <= 0:
            self.bad('mlp_ratio', "must be > 0")

    def check_with(self, check, *args):
        """check(*args) raises ValueError on bad values (e.g. model.step_partition): re-raised naming this config."""
        try:
            check(*args)
        except ValueError as e:
            raise ValueError(f"{type(self).__name__}: {e}") from None

    @classmethod
    def from_dict(cls, d):
        d = {**getattr(cls, 'ADDED_FIELDS', {}), **d}  # fields added later: their old behaviour
        for key, off in getattr(cls, 'REMOVED_FIELDS', {}).items():  # options removed later: loadable if off
            v = d.pop(key, off)
            if off is not None and v != off:
                raise ValueError(f"{cls.__name__}: {key}={v!r} is an option this version no longer has "
                                 f"(only {key}={off!r} loads)")
        known = {f.name for f in fields(cls)}
        unknown, missing = sorted(set(d) - known), sorted(known - set(d))
        if unknown or missing:
            raise ValueError(f"{cls.__name__}: unknown keys {unknown}, missing keys {missing}; "
                             f"valid keys: {sorted(known)}")
        return cls(**d)
