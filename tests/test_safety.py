"""Nothing is lost: a write that fails keeps the old file, leaves no temp file and, when it fails
for lack of space or permission, says so in one line naming the file."""
import errno
import io
import os
from pathlib import Path

import pytest
import torch

import common


# ----------------------------------------------------------------------------- failed writes


@pytest.mark.parametrize('code, words', [(errno.ENOSPC, 'no space left on the device'),
                                         (errno.EACCES, 'permission denied'),
                                         (errno.EROFS, 'read-only file system')])
def test_a_write_that_fails_for_space_or_permission_keeps_the_old_file(code, words, tmp_path):
    path = tmp_path / 'ckpt.pt'
    path.write_bytes(b'old checkpoint' * 1000)

    def write(tmp):  # writes half of the new file, then the device refuses
        with open(tmp, 'wb') as f:
            f.write(b'new' * 500)
            raise OSError(code, os.strerror(code))
    with pytest.raises(SystemExit) as e:
        common.atomic_write(str(path), write)
    assert str(e.value) == (f"error: cannot write '{path}': {words} (nothing was replaced; "
                            f"the temp file is removed)")
    assert path.read_bytes() == b'old checkpoint' * 1000 and os.listdir(tmp_path) == ['ckpt.pt']


def test_other_write_errors_are_raised_and_leave_no_temp_file(tmp_path):
    path = tmp_path / 'a.json'
    path.write_text('{}')

    def write(tmp):
        Path(tmp).write_text('{"half')
        raise ValueError('not serialisable')
    with pytest.raises(ValueError, match='not serialisable'):
        common.atomic_write(str(path), write)
    assert path.read_text() == '{}' and os.listdir(tmp_path) == ['a.json']


def test_a_full_disk_during_a_checkpoint_save_keeps_the_last_checkpoint(tmp_path, monkeypatch):
    """torch.save writing into a file on a disk with 4 kB left, as save_state does it: the error
    names the path and the cause (torch's own writer would report 'unexpected pos ...')."""
    path = tmp_path / 'ckpt.pt'
    model = torch.nn.Linear(64, 64)
    common.save_state(str(path), dict(model=model), 'tokenizer', step=1)
    before = path.read_bytes()

    class FullDisk(io.FileIO):
        def write(self, b):
            if self.tell() + memoryview(b).nbytes > 4096:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return super().write(b)
    monkeypatch.setattr(common, 'open', lambda file, mode: FullDisk(file, 'w'), raising=False)
    with torch.no_grad():
        model.weight.add_(1)
    with pytest.raises(SystemExit, match=f"cannot write '{path}': no space left on the device"):
        common.save_state(str(path), dict(model=model), 'tokenizer', step=2)
    assert path.read_bytes() == before and os.listdir(tmp_path) == ['ckpt.pt']
    monkeypatch.undo()
    assert common.load_checkpoint(str(path), kind='tokenizer')['step'] == 1
