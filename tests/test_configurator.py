import sys

import pytest

from configurator import ConfigError, configure, script_settings


def fresh():
    return dict(batch_size=8, lr=1e-4, compile=True, out_dir='out/x', betas=(0.9, 0.95),
                deg={}, seed=None, _private=3, math=pytest, MIN_TILE=32)  # last three are not settings


def test_overrides_and_files(tmp_path):
    cfg = tmp_path / 'c.py'
    cfg.write_text("batch_size = 4 * 2 * 2  # arithmetic in config files is fine\nlr = 3e-4\n")
    g = fresh()
    out = configure(g, [str(cfg), '--compile=False', '--out_dir=out/y', '--lr=1', '--betas=[0.8,0.9]'],
                    verbose=False)
    assert g['batch_size'] == 16 and out['batch_size'] == 16
    assert g['lr'] == 1.0 and type(g['lr']) is float  # int -> float widening
    assert g['compile'] is False and g['out_dir'] == 'out/y' and g['betas'] == (0.8, 0.9)
    assert '_private' not in out and 'math' not in out and 'MIN_TILE' not in out  # constants are not settings
    with pytest.raises(ConfigError, match="unknown config key 'MIN_TILE'"):
        configure(fresh(), ['--MIN_TILE=8'], verbose=False)
    assert configure(fresh(), ['--betas=0.5'], verbose=False)['betas'] == (0.5,)  # one value for a tuple


def test_unknown_key_lists_valid_keys(tmp_path):
    with pytest.raises(ConfigError, match=r"unknown config key 'batchsize'.*batch_size"):
        configure(fresh(), ['--batchsize=3'], verbose=False)
    cfg = tmp_path / 'bad.py'
    cfg.write_text("learning_rate = 1e-3\n")
    with pytest.raises(ConfigError, match=r"bad\.py.*unknown config key 'learning_rate'.*lr"):
        configure(fresh(), [str(cfg)], verbose=False)


@pytest.mark.parametrize('arg', ['--batch_size=2.5', '--compile=1', '--lr=fast', '--batch_size=True'])
def test_wrong_type_refused(arg):
    with pytest.raises(ConfigError, match='expects'):
        configure(fresh(), [arg], verbose=False)


def test_missing_file_and_malformed_arg():
    with pytest.raises(ConfigError, match='nope.py'):
        configure(fresh(), ['nope.py'], verbose=False)
    with pytest.raises(ConfigError, match='--key=value'):
        configure(fresh(), ['--compile'], verbose=False)


def test_a_file_sets_keys_per_stage(tmp_path, monkeypatch):
    """A config file runs with `stage` = the script's name: the keys under another stage's branch
    never run, so they are neither applied nor checked against this script's settings."""
    cfg = tmp_path / 'size.py'
    cfg.write_text("batch_size = 4\n"
                   "if stage == 'tokenizer':\n    lr = 3e-4\n"
                   "if stage == 'generator':\n    lr = 1e-3\n    width = 768   # a generator-only key\n")
    out = configure(fresh(), [str(cfg)], verbose=False, stage='tokenizer')
    assert (out['batch_size'], out['lr']) == (4, 3e-4) and 'width' not in out and 'stage' not in out
    with pytest.raises(ConfigError, match=r"size\.py.*unknown config key 'width'"):  # run for the generator
        configure(fresh(), [str(cfg)], verbose=False, stage='generator')
    # the stage of a script's command line is its file name; script_settings uses the script's
    monkeypatch.setattr(sys, 'argv', ['/somewhere/tokenizer.py'])
    assert configure(fresh(), [str(cfg)], verbose=False)['lr'] == 3e-4
    assert script_settings('tokenizer.py', ['config/tiny.py'])['crop_size'] == 64
    assert script_settings('generator.py', ['config/tiny.py'])['crop_size'] == 128


def test_a_typo_in_a_stage_branch_is_refused_naming_the_file(tmp_path):
    cfg = tmp_path / 'typo.py'
    cfg.write_text("if stage == 'tokenizer':\n    batch_sise = 4\n")
    with pytest.raises(ConfigError, match=r"typo\.py.*unknown config key 'batch_sise'.*batch_size"):
        configure(fresh(), [str(cfg)], verbose=False, stage='tokenizer')
    cfg.write_text("batch_size = 4\nif stag == 'tokenizer':\n    lr = 1.0\n")  # a misspelt name it reads
    with pytest.raises(ConfigError, match=r"typo\.py', line 2: NameError: name 'stag' is not defined"):
        configure(fresh(), [str(cfg)], verbose=False, stage='tokenizer')
    cfg.write_text("batch_size = = 4\n")
    with pytest.raises(ConfigError, match=r"typo\.py', line 1: SyntaxError"):
        configure(fresh(), [str(cfg)], verbose=False, stage='tokenizer')
    cfg.write_text("stage = 'generator'\n")  # stage is given, not a setting
    with pytest.raises(ConfigError, match=r"unknown config key 'stage'"):
        configure(fresh(), [str(cfg)], verbose=False, stage='tokenizer')


def test_a_method_file_sees_the_size_files_settings(tmp_path):
    size, method = tmp_path / 'size.py', tmp_path / 'method.py'
    size.write_text("batch_size = 16\nout_dir = 'out/tok'\n")
    method.write_text("batch_size = batch_size // 2\nout_dir = out_dir + '_m'\nbetas = tuple(b for b in betas)\n")
    out = configure(fresh(), [str(size), str(method)], verbose=False, stage='tokenizer')
    assert (out['batch_size'], out['out_dir'], out['betas']) == (8, 'out/tok_m', (0.9, 0.95))
    # alone it sees the script's defaults; --key=value after the files still wins
    assert configure(fresh(), [str(method)], verbose=False, stage='tokenizer')['batch_size'] == 4
    assert configure(fresh(), [str(size), str(method), '--batch_size=3'], verbose=False)['batch_size'] == 3
    # the project's own: config/hvar.py takes its residual steps from the size file's token grid
    tiny = script_settings('tokenizer.py', ['config/tiny.py', 'config/hvar.py'])
    paper = script_settings('tokenizer.py', ['config/paper.py', 'config/hvar.py'])
    assert tiny['rq_steps'][-1] * tiny['patch'] == tiny['crop_size'] == 64
    assert paper['rq_steps'][-1] * paper['patch'] == paper['crop_size'] == 512
    assert (tiny['out_dir'], paper['out_dir']) == ('out/tokenizer_hrq', 'out/tokenizer_hrq_paper')


def test_a_dict_changed_in_place_is_applied_not_shared(tmp_path):
    cfg = tmp_path / 'd.py'
    cfg.write_text("deg['jpeg'] = 50\n")
    g = fresh()
    assert configure(g, [str(cfg)], verbose=False)['deg'] == {'jpeg': 50} and g['deg'] == {'jpeg': 50}
    assert fresh()['deg'] == {}
