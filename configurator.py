"""
Poor man's configurator, nanoGPT-style, but strict. Each stage script keeps its settings as plain
module globals and then calls

    from configurator import configure
    config = configure(globals())

which reads sys.argv:

    python tokenizer.py config/tokenizer_tiny.py --batch_size=8 --compile=False

- Arguments without `--` are config files: plain Python assignments, executed in a scratch
  namespace; every name they assign must already be a setting.
- `--key=value` overrides a setting; the value is parsed as a Python literal, falling back to a
  plain string (so `--out_dir=out/x` needs no quotes).
- Unknown keys and wrong types are refused, naming the valid keys. An int is accepted where a float
  is expected (`--learning_rate=1` means 1.0), a list where a tuple is, and a single value where a
  tuple of such values is (`--scales=4` means (4,)); nothing else is coerced.

A setting is any global whose name does not start with '_', is not all capitals (a constant, e.g.
one imported from model.py) and whose value is an int, float, bool, str, tuple, dict or None. configure() returns the resolved settings as a dict (to be printed and
saved in the checkpoint).
"""
import ast
import os
import sys
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


def read_config_file(path):
    """A config file's settings: its assignments, executed in a scratch namespace (names starting
    with '_' and imported modules left out). Unchecked: configure() checks them against a script."""
    try:
        with open(path) as f:
            src = f.read()
    except OSError as e:
        raise ConfigError(f"cannot read config file '{path}': {e.strerror}") from None
    scope = {}
    exec(compile(src, path, 'exec'), {}, scope)
    return {k: v for k, v in scope.items() if not k.startswith('_') and type(v).__name__ != 'module'}


def fail(msg):
    """Stop a script before any work with one clear line on stderr (no traceback), exit code 1."""
    sys.exit(f"config error: {msg}")


def configure(g, argv=None, verbose=True):
    """Apply config files and --key=value overrides from argv to the globals dict g, in place.
    With argv=None (a script's command line) a bad setting ends the program via fail();
    with an explicit argv it raises ConfigError."""
    if argv is None:
        try:
            return configure(g, sys.argv[1:], verbose)
        except ConfigError as e:
            fail(str(e))
    current = settings_of(g)
    valid = set(current)
    for arg in argv:
        if not arg.startswith('--'):  # a config file
            for key, value in read_config_file(arg).items():
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
    (everything above `config = configure(globals())`), then config files and --key=value overrides
    from argv, checked exactly as the script would check them. bench.py and the tests build their
    models through this, so they can never drift from the scripts' defaults."""
    import os
    path = script if os.path.isabs(script) else os.path.join(os.path.dirname(os.path.abspath(__file__)), script)
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    g = {}
    for node in tree.body:
        if not (isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name)):
            continue
        if node.targets[0].id == 'config':
            break
        try:
            g[node.targets[0].id] = ast.literal_eval(node.value)
        except ValueError:
            pass  # not a setting (an expression computed at run time)
    return configure(g, list(argv), verbose=False)


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
