"""The modules stand in layers a reader can see: tools, then models and data, then losses and
inference, then the scripts. A module imports only modules of lower layers (checked on the source,
every import statement, also those inside functions), and every module of the project has a layer."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {
    1: ('wavelets', 'configurator', 'degradation', 'prior', 'metrics', 'common', 'peer',   # tools: no project imports
        'report'),
    2: ('model', 'data'),                                                                  # models, data
    3: ('losses', 'chain'),                                                                # losses, inference
    4: ('tokenizer', 'generator', 'finetune_decoder', 'eval', 'sr', 'bench', 'ablate'),    # the scripts
}
LAYER_OF = {m: n for n, mods in LAYERS.items() for m in mods}


def project_imports(source):
    """The project modules a source imports (any import statement, at any depth)."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                 [node.module] if isinstance(node, ast.ImportFrom) and node.module and node.level == 0 else [])
        found |= {n.split('.')[0] for n in names if n.split('.')[0] in LAYER_OF}
    return found


def violations(sources):
    """{module: source} -> ['a imports b (layer x, not below y)', ...]."""
    out = []
    for mod, src in sorted(sources.items()):
        for dep in sorted(project_imports(src) - {mod}):
            if LAYER_OF[dep] >= LAYER_OF[mod]:
                out.append(f"{mod} (layer {LAYER_OF[mod]}) imports {dep} (layer {LAYER_OF[dep]})")
    return out


def test_every_module_has_a_layer():
    modules = {p.stem for p in ROOT.glob('*.py')}
    assert modules == set(LAYER_OF), f"place new modules in LAYERS: {sorted(modules ^ set(LAYER_OF))}"


def test_no_module_imports_its_own_layer_or_above():
    sources = {p.stem: p.read_text() for p in ROOT.glob('*.py')}
    assert violations(sources) == []


def test_the_check_sees_a_violation_inside_a_function():
    sources = {'model': 'import torch\n\ndef f():\n    from chain import load_sr_chain\n',
               'metrics': 'from common import write_json\n', 'sr': 'import model\nimport metrics\n'}
    assert violations(sources) == ['metrics (layer 1) imports common (layer 1)', 'model (layer 2) imports chain (layer 3)']
