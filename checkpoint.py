"""What a run keeps on disk, and how it is read back: checkpoints written atomically (ckpt.pt, best.pt; a
train.Run saved and restored whole: save_run, restore_run),
the RNG state that makes a resumed run repeat the uninterrupted one, log.jsonl cut back to the checkpoint,
JSON that stays valid JSON (NaN -> null), and the refusal to write into a folder holding another run.

A fault in the user's files is a UserError (one message, no traceback), raised before anything is written.
"""
import dataclasses
import json
import math
import os
import pickle
import platform
import random
import re
import shlex
import subprocess
import time

import numpy as np
import torch

from config import UserError
from ddp import barrier

RUN_FILES = re.compile(r'(config\.json|log\.jsonl|results\.json|ckpt\.pt|best\.pt|curves\.png|genotype\.json'
                       r'|vis_epoch\d+\.png)$')


def json_safe(x):
    """x with every NaN / inf float replaced by None, so the files written are valid JSON (null)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    return [json_safe(v) for v in x] if isinstance(x, (list, tuple)) else x


def append_record(path, record):
    """One JSON line appended to a log (log.jsonl)."""
    with open(path, 'a') as f:
        f.write(json.dumps(json_safe(record), allow_nan=False) + '\n')


def write_atomically(path, write):
    """write(temporary path), then os.replace onto `path`: a crash mid-write leaves the previous file whole,
    never part of one, and no temporary file stays behind."""
    tmp = path + '.tmp'
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_json(path, obj):
    """JSON (config.json, results.json, eval.json, genotype.json), atomically."""
    write_atomically(path, lambda tmp: _write_text(tmp, json.dumps(json_safe(obj), indent=1, allow_nan=False)))


def _write_text(path, text):
    with open(path, 'w') as f:
        f.write(text)


def save_checkpoint(path, state):
    write_atomically(path, lambda tmp: torch.save(state, tmp))


def pickled_object(error):
    """What torch.load(weights_only=True) refused to unpickle (e.g. 'posix.system'), None for a mere unreadable file."""
    words = str(error).split('unsupported GLOBAL ')
    return words[1].split()[0] if len(words) > 1 else None


def load_checkpoint(path, device):
    """A checkpoint of this project (ckpt.pt / best.pt), or a UserError saying what the file is not. Read with
    weights_only=True: tensors and plain data only, so a file holding pickled code is refused, never run."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except pickle.UnpicklingError as e:
        found = pickled_object(e)
        if not found:
            raise UserError(f"{path} is not a readable checkpoint (UnpicklingError)") from None
        raise UserError(f"{path} is refused: it holds a pickled Python object ({found}) besides tensors and plain "
                        f"data, which could run code when loaded; this project's checkpoints hold none") from None
    except Exception as e:                    # truncated, empty, not a torch file
        raise UserError(f"{path} is not a readable checkpoint ({type(e).__name__}: {str(e)[:200]})") from None
    if not isinstance(ckpt, dict) or not {'model', 'config'} <= set(ckpt):
        raise UserError(f"{path} is not a checkpoint of train.py (no 'model' and 'config' in it); an ImageNet "
                        f"backbone file goes to --pretrained")
    return ckpt


def load_weights(net, ckpt, path):
    try:
        net.load_state_dict(ckpt['model'])
    except RuntimeError as e:
        was = {k: ckpt['config'].get(k) for k in ('dataset', 'model', 'backbone', 'tasks', 'scale')}
        raise UserError(f"{path} does not fit this model: it holds {was}; "
                        f"{str(e).splitlines()[1].strip() if len(str(e).splitlines()) > 1 else e}") from None


def check_resume(cfg, ckpt, path, resumable):
    """Resume continues the run of the checkpoint: a config differing in a key not in `resumable` is refused."""
    changed = {k: (ckpt['config'].get(k), v) for k, v in cfg.items()
               if k not in resumable and ckpt['config'].get(k) != v}
    if changed:
        lines = ', '.join(f"{k}: run {a!r}, now {b!r}" for k, (a, b) in changed.items())
        raise UserError(f"resume: this config differs from the run in {path} ({lines}). Resume with the run's "
                        f"own config (its config.json), or start a new run with another --out_dir")
    if 'progress' not in ckpt:
        raise UserError(f"{path} holds weights only (best.pt); resume needs the run's ckpt.pt")


def check_out_dir(cfg):
    """A new run refuses a folder holding another run's files, so nothing is overwritten or mixed."""
    out_dir = cfg['out_dir']
    if cfg['resume'] or cfg['eval_only'] or not os.path.isdir(out_dir):
        return
    found = sorted(f for f in os.listdir(out_dir) if RUN_FILES.match(f))
    if found:
        how = "--resume=True continues it" if 'ckpt.pt' in found else "its ckpt.pt is gone, it cannot be resumed"
        raise UserError(f"{out_dir} holds another run's files ({', '.join(found[:4])}{', ...' * (len(found) > 4)}): "
                        f"{how}; or pass another --out_dir (or delete the folder) to start over")


def cut_log(path, size):
    """Resume: records written after the checkpoint will be written again; drop them."""
    if os.path.exists(path) and os.path.getsize(path) > size:
        with open(path, 'r+b') as f:
            f.truncate(size)


def rng_state(device):
    """The RNG states in types torch's safe loader reads (numpy's key array as an int64 tensor)."""
    name, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {'torch': torch.get_rng_state(), 'numpy': [name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                      gauss], 'python': random.getstate()}
    if device.type == 'cuda':
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state['torch'].cpu())
    name, keys, pos, has_gauss, gauss = state['numpy']
    np.random.set_state((name, keys.cpu().numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(state['python'])
    if device.type == 'cuda' and 'cuda' in state:
        torch.cuda.set_rng_state_all([s.cpu() for s in state['cuda']])


def versions(device, world):
    import timm
    import torchvision
    return {'python': platform.python_version(), 'torch': torch.__version__, 'torchvision': torchvision.__version__,
            'timm': timm.__version__, 'numpy': np.__version__, 'cuda': torch.version.cuda,
            'device': torch.cuda.get_device_name(device) if device.type == 'cuda'
            else (platform.processor() or platform.machine()), 'world_size': world, 'threads': torch.get_num_threads()}


@dataclasses.dataclass
class Progress:
    """Where a run stands: `epoch` epochs done plus `batches_done` steps of the next (`step` in all), its best
    and last evaluation records, the seconds trained and the size of log.jsonl at the last checkpoint."""
    epoch: int = 0
    batches_done: int = 0
    step: int = 0
    best: dict | None = None
    last: dict | None = None
    seconds: float = 0.0
    log_bytes: int = 0


def save_run(run):
    """ckpt.pt of a train.Run (rank 0 writes, every rank waits): weights, optimisers, schedule, its Progress, the
    RNG states and config, everything a resume needs to repeat the uninterrupted run."""
    p = run.progress
    p.seconds = run.timing['before'] + time.time() - run.timing['start']
    if run.master:
        log = run.path('log.jsonl')
        p.log_bytes = os.path.getsize(log) if os.path.exists(log) else 0
        save_checkpoint(run.path('ckpt.pt'), {
            'model': run.raw_model.state_dict(), 'optimizer': run.optimizer.state_dict(),
            'scheduler': run.scheduler.state_dict(), 'progress': dataclasses.asdict(p), 'rng': rng_state(run.device),
            'config': dict(run.cfg), 'input_size': list(run.val_set.size),
            'own_optimizer': run.own_optimizer.state_dict() if run.own_optimizer else None})
    barrier()


def save_best(run, record):
    """best.pt (rank 0): the weights of the evaluation `record`, with the config and input size predict.py needs."""
    if run.master:
        save_checkpoint(run.path('best.pt'), {'model': run.raw_model.state_dict(), 'config': dict(run.cfg),
                                              'eval': record, 'input_size': list(run.val_set.size)})


def restore_run(run, ckpt):
    """A train.Run as save_run left it; log.jsonl is cut back to the checkpoint (what comes after is redone)."""
    run.raw_model.load_state_dict(ckpt['model'])
    run.optimizer.load_state_dict(ckpt['optimizer'])
    if run.own_optimizer:
        run.own_optimizer.load_state_dict(ckpt['own_optimizer'])
    run.scheduler.load_state_dict(ckpt['scheduler'])
    run.progress = Progress(**ckpt['progress'])
    run.timing['before'], run.timing['first_step'] = run.progress.seconds, run.progress.step
    set_rng_state(ckpt['rng'], run.device)
    if run.master:
        cut_log(run.path('log.jsonl'), run.progress.log_bytes)


def results_record(run):
    """results.json of a finished train.Run: its final and best evaluations, delta_m reference, size, time, the
    software it ran on and its config."""
    p, cfg = run.progress, run.cfg
    return {'model': cfg['model'], 'dataset': cfg['dataset'], 'backbone': cfg['backbone'], 'seed': cfg['seed'],
            'epochs': run.epochs, 'steps': p.step, 'params': sum(q.numel() for q in run.raw_model.parameters()),
            'final': {k: v for k, v in p.last.items() if k != 'type'},
            'best': {k: v for k, v in p.best.items() if k not in ('type', 'score')},
            'reference': {'source': run.reference_source, 'values': run.reference},
            'train_time_s': run.timing['before'] + time.time() - run.timing['start'],
            'versions': versions(run.device, run.world), **provenance(run.argv), 'config': dict(cfg)}


def git_state():
    """{'commit', 'dirty'} of the checkout this code runs from (dirty: tracked files differ from the commit);
    None, None outside a git checkout or without git."""
    here = os.path.dirname(os.path.abspath(__file__))
    try:
        commit, status = (subprocess.run(['git', '-C', here, *args], capture_output=True, text=True, timeout=30)
                          for args in (['rev-parse', 'HEAD'], ['status', '--porcelain', '--untracked-files=no']))
    except (OSError, subprocess.SubprocessError):
        return {'commit': None, 'dirty': None}
    if commit.returncode or status.returncode:
        return {'commit': None, 'dirty': None}
    return {'commit': commit.stdout.strip(), 'dirty': bool(status.stdout.strip())}


def provenance(argv):
    """Where a result comes from: the code's git state, the command line (train.py's arguments; a torchrun
    launcher is not visible from inside) and its working directory, which relative paths in it refer to."""
    return {'git': git_state(), 'command': shlex.join(['python', 'train.py', *argv]), 'cwd': os.getcwd()}
