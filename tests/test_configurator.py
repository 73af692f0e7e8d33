import pytest

from configurator import ConfigError, configure


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
