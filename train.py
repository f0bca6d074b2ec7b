"""Train and evaluate any model of model.py on any dataset of data.py.

    python train.py configs/nyuv2_ctal_ss.py [--key=value ...]
    torchrun --nproc_per_node=4 train.py configs/nyuv2_ctal_ss.py     # the same script under DDP
    python train.py configs/nyuv2_ctal_ss.py --eval_only=True          # score out_dir/ckpt.pt (or --init_from)

Configuration: the annotated defaults below, then config files in order, then `--key=value` (config.py).
A step: batch (augmentation seeded by (seed, epoch, index)) -> per micro-batch (grad_accum_steps): model(images)
-> per task L_final + L_initial, means over the global batch's valid pixels, + the model's extra losses
(metrics.compute_losses) -> loss = sum_t w_t L_t + the model's regulariser -> backward; the losses all-reduced
(a NaN on any rank stops every rank) -> clip -> Adam or SGD and the model's own optimiser (the hooks:
model.MultiTaskModel). The LR steps per epoch ('poly': per step). A run is `epochs` epochs or `iters`
steps; every `eval_interval` epochs: val metrics, delta_m, the PNG grid, best.pt, the model's artifacts, then
ckpt.pt (atomically). `batch_size` is global and BatchNorm synchronised: 1 and W processes compute the same
step (ddp.py); a resumed run repeats the uninterrupted one exactly on CPU (checkpoint.py). out_dir:
config.json, log.jsonl, results.json, vis_epochNNN.png, curves.png (vis.py), ckpt.pt, best.pt.
"""
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn as nn

from baselines import FPM_SOFTMAXES, PAP_AFFINITIES
from checkpoint import (Progress, append_record, check_out_dir, check_resume, load_checkpoint, load_weights, provenance,
                        restore_run, results_record, save_best, save_run, write_json)
from config import JsonFile, Size, UserError, parse_config as read_config
from ctal import CTAL, FUSIONS, IMPLS
from data import DATASETS, build_dataset, resolve_tasks, to_device
from ddp import (EpochBatches, Interrupted, SeededAugmentation, StopFlag, all_reduce_sum, barrier, gradient_sync,
                 micro_batches, setup_distributed, wrap_distributed)
from metrics import (NORMALS_LOSSES, compute_losses, evaluate as evaluate_model, format_delta, format_metrics,
                     gain_metrics, global_counts, load_reference, loss_options)
from model import BACKBONES, MODEL_NAMES, build_net, check_device_name, pick_device
from synthetic import make_synthetic
from vis import save_curves, save_val_grid

_names_before_defaults = set(globals())
# ---------------------------------------------------------------------------------------- defaults
# data
dataset: str = 'synthetic'            # nyuv2 | cityscapes | pascal | nyud | synthetic (data.DATASETS)
data_root: str | None = None          # None = data/<dataset>
tasks: str | list | None = None       # None = all tasks of the dataset, or e.g. "semseg,depth"
img_size: Size | None = None          # pascal / nyud: the canvas (H, W), None = 512x512 / 425x560; others: read from the files
augment: bool = True                  # training augmentation (flip; pascal / nyud: scale/crop/flip/colour, data.py)
scale_crop: bool = False              # MTAN random scale-crop (NYUv2 / Cityscapes / synthetic)
n_train: int = 400                    # synthetic: scenes generated into data_root if absent
n_val: int = 100                      # synthetic: validation scenes
synthetic_size: Size = [96, 128]      # synthetic: (H, W) of the rendered scenes
synthetic_seed: int = 0               # synthetic: seed of the scene generator
# model (model.build_model)
model: str = 'ctal_ss'                # the model's name (model.MODEL_NAMES)
backbone: str = 'hrnet18'             # hrnet18 | swinv2_s
scale: float = 1 / 4                  # CTAL distillation scale on HRNet: 1/4, 1/6, 1/8 ...
gamma: float = 0.05                   # CTAL: out = gamma * diffused + (1 - gamma) * features
ctal_impl: str = 'auto'               # CTAL: auto | dense | linear (same parameters, same numbers)
ctal_fusion: str = 'shared'           # CTAL: shared | task
pap_iters: int = 1                    # PAP-Net propagation iterations
pap_affinity: str = 'code'            # PAP-Net affinity: code (the CTAL authors') | paper (PAP-Net's text)
fpm_softmax: str = 'code'             # MTI-Net FPM mask: code (MTI-Net's code) | paper (MTI-Net Sec. 2.4)
genotype: JsonFile | None = None      # JSON file {target: {source: context}} of a searched model; None = its authors'
search: bool = False                  # the model's architecture search instead (-> out_dir/genotype.json)
hrnet_bn_momentum: float | None = None  # HRNet BN momentum; None = the model's authors' (model.HRNET_VARIANTS); short runs need 0.1
pretrained: str | None = None         # local ImageNet backbone checkpoint (timm / torchvision); None = random
init_from: str | None = None          # fine-tune from / evaluate this project's ckpt.pt or best.pt
# optimisation
epochs: int = 200                     # training epochs (unless iters > 0)
iters: int = 0                        # > 0: train for exactly this many steps instead (configs/recipe_*.py count them)
batch_size: int = 8                   # global batch (split across DDP ranks and micro-batches)
grad_accum_steps: int = 1             # micro-batches per step (gradients summed): batch_size / (world x this) at a time
optimizer: str = 'adam'               # adam (the CTAL authors') | sgd (momentum 0.9: configs/recipe_*.py)
lr: float = 1e-4                      # learning rate
weight_decay: float = 1e-4            # weight decay (an L2 term in the gradient, as torch's Adam and SGD)
scheduler: str = 'cosine'             # cosine | cosine_restarts | none (stepped per epoch) | poly (power 0.9, per step)
restart_period: int | None = None     # cosine_restarts: T_0 in epochs; None = epochs // 3
restart_mult: int = 2                 # cosine_restarts: T_mult
grad_clip: float = 0.0                # max gradient norm; 0 = off
loss_weights: dict | None = None      # {task: weight}; None = data.DATASETS[dataset]['loss_weights']
normals_loss: str = 'cosine'          # cosine (1 - cos, the CTAL authors' CNN code) | l1 (their transformer code)
max_steps_per_epoch: int = 0          # > 0: at most this many steps per epoch (quick tests)
# evaluation, logging, output
eval_interval: int = 1                # epochs between evaluations (the last epoch is always evaluated)
log_interval: int = 20                # steps between log lines
eval_log_interval: int = 50           # evaluation: a progress line every this many batches (0 = none)
vis_images: int = 4                   # validation images in the PNG grid (0 = none)
stl_results: str | None = None        # results.json of an STL run: the delta_m reference (else the papers')
out_dir: str | None = None            # None = out/<dataset>_<model>[_<backbone> if not hrnet18]
resume: bool = False                  # continue the run in out_dir from its ckpt.pt
eval_only: bool = False               # score a checkpoint (init_from, else out_dir/ckpt.pt) on the val split
# system
seed: int = 0                         # seeds the weights, the epoch order and the augmentation
device: str = 'auto'                  # auto | cpu | cuda | cuda:N (under torchrun: cuda:LOCAL_RANK)
num_workers: int = 0                  # DataLoader worker processes (kept alive for the whole run)
tf32: bool = True                     # CUDA: TF32 matmuls and convolutions (False: full float32 products)
bf16: bool = False                    # bf16 autocast (CUDA only)
compile: bool = False                 # torch.compile the training model (the first steps pay the compile time)
sync_bn: bool = True                  # DDP: BatchNorm statistics over the global batch, as one process would
# ---------------------------------------------------------------------------------- end of defaults
DEFAULTS = {k: v for k, v in globals().items() if k not in _names_before_defaults | {'_names_before_defaults'}}

SCHEDULERS = ('cosine', 'cosine_restarts', 'none', 'poly')
OPTIMIZERS = ('adam', 'sgd')
POLY_POWER = 0.9                # the SGD recipes' decay: lr = base (1 - step / iters) ** 0.9 (configs/recipe_*.py)
SGD_MOMENTUM = 0.9              # the SGD recipes'
CHOICES = {'dataset': tuple(DATASETS), 'model': MODEL_NAMES, 'backbone': BACKBONES, 'ctal_impl': IMPLS,
           'ctal_fusion': FUSIONS, 'pap_affinity': PAP_AFFINITIES, 'fpm_softmax': FPM_SOFTMAXES,
           'scheduler': SCHEDULERS, 'optimizer': OPTIMIZERS, 'normals_loss': NORMALS_LOSSES}
AT_LEAST = {'epochs': 1, 'iters': 0, 'batch_size': 1, 'grad_accum_steps': 1, 'eval_interval': 1, 'log_interval': 1,
            'eval_log_interval': 0, 'n_train': 1, 'n_val': 1,
            'restart_period': 1, 'restart_mult': 1, 'max_steps_per_epoch': 0, 'vis_images': 0, 'grad_clip': 0,
            'weight_decay': 0, 'num_workers': 0, 'seed': 0, 'synthetic_seed': 0,
            'synthetic_size': 32, 'img_size': 32}          # sizes: the backbones' smallest input
# what a resumed run may change; any other difference from the checkpoint's config is refused
RESUMABLE_CHANGES = ('data_root', 'out_dir', 'resume', 'eval_only', 'epochs', 'eval_interval', 'log_interval',
                     'eval_log_interval', 'vis_images', 'stl_results', 'device', 'num_workers', 'bf16', 'ctal_impl',
                     'compile', 'tf32', 'grad_accum_steps')


class NonFiniteLoss(UserError):
    """A task's loss became NaN/inf: training stops, the last good checkpoint is kept."""


# ------------------------------------------------------------------------------------------ config

def parse_config(argv):
    """Command-line words -> the checked config: defaults, config files, --key=value (see config.py)."""
    usage = __doc__.split('\n\n')[1]
    return check_config(read_config(argv, DEFAULTS, __annotations__, __file__, CHOICES, AT_LEAST, usage))


def check_config(cfg):
    """What only train.py knows (types and ranges: config.py; the models and datasets check their own), and the
    derived defaults. Returns cfg."""
    if not cfg.lr > 0:
        raise UserError(f"lr={cfg.lr!r}: must be > 0")
    if cfg.resume and cfg.eval_only:
        raise UserError("resume=True and eval_only=True: pick one (eval_only scores a checkpoint, resume trains on)")
    try:
        check_device_name(cfg.device)
        cfg['tasks'], cfg['loss_weights'] = resolve_tasks(cfg.dataset, cfg.tasks, cfg.loss_weights)
    except ValueError as e:
        raise UserError(str(e)) from None
    cfg['data_root'] = cfg.data_root or os.path.join('data', cfg.dataset)
    suffix = '' if cfg.backbone == 'hrnet18' else f"_{cfg.backbone}"
    cfg['out_dir'] = cfg.out_dir or os.path.join('out', f"{cfg.dataset}_{cfg.model}{suffix}")
    return cfg


# ------------------------------------------------------------------------------------------ data, recipe, eval

def build_datasets(cfg, rank):
    """(train set, val set, input size); the synthetic set is generated first if absent (rank 0)."""
    if cfg.dataset == 'synthetic':
        if rank == 0:
            make_synthetic(cfg.data_root, cfg.n_train, cfg.n_val, tuple(cfg.synthetic_size), cfg.synthetic_seed)
        barrier()
    val_set = build_dataset(cfg.dataset, cfg.data_root, 'val', cfg.tasks, size=cfg.img_size)
    train_set = build_dataset(cfg.dataset, cfg.data_root, 'train', cfg.tasks, augment=cfg.augment,
                              size=cfg.img_size, scale_crop=cfg.scale_crop)
    return SeededAugmentation(train_set, cfg.seed), val_set, tuple(val_set.size)


def make_loader(dataset, batches, cfg, device):
    """A DataLoader over `batches` (lists of indices, or a batch sampler) whose workers live as long as the run."""
    return torch.utils.data.DataLoader(dataset, batch_sampler=batches, num_workers=cfg.num_workers,
                                       pin_memory=device.type == 'cuda', persistent_workers=cfg.num_workers > 0,
                                       generator=torch.Generator().manual_seed(cfg.seed))   # not the global RNG


def make_optimizer(params, cfg):
    """Adam (the CTAL authors' recipe) or SGD with momentum 0.9 (the SGD recipes' code, pl_model.py: its two
    parameter groups, backbone and head, have one lr and one weight decay, so one group computes the same step)."""
    if cfg.optimizer == 'sgd':
        return torch.optim.SGD(params, lr=cfg.lr, momentum=SGD_MOMENTUM, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


def make_scheduler(optimizer, cfg, epochs, total_steps):
    """The LR schedule: 'poly' is stepped after every optimiser step (the SGD recipes' PolynomialLR over the
    run's iterations, min_lr 0), the others once per epoch."""
    if cfg.scheduler == 'poly':
        return torch.optim.lr_scheduler.PolynomialLR(optimizer, total_iters=total_steps, power=POLY_POWER)
    if cfg.scheduler == 'cosine':
        return torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    if cfg.scheduler == 'cosine_restarts':
        period = cfg.restart_period or max(1, epochs // 3)
        return torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=period, T_mult=cfg.restart_mult)
    return torch.optim.lr_scheduler.ConstantLR(optimizer, factor=1.0, total_iters=0)


def autocast(cfg, device):
    return torch.autocast('cuda', dtype=torch.bfloat16, enabled=cfg.bf16 and device.type == 'cuda')


def evaluate(run):
    """metrics.evaluate of the run's network on its val loader."""
    return evaluate_model(run.raw_model, run.val_loader, run.cfg, run.device, run.reference,
                          autocast(run.cfg, run.device), run.world, run.say)


# ------------------------------------------------------------------------------------------ training

class Run:
    """One run's objects: `raw_model` (the network) and `model` (what a training step calls: DDP- or
    torch.compile-wrapped, else the same module), the data, optimisers, schedule, delta_m reference, Progress;
    checkpoint.save_run / restore_run write and read them."""

    def __init__(self, cfg, rank, world, device, net, train_set, val_set, argv=()):
        self.cfg, self.rank, self.world, self.device, self.argv = cfg, rank, world, device, list(argv)
        self.master = rank == 0
        self.raw_model, self.model = wrap_distributed(net, device, world, cfg.sync_bn)
        net, self.train_set, self.val_set = self.raw_model, train_set, val_set
        if cfg.compile:                     # training steps only; evaluation runs the eager net (same weights)
            self.model = torch.compile(self.model)
        # the run's length: `iters` steps, else `epochs` whole epochs (the last epoch may end early)
        self.train_batches = EpochBatches(len(train_set), cfg, rank, world)
        self.steps_per_epoch = len(self.train_batches)
        self.total_steps = cfg.iters or self.steps_per_epoch * cfg.epochs
        self.epochs = -(-self.total_steps // self.steps_per_epoch) if self.steps_per_epoch else cfg.epochs
        self.own_optimizer = net.own_optimizer()                # the model's own (a search's arch logits)
        own = {id(p) for group in (self.own_optimizer.param_groups if self.own_optimizer else []) for p in group['params']}
        self.optimizer = make_optimizer([p for p in net.parameters() if id(p) not in own], cfg)
        self.optimizers = [self.optimizer] + ([self.own_optimizer] if self.own_optimizer else [])
        self.scheduler = make_scheduler(self.optimizer, cfg, self.epochs, self.total_steps)
        self.reference, self.reference_source = load_reference(cfg)
        self.progress = Progress()
        self.timing = {'start': time.time(), 'before': 0.0, 'first_step': 0}
        # one loader each for the run; evaluation: this rank's every world-th image, batch_size / world at a time
        self.train_loader = make_loader(train_set, self.train_batches, cfg, device)
        indices, b = list(range(rank, len(val_set), world)), max(1, cfg.batch_size // world)
        self.val_loader = make_loader(val_set, [indices[i:i + b] for i in range(0, len(indices), b)], cfg, device)

    def path(self, name):
        return os.path.join(self.cfg.out_dir, name)

    def save_grid(self, name):
        """out_dir/name: the prediction grid of the first vis_images validation images."""
        save_val_grid(self.path(name), self.raw_model, self.val_set, self.cfg.tasks, self.cfg.vis_images,
                      autocast(self.cfg, self.device))

    def say(self, *args, **kw):
        if self.master:
            print(*args, **kw, flush=True)

    def log(self, record):
        if self.master:
            append_record(self.path('log.jsonl'), record)

def train_step(run, batch):
    """One optimiser step over this rank's share of the global batch, in grad_accum_steps micro-batches whose
    gradients add up; every masked loss is the mean over the global batch's valid pixels (global_counts), so
    1 process and W processes x n micro-batches compute the same step. Returns the per-task losses (floats)."""
    cfg, net, p, n = run.cfg, run.raw_model, run.progress, run.cfg.grad_accum_steps
    net.schedule(p.step / run.total_steps)
    options, counts = loss_options(cfg), global_counts(batch, cfg.tasks)
    for optimizer in run.optimizers:
        optimizer.zero_grad(set_to_none=True)
    shared = torch.zeros(len(cfg.tasks), device=run.device)
    for k, micro in enumerate(micro_batches(batch, n)):
        with gradient_sync(run.model, k == n - 1):
            with autocast(cfg, run.device):
                out = run.model(micro['image'])
            # the model's extra losses and regulariser: the mean over micro-batches (and ranks) of their values
            extra = {t: e / n for t, e in net.extra_losses(out, micro, options['edge_pos_weight']).items()}
            losses = compute_losses(out, micro, cfg.tasks, options, extra, counts, run.world)
            shared += torch.stack([l.detach().float() for l in losses.values()])
            (sum(cfg.loss_weights[t] * losses[t] for t in cfg.tasks) + net.regulariser(out) / n).backward()
    values = dict(zip(cfg.tasks, (all_reduce_sum(shared) / run.world).tolist()))
    bad = [t for t, v in values.items() if not math.isfinite(v)]
    if bad:
        kept = (f"The last good checkpoint {run.path('ckpt.pt')} (epoch {p.epoch}) is kept."
                if os.path.exists(run.path('ckpt.pt')) else "No checkpoint had been written yet.")
        raise NonFiniteLoss(f"the {bad[0]} loss is {values[bad[0]]} at epoch {p.epoch}, step {p.batches_done} "
                            f"(global step {p.step}); stopping. {kept}")
    if cfg.grad_clip > 0:
        nn.utils.clip_grad_norm_(net.parameters(), cfg.grad_clip)
    for optimizer in run.optimizers:
        optimizer.step()
    if cfg.scheduler == 'poly':
        run.scheduler.step()
    return values


def next_batch(it, stop, device):
    """The loader's next batch; a bad sample found now (a NaN in a label) is the user's data fault."""
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
    """A log line and log.jsonl record of the steps in `window`; the ETA from this process's time per step."""
    cfg, t, step = run.cfg, run.timing, run.progress.step
    n, dt = len(window), time.time() - t['window_start']
    losses = {task: sum(w[task] for w in window) / n for task in cfg.tasks}
    record = {'type': 'train', 'epoch': epoch, 'iter': i + 1, 'step': step,
              'loss': sum(sum(cfg.loss_weights[task] * w[task] for task in w) for w in window) / n, 'losses': losses,
              'lr': run.optimizer.param_groups[0]['lr'], 'img_per_s': n * cfg.batch_size / max(dt, 1e-9),
              'eta_s': (run.total_steps - step) * (time.time() - t['start']) / max(1, step - t['first_step'])}
    run.log(record)
    run.say(f"epoch {epoch + 1}/{run.epochs} step {i + 1}/{run.steps_per_epoch} | loss {record['loss']:.4f} ("
            + ', '.join(f"{task} {v:.4f}" for task, v in losses.items()) + f") | lr {record['lr']:.2e} | "
            f"{record['img_per_s']:.1f} img/s | ETA {record['eta_s'] / 60:.1f} min")
    t['window_start'] = time.time()


def train_one_epoch(run, epoch, stop):
    cfg, p = run.cfg, run.progress
    run.train_batches.set_epoch(epoch, start=p.batches_done)
    it = iter(run.train_loader)
    window, run.timing['window_start'] = [], time.time()
    run.model.train()
    for i in range(p.batches_done, min(run.steps_per_epoch, p.batches_done + run.total_steps - p.step)):
        if stop.agreed(run.device):       # before the forward: it would already move BatchNorm statistics
            raise Interrupted
        window.append(train_step(run, next_batch(it, stop, run.device)))
        p.batches_done, p.step = i + 1, p.step + 1
        if len(window) == cfg.log_interval or i + 1 == run.steps_per_epoch or p.step == run.total_steps:
            log_window(run, epoch, i, window)
            window = []
    if cfg.scheduler != 'poly':
        run.scheduler.step()
    p.epoch, p.batches_done = epoch + 1, 0


def record_evaluation(run, epoch):
    """Evaluate, log, keep best.pt (highest delta_m, else lowest val loss), draw, write the model's artifacts."""
    t0 = time.time()
    record = {'type': 'eval', 'epoch': epoch, 'step': run.progress.step, **evaluate(run)}
    run.log(record)
    run.progress.last = record
    score = record['delta_m'] if record['delta_m'] is not None else -record['val_loss']
    best = run.progress.best
    if best is None or (math.isfinite(score) and not score <= best['score']):
        run.progress.best = dict(record, score=score)
        save_best(run, record)
    if run.master:
        run.save_grid(f'vis_epoch{epoch:03d}.png')
        save_curves(run.path('log.jsonl'), run.cfg.tasks, run.path('curves.png'), gain_metrics(run.cfg.dataset))
        for name, data in run.raw_model.artifacts().items():       # e.g. what a search has found so far
            write_json(run.path(name), data)
    run.say(f"eval epoch {epoch}: val loss {record['val_loss']:.4f}, delta_m {format_delta(record['delta_m'])} "
            f"({time.time() - t0:.1f} s)\n{format_metrics(record['metrics'], run.reference, run.cfg.dataset)}")
    if record['initial_metrics']:
        run.say(f"  initial predictions:\n{format_metrics(record['initial_metrics'], None, run.cfg.dataset)}")


def train(run):
    """The epochs still to do; Ctrl-C / SIGTERM: a checkpoint, then Interrupted."""
    with StopFlag() as stop:
        try:
            for epoch in range(run.progress.epoch, run.epochs):
                train_one_epoch(run, epoch, stop)
                if (epoch + 1) % run.cfg.eval_interval == 0 or epoch + 1 == run.epochs:
                    record_evaluation(run, epoch + 1)
                save_run(run)
                if stop.agreed(run.device):
                    raise Interrupted
        except Interrupted:
            save_run(run)
            run.say(f"interrupted: checkpoint saved to {run.path('ckpt.pt')} ({run.progress.epoch} epochs + "
                    f"{run.progress.batches_done} steps); continue with --resume=True")
            raise
        except NonFiniteLoss as e:
            run.log({'type': 'error', 'step': run.progress.step, 'message': str(e)})
            raise
    if run.progress.last is None or run.progress.last['epoch'] != run.epochs:
        record_evaluation(run, run.epochs)         # e.g. resumed a finished run without its last eval


# ------------------------------------------------------------------------------------------ main

def setup(cfg, argv=()):
    """Everything that can fail on the user's input, before any file is written: device, data files,
    model and pretrained weights, the checkpoint to resume / start from / score, the out_dir."""
    try:
        rank, world, device = setup_distributed(pick_device(cfg.device, cfg.tf32), cfg.batch_size, cfg.grad_accum_steps)
        torch.manual_seed(cfg.seed)          # the weights; the data order and augmentation seed themselves
        train_set, val_set, size = build_datasets(cfg, rank)
        net = build_net(cfg, size, device)
    except (FileNotFoundError, ValueError) as e:
        raise UserError(str(e)) from None
    check_out_dir(cfg)
    net.prepare(train_set, cfg.data_root, cfg.seed, DATASETS[cfg.dataset].get('inverse_depth', False))
    own = os.path.join(cfg.out_dir, 'ckpt.pt')          # resume: always the run's own; init_from: only its start
    ckpt_path = own if cfg.resume else cfg.init_from or own
    ckpt = None
    if cfg.resume or cfg.eval_only or cfg.init_from:
        ckpt = load_checkpoint(ckpt_path, device)
        if cfg.resume:
            check_resume(cfg, ckpt, ckpt_path, RESUMABLE_CHANGES)
        load_weights(net, ckpt, ckpt_path)
    run = Run(cfg, rank, world, device, net, train_set, val_set, argv)
    if run.steps_per_epoch == 0 and not cfg.eval_only:
        raise UserError(f"batch_size={cfg.batch_size} is larger than the {len(train_set)} training images")
    return run, ckpt


def describe(run):
    cfg, size = run.cfg, run.val_set.size
    run.say(f"{cfg.model} ({cfg.backbone}): {sum(p.numel() for p in run.raw_model.parameters()) / 1e6:.2f} M "
            f"parameters, input {size[0]}x{size[1]}; {cfg.dataset}: {len(run.train_set)} train / "
            f"{len(run.val_set)} val; device {run.device}, {run.world} process(es)")
    for m in run.raw_model.modules():
        if isinstance(m, CTAL):                 # what impl='auto' resolved to on this device
            run.say(f"CTAL at {m.size[0]}x{m.size[1]}: impl {m.impl!r} -> {m.impl_for(run.device)}")
    if cfg.bf16 and run.device.type != "cuda":
        run.say("note: bf16 autocast is for CUDA; running in float32 on CPU")
    if cfg.dataset != 'synthetic' and not (cfg.pretrained or cfg.init_from or cfg.resume or cfg.eval_only):
        run.say(f"warning: training {cfg.model} on {cfg.dataset} from random weights (pretrained=None); the papers "
                f"start the backbone from ImageNet weights: pass a local file with --pretrained=PATH (timm's "
                f"hrnet_w18_small_v2 / torchvision's swin_v2_s-6cf4c8c5.pth)")
    run.say(f"delta_m reference: {run.reference_source}" if run.reference else
            f"delta_m: unavailable: {run.reference_source}")


def score_checkpoint(run, ckpt_path):
    """eval_only: metrics, delta_m and the PNG grid of the loaded weights -> out_dir/eval.json."""
    result = {'checkpoint': ckpt_path, **evaluate(run), 'reference': {'source': run.reference_source,
              'values': run.reference}, **provenance(run.argv), 'config': dict(run.cfg)}
    if run.master:
        os.makedirs(run.cfg.out_dir, exist_ok=True)
        write_json(run.path('eval.json'), result)
        run.save_grid('vis_eval.png')
    run.say(f"{ckpt_path} on the {run.cfg.dataset} val split (val loss {result['val_loss']:.4f}):\n"
            f"{format_metrics(result['metrics'], run.reference, run.cfg.dataset)}\n  delta_m: "
            f"{format_delta(result['delta_m'])} (reference: {run.reference_source})")
    return result


def finish(run):
    """results.json and the summary."""
    cfg, final, best = run.cfg, run.progress.last, run.progress.best
    results = results_record(run)
    if run.master:
        write_json(run.path('results.json'), results)
    run.say(f"\n==== {cfg.model} on {cfg.dataset} ({cfg.backbone}), seed {cfg.seed}: final metrics after "
            f"epoch {final['epoch']} (val loss {final['val_loss']:.4f})\n"
            f"{format_metrics(final['metrics'], run.reference, cfg.dataset)}")
    run.say(f"  delta_m: unavailable: {run.reference_source}" if final['delta_m'] is None else
            f"  delta_m vs {run.reference_source}: {final['delta_m']:+.2f} %   (best epoch {best['epoch']}: "
            f"{best['delta_m']:+.2f} %)")
    run.say(f"  total time {results['train_time_s'] / 60:.1f} min; outputs in {cfg.out_dir}")
    return results


def run_command(cfg, argv=()):
    run, ckpt = setup(cfg, argv)
    describe(run)
    if cfg.eval_only:
        return score_checkpoint(run, cfg.init_from or run.path('ckpt.pt'))
    if cfg.resume:
        restore_run(run, ckpt)
        run.say(f"resumed from {run.path('ckpt.pt')}: {run.progress.epoch} epochs + "
                f"{run.progress.batches_done} steps done")
    if run.master:
        os.makedirs(cfg.out_dir, exist_ok=True)
        run.say("config:\n" + '\n'.join(f"  {k:<{max(map(len, cfg))}} = {v!r}" for k, v in cfg.items()))
        write_json(run.path('config.json'), cfg)
    barrier()
    train(run)
    return finish(run)


def main(argv=None):
    """Command line entry: the exit code (0 ok, 1 a user mistake or a data fault, 130 interrupted)."""
    try:
        argv = sys.argv[1:] if argv is None else argv
        run_command(parse_config(argv), argv)
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
