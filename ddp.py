"""Data-parallel training that computes what one process would (torchrun + torch.distributed).

`batch_size` is the global batch: each epoch's order is DistributedSampler's permutation (randperm seeded
by seed + epoch) and rank r takes every W-th index, so the union of the ranks' j-th batches is the
one-process j-th batch; each sample's augmentation is drawn from an RNG seeded by (seed, epoch, index)
alone (SeededAugmentation), whatever worker, rank or resume point loads it; BatchNorm statistics are
taken over the global batch (nn.SyncBatchNorm on CUDA, CPUSyncBatchNorm over gloo on CPU); every masked
loss divides by the valid pixels of the global batch (metrics.global_counts). One process and W processes
then compute the same step, to float rounding; so do micro-batches (micro_batches, gradient_sync), except for
BatchNorm's batch statistics. One DataLoader per run (EpochBatches) keeps its workers across epochs.
Ctrl-C / SIGTERM stop every rank after the same step (StopFlag), so the checkpoint then written is one state
of the whole run.
"""
import contextlib
import os
import signal
import threading
import warnings

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

from config import UserError


def setup_distributed(device, batch_size, accum_steps=1):
    """torchrun sets RANK / WORLD_SIZE / LOCAL_RANK: join the group (nccl on CUDA, gloo on CPU). Returns
    (rank, world, device), on CUDA each process on its local rank's GPU. The global batch must split into
    world x accum_steps equal micro-batches."""
    world = int(os.environ.get('WORLD_SIZE', '1'))
    rank, local_rank = int(os.environ.get('RANK', '0')), int(os.environ.get('LOCAL_RANK', '0'))
    if device.type == 'cuda':
        device = torch.device('cuda', local_rank if world > 1 else device.index or 0)
        torch.cuda.set_device(device)
    if batch_size % (world * accum_steps):
        raise UserError(f"batch_size={batch_size} (the global batch) must divide into {world} process(es) x "
                        f"grad_accum_steps={accum_steps} equal micro-batches")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group('nccl' if device.type == 'cuda' else 'gloo')
    return rank, world, device


def all_reduce_sum(x):
    if dist.is_initialized():
        dist.all_reduce(x)
    return x


def barrier():
    if dist.is_initialized():
        dist.barrier()


def differentiable_all_reduce(x):
    """Sum over ranks whose backward sums the gradients over ranks too (torch.distributed.nn's version
    warns that it is deprecated in favour of _functional_collectives, which has no autograd)."""
    from torch.distributed.nn.functional import all_reduce
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', FutureWarning)
        return all_reduce(x)


def micro_batches(batch, n):
    """A rank's batch cut into n equal micro-batches (grad_accum_steps), whose gradients add up to the batch's."""
    return [batch] if n == 1 else [dict(zip(batch, parts)) for parts in zip(*(v.chunk(n) for v in batch.values()))]


def gradient_sync(model, last):
    """DDP all-reduces the gradients in the last micro-batch's backward only (no_sync before it)."""
    return contextlib.nullcontext() if last or not hasattr(model, 'no_sync') else model.no_sync()


class CPUSyncBatchNorm(nn.BatchNorm2d):
    """BatchNorm2d with training statistics over the global batch of all ranks, for gloo (nn.SyncBatchNorm
    is GPU-only). The running variance gets the unbiased variance, as nn.BatchNorm2d on the whole batch;
    the all-reduces are differentiable, so each rank's backward sees the others' share of the statistics."""

    def forward(self, x):
        if not (self.training and dist.is_initialized()):
            return super().forward(x)
        count = differentiable_all_reduce(x.new_tensor([x.numel() / x.shape[1]]))     # pixels per channel
        mean = differentiable_all_reduce(x.sum((0, 2, 3))) / count                    # (C,)
        centred = x - mean[:, None, None]
        var = differentiable_all_reduce((centred ** 2).sum((0, 2, 3))) / count        # two-pass: stable
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean)
            self.running_var.mul_(1 - self.momentum).add_(self.momentum * var * count / (count - 1).clamp(min=1))
        return centred * torch.rsqrt(var + self.eps)[:, None, None] * self.weight[:, None, None] \
            + self.bias[:, None, None]


def wrap_distributed(net, device, world, sync_bn=True):
    """(the network, what a training step calls): under W > 1 processes the network with synchronised BatchNorm
    (sync_bn) inside DistributedDataParallel, which expects unused parameters where the model says a step may
    leave some without gradient (`uses_all_parameters`); in one process the network twice."""
    if world == 1:
        return net, net
    net = convert_sync_batchnorm(net, device).to(device) if sync_bn else net
    return net, nn.parallel.DistributedDataParallel(net, device_ids=[device.index] if device.type == 'cuda' else None,
                                                    find_unused_parameters=not net.uses_all_parameters)


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


class SeededAugmentation(torch.utils.data.Dataset):
    """Each sample's augmentation draws from a torch RNG seeded by (seed, epoch, index) alone, so a sample
    is the same whatever the worker, rank or resume point that loads it. Indexed by (epoch, index) (what
    EpochBatches yields: the epoch travels with the index to long-lived workers) or by index (epoch 0)."""

    def __init__(self, dataset, seed):
        self.dataset, self.seed = dataset, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        epoch, i = key if isinstance(key, tuple) else (0, key)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(np.random.SeedSequence([self.seed, epoch, i]).generate_state(1)[0]))
            return self.dataset[i]


def epoch_batches(n, epoch, cfg, rank, world, start=0):
    """This rank's batches (lists of indices) of one epoch: DistributedSampler's permutation (randperm
    seeded by seed + epoch, every world-th index), last partial batch dropped, at most max_steps_per_epoch of them;
    `start` skips those already done (resume)."""
    sampler = torch.utils.data.DistributedSampler(range(n), num_replicas=world, rank=rank, shuffle=True,
                                                  seed=cfg['seed'], drop_last=True)
    sampler.set_epoch(epoch)
    order, b = list(sampler), cfg['batch_size'] // world
    batches = [order[i:i + b] for i in range(0, len(order) - b + 1, b)]
    return batches[:cfg['max_steps_per_epoch'] or None][start:]


class EpochBatches(torch.utils.data.Sampler):
    """The batch sampler of one DataLoader for the whole run (its workers persist across epochs): this rank's
    epoch_batches of the epoch last set (`set_epoch`), each index paired with its epoch for SeededAugmentation."""

    def __init__(self, n, cfg, rank, world):
        self.n, self.cfg, self.rank, self.world, self.epoch, self.start = n, cfg, rank, world, 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def __iter__(self):
        batches = epoch_batches(self.n, self.epoch, self.cfg, self.rank, self.world, self.start)
        return iter([[(self.epoch, i) for i in batch] for batch in batches])

    def __len__(self):
        return len(epoch_batches(self.n, self.epoch, self.cfg, self.rank, self.world, self.start))


class Interrupted(Exception):
    """Ctrl-C / SIGTERM: a checkpoint was saved."""


class StopFlag:
    """SIGINT / SIGTERM set a flag; the ranks agree on it before each step and stop after a whole step
    with a checkpoint. A second Ctrl-C aborts at once."""

    def __init__(self):
        self.requested, self.previous = False, {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():     # signal handlers live there only
            self.previous = {sig: signal.signal(sig, self.handle) for sig in (signal.SIGINT, signal.SIGTERM)}
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

    def agreed(self, device):
        return all_reduce_sum(torch.tensor(float(self.requested), device=device)) > 0
