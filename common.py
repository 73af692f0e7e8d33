"""
The few pieces of training plumbing every stage script shares: device and dtype selection, the
learning-rate schedule, data-parallel training under torchrun (DDP), the checkpoint of a stage's
declared state (exact resume), one atomic writer for every file, the claim of an out_dir (lock, no
silent replacement), a log file, PNG sample grids, training curves, the final summary block, the
MFU arithmetic (datasheet peaks, a tokenizer's FLOPs from its model_args), the base of the model
configs (checks that name the field, from_dict for checkpoints) and the quantizers' one-process
view of DDP. Kept deliberately small; everything model-specific lives in model.py.
"""
import atexit
import contextlib
import datetime
import errno
import json
import math
import hashlib
import os
import pickle
import random
import re
import signal
import sys
import time
import types

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw


def fail(msg):
    """End a script before any work with one line on stderr (no traceback), exit code 1: the same as
    configurator.fail, for the settings and files this module checks."""
    sys.exit(f"config error: {msg}")


def pick_device(device='auto'):
    if device != 'auto':
        return device
    if torch.cuda.is_available():
        return 'cuda'
    if getattr(torch.backends, 'mps', None) is not None and torch.backends.mps.is_available():
        return 'mps'
    return 'cpu'


# -----------------------------------------------------------------------------
# Data-parallel training (DDP): `torchrun --nproc_per_node=N script.py ...` starts N copies of a
# stage script; each trains on its own batches, the gradients are averaged in backward, and rank 0
# alone evaluates and writes. Every helper below is a no-op in a plain `python script.py`.

def ddp_setup(device='auto'):
    """torchrun sets RANK, LOCAL_RANK and WORLD_SIZE: join the process group (NCCL on GPUs, gloo on
    CPU), one GPU per process. -> (rank, local_rank, world_size, device). Without torchrun:
    (0, 0, 1, pick_device(device)) and no process group."""
    device = pick_device(device)
    if 'RANK' not in os.environ:
        return 0, 0, 1, device
    rank, local_rank, world = (int(os.environ[k]) for k in ('RANK', 'LOCAL_RANK', 'WORLD_SIZE'))
    if device.startswith('cuda'):
        device = f'cuda:{local_rank}'
        torch.cuda.set_device(device)
    backend = 'nccl' if device.startswith('cuda') else 'gloo'
    dist.init_process_group(backend, timeout=datetime.timedelta(minutes=30))  # while rank 0 evaluates
    return rank, local_rank, world, device


def ddp_world():
    """-> (rank, world_size): (0, 1) without a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def ddp_cleanup():
    """Leave the process group together: the barrier keeps a rank from tearing its connections down
    while rank 0 still writes its last checkpoint and summary."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def _distributed():
    return ddp_world()[1] > 1


def _comm_device():
    return torch.device('cuda', torch.cuda.current_device()) if dist.get_backend() == 'nccl' else 'cpu'


def sum_over_ranks(x):
    """The sum of x (a tensor) over the ranks, as a new tensor; x itself in a single process."""
    if not _distributed():
        return x
    x = x.clone()
    dist.all_reduce(x)
    return x


def mean_over_ranks(x):
    return sum_over_ranks(x) / ddp_world()[1] if _distributed() else x


def gather_over_ranks(x, dim=0):
    """Every rank's x concatenated along dim in rank order (what one process holding all ranks'
    batches would have); x itself in a single process. Every rank's x has the same shape."""
    if not _distributed():
        return x
    parts = [torch.empty_like(x) for _ in range(ddp_world()[1])]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim)


def from_rank0_(x):
    """Overwrite the tensor x with rank 0's, in place (e.g. after random draws that differ by rank)."""
    if _distributed():
        dist.broadcast(x, 0)
    return x


class Ranks:
    """The quantizers' view of DDP (OneProcess in one process): tokenizer.py sets
    `quantizer.ranks = Ranks()` so code hits, replacement pools and random draws cover every rank."""
    gather = staticmethod(gather_over_ranks)
    sum = staticmethod(sum_over_ranks)
    from_rank0_ = staticmethod(from_rank0_)


def rank0_number(value):
    """Rank 0's value of a Python number on every rank: its clock decides when a time-budgeted run
    ends and how far its learning rate has decayed, so that all ranks agree."""
    if not _distributed():
        return value
    t = torch.tensor([float(value)], dtype=torch.float64, device=_comm_device())
    dist.broadcast(t, 0)
    return t.item()


def mean_items(parts):
    """{name: scalar tensor} -> {name: float}, each averaged over the ranks (what the log shows)."""
    if not _distributed():
        return {k: v.item() for k, v in parts.items()}
    values = torch.stack([torch.as_tensor(v).detach().to(_comm_device(), torch.float64).reshape(())
                          for v in parts.values()])
    return dict(zip(parts, mean_over_ranks(values).tolist()))


class TrainStep(torch.nn.Module):
    """The modules a stage trains, as one module whose forward runs a function of them:
    step(fn, *args) = fn(*args). Wrapped by ddp_wrap, the function becomes DDP's forward, so a
    step that calls several modules (generator and prior) or a method other than forward
    (Tokenizer.hierarchical) still gets its gradients averaged over the ranks in backward."""
    def __init__(self, *modules):
        super().__init__()
        self.parts = torch.nn.ModuleList(modules)

    def forward(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)


def ddp_wrap(module, find_unused=False):
    """DistributedDataParallel(module) under torchrun (rank 0's weights are copied to every rank
    here; backward averages the gradients over the ranks), the module itself in a single process.
    find_unused: some trainable parameters may get no gradient in a step (DDP then looks for them)."""
    if not _distributed():
        return module
    return torch.nn.parallel.DistributedDataParallel(module, find_unused_parameters=find_unused)


def no_sync(module, sync):
    """Around the forward and backward of a micro-batch: the gradient all-reduce is skipped unless
    sync (the last micro-batch of a step), so grad_accum costs one all-reduce per step."""
    if sync or not isinstance(module, torch.nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext()
    return module.no_sync()


def rank_states(state, names):
    """Under DDP, the state of each rank's own streams (the objects `names` of a stage's state: its
    data sampler, its generators; and the global RNGs), gathered so rank 0 saves them all:
    -> dict(ranks=[one dict per rank], world_size=N) to pass to save_state; {} in a single process
    (nothing is added to its checkpoint). load_state gives each rank its own back."""
    if not _distributed():
        return {}
    mine = dict({name: _get_state(state[name]) for name in names}, rng=rng_state())
    ranks = [None] * ddp_world()[1]
    dist.all_gather_object(ranks, mine)
    return dict(ranks=ranks, world_size=len(ranks))


def setting_problems(s):
    """Range checks of the settings the stage scripts share, before any work: one message per bad
    value, with the valid range (every *_weight >= 0; degradation, jpeg_impl, patch where a script has
    them). The scripts add their own checks and fail with all of them."""
    problems = []
    for key in ('batch_size', 'grad_accum', 'crop_size', 'eval_interval', 'log_interval'):
        if s[key] < 1:
            problems.append(f"{key}={s[key]} must be >= 1")
    for key in ('warmup_iters', 'max_iters', 'max_minutes', 'decay_iters', 'grad_clip', 'weight_decay',
                'd_learning_rate'):
        if s[key] < 0:
            problems.append(f"{key}={s[key]} must be >= 0")
    if not s['learning_rate'] > 0:
        problems.append(f"learning_rate={s['learning_rate']} must be > 0")
    if not 0 <= s['learning_rate_floor'] <= 1:
        problems.append(f"learning_rate_floor={s['learning_rate_floor']} must be in [0, 1]")
    if s.get('perceptual', 'vgg') not in ('vgg', 'alex'):
        problems.append(f"perceptual={s['perceptual']!r} must be 'vgg' or 'alex' (the LPIPS network of the loss)")
    if s.get('lpips_batch', 0) < 0:
        problems.append(f"lpips_batch={s['lpips_batch']} must be >= 0 (0: every crop of the batch)")
    if 'threads' in s and s['threads'] < 0:
        problems.append(f"threads={s['threads']} must be >= 0 (0 = torch's default)")
    if s['max_iters'] <= 0 and s['max_minutes'] <= 0:
        problems.append("set max_iters > 0 or max_minutes > 0")
    for key in sorted(k for k in s if k.endswith('_weight')):                  # every loss weight
        if s[key] < 0:
            problems.append(f"{key}={s[key]} must be >= 0 (0 disables it)")
    for key, choices in (('degradation', ('realesrgan', 'bicubic')), ('jpeg_impl', ('torch', 'pil'))):
        if key in s and s[key] not in choices:
            problems.append(f"{key}={s[key]!r} must be " + ' or '.join(map(repr, choices)))
    if 'patch' in s and s['patch'] < 1:
        problems.append(f"patch={s['patch']} must be >= 1")
    elif 'patch' in s and s['crop_size'] % s['patch']:
        problems.append(f"crop_size={s['crop_size']} must be a multiple of patch={s['patch']}")
    return problems + device_problems(s['device']) + dtype_problems(s.get('dtype', 'auto'))


def device_problems(device):
    """[] when `device` names a device this machine has (auto | cpu | cuda | cuda:N | mps), else one message."""
    device = str(device)
    if not re.fullmatch(r'auto|cpu|mps|cuda(:\d+)?', device):
        return [f"device={device!r} must be auto, cpu, cuda, cuda:N or mps"]
    if device.startswith('cuda') and not torch.cuda.is_available():
        return [f"device={device!r} but CUDA is not available here (use auto or cpu)"]
    if device.startswith('cuda:') and int(device[5:]) >= torch.cuda.device_count():
        return [f"device={device!r} but this machine has {torch.cuda.device_count()} CUDA device(s)"]
    if device == 'mps' and not (getattr(torch.backends, 'mps', None) and torch.backends.mps.is_available()):
        return ["device='mps' but MPS is not available here (use auto or cpu)"]
    return []


def dtype_problems(dtype):
    if dtype not in ('auto', 'float32', 'bfloat16', 'float16'):
        return [f"dtype={dtype!r} must be auto, float32, bfloat16 or float16"]
    return []


def autocast_ctx(device, dtype='auto'):
    """bf16 autocast where the hardware supports it (dtype='auto'), else full fp32.
    On CPU bf16 autocast is slower than fp32 on most machines, so 'auto' keeps fp32 there."""
    if dtype == 'auto':
        dtype = 'bfloat16' if device.startswith('cuda') and torch.cuda.is_bf16_supported() else 'float32'
    if dtype not in ('float32', 'bfloat16', 'float16'):
        raise ValueError(f"dtype must be auto|float32|bfloat16|float16, got {dtype!r}")
    if dtype == 'float32':
        return dtype, contextlib.nullcontext()
    return dtype, torch.autocast(device_type=device.split(':')[0], dtype=getattr(torch, dtype))


def maybe_compile(module, enabled, device):
    """torch.compile only where it pays off: on CPU it mostly costs start-up minutes."""
    if enabled and device.startswith('cuda'):
        return torch.compile(module)
    return module


def learning_rate_at(step, progress, learning_rate, warmup_iters, floor=0.1):
    """Linear warm-up over `warmup_iters` steps, then cosine decay to floor * learning_rate.
    `progress` in [0,1] is the fraction of the run done: step / decay_iters, or elapsed
    time / max_minutes when a wall-clock budget drives the run."""
    if step < warmup_iters:
        return learning_rate * (step + 1) / warmup_iters
    coeff = 0.5 * (1.0 + math.cos(math.pi * min(max(progress, 0.0), 1.0)))
    return learning_rate * (floor + (1.0 - floor) * coeff)


def param_groups(model, weight_decay):
    """AdamW groups: decay matrices / conv kernels; no decay for norms, biases and codebooks
    (weight decay would pull codes toward 0, away from the encoder outputs they track)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        if p.dim() >= 2 and not getattr(p, '_no_weight_decay', False):
            decay.append(p)
        else:
            no_decay.append(p)
    return [{'params': decay, 'weight_decay': weight_decay},
            {'params': no_decay, 'weight_decay': 0.0}]


def count_params(module, trainable_only=False):
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)


def set_learning_rate(optimizer, rate):
    """Every parameter group at `rate`, times the group's 'lr_mult' where it has one."""
    for group in optimizer.param_groups:
        group['lr'] = rate * group.get('lr_mult', 1.0)


def rng_state():
    """The global RNG states as tensors and plain Python values only, so that a checkpoint loads with
    torch.load(weights_only=True): numpy's state tuple holds an ndarray, stored here as a tensor."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    return dict(torch=torch.get_rng_state(), python=random.getstate(),
                numpy=dict(name=name, keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                           has_gauss=int(has_gauss), gauss=float(gauss)),
                cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None)


def set_rng_state(state):
    torch.set_rng_state(state['torch'])
    random.setstate(state['python'])
    n = state['numpy']
    np.random.set_state((n['name'], n['keys'].numpy().astype(np.uint32), n['pos'], n['has_gauss'], n['gauss']))
    if state.get('cuda') is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


# why a write failed, for the errors a user can fix (space, permission); any other error is raised
WRITE_ERRORS = {errno.ENOSPC: 'no space left on the device', errno.EDQUOT: 'disk quota exceeded',
                errno.EACCES: 'permission denied', errno.EPERM: 'permission denied',
                errno.EROFS: 'read-only file system'}


def atomic_write(path, write):
    """Every file the project writes goes through here: write(tmp) fills a hidden temp file
    (.NAME.tmpPID) in the same folder, which then replaces `path` in one rename, so a crash or a
    kill leaves either the old file or the new one, never a torn one. When write fails the temp
    file is removed and the old file stays as it was; lack of space or permission ends the program
    with one line naming the path. Writers write through Python file objects, so a full disk raises
    OSError(ENOSPC) (torch.save(obj, path) would only say 'unexpected pos ...')."""
    folder, name = os.path.split(os.path.abspath(path))
    tmp = os.path.join(folder, f'.{name}.tmp{os.getpid()}')
    try:
        os.makedirs(folder, exist_ok=True)
        write(tmp)
        os.replace(tmp, path)
    except Exception as e:
        cause = e  # torch.save reports a failed write of its file as a RuntimeError raised while handling it
        while cause is not None and getattr(cause, 'errno', None) not in WRITE_ERRORS:
            cause = cause.__cause__ or cause.__context__
        if cause is None:
            raise
        sys.exit(f"error: cannot write '{path}': {WRITE_ERRORS[cause.errno]} (nothing was replaced; "
                 f"the temp file is removed)")
    finally:
        with contextlib.suppress(OSError):
            os.remove(tmp)


def write_json(obj, path):
    def write(tmp):
        with open(tmp, 'w') as f:
            json.dump(obj, f, indent=1)
    atomic_write(path, write)


# What each stage saves, named in the messages of loaders that get the wrong kind of file.
CHECKPOINT_KINDS = {'tokenizer': 'a stage-1 tokenizer checkpoint (tokenizer.py)',
                    'generator': 'a stage-2 generator checkpoint (generator.py)',
                    'decoder': 'a stage-3 decoder checkpoint (finetune_decoder.py)'}
CHECKPOINT_FORMAT = 3  # 3: tensors and plain values only (weights_only loads); paths relative + absolute


def load_checkpoint(path, what='checkpoint', kind=None):
    """torch.load of a checkpoint with errors that name the file: missing, unreadable (truncated,
    not a checkpoint) or, when `kind` is given, of another kind than the loader expects.
    Always weights_only=True: unpickling may only build tensors and plain Python values, so a
    checkpoint from anywhere cannot run code here (a pickle that names any other callable, e.g. via
    __reduce__, is refused before anything of it runs)."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{what} not found: '{path}' (train the earlier stage first, "
                                f"or point the *_ckpt setting at an existing ckpt.pt)")
    try:
        ckpt = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        if 'weights only' not in str(e).lower():
            raise ValueError(f"cannot read {what} '{path}': truncated or not a checkpoint "
                             f"(UnpicklingError: {str(e).splitlines()[0] if str(e) else ''})") from None
        found = re.search(r'GLOBAL ([\w.]+)', str(e))
        raise ValueError(f"refusing to load {what} '{path}': it holds Python objects other than tensors and "
                         f"plain values ({found[1] if found else 'an unsupported object'}), which could run code "
                         f"when unpickled; nothing of it was run (checkpoints of format < {CHECKPOINT_FORMAT} "
                         f"stored numpy objects: retrain those)") from None
    except Exception as e:  # a torn or foreign file: torch's own message names no file
        raise ValueError(f"cannot read {what} '{path}': truncated or not a checkpoint "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
    if kind is not None and (not isinstance(ckpt, dict) or ckpt.get('kind') != kind):
        found = CHECKPOINT_KINDS.get(ckpt.get('kind') if isinstance(ckpt, dict) else None,
                                     'not a checkpoint of this version of the project')
        raise ValueError(f"'{path}' is {found}; {what} expects {CHECKPOINT_KINDS[kind]}")
    return ckpt


def weights_id(state_dict):
    """A short fingerprint of a model's weights (sha256 over names, dtypes, shapes and bytes, in key
    order): later stages record the id of the tokenizer (and generator) they were made for, and the
    chain refuses a checkpoint made for other weights, even of the same architecture."""
    h = hashlib.sha256()
    for name, t in state_dict.items():
        t = t.detach().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def path_record(target, ckpt_path):
    """How a checkpoint records another file it depends on (e.g. the generator's tokenizer): the path
    relative to the checkpoint's own folder, tried first, so a copied or moved project keeps working,
    and the absolute path as it was, tried next."""
    target = os.path.abspath(target)
    return dict(rel=os.path.relpath(target, os.path.dirname(os.path.abspath(ckpt_path))), abs=target)


def resolve_record(record, ckpt_path):
    """The inverse of path_record: the recorded file beside ckpt_path (relative path) if it exists, else
    the absolute path as recorded. A plain string (checkpoints of format 2) is an absolute path, or one
    relative to ckpt_path's folder."""
    here = os.path.dirname(os.path.abspath(ckpt_path))
    if isinstance(record, str):
        record = dict(rel=record, abs=record)
    beside = os.path.normpath(os.path.join(here, record['rel']))
    return beside if os.path.isfile(beside) else record['abs']


def _get_state(obj):
    if isinstance(obj, torch.Generator):
        return obj.get_state()
    return unwrap(obj).state_dict()


def save_state(path, state, kind, **values):
    """One checkpoint from the state a stage script declares once: state = {name: object with
    state_dict() (models, optimizers, the data sampler) or a torch.Generator}, saved under the same
    names, plus the global RNG states and the plain values (step, minutes, model_args, config, ...)."""
    ckpt = {name: _get_state(obj) for name, obj in state.items()}
    clash = set(ckpt) & (set(values) | {'rng', 'kind', 'format'})
    if clash:
        raise ValueError(f"save_state: {sorted(clash)} named both as state and as a value")
    ckpt.update(values, rng=rng_state(), kind=kind, format=CHECKPOINT_FORMAT)

    def write(tmp):
        with open(tmp, 'wb') as f:  # a Python file, so a full disk is reported as such (atomic_write)
            torch.save(ckpt, f)
    atomic_write(path, write)


def checkpoint_to_resume(out_dir, init_from, kind, **expected):
    """-> (out_dir/ckpt.pt, its contents for init_from='resume' else None). A resumed checkpoint
    must be of this stage's kind and made with the same model: every value of `expected` (e.g.
    model_args=...) must equal the saved one, else the run stops before any work with one line."""
    path = os.path.join(out_dir, 'ckpt.pt')
    if init_from != 'resume':
        return path, None
    try:
        ckpt = load_checkpoint(path, 'the checkpoint to resume', kind)
    except (FileNotFoundError, ValueError) as e:
        fail(str(e))
    for key, value in expected.items():
        if ckpt.get(key) != value:
            fail(f"resume: model settings differ from {path}: {key} saved {ckpt.get(key)}, now {value}")
    saved, world = ckpt.get('world_size', 1), ddp_world()[1]
    if saved != world:  # each rank resumes its own data and RNG streams (rank_states)
        fail(f"resume: {path} was saved by {saved} process(es), this run has {world}: resume with the "
             f"same number of processes (torchrun --nnodes x --nproc_per_node)")
    return path, ckpt


def load_state(ckpt, state):
    """The inverse of save_state: every declared object gets its saved state and the global RNGs
    are restored; -> (step, minutes) at which the checkpoint was saved."""
    missing = [name for name in state if name not in ckpt]
    if missing:
        raise ValueError(f"checkpoint has no {missing}: it was not saved by this stage script")
    for name, obj in state.items():
        if isinstance(obj, torch.Generator):
            obj.set_state(ckpt[name])
        else:
            unwrap(obj).load_state_dict(ckpt[name])
    set_rng_state(ckpt['rng'])
    rank, world = ddp_world()
    if world > 1:  # under DDP the top-level streams are rank 0's: each rank takes its own (rank_states)
        for name, saved in ckpt['ranks'][rank].items():
            if name == 'rng':
                set_rng_state(saved)
            elif isinstance(state[name], torch.Generator):
                state[name].set_state(saved)
            else:
                state[name].load_state_dict(saved)
    return ckpt['step'], ckpt['minutes']


def check_before_save(step, log, state, metrics, saved_metrics, collapse_db):
    """The guard in front of every checkpoint write: a checkpoint in out_dir is never replaced by
    weights that are not finite, or whose evaluation collapsed: PSNR-Y more than collapse_db below that
    of the checkpoint it would replace (saved_metrics; None for the first save of a run). Both end the
    run with one line, the checkpoint on disk unchanged. A diverged update can pass stop_if_diverged
    (its gradient was finite) and still ruin the weights it makes, e.g. at a far too high learning rate."""
    bad = [name for name, obj in state.items() if isinstance(obj, torch.nn.Module)
           and not all(bool(t.isfinite().all()) for t in unwrap(obj).state_dict().values() if t.is_floating_point())]
    key = next((k for k in ('r_psnr_y', 'psnr_y', 'x4_psnr_y') if k in metrics), None)
    now, before = (metrics.get(key), (saved_metrics or {}).get(key)) if key else (None, None)
    if bad:
        why = f"the weights of {', '.join(bad)} are not finite"
    elif collapse_db > 0 and now is not None and before is not None and not now >= before - collapse_db:
        why = (f"its evaluation collapsed: {key} {now:.2f} against {before:.2f} of the saved checkpoint, more "
               f"than collapse_db={collapse_db} lower")
    else:
        return
    log(f"not saved at step {step}: {why}")
    sys.exit(f"error: training diverged by step {step} ({why}); "
             f"the checkpoint in out_dir was not replaced: lower the learning rate and resume with --init_from=resume")


def stop_if_diverged(step, log, grad_norm, **loss_parts):
    """The divergence guard, called after backward and before the optimizer step: a non-finite
    gradient norm or loss part (of any rank, under DDP) ends the run here, naming the step and the
    parts, so the diverged weights are never taken, evaluated or saved: the last checkpoint in
    out_dir stays as it was.
    One host sync per step (a stack of scalars)."""
    dev = torch.as_tensor(grad_norm).device
    values = torch.stack([torch.as_tensor(v, device=dev).detach().float().reshape(())
                          for v in (grad_norm, *loss_parts.values())])   # on the training device
    values = mean_over_ranks(values)  # DDP: every rank sees a non-finite part of any rank and stops
    if bool(values.isfinite().all()):  # the one sync
        return
    parts = ' '.join(f"{k} {v:.4g}" for k, v in zip(['grad_norm', *loss_parts], values.tolist()))
    log(f"diverged at step {step}: {parts}")
    sys.exit(f"error: training diverged at step {step} (a loss part or the gradient norm is not finite: "
             f"{parts}); nothing was saved after the last checkpoint: lower the learning rate and resume "
             f"with --init_from=resume")


@torch.no_grad()
def batched(fn, *xs, device='cpu', bs=4):
    """Run fn on slices of bs rows of the tensors xs (moved to device); fn returns a tuple/list of
    tensors, which are concatenated over the slices: a whole validation set without OOM."""
    return [torch.cat(o) for o in zip(*[fn(*(x[i:i + bs].to(device) for x in xs))
                                         for i in range(0, len(xs[0]), bs)])]


def unwrap(model):
    """The module without torch.compile's wrapper, so saved keys never get an `_orig_mod.` prefix."""
    return getattr(model, '_orig_mod', model)


def _pid_alive(pid):
    """Whether a process with this PID runs here. Our own PID does not count: a file that holds it
    was left by an earlier process that had the same PID (a restarted container)."""
    if not pid or pid <= 0 or pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)  # signal 0 sends nothing: it only checks that the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, owned by another user
        return True
    return True


def _lock_holder(lock):
    with contextlib.suppress(OSError, ValueError, IndexError):
        with open(lock) as f:
            return int(f.read().split()[0])
    return None


def _release_lock(lock, created):
    if _lock_holder(lock) == os.getpid():
        with contextlib.suppress(OSError):
            os.remove(lock)
            if created:  # a run that failed before writing anything leaves no empty folder behind
                os.rmdir(os.path.dirname(lock))  # only succeeds if empty


def _exit_on_sigterm(signum, frame):
    print("error: stopped by SIGTERM (out_dir keeps its last checkpoint, if one was saved: resume with "
          "--init_from=resume)", file=sys.stderr, flush=True)
    sys.exit(128 + signum)  # unwinds like an error: temp files and the lock are removed on the way


def lock_out_dir(out_dir):
    """Make out_dir this process's own before any work; -> notes for the log.
    - A lock file out_dir/lock holding this process's PID refuses a second run on the same folder at
      once, naming the PID that holds it; a lock whose process no longer runs (a kill -9) is taken over.
    - Temp files of writers that were killed (.NAME.tmpPID, see atomic_write) are removed.
    The lock is removed at exit (normal end, error, exception, Ctrl-C or SIGTERM), and with it the
    folder when this run created it and wrote nothing into it."""
    notes, lock = [], os.path.join(out_dir, 'lock')
    tmp = os.path.join(out_dir, f'.lock.tmp{os.getpid()}')
    created = not os.path.isdir(out_dir)
    try:
        os.makedirs(out_dir, exist_ok=True)
        with open(tmp, 'w') as f:
            f.write(f'{os.getpid()}\n')
    except OSError as e:  # e.g. a path under a file, no permission, a full disk
        with contextlib.suppress(OSError):
            os.remove(tmp)
            if created:
                os.rmdir(out_dir)
        fail(f"cannot create or write in out_dir '{out_dir}': {e.strerror}")
    try:
        while True:
            try:
                os.link(tmp, lock)  # atomic, fails if a lock exists; never a lock without its PID
                break
            except FileExistsError:
                holder = _lock_holder(lock)
                if _pid_alive(holder):
                    sys.exit(f"error: out_dir '{out_dir}' is in use by another run (PID {holder} holds "
                             f"{lock}): wait for it to end or choose another --out_dir (delete the lock "
                             f"only if PID {holder} is not a run of this project)")
                with contextlib.suppress(FileNotFoundError):
                    os.remove(lock)
                notes.append(f"took over the lock {lock} of PID {holder}, which no longer runs")
    finally:
        os.remove(tmp)
    atexit.register(_release_lock, lock, created)
    if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _exit_on_sigterm)  # Ctrl-C already unwinds (KeyboardInterrupt)
    stale = [f for f in sorted(os.listdir(out_dir))
             if (m := re.fullmatch(r'\..+\.tmp(\d+)', f)) and not _pid_alive(int(m[1]))]
    for f in stale:
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(out_dir, f))
    if stale:
        notes.append(f"removed {len(stale)} temp file(s) of killed runs: {' '.join(stale)}")
    return notes


def claim_out_dir(out_dir, init_from, overwrite):
    """lock_out_dir for a training stage, and a scratch run never replaces the ckpt.pt of an earlier
    run unless overwrite; -> notes for the log."""
    notes = lock_out_dir(out_dir)
    ckpt = os.path.join(out_dir, 'ckpt.pt')
    if init_from == 'scratch' and os.path.exists(ckpt):
        if not overwrite:
            fail(f"{ckpt} holds an earlier run, which a scratch run would replace: continue it with "
                 f"--init_from=resume, choose another --out_dir, or pass --overwrite=True")
        notes.append(f"overwrite=True: {ckpt} of an earlier run is replaced at the first checkpoint")
    return notes


class Logger:
    """Prints and appends to out_dir/log.txt, never truncating it (a resumed run, or a new one with
    --overwrite=True, adds to the log of the runs before). Each run's first lines record the date,
    the command, the config and `notes` (claim_out_dir's)."""

    def __init__(self, out_dir, config, notes=()):
        os.makedirs(out_dir, exist_ok=True)
        self.path = os.path.join(out_dir, 'log.txt')
        try:  # never through a link: the log stays inside out_dir
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | getattr(os, 'O_NOFOLLOW', 0), 0o644)
        except OSError as e:
            why = 'it is a symbolic link (the log is only written inside out_dir)' if e.errno == errno.ELOOP \
                else WRITE_ERRORS.get(e.errno, e.strerror)
            sys.exit(f"error: cannot write the log '{self.path}': {why}")
        self.f = os.fdopen(fd, 'a')
        self(f"run started {time.strftime('%Y-%m-%d %H:%M:%S')}, PID {os.getpid()}")
        self('command: ' + ' '.join([os.path.basename(sys.executable)] + sys.argv))
        self('config: ' + json.dumps(config, sort_keys=True, default=str))
        for note in notes:
            self(note)

    def __call__(self, msg):
        print(msg, flush=True)
        try:
            self.f.write(msg + '\n')
            self.f.flush()
        except OSError as e:  # a full disk: one line, the checkpoints already written stay as they are
            if e.errno not in WRITE_ERRORS:
                raise
            self.f = open(os.devnull, 'w')  # nothing left to flush at exit
            sys.exit(f"error: cannot write the log '{self.path}': {WRITE_ERRORS[e.errno]} (the checkpoint in "
                     f"out_dir is the last one saved: free space and resume with --init_from=resume)")


def save_grid(rows, path, labels=None):
    """rows: list of (N,3,H,W) tensors in [0,1] (any H,W, resized by nearest to the first row's
    size so pixels stay visible); writes one PNG with the images of row r on line r."""
    H, W = rows[0].shape[-2:]
    rows = [F.interpolate(r.float().clamp(0, 1), size=(H, W), mode='nearest') for r in rows]
    pad = 2
    N = max(r.shape[0] for r in rows)
    canvas = torch.ones(3, len(rows) * (H + pad) + pad, N * (W + pad) + pad)
    for i, r in enumerate(rows):
        for j in range(r.shape[0]):
            y, x = pad + i * (H + pad), pad + j * (W + pad)
            canvas[:, y:y + H, x:x + W] = r[j].cpu()
    save_png(canvas, path)
    if labels:  # the row legend goes next to the picture, readable without an image viewer
        def write(tmp):
            with open(tmp, 'w') as f:
                f.write('rows, top to bottom: ' + ', '.join(labels) + '\n')
        atomic_write(os.path.splitext(path)[0] + '.txt', write)


def to_uint8(img):
    """(..., 3, H, W) float tensor in [0, 1] -> (..., H, W, 3) uint8 numpy array on the host: the
    one rounding every saved image goes through."""
    img = (img.detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return img.movedim(-3, -1).cpu().numpy()


def save_png(img, path):
    """PNG of a (3, H, W) float tensor in [0, 1] or an (H, W, 3) uint8 array, written atomically."""
    if torch.is_tensor(img):
        img = to_uint8(img)
    atomic_write(path, lambda tmp: Image.fromarray(img).save(tmp, format='PNG'))


def save_curves(history, path):
    """curves.png: one small panel per logged number against the step: the training loss parts and
    the learning rate (history['train'], every log_interval) and the evaluation metrics
    (history['eval']); each panel spans its series' min..max, printed at the left. PIL only."""
    series = []
    for kind in ('train', 'eval'):
        for key in dict.fromkeys(k for h in history[kind] for k in h if k != 'step'):  # in first-seen order
            pts = [(h['step'], h[key]) for h in history[kind]
                   if isinstance(h.get(key), (int, float)) and math.isfinite(h[key])]
            if pts:
                series.append((f"{kind} {key}", pts))
    if not series:
        return
    cols, W, H = 4, 260, 150                    # panels per row, panel size in pixels
    left, top, right, bottom = 52, 16, 10, 18   # margins inside a panel
    img = Image.new('RGB', (cols * W, -(-len(series) // cols) * H), 'white')
    draw = ImageDraw.Draw(img)
    s_max = max(max(s for s, _ in pts) for _, pts in series) or 1  # one step axis for every panel
    for i, (name, pts) in enumerate(series):
        x0, y0 = (i % cols) * W + left, (i // cols) * H + top
        x1, y1 = (i % cols + 1) * W - right, (i // cols + 1) * H - bottom
        lo, hi = min(v for _, v in pts), max(v for _, v in pts)
        pad = (hi - lo) * 0.05 or abs(hi) * 0.05 or 1.0
        lo, hi = lo - pad, hi + pad
        xy = [(x0 + (x1 - x0) * s / s_max, y1 - (y1 - y0) * (v - lo) / (hi - lo)) for s, v in pts]
        draw.rectangle([x0, y0, x1, y1], outline=(190, 190, 190))
        draw.text((x0, y0 - 14), name, fill='black')
        draw.text((x0 - left + 2, y0), f"{hi - pad:.3g}", fill=(90, 90, 90))
        draw.text((x0 - left + 2, y1 - 10), f"{lo + pad:.3g}", fill=(90, 90, 90))
        draw.text((x0, y1 + 2), '0', fill=(90, 90, 90))
        draw.text(((x0 + x1) / 2 - 12, y1 + 2), 'step', fill=(90, 90, 90))
        draw.text((x1 - 6 * len(str(s_max)), y1 + 2), str(s_max), fill=(90, 90, 90))
        colour = (200, 60, 30) if name.startswith('eval') else (30, 90, 200)
        if len(xy) > 1:
            draw.line(xy, fill=colour, width=2)
        for x, y in xy if name.startswith('eval') or len(xy) == 1 else ():
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=colour)
    save_png(np.asarray(img), path)


def summary(title, values):
    """The grep-able block every stage ends with: `key: value` lines between two rulers."""
    lines = [f"---- {title} summary ----"]
    for k, v in values.items():
        lines.append(f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}")
    lines.append('-' * len(lines[0]))
    return '\n'.join(lines)


class Timer:
    def __init__(self):
        self.t0 = time.time()

    def minutes(self):
        return (time.time() - self.t0) / 60


def time_left(step, max_iters, minutes, max_minutes, start_step=0, start_minutes=0.0):
    """'left 3.2 min' for a stage's periodic log line: the time until whichever ends the run first,
    the wall-clock budget (max_minutes; 0 = none) or max_iters at this run's pace so far (steps since
    start_step over the minutes since start_minutes, evaluations included; a resumed run counts from
    its resume)."""
    left = [max_minutes - minutes] if max_minutes > 0 else []
    if step > start_step:
        left.append((minutes - start_minutes) / (step - start_step) * max(max_iters - step, 0))
    return f"left {max(min(left), 0.0):.1f} min" if left else "left ? min"


# Dense bf16 tensor-core peak by GPU name, from the vendors' datasheets (no sparsity). MFU is only
# reported for GPUs listed here, never against an assumed A100.
PEAK_BF16_FLOPS = [('H200', 989e12), ('H100 PCIe', 756e12), ('H100', 989e12), ('A100', 312e12),
                   ('L40S', 362e12), ('A10G', 70e12), ('L4', 121e12)]


def peak_flops(device):
    if not str(device).startswith('cuda'):
        return None
    name = torch.cuda.get_device_name()
    return next((f for key, f in PEAK_BF16_FLOPS if key in name), None)


def flops_per_image(model_args, H, W):
    """Rough training FLOPs (forward + backward) of encoder + decoder for one H x W image, for MFU,
    from a tokenizer's model_args (the fields of model.TokenizerConfig).
    Per transformer with T tokens, L layers, width w, N matmul params:  6*N*T + 12*L*w*T^2
    (PaLM appendix B: 6N per token for the weights, 12*L*w*T per token for QK^T and AV).
    N counts blocks (4w^2 attention + 3*w*hidden SwiGLU) and the patch / latent projections;
    the decoder's conv head adds 6 * (its conv weights) per pixel of each level;
    norms, the VQ lookup (2*K*C per token, no backward), the discriminator and LPIPS are left out."""
    c = types.SimpleNamespace(**model_args)
    T = (H // c.patch) * (W // c.patch)
    pix = 3 * c.patch ** 2
    conv_head = getattr(c, 'dec_head', 'linear') == 'conv'
    out_pix = 3 if conv_head else 3 * (2 * c.patch) ** 2 if c.dec_overlap else pix  # conv: to_rgb
    total = 0.0
    for width, depth, io in ((c.enc_width, c.enc_depth, pix + c.latent_dim),
                             (c.dec_width, c.dec_depth, c.latent_dim + out_pix)):
        hidden = int(2 * c.mlp_ratio * width / 3)  # the SwiGLU width of model.Block
        n = depth * (4 * width ** 2 + 3 * width * hidden) + io * width
        total += 6 * n * T + 12 * depth * width * T ** 2
    if conv_head:  # ConvUpsampler: per level, pixels x 9 x weights
        n_up = c.patch.bit_length() - 1
        chs = [min(c.dec_conv_ch << (n_up - i), c.dec_width) for i in range(n_up + 1)]
        for i, ch in enumerate(chs):
            ch_in = c.dec_width if i == 0 else chs[i - 1]   # conv_in, or the previous level's up conv
            conv = 9 * (ch_in * ch + 2 * c.dec_conv_blocks * ch * ch + (3 * ch if i == n_up else 0))
            total += 6 * conv * (H * W) // (c.patch >> i) ** 2
    return total
