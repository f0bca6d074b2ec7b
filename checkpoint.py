"""What a run keeps on disk, and how it is read back: checkpoints written atomically (ckpt.pt, best.pt),
the RNG state that makes a resumed run repeat the uninterrupted one, log.jsonl cut back to the checkpoint,
JSON that stays valid JSON (NaN -> null), the refusal to write into a folder holding another run, and the
delta_m reference read from an STL run's results.json (or the papers' STL numbers).

A fault in the user's files is a UserError (one message, no traceback), raised before anything is written.
"""
import json
import math
import os
import platform
import random
import re

import numpy as np
import torch

from config import UserError
from metrics import STL_REFERENCE, gain_metrics

RUN_FILES = re.compile(r'(config\.json|log\.jsonl|results\.json|ckpt\.pt|best\.pt|curves\.png|genotype\.json'
                       r'|vis_epoch\d+\.png)$')


def json_safe(x):
    """x with every NaN / inf float replaced by None, so the files written are valid JSON (null)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    return [json_safe(v) for v in x] if isinstance(x, (list, tuple)) else x


def write_json(path, obj):
    with open(path, 'w') as f:
        json.dump(json_safe(obj), f, indent=1, allow_nan=False)


def save_checkpoint(path, state):
    """Write to path + '.tmp', then os.replace: a crash mid-write never leaves a truncated file."""
    tmp = path + '.tmp'
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def load_checkpoint(path, device):
    """A checkpoint of this project (ckpt.pt / best.pt), or a UserError saying what the file is not."""
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path}")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=False)
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
    state = {'torch': torch.get_rng_state(), 'numpy': np.random.get_state(), 'python': random.getstate()}
    if device.type == 'cuda':
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state['torch'].cpu())
    np.random.set_state(state['numpy'])
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


def load_reference(cfg):
    """The delta_m baseline: ({task: metric}, where from), or (None, why not and what to do). The papers'
    reference covers the tasks they give (NYUD_MT's edge odsF is not measured here: delta_m leaves it out)."""
    path, key = cfg['stl_results'], (cfg['dataset'], cfg['backbone'])
    if path is None:
        if key in STL_REFERENCE:
            reference = {t: STL_REFERENCE[key][t] for t in cfg['tasks'] if t in STL_REFERENCE[key]}
            if reference:
                return reference, f"the papers' STL {key}"
            return None, f"the papers' STL {key} gives none of the tasks {cfg['tasks']}"
        return None, (f"no paper STL reference for {key}: train `configs/{cfg['dataset']}_stl.py` with the same "
                      f"epochs and seed, then pass --stl_results=<its out_dir>/results.json")
    if os.path.abspath(path) == os.path.abspath(os.path.join(cfg['out_dir'], 'results.json')):
        return None, f"this run is the STL reference: {path} is the other models' delta_m baseline"
    if not os.path.isfile(path):
        return None, (f"the STL results file {path} does not exist (yet): run the STL model with the same "
                      f"recipe first, e.g. `python train.py configs/{cfg['dataset']}_stl.py`")
    try:
        with open(path) as f:
            stl = json.load(f)
        dataset, metrics = stl['config']['dataset'], stl['final']['metrics']
    except (ValueError, KeyError, TypeError) as e:
        raise UserError(f"stl_results={path}: not a results.json of train.py ({type(e).__name__}: {e})") from None
    if dataset != cfg['dataset']:
        raise UserError(f"stl_results={path} is a {dataset} run; this is {cfg['dataset']}")
    if any(t not in metrics for t in cfg['tasks']):
        return None, f"{path} has no results for some of {cfg['tasks']}"
    return {t: metrics[t][gain_metrics(cfg['dataset'])[t][0]] for t in cfg['tasks']}, f"STL run {path}"
