"""Training loop: one command trains and evaluates any model of model.py on any dataset of data.py.

    python train.py configs/nyuv2_ctal_ss.py [--key=value ...]
    torchrun --nproc_per_node=4 train.py configs/nyuv2_ctal_ss.py     # same script, DDP

Configuration (nanoGPT style): the defaults are the plain assignments in the block below; a config file
is python assigning some of those names; then `--key=value` overrides, parsed against the default's
type. The resolved config is printed and saved as out_dir/config.json.

Data flow per step:
  loader (DistributedSampler order, augmentation seeded per sample) -> batch dict of tensors
  -> model(images) -> {task: final (B, K_t, H, W), 'initial': {task: tensor | list of 4 scales}}
  -> loss = sum_t w_t * (L_initial_t + L_final_t)   (metrics.task_loss; MS models: L_initial_t is the
     mean over the 4 scales; stl/mtl have no initial predictions)
  -> per-task losses all-reduced (logging; a NaN on any rank stops every rank) -> backward (DDP
     averages gradients) -> optional clip -> Adam step. The LR scheduler steps once per epoch.
  Ctrl-C / SIGTERM set a flag that the ranks agree on before each step: a checkpoint, then exit.
Every `eval_interval` epochs: metrics.build_meters over the val split (sums all-reduced across ranks),
delta_m against an STL reference, a PNG grid of predictions; then ckpt.pt is written (atomically).

Reproducibility: `batch_size` is the GLOBAL batch. The epoch order is torch.randperm seeded by
seed + epoch (DistributedSampler), and rank r takes every W-th index, so the union of the ranks' j-th
batches is the one-process j-th batch; each sample's augmentation is drawn from an RNG seeded by
(seed, epoch, index), and BatchNorm statistics are synchronised across ranks. So one process and W
processes compute the same step (to float rounding, given equal valid-pixel counts per rank), and a run
resumed from a checkpoint (saved at epoch ends, or mid-epoch on Ctrl-C) repeats the uninterrupted run's
losses exactly on CPU.

Outputs in out_dir: config.json, log.jsonl (one record per log line / evaluation), results.json,
vis_epochNNN.png, ckpt.pt.
"""
import ast
import json
import math
import os
import platform
import random
import signal
import sys
import threading
import time
import warnings
from fractions import Fraction

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
from matplotlib import colormaps
from matplotlib.figure import Figure

from data import DATASET_TASKS, build_dataset
from synthetic import make_synthetic
from baselines import FPM_SOFTMAXES, PAP_AFFINITIES
from ctal import CTAL
from metrics import LOSS_WEIGHTS, NORMALS_LOSSES, STL_REFERENCE, TASK_METRIC, build_meters, delta_m, task_loss
from model import BACKBONES, MODEL_NAMES, build_model

_names_before_defaults = set(globals())
# ------------------------------------------------------------------------------------------ defaults
# data
dataset = 'synthetic'         # a key of data.DATASET_TASKS: nyuv2 | cityscapes | pascal | synthetic
data_root = None              # None = data/<dataset>
tasks = None                  # None = all tasks of the dataset; or e.g. ('semseg', 'depth') / "semseg,depth"
img_size = None               # None = the dataset's own size; PASCAL: the padded input (H, W), default 512x512
augment = True                # random horizontal flip (train split only)
scale_crop = False            # MTAN random scale-crop (NYUv2 / Cityscapes / synthetic)
n_train = 400                 # synthetic only: scenes generated into data_root if absent
n_val = 100
synthetic_size = (96, 128)    # synthetic only: (H, W), multiples of 32
synthetic_seed = 0
# model (model.build_model)
model = 'ctal_ss'             # stl | mtl | concat | padnet | papnet | ctal_ss | mtinet | ctal_ms
backbone = 'hrnet18'          # hrnet18 | swinv2_s
scale = 1 / 4                 # CTAL distillation scale (HRNet): 1/4, 1/6, 1/8 ...
gamma = 0.05
ctal_impl = 'auto'            # auto | dense | linear (same parameters, same numbers)
ctal_fusion = 'shared'        # shared | task
pap_iters = 1
pap_affinity = 'code'         # code (the CTAL authors' PAP-Net) | paper (PAP-Net's text): baselines.pap_affinity
fpm_softmax = 'code'          # code (MTI-Net's code) | paper (MTI-Net Sec. 2.4): baselines.fpm_softmax
hrnet_bn_momentum = 0.01      # the authors' HRNet BN momentum; short runs need 0.1 (see model.build_model)
pretrained = None             # local backbone checkpoint file; None = random init
# optimisation
epochs = 200
batch_size = 8                # global batch (split across DDP ranks)
lr = 1e-4
weight_decay = 1e-4
scheduler = 'cosine'          # cosine | cosine_restarts | none   (stepped once per epoch)
restart_period = None         # cosine_restarts: T_0 in epochs; None = epochs // 3
restart_mult = 2              # cosine_restarts: T_mult
grad_clip = 0.0               # max gradient norm; 0 = off
loss_weights = None           # None = metrics.LOSS_WEIGHTS[dataset]; or {task: weight}
normals_loss = 'cosine'       # cosine (1 - cos, the authors' CNN code) | l1 (their PASCAL transformer code)
max_iters = 0                 # > 0: stop each epoch after this many steps (quick tests)
# evaluation, logging, output
eval_interval = 1             # epochs between evaluations (the last epoch is always evaluated)
log_interval = 20             # steps between log lines
vis_images = 4                # validation images in the PNG grid (0 = none)
stl_results = None            # results.json of an STL run: the delta_m reference (else the papers' STL)
out_dir = None                # None = out/<dataset>_<model>[_<backbone> if not hrnet18]
resume = False                # continue from out_dir/ckpt.pt
dump_grads = None             # debug: path to save the first step's (averaged) gradients to
# system
seed = 0
device = 'auto'               # auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)
num_workers = 0               # DataLoader worker processes
bf16 = False                  # bf16 autocast (CUDA only)
sync_bn = True                # DDP: BatchNorm statistics over the global batch, as one process would
# ------------------------------------------------------------------------------------------------------
DEFAULTS = {k: v for k, v in globals().items() if k not in _names_before_defaults
            and k != '_names_before_defaults'}

SCHEDULERS = ('cosine', 'cosine_restarts', 'none')
CTAL_IMPLS = ('auto', 'dense', 'linear')
CTAL_FUSIONS = ('shared', 'task')


class ConfigError(ValueError):
    """A bad config file, override or value: printed without a traceback."""


class SetupError(RuntimeError):
    """Data / model / checkpoint could not be set up (message from data.py / model.py): no traceback."""


class NonFiniteLoss(RuntimeError):
    """A task's loss became NaN/inf: training stops, the last good checkpoint is kept."""


class Interrupted(Exception):
    """Ctrl-C / SIGTERM: a checkpoint was saved."""


# ------------------------------------------------------------------------------------------ config

def parse_value(key, text, default):
    """A command-line value, parsed against the type of the default (bool: True/False/true/false/1/0)."""
    if isinstance(default, bool):
        if text.lower() in ('true', '1'):
            return True
        if text.lower() in ('false', '0'):
            return False
        raise ConfigError(f"--{key}={text}: expected a boolean (True/False/true/false/1/0)")
    if isinstance(default, int):
        try:
            return int(text)
        except ValueError:
            raise ConfigError(f"--{key}={text}: expected an integer") from None
    if isinstance(default, float):
        try:
            return float(Fraction(text))        # also '1/6'
        except (ValueError, ZeroDivisionError):
            raise ConfigError(f"--{key}={text}: expected a number (e.g. 0.25 or 1/4)") from None
    if isinstance(default, str):
        return text
    try:                                        # None / tuple / dict defaults: a python literal ...
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text                             # ... or a plain string (a path, '64x96'): check_config judges


def read_config_file(path):
    """Execute a config file (plain `name = value` lines) and return the names it assigned."""
    if not os.path.isfile(path):
        raise ConfigError(f"config file {path!r} not found (configs are in configs/, e.g. "
                          f"configs/synthetic_ctal_ss.py)")
    namespace = {}
    with open(path) as f:
        code = compile(f.read(), path, 'exec')
    exec(code, {}, namespace)
    return {k: v for k, v in namespace.items() if not k.startswith('_')}


def unknown_key_error(key, where):
    return ConfigError(f"{where}: unknown key {key!r}. Valid keys: {', '.join(DEFAULTS)}")


def parse_config(argv):
    """argv: config files and --key=value overrides, applied in order over DEFAULTS -> (dict, sources)."""
    cfg = dict(DEFAULTS)
    for arg in argv:
        if arg.startswith('--'):
            if '=' not in arg:
                raise ConfigError(f"{arg}: overrides look like --key=value (e.g. --epochs=10)")
            key, text = arg[2:].split('=', 1)
            if key not in DEFAULTS:
                raise unknown_key_error(key, arg)
            cfg[key] = parse_value(key, text, DEFAULTS[key])
        else:
            for key, value in read_config_file(arg).items():
                if key not in DEFAULTS:
                    raise unknown_key_error(key, arg)
                cfg[key] = value
    return check_config(cfg)


def _as_pair(key, value):
    if isinstance(value, str):
        value = value.lower().replace(',', 'x').split('x')
    try:
        h, w = (int(v) for v in value)
    except (TypeError, ValueError):
        raise ConfigError(f"{key}={value!r}: expected (H, W), e.g. (96, 128)") from None
    if h < 1 or w < 1:
        raise ConfigError(f"{key}={value!r}: sizes must be positive")
    return h, w


def check_config(cfg):
    """Types and ranges of every value; derived defaults (data_root, out_dir, tasks). Returns cfg."""
    for key, default in DEFAULTS.items():    # a config file may assign any python value: check its type
        value = cfg[key]
        if isinstance(default, bool):
            if not isinstance(value, bool):
                raise ConfigError(f"{key}={value!r}: expected True or False")
        elif isinstance(default, float):
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise ConfigError(f"{key}={value!r}: expected a number")
            cfg[key] = float(value)
        elif isinstance(default, int):
            if isinstance(value, bool) or not isinstance(value, int):
                raise ConfigError(f"{key}={value!r}: expected an integer")
        elif isinstance(default, str) and not isinstance(value, str):
            raise ConfigError(f"{key}={value!r}: expected a string")

    def choice(key, options):
        if cfg[key] not in options:
            raise ConfigError(f"{key}={cfg[key]!r}: expected one of {', '.join(map(str, options))}")

    def at_least(key, low):
        if cfg[key] < low:
            raise ConfigError(f"{key}={cfg[key]!r}: must be >= {low}")

    choice('dataset', tuple(DATASET_TASKS))
    choice('model', MODEL_NAMES)
    choice('backbone', BACKBONES)
    choice('scheduler', SCHEDULERS)
    choice('ctal_impl', CTAL_IMPLS)
    choice('ctal_fusion', CTAL_FUSIONS)
    choice('pap_affinity', PAP_AFFINITIES)
    choice('fpm_softmax', FPM_SOFTMAXES)
    choice('normals_loss', NORMALS_LOSSES)
    for key in ('epochs', 'batch_size', 'eval_interval', 'log_interval', 'n_train', 'n_val', 'pap_iters',
                'restart_mult'):
        at_least(key, 1)
    for key in ('num_workers', 'max_iters', 'vis_images', 'grad_clip', 'weight_decay', 'gamma',
                'synthetic_seed', 'seed'):
        at_least(key, 0)
    if not cfg['lr'] > 0:
        raise ConfigError(f"lr={cfg['lr']!r}: must be > 0")
    if not 0 < cfg['scale'] <= 1:
        raise ConfigError(f"scale={cfg['scale']!r}: must be in (0, 1], e.g. 1/4, 1/6, 1/8")
    if cfg['restart_period'] is not None and (not isinstance(cfg['restart_period'], int)
                                              or cfg['restart_period'] < 1):
        raise ConfigError(f"restart_period={cfg['restart_period']!r}: expected None or an integer >= 1")
    dev = cfg['device']
    if not (dev in ('auto', 'cpu', 'cuda') or (dev.startswith('cuda:') and dev[5:].isdigit())):
        raise ConfigError(f"device={dev!r}: expected auto, cpu, cuda or cuda:N")
    for key in ('data_root', 'out_dir', 'pretrained', 'stl_results', 'dump_grads'):
        if cfg[key] is not None and not isinstance(cfg[key], str):
            raise ConfigError(f"{key}={cfg[key]!r}: expected a path (string) or None")

    known = DATASET_TASKS[cfg['dataset']]
    t = cfg['tasks']
    t = tuple(known) if t is None else tuple(s.strip() for s in t.split(',')) if isinstance(t, str) else t
    if not isinstance(t, (tuple, list)) or not t or any(x not in known for x in t) or len(set(t)) != len(t):
        raise ConfigError(f"tasks={cfg['tasks']!r}: expected None or distinct tasks of {cfg['dataset']}: "
                          f"{', '.join(known)}")
    cfg['tasks'] = [x for x in known if x in t]           # canonical order
    weights = LOSS_WEIGHTS[cfg['dataset']] if cfg['loss_weights'] is None else cfg['loss_weights']
    if not isinstance(weights, dict) or any(x not in weights for x in cfg['tasks']) or any(
            not isinstance(weights[x], (int, float)) or not weights[x] >= 0 for x in cfg['tasks']):
        raise ConfigError(f"loss_weights={cfg['loss_weights']!r}: expected None or a dict giving every task "
                          f"({', '.join(cfg['tasks'])}) a weight >= 0")
    cfg['loss_weights'] = {x: float(weights[x]) for x in cfg['tasks']}
    cfg['synthetic_size'] = list(_as_pair('synthetic_size', cfg['synthetic_size']))
    if cfg['img_size'] is not None:
        cfg['img_size'] = list(_as_pair('img_size', cfg['img_size']))
    if cfg['data_root'] is None:
        cfg['data_root'] = os.path.join('data', cfg['dataset'])
    if cfg['out_dir'] is None:
        suffix = '' if cfg['backbone'] == 'hrnet18' else f"_{cfg['backbone']}"
        cfg['out_dir'] = os.path.join('out', f"{cfg['dataset']}_{cfg['model']}{suffix}")
    return cfg


def format_config(cfg):
    width = max(map(len, cfg))
    return '\n'.join(f"  {k:<{width}} = {v!r}" for k, v in cfg.items())


# ------------------------------------------------------------------------------------------ distributed

def setup_distributed(cfg):
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK: join the group (nccl on CUDA, gloo on CPU).
    Returns (rank, world_size, device)."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    rank, local_rank = int(os.environ.get('RANK', '0')), int(os.environ.get('LOCAL_RANK', '0'))
    want = cfg['device']
    if want == 'auto':
        want = 'cuda' if torch.cuda.is_available() else 'cpu'
    if want.startswith('cuda'):
        if not torch.cuda.is_available():
            raise ConfigError(f"device={cfg['device']!r}: CUDA is not available here; use device=cpu")
        device = torch.device('cuda', local_rank if world > 1 else torch.device(want).index or 0)
        torch.cuda.set_device(device)
    else:
        device = torch.device('cpu')
    if world > 1 and not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return rank, world, device


def is_distributed():
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(x):
    if is_distributed():
        dist.all_reduce(x)
    return x


def barrier():
    if is_distributed():
        dist.barrier()


def differentiable_all_reduce(x):
    """Sum over ranks whose backward sums the gradients over ranks too. torch.distributed.nn's version
    warns that it is deprecated in favour of _functional_collectives, which has no autograd."""
    from torch.distributed.nn.functional import all_reduce
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)
        return all_reduce(x)


class CPUSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d with training statistics over the global batch of all ranks, for gloo (torch's
    nn.SyncBatchNorm is GPU-only). Mean and biased variance normalise; the running variance gets the
    unbiased one, as nn.BatchNorm2d on the concatenated batch. The all-reduces are differentiable
    (torch.distributed.nn), so each rank's backward sees the other ranks' share of the statistics."""

    def forward(self, x):
        if not (self.training and is_distributed()):
            return super().forward(x)
        reduce = differentiable_all_reduce
        count = reduce(x.new_tensor([x.numel() / x.shape[1]]))                    # pixels per channel
        mean = reduce(x.sum((0, 2, 3))) / count                                     # (C,)
        centred = x - mean[:, None, None]
        var = reduce((centred ** 2).sum((0, 2, 3))) / count                         # two-pass: stable
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(m * mean)
            self.running_var.mul_(1 - m).add_(m * var * count / (count - 1).clamp(min=1))
        y = centred * torch.rsqrt(var + self.eps)[:, None, None]
        return y * self.weight[:, None, None] + self.bias[:, None, None]


def convert_sync_batchnorm(module, device):
    if device.type == 'cuda':
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm2d and child.affine and child.track_running_stats \
                and child.momentum is not None:
            sync = CPUSyncBatchNorm(child.num_features, child.eps, child.momentum)
            sync.load_state_dict(child.state_dict())
            setattr(module, name, sync)
        else:
            convert_sync_batchnorm(child, device)
    return module


# ------------------------------------------------------------------------------------------ data

class SeededAugmentation(torch.utils.data.Dataset):
    """Each sample's augmentation draws from a torch RNG seeded by (seed, epoch, index) alone, so a
    sample is the same whatever the worker, rank or resume point that loads it."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed, self.epoch = dataset, seed, 0

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(np.random.SeedSequence([self.seed, self.epoch, i]).generate_state(1)[0]))
            return self.dataset[i]


def build_datasets(cfg, rank):
    name, root = cfg['dataset'], cfg['data_root']
    kw = {}
    if name == 'synthetic':
        if rank == 0:                 # no-op when root already holds this set
            t0 = time.time()
            make_synthetic(root, cfg['n_train'], cfg['n_val'], tuple(cfg['synthetic_size']),
                           cfg['synthetic_seed'])
            if time.time() - t0 > 1:
                print(f"generated the synthetic dataset in {root} ({time.time() - t0:.0f} s)")
        barrier()
    if name == 'pascal':
        kw['size'] = tuple(cfg['img_size'] or (512, 512))
    elif cfg['scale_crop']:
        kw['scale_crop'] = True
    train_set = build_dataset(name, root, 'train', cfg['tasks'], augment=cfg['augment'], **kw)
    kw.pop('scale_crop', None)
    val_set = build_dataset(name, root, 'val', cfg['tasks'], augment=False, **kw)
    size = tuple(train_set[0]['image'].shape[-2:])
    if cfg['img_size'] is not None and name != 'pascal' and size != tuple(cfg['img_size']):
        raise SetupError(f"img_size={tuple(cfg['img_size'])} but the {name} files in {root} are {size}: "
                         f"leave img_size=None for this dataset (it is read from the files)")
    return SeededAugmentation(train_set, cfg['seed']), val_set, size


def epoch_batches(n, epoch, seed, rank, world, batch, start=0, limit=0):
    """This rank's batches (lists of indices) of one training epoch: DistributedSampler's permutation
    (randperm seeded by seed + epoch, every world-th index from rank), cut into batches, last partial
    batch dropped; `start` skips batches already done (resume), `limit` > 0 keeps only that many."""
    sampler = torch.utils.data.DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True,
                                                  seed=seed, drop_last=True)
    sampler.set_epoch(epoch)
    order = list(sampler)
    batches = [order[i:i + batch] for i in range(0, len(order) - batch + 1, batch)]
    if limit:
        batches = batches[:limit]
    return batches[start:]


def make_loader(dataset, batches, cfg, device, generator=None):
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=cfg['num_workers'],
                                       pin_memory=device.type == 'cuda', generator=generator)


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}


# ------------------------------------------------------------------------------------------ loss

def compute_losses(out, batch, tasks, normals_form='cosine'):
    """Per task L_initial + L_final (deep supervision, CTAL paper Sec. 2): a dict task -> scalar tensor.
    'initial' holds a tensor, or for the multi-scale models a list of per-scale predictions (their mean
    loss), or nothing (stl/mtl)."""
    losses = {}
    for t in tasks:
        loss = task_loss(t, out[t], batch[t], normals_form)
        initial = out['initial'].get(t)
        if isinstance(initial, (list, tuple)):
            loss = loss + sum(task_loss(t, p, batch[t], normals_form) for p in initial) / len(initial)
        elif initial is not None:
            loss = loss + task_loss(t, initial, batch[t], normals_form)
        losses[t] = loss
    return losses


def make_scheduler(optimizer, cfg):
    if cfg['scheduler'] == 'cosine':
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=cfg['epochs'])
    if cfg['scheduler'] == 'cosine_restarts':
        period = cfg['restart_period'] or max(1, cfg['epochs'] // 3)
        return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=period,
                                                                    T_mult=cfg['restart_mult'])
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


# ------------------------------------------------------------------------------------------ evaluation

@torch.no_grad()
def evaluate(model, val_set, cfg, device, rank, world):
    """Meters over the whole val split (this rank: every world-th image; sums all-reduced).
    Returns ({task: {metric: value}}, val_loss = sum_t w_t L_final_t averaged over images)."""
    model.eval()
    tasks = {t: DATASET_TASKS[cfg['dataset']][t] for t in cfg['tasks']}
    meters = build_meters(tasks)
    indices = list(range(rank, len(val_set), world))
    per_rank = max(1, cfg['batch_size'] // world)
    loader = make_loader(val_set, [indices[i:i + per_rank] for i in range(0, len(indices), per_rank)],
                         cfg, device)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)     # (sum of batch loss * B, images)
    for batch in loader:
        batch = to_device(batch, device)
        with autocast(cfg, device):
            out = model(batch['image'])
        for t in tasks:
            pred = out[t].float()
            meters[t].update(pred, batch[t])
            loss = task_loss(t, pred, batch[t], cfg['normals_loss'])
            loss_sum[0] += cfg['loss_weights'][t] * float(loss) * len(pred)
        loss_sum[1] += len(batch['image'])
    for m in meters.values():
        m.all_reduce()
    all_reduce_sum(loss_sum)
    model.train()
    return {t: m.compute() for t, m in meters.items()}, float(loss_sum[0] / loss_sum[1].clamp(min=1))


def autocast(cfg, device):
    return torch.autocast('cuda', dtype=torch.bfloat16, enabled=cfg['bf16'] and device.type == 'cuda')


def load_reference(cfg):
    """The delta_m baseline: {task: metric} and where it came from, or (None, why not and what to do)."""
    path = cfg['stl_results']
    key = (cfg['dataset'], cfg['backbone'])
    if path is not None:
        if os.path.abspath(path) == os.path.abspath(os.path.join(cfg['out_dir'], 'results.json')):
            return None, (f"this run is the STL reference: {path} is the delta_m baseline of the other "
                          f"models (their stl_results)")
        if not os.path.isfile(path):
            return None, (f"the STL results file {path} does not exist (yet): run the STL model with the "
                          f"same recipe first, e.g. `python train.py configs/{cfg['dataset']}_stl.py`")
        with open(path) as f:
            stl = json.load(f)
        if stl['config']['dataset'] != cfg['dataset']:
            raise SetupError(f"stl_results={path} is a {stl['config']['dataset']} run; this is {cfg['dataset']}")
        metrics = stl['final']['metrics']
        missing = [t for t in cfg['tasks'] if t not in metrics]
        if missing:
            return None, f"{path} has no results for {missing}"
        return {t: metrics[t][TASK_METRIC[t][0]] for t in cfg['tasks']}, f"STL run {path}"
    if key in STL_REFERENCE:
        return {t: STL_REFERENCE[key][t] for t in cfg['tasks']}, f"the papers' STL {key}"
    return None, (f"no paper STL reference for {key}: train `configs/{cfg['dataset']}_stl.py` with the same "
                  f"epochs and seed, then pass --stl_results=<its out_dir>/results.json")


def gain(metrics, reference):
    if reference is None:
        return None
    return delta_m({t: metrics[t] for t in reference}, reference)   # reads TASK_METRIC's key itself


def format_metrics(metrics, reference=None):
    lines = []
    for t, values in metrics.items():
        cells = '  '.join(f"{k} {v:.4g}" for k, v in values.items() if isinstance(v, (int, float)))
        ref = f"   [STL {TASK_METRIC[t][0]} {reference[t]:.4g}]" if reference else ''
        lines.append(f"  {t:<12}{cells}{ref}")
    return '\n'.join(lines)


# ------------------------------------------------------------------------------------------ pictures

GRID_TILE_PX = 128           # height of one panel of the prediction grid, pixels
GRID_HEADER_PX = 16          # the column titles above the first row
GRID_DPI = 100
# 40 distinct class colours (matplotlib's tab20 + tab20b), repeated for larger label sets
CLASS_COLOURS = np.concatenate([colormaps['tab20'].colors, colormaps['tab20b'].colors])


def colour_labels(labels):
    """Class map (H, W) -> RGB floats (H, W, 3); 255 (ignore) black."""
    rgb = CLASS_COLOURS[np.clip(labels, 0, 254) % len(CLASS_COLOURS)]
    rgb[labels == 255] = 0
    return rgb


def colour_depth(depth, reference):
    """Viridis over the valid range of the reference (target) depth, so GT and prediction compare."""
    valid = reference[reference > 0]
    lo, hi = (float(valid.min()), float(valid.max())) if valid.numel() else (0.0, 1.0)
    return colormaps['viridis'](((depth - lo) / max(hi - lo, 1e-6)).clamp(0, 1).numpy())[..., :3]


def colour_normals(n):
    return ((n + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy()                     # (n + 1) / 2 -> RGB


def colour_target(task, target):
    """A ground-truth map (data.py conventions) as RGB floats (H, W, 3); ignored / invalid pixels black."""
    x = target.float().cpu()
    if task in ('semseg', 'human_parts'):
        return colour_labels(x.long().numpy())
    if task == 'depth':
        rgb = colour_depth(x[0], x[0])
        rgb[(x[0] == 0).numpy()] = 0
        return rgb
    if task == 'normals':
        return colour_normals(x)                            # invalid (zero) vectors -> grey
    rgb = colormaps['gray'](x[0].clamp(0, 1).numpy())[..., :3]    # saliency / edge in {0, 1}
    rgb[(x[0] == 255).numpy()] = (0.5, 0, 0)              # ignore: dark red
    return rgb


def colour_prediction(task, pred, target):
    """A raw prediction (K, H, W) as RGB floats (H, W, 3), coloured like its target."""
    x = pred.float().cpu()
    if task in ('semseg', 'human_parts'):
        return colour_labels(x.argmax(0).numpy())
    if task == 'depth':
        return colour_depth(x[0], target.float().cpu()[0])
    if task == 'normals':
        return colour_normals(x / x.norm(dim=0, keepdim=True).clamp(min=1e-12))
    return colormaps['gray'](torch.sigmoid(x[0]).numpy())[..., :3]             # logits -> probability


@torch.no_grad()
def save_prediction_grid(model, val_set, cfg, device, path):
    """PNG: one row per validation image: input | for each task: ground truth, prediction. Every panel
    is GRID_TILE_PX high (small images are upscaled so a person can see them)."""
    n = min(cfg['vis_images'], len(val_set))
    if n == 0:
        return
    samples = [val_set[i] for i in range(n)]
    model.eval()
    with autocast(cfg, device):
        out = model(torch.stack([s['image'] for s in samples]).to(device))
    model.train()
    names = ['input'] + [f"{t} {kind}" for t in cfg['tasks'] for kind in ('GT', 'pred')]
    H, W = samples[0]['image'].shape[-2:]
    tile_w = round(W * GRID_TILE_PX / H)
    width, height = len(names) * tile_w, GRID_HEADER_PX + n * GRID_TILE_PX
    fig = Figure(figsize=(width / GRID_DPI, height / GRID_DPI), dpi=GRID_DPI)
    for j, name in enumerate(names):
        fig.text((j + 0.5) / len(names), 1 - 2 / height, name, ha='center', va='top', fontsize=7)
    for i, s in enumerate(samples):
        tiles = [s['image'].permute(1, 2, 0).clamp(0, 1).numpy()]
        for t in cfg['tasks']:
            tiles += [colour_target(t, s[t]), colour_prediction(t, out[t][i], s[t])]
        bottom = 1 - (GRID_HEADER_PX + (i + 1) * GRID_TILE_PX) / height
        for j, tile in enumerate(tiles):
            ax = fig.add_axes((j / len(names), bottom, 1 / len(names), GRID_TILE_PX / height))
            ax.imshow(tile, interpolation='nearest', aspect='auto')
            ax.set_axis_off()
    fig.savefig(path, dpi=GRID_DPI)


def save_curves(log_path, tasks, path):
    """PNG of a run's log.jsonl: the training loss of each task over steps, and each task's main
    validation metric (metrics.TASK_METRIC) over epochs."""
    with open(log_path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    train_recs = [r for r in records if r['type'] == 'train']
    eval_recs = [r for r in records if r['type'] == 'eval']
    fig = Figure(figsize=(3.2 * (1 + len(tasks)), 2.8), dpi=GRID_DPI, layout='constrained')
    axes = fig.subplots(1, 1 + len(tasks), squeeze=False)[0]
    steps = [r['step'] for r in train_recs]
    for t in tasks:
        axes[0].plot(steps, [r['losses'][t] for r in train_recs], label=t)
    axes[0].set(title='training loss', xlabel='step')
    axes[0].legend(fontsize=7)
    for ax, t in zip(axes[1:], tasks):
        metric = TASK_METRIC[t][0]
        values = [r['metrics'][t][metric] for r in eval_recs]
        ax.plot([r['epoch'] for r in eval_recs], [v if v is not None else float('nan') for v in values], 'o-')
        ax.set(title=f"val {t} {metric}", xlabel='epoch')
    fig.savefig(path)


# ------------------------------------------------------------------------------------------ checkpoint

def json_safe(x):
    """x with every NaN / inf float replaced by None, so the files written are valid JSON (null)."""
    if isinstance(x, float):
        return x if math.isfinite(x) else None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def save_checkpoint(path, state):
    """Write to path + '.tmp', then os.replace: a crash mid-write never leaves a truncated ckpt.pt."""
    tmp = path + '.tmp'
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def rng_state(device):
    state = {'torch': torch.get_rng_state(), 'numpy': np.random.get_state(), 'python': random.getstate()}
    if device.type == 'cuda':
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, device):
    torch.set_rng_state(state['torch'])
    np.random.set_state(state['numpy'])
    random.setstate(state['python'])
    if device.type == 'cuda' and 'cuda' in state:
        torch.cuda.set_rng_state_all(state['cuda'])


def versions(device, world):
    import timm
    import torchvision
    return {'python': platform.python_version(), 'torch': torch.__version__, 'torchvision': torchvision.__version__,
            'timm': timm.__version__, 'numpy': np.__version__, 'cuda': torch.version.cuda,
            'cudnn': torch.backends.cudnn.version() if device.type == 'cuda' else None,
            'device': torch.cuda.get_device_name(device) if device.type == 'cuda'
            else (platform.processor() or platform.machine()),
            'world_size': world, 'threads': torch.get_num_threads()}


# ------------------------------------------------------------------------------------------ training

class StopFlag:
    """SIGINT / SIGTERM set a flag; the loop agrees on it across ranks and stops after a whole step.
    A second Ctrl-C aborts at once."""

    def __init__(self):
        self.requested = False
        self.previous = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():   # signal handlers live there only
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print(f"\n{signal.Signals(signum).name}: stopping after this step and saving a checkpoint "
              f"(Ctrl-C again to abort without saving)", flush=True)

    def __exit__(self, *exc):
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)


def train(cfg):
    """Train and evaluate as configured; returns the results dict (also out_dir/results.json)."""
    t_start = time.time()
    rank, world, device = setup_distributed(cfg)
    master = rank == 0
    say = print if master else (lambda *a, **k: None)
    if cfg['batch_size'] % world:
        raise ConfigError(f"batch_size={cfg['batch_size']} (the global batch) must be divisible by the "
                          f"{world} processes")
    if cfg['bf16'] and device.type != 'cuda':
        say("note: bf16 autocast is for CUDA; running in float32 on CPU")
    out_dir = cfg['out_dir']
    ckpt_path = os.path.join(out_dir, 'ckpt.pt')
    if not cfg['resume'] and os.path.exists(ckpt_path):     # every rank checks: none waits for a dead one
        raise ConfigError(f"{out_dir} already holds a run (ckpt.pt): pass --resume=True to continue it, "
                          f"or another --out_dir (or delete the folder) to start over")
    if cfg['resume'] and not os.path.exists(ckpt_path):
        raise ConfigError(f"resume=True but there is no checkpoint {ckpt_path}")
    if master:
        os.makedirs(out_dir, exist_ok=True)
        say(f"config:\n{format_config(cfg)}")
        with open(os.path.join(out_dir, 'config.json'), 'w') as f:
            json.dump(cfg, f, indent=1)
    barrier()

    torch.manual_seed(cfg['seed'])
    np.random.seed(cfg['seed'])
    random.seed(cfg['seed'])
    if device.type == 'cuda':
        torch.backends.cudnn.benchmark = True
    try:
        train_set, val_set, size = build_datasets(cfg, rank)
        tasks = {t: DATASET_TASKS[cfg['dataset']][t] for t in cfg['tasks']}
        net = build_model(cfg['model'], tasks, size, backbone=cfg['backbone'], scale=cfg['scale'],
                          gamma=cfg['gamma'], ctal_impl=cfg['ctal_impl'], ctal_fusion=cfg['ctal_fusion'],
                          pretrained=cfg['pretrained'], pap_iters=cfg['pap_iters'],
                          pap_affinity=cfg['pap_affinity'], fpm_softmax=cfg['fpm_softmax'],
                          hrnet_bn_momentum=cfg['hrnet_bn_momentum'])
    except (FileNotFoundError, ValueError) as e:
        raise SetupError(str(e)) from e
    net.to(device)
    n_params = sum(p.numel() for p in net.parameters())
    say(f"{cfg['model']} ({cfg['backbone']}): {n_params / 1e6:.2f} M parameters, input {size[0]}x{size[1]}; "
        f"{cfg['dataset']}: {len(train_set)} train / {len(val_set)} val; device {device}, {world} process(es)")
    for m in net.modules():
        if isinstance(m, CTAL):           # what impl='auto' resolved to on this device (fixed for the run)
            say(f"CTAL at {m.size[0]}x{m.size[1]}: impl {m.impl!r} -> {m.impl_for(device)}")
    model = net
    if world > 1:
        if cfg['sync_bn']:
            net = convert_sync_batchnorm(net, device).to(device)
        model = nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == 'cuda'
                                                    else None)
    optimizer = torch.optim.Adam(net.parameters(), lr=cfg['lr'], weight_decay=cfg['weight_decay'])
    scheduler = make_scheduler(optimizer, cfg)

    # progress: `epoch` epochs are complete, plus `batches_done` steps of the next one (mid-epoch stop)
    state = {'epoch': 0, 'batches_done': 0, 'step': 0, 'best': None, 'last': None}
    if cfg['resume']:
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        changed = {k: (ckpt['config'].get(k), v) for k, v in cfg.items()
                   if ckpt['config'].get(k) != v and k not in ('resume',)}
        if changed:
            say(f"note: config differs from the checkpoint's: {changed}")
        net.load_state_dict(ckpt['model'])
        optimizer.load_state_dict(ckpt['optimizer'])
        scheduler.load_state_dict(ckpt['scheduler'])
        state = ckpt['progress']
        set_rng_state(ckpt['rng'], device)
        say(f"resumed from {ckpt_path}: {state['epoch']} epochs + {state['batches_done']} steps done")
    seconds_before = state.get('seconds', 0.0)          # wall time of the earlier parts of a resumed run

    def checkpoint():
        state['seconds'] = seconds_before + time.time() - t_start
        if master:
            save_checkpoint(ckpt_path, {'model': net.state_dict(), 'optimizer': optimizer.state_dict(),
                                        'scheduler': scheduler.state_dict(), 'progress': state,
                                        'rng': rng_state(device), 'config': cfg,
                                        'sampler': {'seed': cfg['seed'], 'epoch': state['epoch'],
                                                    'batches_done': state['batches_done']}})
        barrier()

    def log(record):
        if master:
            with open(os.path.join(out_dir, 'log.jsonl'), 'a') as f:
                f.write(json.dumps(json_safe(record), allow_nan=False) + '\n')

    reference, why = load_reference(cfg)
    say(f"delta_m reference: {why}" if reference else f"delta_m: unavailable: {why}")
    per_rank = cfg['batch_size'] // world
    steps_per_epoch = len(epoch_batches(len(train_set), 0, cfg['seed'], rank, world, per_rank,
                                        limit=cfg['max_iters']))
    if steps_per_epoch == 0:
        raise ConfigError(f"batch_size={cfg['batch_size']} is larger than the {len(train_set)} training images")
    total_steps = steps_per_epoch * cfg['epochs']
    weights = cfg['loss_weights']
    timing = {'steps': 0, 'seconds': 0.0, 'eval_seconds': 0.0, 'evals': 0}

    def run_evaluation(epoch):
        t0 = time.time()
        metrics, val_loss = evaluate(net, val_set, cfg, device, rank, world)
        ref, why_not = load_reference(cfg)
        dm = gain(metrics, ref)
        record = {'type': 'eval', 'epoch': epoch, 'step': state['step'], 'val_loss': val_loss,
                  'delta_m': dm, 'metrics': metrics}
        state['last'] = record
        # best: highest delta_m when there is a reference, else lowest validation loss
        score = dm if dm is not None else -val_loss
        if state['best'] is None or score > state['best']['score']:
            state['best'] = dict(record, score=score)
        log(record)
        if master:
            save_prediction_grid(net, val_set, cfg, device, os.path.join(out_dir, f'vis_epoch{epoch:03d}.png'))
            save_curves(os.path.join(out_dir, 'log.jsonl'), cfg['tasks'], os.path.join(out_dir, 'curves.png'))
        timing['eval_seconds'] += time.time() - t0
        timing['evals'] += 1
        say(f"eval epoch {epoch}: val loss {val_loss:.4f}, delta_m "
            f"{'n/a' if dm is None else f'{dm:+.2f} %'} ({time.time() - t0:.1f} s)\n"
            f"{format_metrics(metrics, ref)}")

    # ---- the loop
    with StopFlag() as stop:
        try:
            for epoch in range(state['epoch'], cfg['epochs']):
                train_set.epoch = epoch
                batches = epoch_batches(len(train_set), epoch, cfg['seed'], rank, world, per_rank,
                                        start=state['batches_done'], limit=cfg['max_iters'])
                loader = make_loader(train_set, batches, cfg, device,
                                     torch.Generator().manual_seed(cfg['seed'] + epoch))
                window = {'loss': 0.0, 'tasks': dict.fromkeys(cfg['tasks'], 0.0), 'n': 0, 't0': time.time()}
                model.train()
                it = iter(loader)
                for i in range(state['batches_done'], steps_per_epoch):
                    t_step = time.time()
                    # stop before the forward: it would already move the BatchNorm running statistics
                    if all_reduce_sum(torch.tensor(float(stop.requested), device=device)) > 0:
                        raise Interrupted
                    try:
                        batch = to_device(next(it), device)
                    except Exception:
                        if stop.requested:          # DataLoader workers die on Ctrl-C too
                            raise Interrupted
                        raise
                    with autocast(cfg, device):
                        out = model(batch['image'])
                    losses = compute_losses(out, batch, cfg['tasks'], cfg['normals_loss'])
                    # per-task losses, mean over ranks: logging, and every rank sees a NaN anywhere
                    shared = all_reduce_sum(torch.stack([l.detach().float() for l in losses.values()]))
                    values = {t: v / world for t, v in zip(cfg['tasks'], shared.tolist())}
                    bad = [t for t, v in values.items() if not math.isfinite(v)]
                    if bad:
                        raise NonFiniteLoss(
                            f"the {bad[0]} loss is {values[bad[0]]} at epoch {epoch}, step {i} (global step "
                            f"{state['step']}); stopping. " + (
                                f"The last good checkpoint {ckpt_path} (epoch {state['epoch']}) is kept."
                                if os.path.exists(ckpt_path) else "No checkpoint had been written yet."))
                    loss = sum(weights[t] * losses[t] for t in cfg['tasks'])
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if cfg['dump_grads'] and state['step'] == 0 and master:
                        torch.save({n: p.grad.detach().cpu().clone() for n, p in net.named_parameters()
                                    if p.grad is not None}, cfg['dump_grads'])
                    if cfg['grad_clip'] > 0:
                        nn.utils.clip_grad_norm_(net.parameters(), cfg['grad_clip'])
                    optimizer.step()
                    state['batches_done'] = i + 1
                    state['step'] += 1
                    timing['steps'] += 1
                    timing['seconds'] += time.time() - t_step

                    window['loss'] += sum(weights[t] * v for t, v in values.items())
                    for t, v in values.items():
                        window['tasks'][t] += v
                    window['n'] += 1
                    if window['n'] == cfg['log_interval'] or i + 1 == steps_per_epoch:
                        dt = time.time() - window['t0']
                        left = total_steps - (epoch * steps_per_epoch + i + 1)
                        evals_left = sum(1 for e in range(epoch + 1, cfg['epochs'] + 1)
                                         if e % cfg['eval_interval'] == 0 or e == cfg['epochs'])
                        eta = left * timing['seconds'] / timing['steps'] + evals_left * (
                            timing['eval_seconds'] / max(1, timing['evals']))
                        n = window['n']
                        record = {'type': 'train', 'epoch': epoch, 'iter': i + 1, 'step': state['step'],
                                  'loss': window['loss'] / n,
                                  'losses': {t: v / n for t, v in window['tasks'].items()},
                                  'lr': optimizer.param_groups[0]['lr'],
                                  'img_per_s': n * cfg['batch_size'] / max(dt, 1e-9), 'eta_s': eta}
                        log(record)
                        say(f"epoch {epoch + 1}/{cfg['epochs']} step {i + 1}/{steps_per_epoch} | loss "
                            f"{record['loss']:.4f} (" + ', '.join(f"{t} {v:.4f}" for t, v in
                                                                  record['losses'].items())
                            + f") | lr {record['lr']:.2e} | {record['img_per_s']:.1f} img/s | "
                              f"ETA {eta / 60:.1f} min", flush=True)
                        window = {'loss': 0.0, 'tasks': dict.fromkeys(cfg['tasks'], 0.0), 'n': 0,
                                  't0': time.time()}
                scheduler.step()
                state['epoch'], state['batches_done'] = epoch + 1, 0
                if (epoch + 1) % cfg['eval_interval'] == 0 or epoch + 1 == cfg['epochs']:
                    run_evaluation(epoch + 1)
                checkpoint()
                flag = torch.tensor(float(stop.requested), device=device)
                if all_reduce_sum(flag) > 0:
                    raise Interrupted
        except (Interrupted, KeyboardInterrupt) as e:
            if isinstance(e, Interrupted):
                checkpoint()
                say(f"interrupted: checkpoint saved to {ckpt_path} ({state['epoch']} epochs + "
                    f"{state['batches_done']} steps); continue with --resume=True")
            raise Interrupted from None
        except NonFiniteLoss as e:
            log({'type': 'error', 'step': state['step'], 'message': str(e)})
            raise

    if state['last'] is None or state['last']['epoch'] != cfg['epochs']:
        run_evaluation(cfg['epochs'])          # e.g. resumed a finished run without its last eval
    reference, why = load_reference(cfg)
    results = {'model': cfg['model'], 'dataset': cfg['dataset'], 'backbone': cfg['backbone'],
               'seed': cfg['seed'], 'epochs': cfg['epochs'], 'params': n_params,
               'final': finalise(state['last'], reference), 'best': finalise(state['best'], reference),
               'reference': {'source': why, 'values': reference},
               'train_time_s': seconds_before + time.time() - t_start, 'versions': versions(device, world),
               'config': cfg}
    if master:
        with open(os.path.join(out_dir, 'results.json'), 'w') as f:
            json.dump(json_safe(results), f, indent=1, allow_nan=False)
        print_summary(results, why)
    return results


def finalise(record, reference):
    """An eval record with delta_m recomputed against the (possibly newer) reference."""
    record = {k: v for k, v in record.items() if k not in ('type', 'score')}
    record['delta_m'] = gain(record['metrics'], reference)
    return record


def print_summary(results, why):
    final, best = results['final'], results['best']
    ref = results['reference']['values']
    print(f"\n==== {results['model']} on {results['dataset']} ({results['backbone']}), seed {results['seed']}: "
          f"final metrics after epoch {final['epoch']} (val loss {final['val_loss']:.4f})")
    print(format_metrics(final['metrics'], ref))
    if final['delta_m'] is None:
        print(f"  delta_m: unavailable: {why}")
    else:
        print(f"  delta_m vs {why}: {final['delta_m']:+.2f} %   (best epoch {best['epoch']}: "
              f"{best['delta_m']:+.2f} %)")
    print(f"  total time {results['train_time_s'] / 60:.1f} min; outputs in {results['config']['out_dir']}")


def main(argv=None):
    """Command line entry: returns the exit code (0 ok, 1 error, 130 interrupted)."""
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ('-h', '--help') for a in argv):
        print(__doc__.split('\n\n')[0] + '\n\nkeys and defaults:\n' + format_config(DEFAULTS))
        return 0
    try:
        train(parse_config(argv))
        return 0
    except (ConfigError, SetupError, NonFiniteLoss) as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except Interrupted:
        return 130
    finally:
        if is_distributed():
            dist.destroy_process_group()


if __name__ == '__main__':
    sys.exit(main())
