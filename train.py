"""Train and evaluate any model of model.py on any dataset of data.py.

    python train.py configs/nyuv2_ctal_ss.py [--key=value ...]
    torchrun --nproc_per_node=4 train.py configs/nyuv2_ctal_ss.py     # the same script under DDP
    python train.py configs/nyuv2_ctal_ss.py --eval_only=True          # score out_dir/ckpt.pt (or --init_from)

Configuration: the defaults are the plain assignments below; config files (python assigning some of those
names) are executed over them in order, then `--key=value` overrides apply. argparse is generated from the
defaults: `--help` lists every key with its default and comment, unknown keys are refused.

A step: batch (each sample's augmentation seeded by (seed, epoch, index)) -> model(images) -> {task:
(B, K_t, H, W), 'initial': {task: tensor | list of 4}} -> loss = sum_t w_t (L_initial_t + L_final_t) ->
per-task losses all-reduced (a NaN on any rank stops every rank) -> backward -> optional clip -> Adam (or SGD).
The LR steps per epoch ('poly': per step). A run is `epochs` epochs, or `iters` steps (the last epoch cut short).
Every `eval_interval` epochs: val metrics, delta_m against the STL reference, the PNG grid,
best.pt if delta_m improved; then ckpt.pt (atomically). `batch_size` is global: rank r takes every W-th
index and BatchNorm statistics are synchronised, so 1 and W processes compute the same step (to rounding);
a run resumed from ckpt.pt (epoch ends, or mid-epoch on Ctrl-C / SIGTERM) repeats the uninterrupted run
exactly on CPU. out_dir: config.json, log.jsonl, results.json, vis_epochNNN.png, curves.png, ckpt.pt, best.pt.
Beside this loop: config.py (argparse over the defaults), ddp.py (processes, synchronised BatchNorm,
stopping together), checkpoint.py (the run's files, resume, the delta_m reference), vis.py (the pictures).
"""
import hashlib
import inspect
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from baselines import FPM_SOFTMAXES, PAP_AFFINITIES, SEARCH_ARCH_LR
from checkpoint import (check_out_dir, check_resume, cut_log, json_safe, load_checkpoint, load_reference, load_weights,
                        rng_state, save_checkpoint, set_rng_state, versions, write_json)
from config import UserError, parse_config as read_config
from ctal import CTAL, FUSIONS, IMPLS
from data import DATASETS, build_dataset
from ddp import (Interrupted, SeededAugmentation, StopFlag, all_reduce_sum, barrier, check_device_name,
                 convert_sync_batchnorm, epoch_batches, setup_distributed)
from metrics import EDGE_POS_WEIGHT, NORMALS_LOSSES, aux_loss, build_meters, delta_m, gain_metrics, task_loss
from model import ATRC, BACKBONES, MODEL_NAMES, build_model
from synthetic import make_synthetic
from vis import save_curves, save_val_grid

_names_before_defaults = set(globals())
# ---------------------------------------------------------------------------------------- defaults
# data
dataset = 'synthetic'         # nyuv2 | cityscapes | pascal | nyud | synthetic (data.DATASETS)
data_root = None              # None = data/<dataset>
tasks = None                  # None = all tasks of the dataset, or e.g. "semseg,depth"
img_size = None               # pascal / nyud: the canvas (H, W), None = 512x512 / 425x560; others: read from the files
augment = True                # training augmentation (flip; pascal / nyud: ATRC's scale/crop/flip/colour)
scale_crop = False            # MTAN random scale-crop (NYUv2 / Cityscapes / synthetic)
n_train = 400                 # synthetic: scenes generated into data_root if absent
n_val = 100                   # synthetic: validation scenes
synthetic_size = (96, 128)    # synthetic: (H, W) of the rendered scenes
synthetic_seed = 0            # synthetic: seed of the scene generator
# model (model.build_model)
model = 'ctal_ss'             # the model's name (model.MODEL_NAMES)
backbone = 'hrnet18'          # hrnet18 | swinv2_s
scale = 1 / 4                 # CTAL distillation scale on HRNet: 1/4, 1/6, 1/8 ...
gamma = 0.05                  # CTAL: out = gamma * diffused + (1 - gamma) * features
ctal_impl = 'auto'            # CTAL: auto | dense | linear (same parameters, same numbers)
ctal_fusion = 'shared'        # CTAL: shared | task
pap_iters = 1                 # PAP-Net propagation iterations
pap_affinity = 'code'         # PAP-Net affinity: code (the CTAL authors') | paper (PAP-Net's text)
fpm_softmax = 'code'          # MTI-Net FPM mask: code (MTI-Net's code) | paper (MTI-Net Sec. 2.4)
genotype = None               # atrc: JSON file {target: {source: context}}; None = the authors' searched one
atrc_search = False           # atrc: the architecture search (ATRC Sec. 3.3) -> out_dir/genotype.json
hrnet_bn_momentum = None      # HRNet BN momentum; None = the model's authors' (0.01; atrc: 0.1); short runs need 0.1
pretrained = None             # local ImageNet backbone checkpoint (timm / torchvision); None = random
init_from = None              # fine-tune from / evaluate this project's ckpt.pt or best.pt
# optimisation
epochs = 200                  # training epochs (unless iters > 0)
iters = 0                     # > 0: train for exactly this many steps instead (ATRC / TIF count iterations)
batch_size = 8                # global batch (split across DDP ranks)
optimizer = 'adam'            # adam (the CTAL authors') | sgd (momentum 0.9: ATRC's, TIF's)
lr = 1e-4                     # learning rate
weight_decay = 1e-4           # weight decay (an L2 term in the gradient, as torch's Adam and SGD)
scheduler = 'cosine'          # cosine | cosine_restarts | none (stepped per epoch) | poly (power 0.9, per step)
restart_period = None         # cosine_restarts: T_0 in epochs; None = epochs // 3
restart_mult = 2              # cosine_restarts: T_mult
grad_clip = 0.0               # max gradient norm; 0 = off
loss_weights = None           # {task: weight}; None = data.DATASETS[dataset]['loss_weights']
normals_loss = 'cosine'       # cosine (1 - cos, the CTAL authors' CNN code) | l1 (their transformer code, ATRC's)
max_iters = 0                 # > 0: at most this many steps per epoch (quick tests)
# evaluation, logging, output
eval_interval = 1             # epochs between evaluations (the last epoch is always evaluated)
log_interval = 20             # steps between log lines
vis_images = 4                # validation images in the PNG grid (0 = none)
stl_results = None            # results.json of an STL run: the delta_m reference (else the papers')
out_dir = None                # None = out/<dataset>_<model>[_<backbone> if not hrnet18]
resume = False                # continue the run in out_dir from its ckpt.pt
eval_only = False             # score a checkpoint (init_from, else out_dir/ckpt.pt) on the val split
# system
seed = 0                      # seeds the weights, the epoch order and the augmentation
device = 'auto'               # auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)
num_workers = 0               # DataLoader worker processes
bf16 = False                  # bf16 autocast (CUDA only)
compile = False               # torch.compile the training model (the first steps pay the compile time)
sync_bn = True                # DDP: BatchNorm statistics over the global batch, as one process would
# ---------------------------------------------------------------------------------- end of defaults
DEFAULTS = {k: v for k, v in globals().items() if k not in _names_before_defaults | {'_names_before_defaults'}}

SCHEDULERS = ('cosine', 'cosine_restarts', 'none', 'poly')
POLY_POWER = 0.9                # ATRC's polynomial decay: lr = base (1 - step / iters) ** 0.9 (their PolynomialLR)
SGD_MOMENTUM = 0.9              # ATRC's SGD
CHOICES = {'dataset': tuple(DATASETS), 'model': MODEL_NAMES, 'backbone': BACKBONES, 'ctal_impl': IMPLS,
           'ctal_fusion': FUSIONS, 'pap_affinity': PAP_AFFINITIES, 'fpm_softmax': FPM_SOFTMAXES,
           'scheduler': SCHEDULERS, 'optimizer': ('adam', 'sgd'), 'normals_loss': NORMALS_LOSSES}
AT_LEAST = {'epochs': 1, 'iters': 0, 'batch_size': 1, 'eval_interval': 1, 'log_interval': 1, 'n_train': 1, 'n_val': 1,
            'restart_mult': 1, 'max_iters': 0, 'vis_images': 0, 'grad_clip': 0, 'weight_decay': 0,
            'num_workers': 0, 'seed': 0, 'synthetic_seed': 0}
# what a resumed run may change; any other difference from the checkpoint's config is refused
RESUMABLE_CHANGES = ('data_root', 'out_dir', 'resume', 'eval_only', 'epochs', 'eval_interval', 'log_interval',
                     'vis_images', 'stl_results', 'device', 'num_workers', 'bf16', 'ctal_impl', 'compile')


class NonFiniteLoss(UserError):
    """A task's loss became NaN/inf: training stops, the last good checkpoint is kept."""


# ------------------------------------------------------------------------------------------ config

def parse_config(argv):
    """Command-line words -> the checked config: defaults, config files, --key=value (see config.py)."""
    return check_config(read_config(argv, DEFAULTS, __file__, CHOICES, AT_LEAST, __doc__.split('\n\n')[1]))


def as_pair(key, value):
    words = value.lower().replace(',', 'x').strip('()[] ').split('x') if isinstance(value, str) else value
    try:
        h, w = (int(v) for v in words)
    except (TypeError, ValueError):
        h = w = 0
    if h < 32 or w < 32:
        raise UserError(f"{key}={value!r}: expected (H, W), each >= 32, e.g. (96, 128)")
    return [h, w]


def check_tasks(cfg):
    """The task list (canonical order) and one loss weight >= 0 per task."""
    known = DATASETS[cfg['dataset']]['tasks']
    t = cfg['tasks']
    t = tuple(known) if t is None else tuple(s.strip() for s in t.split(',')) if isinstance(t, str) else t
    if not isinstance(t, (tuple, list)) or not t or any(x not in known for x in t) or len(set(t)) != len(t):
        raise UserError(f"tasks={cfg['tasks']!r}: expected None or distinct tasks of {cfg['dataset']}: "
                        f"{', '.join(known)}")
    tasks = [x for x in known if x in t]
    weights = cfg['loss_weights'] or DATASETS[cfg['dataset']]['loss_weights']
    if not isinstance(weights, dict) or any(not isinstance(weights.get(x), (int, float)) or not weights[x] >= 0
                                            for x in tasks):
        raise UserError(f"loss_weights={cfg['loss_weights']!r}: expected None or a dict giving every task "
                        f"({', '.join(tasks)}) a weight >= 0")
    return tasks, {x: float(weights[x]) for x in tasks}


def check_config(cfg):
    """What only train.py knows (model.build_model, CTAL and the datasets check their own arguments),
    and the derived defaults. Returns cfg."""
    if not cfg['lr'] > 0:
        raise UserError(f"lr={cfg['lr']!r}: must be > 0")
    if cfg['restart_period'] is not None and (not isinstance(cfg['restart_period'], int)
                                              or cfg['restart_period'] < 1):
        raise UserError(f"restart_period={cfg['restart_period']!r}: expected None or an integer >= 1")
    check_device_name(cfg['device'])
    for key in ('data_root', 'out_dir', 'pretrained', 'init_from', 'stl_results', 'genotype'):
        if cfg[key] is not None and not isinstance(cfg[key], str):
            raise UserError(f"{key}={cfg[key]!r}: expected a path (string) or None")
    if cfg['resume'] and cfg['eval_only']:
        raise UserError("resume=True and eval_only=True: pick one (eval_only scores a checkpoint, resume trains on)")
    cfg['tasks'], cfg['loss_weights'] = check_tasks(cfg)
    cfg['genotype'] = read_genotype(cfg['genotype'])
    cfg['synthetic_size'] = as_pair('synthetic_size', cfg['synthetic_size'])
    cfg['img_size'] = None if cfg['img_size'] is None else as_pair('img_size', cfg['img_size'])
    cfg['data_root'] = cfg['data_root'] or os.path.join('data', cfg['dataset'])
    suffix = '' if cfg['backbone'] == 'hrnet18' else f"_{cfg['backbone']}"
    cfg['out_dir'] = cfg['out_dir'] or os.path.join('out', f"{cfg['dataset']}_{cfg['model']}{suffix}")
    return cfg


def read_genotype(value):
    """genotype: a JSON file's path -> its contents, so that config.json and the checkpoints carry the
    genotype itself (model.build_model checks it against the tasks)."""
    if not isinstance(value, str):
        return value
    try:
        with open(value) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        raise UserError(f"genotype={value!r}: cannot read it as a JSON file ({e})") from None


# ------------------------------------------------------------------------------------------ data

def task_channels(cfg):
    """{task: output channels} of this run's tasks."""
    return {t: DATASETS[cfg['dataset']]['tasks'][t] for t in cfg['tasks']}


def build_datasets(cfg, rank):
    """(train set, val set, input size); the synthetic set is generated first if absent (rank 0)."""
    name, root = cfg['dataset'], cfg['data_root']
    if name == 'synthetic':
        if rank == 0:
            make_synthetic(root, cfg['n_train'], cfg['n_val'], tuple(cfg['synthetic_size']), cfg['synthetic_seed'])
        barrier()
    canvas = DATASETS[name].get('canvas')              # images placed on a canvas of img_size (ATRC's datasets)
    kw = {'size': tuple(cfg['img_size'] or DATASETS[name]['size'])} if canvas else {}
    val_set = build_dataset(name, root, 'val', cfg['tasks'], augment=False, **kw)
    if not canvas:
        kw['scale_crop'] = cfg['scale_crop']
    train_set = build_dataset(name, root, 'train', cfg['tasks'], augment=cfg['augment'], **kw)
    size = tuple(val_set.size)
    if cfg['img_size'] is not None and tuple(cfg['img_size']) != size:
        raise UserError(f"img_size={tuple(cfg['img_size'])} but the {name} files in {root} are {size}: leave "
                        f"img_size=None for this dataset (the size is read from the files)")
    return SeededAugmentation(train_set, cfg['seed']), val_set, size


def make_loader(dataset, batches, cfg, device, seed=0):
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=cfg['num_workers'],
                                       pin_memory=device.type == 'cuda', generator=torch.Generator().manual_seed(seed))


def to_device(batch, device):
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}


# ------------------------------------------------------------------------------------------ loss, eval

def loss_options(cfg):
    """metrics.task_loss's options in this run: the normals loss form (config), the edge weight (dataset)."""
    return {'normals_form': cfg['normals_loss'],
            'edge_pos_weight': DATASETS[cfg['dataset']].get('edge_pos_weight', EDGE_POS_WEIGHT)}


def compute_losses(out, batch, tasks, options=None, label_spaces=None):
    """Per task L_initial + L_final (deep supervision, CTAL paper Sec. 2): {task: scalar}. 'initial' holds
    a tensor, or for the multi-scale models a list of per-scale predictions (their mean loss), or nothing
    (stl / mtl). atrc's out['aux'] adds each auxiliary prediction's loss to its task's (ATRC: same weight),
    on targets discretised by the model's label_spaces. options: `loss_options` (None: the defaults)."""
    options, losses = options or {}, {}
    for t in tasks:
        initial = out['initial'].get(t)
        initial = [] if initial is None else initial if isinstance(initial, (list, tuple)) else [initial]
        losses[t] = task_loss(t, out[t], batch[t], **options)
        if initial:
            losses[t] = losses[t] + sum(task_loss(t, p, batch[t], **options) for p in initial) / len(initial)
    for t, logits in out.get('aux', {}).items():
        edge_weight = options.get('edge_pos_weight', EDGE_POS_WEIGHT)
        losses[t] = losses[t] + aux_loss(t, logits, batch[t], edge_pos_weight=edge_weight, **label_spaces)
    return losses


def set_atrc_label_spaces(net, cfg, train_set):
    """atrc's depth bins and normals clusters for this data (`ATRC.fit_label_spaces`), fitted once on every
    len/64-th training sample and cached in data_root, under a name that hashes the data (cannot go stale)."""
    first = train_set[0]
    digest = hashlib.sha1(repr(len(train_set)).encode())
    for t in cfg['tasks']:
        digest.update(first[t].numpy().tobytes())
    path = os.path.join(cfg['data_root'], f"atrc_label_spaces_{digest.hexdigest()[:12]}_seed{cfg['seed']}.pt")
    if os.path.isfile(path):
        for name, value in torch.load(path, weights_only=True).items():
            getattr(net, name).copy_(value)
        return
    samples = [train_set[i] for i in range(0, len(train_set), max(1, len(train_set) // 64))]
    spaces = net.fit_label_spaces(samples, cfg['seed'], inverse_depth=cfg['dataset'] == 'cityscapes')
    try:
        save_checkpoint(path, spaces)
    except OSError:                                   # a read-only data folder: no cache
        pass


def make_optimizer(params, cfg):
    """Adam (the CTAL authors' recipe) or SGD with momentum 0.9 (ATRC's pl_model.py; their two parameter
    groups, backbone and head, have one lr and one weight decay, so one group computes the same step)."""
    if cfg['optimizer'] == 'sgd':
        return torch.optim.SGD(params, lr=cfg['lr'], momentum=SGD_MOMENTUM, weight_decay=cfg['weight_decay'])
    return torch.optim.Adam(params, lr=cfg['lr'], weight_decay=cfg['weight_decay'])


def make_scheduler(optimizer, cfg, epochs, total_steps):
    """The LR schedule: 'poly' is stepped after every optimiser step (ATRC's PolynomialLR over the run's
    iterations, min_lr 0), the others once per epoch."""
    if cfg['scheduler'] == 'poly':
        return torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=total_steps, power=POLY_POWER)
    if cfg['scheduler'] == 'cosine':
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if cfg['scheduler'] == 'cosine_restarts':
        period = cfg['restart_period'] or max(1, epochs // 3)
        return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=period, T_mult=cfg['restart_mult'])
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def autocast(cfg, device):
    return torch.autocast('cuda', dtype=torch.bfloat16, enabled=cfg['bf16'] and device.type == 'cuda')


@torch.no_grad()
def evaluate(net, val_set, cfg, device, rank, world):
    """Meters over the whole val split (this rank: every world-th image; sums all-reduced).
    Returns ({task: {metric: value}}, val loss = sum_t w_t L_final_t averaged over images)."""
    net.eval()
    options = loss_options(cfg)
    meters = build_meters(task_channels(cfg), options['edge_pos_weight'])
    indices = list(range(rank, len(val_set), world))
    b = max(1, cfg['batch_size'] // world)
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)       # (sum of image losses, images)
    for batch in make_loader(val_set, [indices[i:i + b] for i in range(0, len(indices), b)], cfg, device):
        batch = to_device(batch, device)
        with autocast(cfg, device):
            out = net(batch['image'])
        for t in cfg['tasks']:
            pred = out[t].float()                                     # bf16 autocast: meters and loss in float32
            meters[t].update(pred, batch[t])
            loss_sum[0] += cfg['loss_weights'][t] * float(task_loss(t, pred, batch[t], **options)) \
                * len(batch['image'])
        loss_sum[1] += len(batch['image'])
    for m in meters.values():
        m.all_reduce()
    all_reduce_sum(loss_sum)
    net.train()
    return {t: m.compute() for t, m in meters.items()}, float(loss_sum[0] / loss_sum[1].clamp(min=1))


def format_delta(dm):
    return 'n/a' if dm is None else f'{dm:+.2f} %'


def format_metrics(metrics, reference, dataset):
    lines = []
    for t, values in metrics.items():
        cells = '  '.join(f"{k} {v:.4g}" for k, v in values.items() if isinstance(v, (int, float)))
        ref = f"   [STL {gain_metrics(dataset)[t][0]} {reference[t]:.4g}]" if reference and t in reference else ''
        lines.append(f"  {t:<12}{cells}{ref}")
    return '\n'.join(lines)


# ------------------------------------------------------------------------------------------ training

class Run:
    """One run's objects, and its progress: `epoch` epochs done plus `batches_done` steps of the next."""

    def __init__(self, cfg, rank, world, device, net, train_set, val_set):
        self.cfg, self.rank, self.world, self.device = cfg, rank, world, device
        self.master = rank == 0
        self.net, self.model, self.train_set, self.val_set = net, net, train_set, val_set
        if world > 1:
            net = convert_sync_batchnorm(net, device).to(device) if cfg['sync_bn'] else net
            self.net, self.model = net, nn.parallel.DistributedDataParallel(
                net, device_ids=[device.index] if device.type == 'cuda' else None,
                find_unused_parameters=cfg['atrc_search'])     # a frozen search block skips its other contexts
        if cfg['compile']:                  # training steps only; evaluation runs the eager net (same weights)
            self.model = torch.compile(self.model)
        arch = [p for n, p in net.named_parameters() if n.endswith('arch_logits')]     # atrc_search only
        weights = [p for n, p in net.named_parameters() if not n.endswith('arch_logits')]
        # the run's length: `iters` steps, else `epochs` whole epochs (the last epoch may end early)
        self.steps_per_epoch = len(epoch_batches(len(train_set), 0, cfg, rank, world))
        self.total_steps = cfg['iters'] or self.steps_per_epoch * cfg['epochs']
        self.epochs = -(-self.total_steps // self.steps_per_epoch) if self.steps_per_epoch else cfg['epochs']
        self.optimizer = make_optimizer(weights, cfg)
        self.arch_optimizer = torch.optim.Adam(arch, lr=SEARCH_ARCH_LR, weight_decay=0) if arch else None
        self.scheduler = make_scheduler(self.optimizer, cfg, self.epochs, self.total_steps)
        self.reference, self.reference_source = load_reference(cfg)
        self.progress = {'epoch': 0, 'batches_done': 0, 'step': 0, 'best': None, 'last': None, 'seconds': 0.0,
                         'log_bytes': 0}
        self.timing = {'start': time.time(), 'before': 0.0, 'first_step': 0}

    def path(self, name):
        return os.path.join(self.cfg['out_dir'], name)

    def save_grid(self, name):
        """out_dir/name: the prediction grid of the first vis_images validation images."""
        save_val_grid(self.path(name), self.net, self.val_set, self.cfg['tasks'], self.cfg['vis_images'],
                      autocast(self.cfg, self.device))

    def score(self):
        """The model on the val split: {'val_loss', 'delta_m' (None without a reference), 'metrics'}."""
        metrics, val_loss = evaluate(self.net, self.val_set, self.cfg, self.device, self.rank, self.world)
        dm = (delta_m({t: metrics[t] for t in self.reference}, self.reference, gain_metrics(self.cfg['dataset']))
              if self.reference else None)
        return {'val_loss': val_loss, 'delta_m': dm, 'metrics': metrics}

    def say(self, *args, **kw):
        if self.master:
            print(*args, **kw, flush=True)

    def log(self, record):
        if self.master:
            with open(self.path('log.jsonl'), 'a') as f:
                f.write(json.dumps(json_safe(record), allow_nan=False) + '\n')

    def restore(self, ckpt):
        self.net.load_state_dict(ckpt['model'])
        self.optimizer.load_state_dict(ckpt['optimizer'])
        if self.arch_optimizer:
            self.arch_optimizer.load_state_dict(ckpt['arch_optimizer'])
        self.scheduler.load_state_dict(ckpt['scheduler'])
        self.progress = ckpt['progress']
        self.timing['before'], self.timing['first_step'] = self.progress['seconds'], self.progress['step']
        set_rng_state(ckpt['rng'], self.device)
        if self.master:
            cut_log(self.path('log.jsonl'), self.progress['log_bytes'])

    def checkpoint(self):
        self.progress['seconds'] = self.timing['before'] + time.time() - self.timing['start']
        if self.master:
            log = self.path('log.jsonl')
            self.progress['log_bytes'] = os.path.getsize(log) if os.path.exists(log) else 0
            save_checkpoint(self.path('ckpt.pt'), {
                'model': self.net.state_dict(), 'optimizer': self.optimizer.state_dict(),
                'scheduler': self.scheduler.state_dict(), 'progress': self.progress, 'rng': rng_state(self.device),
                'config': self.cfg, 'input_size': list(self.val_set.size),
                'arch_optimizer': self.arch_optimizer.state_dict() if self.arch_optimizer else None})
        barrier()


def train_step(run, batch):
    """One optimiser step; the per-task losses averaged over ranks (floats)."""
    cfg = run.cfg
    if run.arch_optimizer:                      # the ATRC search: this step's temperature and entropy weight
        entropy_weight = run.net.distill.schedule(run.progress['step'] / run.total_steps)
    with autocast(cfg, run.device):
        out = run.model(batch['image'])
    spaces = run.net.label_spaces() if isinstance(run.net, ATRC) else None
    losses = compute_losses(out, batch, cfg['tasks'], loss_options(cfg), spaces)
    shared = all_reduce_sum(torch.stack([l.detach().float() for l in losses.values()])) / run.world
    values = dict(zip(cfg['tasks'], shared.tolist()))
    bad = [t for t, v in values.items() if not math.isfinite(v)]
    if bad:
        p = run.progress
        kept = (f"The last good checkpoint {run.path('ckpt.pt')} (epoch {p['epoch']}) is kept."
                if os.path.exists(run.path('ckpt.pt')) else "No checkpoint had been written yet.")
        raise NonFiniteLoss(f"the {bad[0]} loss is {values[bad[0]]} at epoch {p['epoch']}, step {p['batches_done']} "
                            f"(global step {p['step']}); stopping. {kept}")
    loss = sum(cfg['loss_weights'][t] * losses[t] for t in cfg['tasks'])
    if run.arch_optimizer:
        loss = loss + entropy_weight * out['entropy']
        run.arch_optimizer.zero_grad(set_to_none=True)
    run.optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if cfg['grad_clip'] > 0:
        nn.utils.clip_grad_norm_(run.net.parameters(), cfg['grad_clip'])
    run.optimizer.step()
    if run.arch_optimizer:
        run.arch_optimizer.step()
    if cfg['scheduler'] == 'poly':
        run.scheduler.step()
    return values


def next_batch(it, stop, device):
    """The loader's next batch; a bad sample found now (e.g. NaN in a label) is the user's data fault."""
    try:
        return to_device(next(it), device)
    except (ValueError, OSError) as e:
        lines = [line for line in str(e).splitlines() if line.strip()]        # workers wrap it in a traceback
        raise UserError(f"data: {lines[-1] if lines else e}") from None
    except Exception:
        if stop.requested:                    # DataLoader workers die on Ctrl-C too
            raise Interrupted from None
        raise


def log_window(run, epoch, i, window):
    """A log line, and a log.jsonl record, of the steps in `window`. The ETA spreads the time this process has
    run (evaluations included) over the steps it has done."""
    cfg, t, step = run.cfg, run.timing, run.progress['step']
    n, dt = len(window), time.time() - t['window_start']
    left = run.total_steps - step
    losses = {task: sum(w[task] for w in window) / n for task in cfg['tasks']}
    record = {'type': 'train', 'epoch': epoch, 'iter': i + 1, 'step': step,
              'loss': sum(sum(cfg['loss_weights'][task] * w[task] for task in w) for w in window) / n, 'losses': losses,
              'lr': run.optimizer.param_groups[0]['lr'], 'img_per_s': n * cfg['batch_size'] / max(dt, 1e-9),
              'eta_s': left * (time.time() - t['start']) / max(1, step - t['first_step'])}
    run.log(record)
    run.say(f"epoch {epoch + 1}/{run.epochs} step {i + 1}/{run.steps_per_epoch} | loss {record['loss']:.4f} ("
            + ', '.join(f"{task} {v:.4f}" for task, v in losses.items()) + f") | lr {record['lr']:.2e} | "
            f"{record['img_per_s']:.1f} img/s | ETA {record['eta_s'] / 60:.1f} min")
    t['window_start'] = time.time()


def train_one_epoch(run, epoch, stop):
    cfg, p = run.cfg, run.progress
    run.train_set.epoch = epoch
    batches = epoch_batches(len(run.train_set), epoch, cfg, run.rank, run.world, start=p['batches_done'])
    it = iter(make_loader(run.train_set, batches, cfg, run.device, cfg['seed'] + epoch))
    window, run.timing['window_start'] = [], time.time()
    run.model.train()
    for i in range(p['batches_done'], min(run.steps_per_epoch, p['batches_done'] + run.total_steps - p['step'])):
        if stop.agreed(run.device):       # before the forward: it would already move BatchNorm statistics
            raise Interrupted
        window.append(train_step(run, next_batch(it, stop, run.device)))
        p['batches_done'], p['step'] = i + 1, p['step'] + 1
        if len(window) == cfg['log_interval'] or i + 1 == run.steps_per_epoch or p['step'] == run.total_steps:
            log_window(run, epoch, i, window)
            window = []
    if cfg['scheduler'] != 'poly':
        run.scheduler.step()
    p['epoch'], p['batches_done'] = epoch + 1, 0


def evaluate_run(run, epoch):
    """Evaluate, log, keep best.pt (highest delta_m; lowest val loss without a reference), draw."""
    t0 = time.time()
    record = {'type': 'eval', 'epoch': epoch, 'step': run.progress['step'], **run.score()}
    run.log(record)
    run.progress['last'] = record
    score = record['delta_m'] if record['delta_m'] is not None else -record['val_loss']
    best = run.progress['best']
    if best is None or (math.isfinite(score) and not score <= best['score']):
        run.progress['best'] = dict(record, score=score)
        if run.master:
            save_checkpoint(run.path('best.pt'), {'model': run.net.state_dict(), 'config': run.cfg, 'eval': record,
                                                  'input_size': list(run.val_set.size)})
    if run.master:
        run.save_grid(f'vis_epoch{epoch:03d}.png')
        save_curves(run.path('log.jsonl'), run.cfg['tasks'], run.path('curves.png'), gain_metrics(run.cfg['dataset']))
        if run.arch_optimizer:                  # what the search has found so far: --genotype= retrains it
            write_json(run.path('genotype.json'), run.net.distill.current_genotype())
    run.say(f"eval epoch {epoch}: val loss {record['val_loss']:.4f}, delta_m {format_delta(record['delta_m'])} "
            f"({time.time() - t0:.1f} s)\n{format_metrics(record['metrics'], run.reference, run.cfg['dataset'])}")


def train(run):
    """The epochs still to do; Ctrl-C / SIGTERM: a checkpoint, then Interrupted."""
    cfg = run.cfg
    with StopFlag() as stop:
        try:
            for epoch in range(run.progress['epoch'], run.epochs):
                train_one_epoch(run, epoch, stop)
                if (epoch + 1) % cfg['eval_interval'] == 0 or epoch + 1 == run.epochs:
                    evaluate_run(run, epoch + 1)
                run.checkpoint()
                if stop.agreed(run.device):
                    raise Interrupted
        except Interrupted:
            run.checkpoint()
            run.say(f"interrupted: checkpoint saved to {run.path('ckpt.pt')} ({run.progress['epoch']} epochs + "
                    f"{run.progress['batches_done']} steps); continue with --resume=True")
            raise
        except NonFiniteLoss as e:
            run.log({'type': 'error', 'step': run.progress['step'], 'message': str(e)})
            raise
    if run.progress['last'] is None or run.progress['last']['epoch'] != run.epochs:
        evaluate_run(run, run.epochs)              # e.g. resumed a finished run without its last eval


# ------------------------------------------------------------------------------------------ main

def build_net(cfg, size, device):
    """model.build_model's options are config keys of the same names; the input normalisation is the dataset's."""
    options = inspect.signature(build_model).parameters.keys() - {'name', 'tasks', 'img_size', 'image_norm'}
    return build_model(cfg['model'], task_channels(cfg), size, image_norm=DATASETS[cfg['dataset']].get('image_norm'),
                       **{k: cfg[k] for k in options}).to(device)


def setup(cfg):
    """Everything that can fail on the user's input, before any file is written: device, data files,
    model and pretrained weights, the checkpoint to resume / start from / score, the out_dir."""
    rank, world, device = setup_distributed(cfg)
    torch.manual_seed(cfg['seed'])          # the weights; the data order and augmentation seed themselves
    try:
        train_set, val_set, size = build_datasets(cfg, rank)
        net = build_net(cfg, size, device)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    check_out_dir(cfg)
    if isinstance(net, ATRC):
        set_atrc_label_spaces(net, cfg, train_set)          # before any checkpoint: its own ones win
    own = os.path.join(cfg['out_dir'], 'ckpt.pt')     # resume: always the run's own; init_from: only its start
    ckpt_path = own if cfg['resume'] else cfg['init_from'] or own
    ckpt = None
    if cfg['resume'] or cfg['eval_only'] or cfg['init_from']:
        ckpt = load_checkpoint(ckpt_path, device)
        if cfg['resume']:
            check_resume(cfg, ckpt, ckpt_path, RESUMABLE_CHANGES)
        load_weights(net, ckpt, ckpt_path)
    run = Run(cfg, rank, world, device, net, train_set, val_set)
    if run.steps_per_epoch == 0 and not cfg['eval_only']:
        raise UserError(f"batch_size={cfg['batch_size']} is larger than the {len(train_set)} training images")
    return run, ckpt


def describe(run):
    cfg, size = run.cfg, run.val_set.size
    run.say(f"{cfg['model']} ({cfg['backbone']}): {sum(p.numel() for p in run.net.parameters()) / 1e6:.2f} M "
            f"parameters, input {size[0]}x{size[1]}; {cfg['dataset']}: {len(run.train_set)} train / "
            f"{len(run.val_set)} val; device {run.device}, {run.world} process(es)")
    for m in run.net.modules():
        if isinstance(m, CTAL):               # what impl='auto' resolved to on this device
            run.say(f"CTAL at {m.size[0]}x{m.size[1]}: impl {m.impl!r} -> {m.impl_for(run.device)}")
    if cfg['bf16'] and run.device.type != 'cuda':
        run.say("note: bf16 autocast is for CUDA; running in float32 on CPU")
    if cfg['dataset'] != 'synthetic' and not (cfg['pretrained'] or cfg['init_from'] or cfg['resume'] or cfg['eval_only']):
        run.say(f"warning: training {cfg['model']} on {cfg['dataset']} from random weights (pretrained=None); the papers "
                f"start the backbone from ImageNet weights: pass a local file with --pretrained=PATH (timm's "
                f"hrnet_w18_small_v2 / torchvision's swin_v2_s-6cf4c8c5.pth)")
    run.say(f"delta_m reference: {run.reference_source}" if run.reference else
            f"delta_m: unavailable: {run.reference_source}")


def score_checkpoint(run, ckpt_path):
    """eval_only: metrics, delta_m and the PNG grid of the loaded weights -> out_dir/eval.json."""
    result = {'checkpoint': ckpt_path, **run.score(),
              'reference': {'source': run.reference_source, 'values': run.reference}, 'config': run.cfg}
    if run.master:
        os.makedirs(run.cfg['out_dir'], exist_ok=True)
        write_json(run.path('eval.json'), result)
        run.save_grid('vis_eval.png')
    run.say(f"{ckpt_path} on the {run.cfg['dataset']} val split (val loss {result['val_loss']:.4f}):\n"
            f"{format_metrics(result['metrics'], run.reference, run.cfg['dataset'])}\n  delta_m: {format_delta(result['delta_m'])} "
            f"(reference: {run.reference_source})")
    return result


def finish(run):
    """results.json and the summary."""
    final, best, cfg = run.progress['last'], run.progress['best'], run.cfg
    results = {'model': cfg['model'], 'dataset': cfg['dataset'], 'backbone': cfg['backbone'], 'seed': cfg['seed'],
               'epochs': run.epochs, 'steps': run.progress['step'], 'params': sum(p.numel() for p in run.net.parameters()),
               'final': {k: v for k, v in final.items() if k != 'type'},
               'best': {k: v for k, v in best.items() if k not in ('type', 'score')},
               'reference': {'source': run.reference_source, 'values': run.reference},
               'train_time_s': run.timing['before'] + time.time() - run.timing['start'],
               'versions': versions(run.device, run.world), 'config': cfg}
    if run.master:
        write_json(run.path('results.json'), results)
    run.say(f"\n==== {cfg['model']} on {cfg['dataset']} ({cfg['backbone']}), seed {cfg['seed']}: final metrics after "
            f"epoch {final['epoch']} (val loss {final['val_loss']:.4f})\n"
            f"{format_metrics(final['metrics'], run.reference, cfg['dataset'])}")
    run.say(f"  delta_m: unavailable: {run.reference_source}" if final['delta_m'] is None else
            f"  delta_m vs {run.reference_source}: {final['delta_m']:+.2f} %   (best epoch {best['epoch']}: "
            f"{best['delta_m']:+.2f} %)")
    run.say(f"  total time {results['train_time_s'] / 60:.1f} min; outputs in {cfg['out_dir']}")
    return results


def run_command(cfg):
    run, ckpt = setup(cfg)
    describe(run)
    if cfg['eval_only']:
        return score_checkpoint(run, cfg['init_from'] or run.path('ckpt.pt'))
    if cfg['resume']:
        run.restore(ckpt)
        run.say(f"resumed from {run.path('ckpt.pt')}: {run.progress['epoch']} epochs + "
                f"{run.progress['batches_done']} steps done")
    if run.master:
        os.makedirs(cfg['out_dir'], exist_ok=True)
        run.say("config:\n" + '\n'.join(f"  {k:<{max(map(len, cfg))}} = {v!r}" for k, v in cfg.items()))
        write_json(run.path('config.json'), cfg)
    barrier()
    train(run)
    return finish(run)


def main(argv=None):
    """Command line entry: the exit code (0 ok, 1 a user mistake or a data fault, 130 interrupted)."""
    try:
        run_command(parse_config(sys.argv[1:] if argv is None else argv))
        return 0
    except UserError as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 1
    except SystemExit as e:                   # --help
        return e.code
    except (Interrupted, KeyboardInterrupt):
        return 130
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


if __name__ == '__main__':
    sys.exit(main())
