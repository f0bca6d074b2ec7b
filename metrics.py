"""Per-task losses, evaluation meters and the MTL gain (delta_m): every number a table reports.

Data flow (train.py is the only user; results.py reads the tables):
  training:   losses = compute_losses(out, batch, tasks, loss_options(cfg), the model's extra losses): per task
              the final prediction's task_loss + the mean of its initial ones; loss = sum_t w_t * losses[t]
  evaluation: evaluate(net, loader, ...): meters = build_meters(tasks); for each val batch:
              meters[t].update(pred_t, target_t) (and on each initial prediction);
              under DDP meters[t].all_reduce() once at the end; meters[t].compute() -> {name: float};
              delta_m({t: results[t][TASK_METRIC[t][0]]}, STL_REFERENCE[(dataset, backbone)]).
Predictions are the raw model outputs at target resolution, (B, K, H, W): semseg / human_parts logits,
depth values, unnormalised normals, saliency / edge logits. Targets follow data.py's conventions:
semseg / human_parts int64 (B, H, W) with 255 = ignore; depth (B, 1, H, W) with 0 = invalid;
normals (B, 3, H, W) with the all-zero vector = invalid; saliency / edge (B, 1, H, W) in {0, 1}, 255 = ignore.

Definitions (the papers' metrics, CTAL paper Sec. 3.2 and its appendix; the formulas are repeated next
to the code that computes them):
Losses, each a mean over the valid pixels of the whole batch (a batch with no valid pixel gives an exact 0
that is still attached to the graph, never NaN); in training the whole batch is the global one: with `counts`
(loss_counts summed over ranks and micro-batches, global_counts) each rank's loss is its share of that mean:
  semseg / human_parts  cross-entropy, 255 ignored.
  depth                 L1 = mean |p - g| over pixels with g != 0.
  normals               1 - mean <p/max(|p|, eps), g> over pixels whose target vector is non-zero.
  saliency / edge       balanced binary cross-entropy on logits x (HED / MTI-Net style):
                          L = ( w * sum_pos -log sigmoid(x) + (1 - w) * sum_neg -log(1 - sigmoid(x)) ) / N
                        pos / neg = valid pixels with target 1 / 0, N = number of valid pixels (not 255).
                        edge: w fixed per dataset (data.DATASETS edge_pos_weight: PASCAL 0.95, NYUD_MT 0.8,
                        ATRC's). saliency: w = N_neg / N computed over the batch, i.e. the
                        positive term is weighted by the fraction of negatives and the negative term by
                        the fraction of positives. MTI-Net's BalancedCrossEntropyLoss divides by all the
                        pixels of the tensor; we divide by the valid ones (identical when nothing is
                        ignored, and the value then does not depend on how much of a batch is void).
Meters, accumulated per pixel over the whole split (float64 sums, so the result does not depend on how
the split is cut into batches or ranks; all_reduce sums them across processes):
  seg      confusion matrix C[target, prediction] over non-ignored pixels, prediction = argmax of logits.
           IoU_k = C_kk / (sum_j C_kj + sum_j C_jk - C_kk); a class absent from both target and
           prediction has IoU NaN and is left out: mIoU = nanmean_k IoU_k * 100.
           pixel_acc = trace(C) / sum(C) * 100.
  depth    over pixels with g != 0: abs_err = mean |p - g|, rel_err = mean |p - g| / g,
           rmse = sqrt(mean (p - g)^2). rel_err is a plain ratio, not a percentage (on the MTAN Cityscapes
           inverse depth it is ~30, which is what the papers print).
  normals  angle = degrees(acos(clamp(<p/|p|, g>, -1, 1))) over valid pixels (g not normalised, as the
           authors' evaluation):
           mean, median, and the % of angles strictly below 11.25, 22.5, 30 degrees.
           The median is taken from a histogram of 0.001-degree bins over [0, 180]: it is the exact median
           (numpy convention: mean of the two middle values for an even count) of the angles quantised to
           their bin centres, so within 0.0005 degrees of the exact median of the raw angles, and it is
           mergeable across batches and ranks like every other sum.
  saliency probability = sigmoid(logit); at each threshold t in 0.05, 0.10, ..., 0.95 a pixel is
           predicted salient when probability >= t; TP, FP, FN per threshold summed over the split;
           F_t = (1 + b2) P R / (b2 P + R) = (1 + b2) TP / ((1 + b2) TP + b2 FN + FP), b2 = 0.3
           (0 where undefined); maxF = max_t F_t * 100.
  edge     the papers' metric is the validation loss: the edge loss above (the dataset's w) summed per pixel
           over the split and divided by the number of valid pixels of the split (the per-batch mean
           weighted by each batch's pixel count, as MTI-Net's EdgeMeter, so batch-split invariant).
MTL gain: delta_m = 100 / T * sum_t s_t * (M_t - B_t) / B_t, s_t = +1 when higher is better and -1
when lower is better (the (-1)^{l_t} of the papers), on the metric named by TASK_METRIC (gain_metrics: on
NYUD_MT depth counts by RMSE, as ATRC and TIF report it; its edge by odsF, which needs the external SEISM
benchmark, so its delta_m covers semseg, depth and normals).
"""

import json
import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F

from config import UserError
from data import DATASETS, IGNORE, to_device   # IGNORE: the label to skip (seg / saliency / edge), as data.py writes it

EDGE_POS_WEIGHT = 0.95       # default weight of the positive (edge) term of the edge loss (PASCAL: MTI-Net / ATRC)
NORMALS_EPS = 1e-12          # eps of the prediction normalisation (F.normalize's default)
DEPTH_EVAL_MIN = 1e-9        # depth predictions <= 0 are evaluated as this (the authors' eval_depth)
NORMALS_BIN_DEG = 0.001      # histogram resolution of the normals median, degrees
NORMALS_BINS = 180_000       # 180 / 0.001 bins over [0, 180]
NORMALS_WITHIN = (11.25, 22.5, 30.0)
SAL_THRESHOLDS = tuple(k / 20 for k in range(1, 20))   # 0.05, 0.10, ..., 0.95
SAL_BETA2 = 0.3

SEG_TASKS = ('semseg', 'human_parts')
# channels each non-segmentation task predicts (segmentation: one per class)
TASK_CHANNELS = {'depth': 1, 'normals': 3, 'saliency': 1, 'edge': 1}
TASKS = SEG_TASKS + tuple(TASK_CHANNELS)


# ---------------------------------------------------------------------------------------------- checks

def _check(task, pred, target, channels=None):
    """Shapes and dtypes of the dataset conventions (data.py); pred must already be at target resolution."""
    if not torch.is_tensor(pred) or pred.dim() != 4:
        raise ValueError(f"{task}: prediction must be a (B, K, H, W) tensor, got "
                         f"{tuple(pred.shape) if torch.is_tensor(pred) else type(pred).__name__}")
    if not torch.is_tensor(target):
        raise ValueError(f"{task}: target must be a tensor, got {type(target).__name__}")
    B, K, H, W = pred.shape
    if channels is not None and K != channels:
        raise ValueError(f"{task}: prediction has {K} channels, expected {channels}")
    if task in SEG_TASKS:
        expected = (B, H, W)
        if target.dtype != torch.int64:
            raise ValueError(f"{task}: target must hold int64 class labels, got {target.dtype}; "
                             f"cast with target.long()")
    else:
        expected = (B, TASK_CHANNELS[task], H, W)
    if tuple(target.shape) != expected:
        raise ValueError(f"{task}: target shape {tuple(target.shape)} does not match prediction "
                         f"{tuple(pred.shape)}; expected target {expected}. Upsample predictions to the "
                         f"target resolution before the loss / meter.")


# ---------------------------------------------------------------------------------------------- losses

def valid_pixels(task, target):
    """The pixels a task's loss averages over: (B, H, W) bool for segmentation / normals, (B, 1, H, W) else."""
    if task == 'normals':
        return (target != 0).any(dim=1)
    return target != 0 if task == 'depth' else target != IGNORE


def loss_counts(task, target):
    """What the masked loss of `task` divides by: (2,) int64, (valid pixels, valid negatives: they set the
    saliency balance). Summed over a global batch (all ranks and micro-batches, train.py), the sums make each
    rank's loss its share of the one-process mean of that batch: `task_loss(..., counts=sums)`."""
    valid = valid_pixels(task, target)
    return torch.stack([valid.sum(), (valid & (target < 0.5)).sum() if task in ('saliency', 'edge')
                        else torch.zeros_like(valid.sum())])


def _mean(total, n_valid, counts):
    """total / the valid pixels of this batch (n_valid), or of the global batch (`counts`); 0, not NaN, for none."""
    return total / (n_valid if counts is None else counts[0]).clamp(min=1)


def segmentation_loss(pred, target, task='semseg', counts=None):
    """Cross-entropy over the non-ignored pixels. pred (B, K, H, W) logits, target (B, H, W) int64."""
    _check(task, pred, target)
    ce = F.cross_entropy(pred.float(), target, ignore_index=IGNORE, reduction='sum')
    return _mean(ce, valid_pixels(task, target).sum(), counts)


def depth_loss(pred, target, counts=None):
    """L1 over pixels with valid depth (target != 0). pred, target (B, 1, H, W)."""
    _check('depth', pred, target)
    valid = valid_pixels('depth', target)
    return _mean(torch.where(valid, (pred.float() - target).abs(), 0.0).sum(), valid.sum(), counts)


NORMALS_LOSSES = ('cosine', 'l1')


def normals_loss(pred, target, form='cosine', counts=None):
    """Loss of the normalised prediction against the (unit) target over valid pixels (an all-zero target
    vector is invalid). pred (B, 3, H, W) unnormalised, target (B, 3, H, W).
    'cosine': mean over valid pixels of 1 - cos (the CTAL authors' CNN code, NYUv2 / Cityscapes).
    'l1': sum over the 3 channels of |n^ - g|, averaged over valid pixels (the CTAL authors' transformer
    code on PASCAL-Context, inherited from ATRC / MTI-Net)."""
    _check('normals', pred, target)
    valid = valid_pixels('normals', target)                                     # (B, H, W)
    unit = F.normalize(pred.float(), dim=1, eps=NORMALS_EPS)                    # (B, 3, H, W)
    if form == 'cosine':
        err = 1 - (unit * target).sum(1)                                        # (B, H, W)
    elif form == 'l1':
        err = (unit - target).abs().sum(1)
    else:
        raise ValueError(f"normals_loss={form!r}: expected one of {NORMALS_LOSSES}")
    return _mean(torch.where(valid, err, 0.0).sum(), valid.sum(), counts)


def _balanced_bce_sum(logits, target, pos_weight=None, counts=None):
    """Weighted per-pixel BCE summed over the valid pixels, and the number of valid pixels. logits, target
    (B, 1, H, W); pos_weight None = the fraction of negatives among the valid pixels (saliency) of this
    batch, or of the global batch (`counts`)."""
    valid = valid_pixels('saliency', target)                                     # edge: the same rule
    pos = valid & (target >= 0.5)
    neg = valid & ~pos
    if pos_weight is None:
        n_valid, n_neg = (valid.sum(), neg.sum()) if counts is None else counts
        pos_weight = n_neg.to(logits.dtype) / n_valid.clamp(min=1)
    # -log sigmoid(x) on positives, -log(1 - sigmoid(x)) on negatives, in the stable logits form
    bce = F.binary_cross_entropy_with_logits(logits, pos.to(logits.dtype), reduction='none')
    weight = pos.to(logits.dtype) * pos_weight + neg.to(logits.dtype) * (1 - pos_weight)   # 0 on ignored pixels
    return (weight * bce).sum(), valid.sum()


def saliency_loss(pred, target, counts=None):
    """Balanced BCE, positives weighted by the batch's fraction of negatives. pred logits (B, 1, H, W)."""
    _check('saliency', pred, target)
    return _mean(*_balanced_bce_sum(pred.float(), target, counts=counts), counts)


def edge_loss(pred, target, pos_weight=EDGE_POS_WEIGHT, counts=None):
    """Balanced BCE with a fixed positive weight (the dataset's). pred logits (B, 1, H, W), target (B, 1, H, W)."""
    _check('edge', pred, target)
    return _mean(*_balanced_bce_sum(pred.float(), target, pos_weight, counts), counts)


def task_loss(task, pred, target, normals_form='cosine', edge_pos_weight=EDGE_POS_WEIGHT, counts=None):
    """The loss of `task` on a prediction at target resolution: a scalar tensor, the mean over the valid pixels
    of this batch, or with `counts` (loss_counts summed over a global batch) this batch's share of the global
    mean. normals_form: the form of the normals loss ('cosine' | 'l1', see `normals_loss`); edge_pos_weight:
    the edge loss's positive weight (the dataset's)."""
    if task in SEG_TASKS:
        return segmentation_loss(pred, target, task, counts)
    if task == 'normals':
        return normals_loss(pred, target, normals_form, counts)
    if task == 'edge':
        return edge_loss(pred, target, edge_pos_weight, counts)
    if task == 'depth':
        return depth_loss(pred, target, counts)
    if task == 'saliency':
        return saliency_loss(pred, target, counts)
    raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")


def loss_options(cfg):
    """task_loss's options in a run of train.py: the normals loss form (its config), the edge weight (its dataset)."""
    return {'normals_form': cfg['normals_loss'],
            'edge_pos_weight': DATASETS[cfg['dataset']].get('edge_pos_weight', EDGE_POS_WEIGHT)}


def initial_predictions(out, task):
    """{name: prediction} of a task's initial predictions in a model's output: none, one, or one per scale of the
    multi-scale models (named task@1/4 ... task@1/32)."""
    initial = out['initial'].get(task)
    if isinstance(initial, (list, tuple)):
        return {f"{task}@1/{4 * 2 ** k}": p for k, p in enumerate(initial)}
    return {} if initial is None else {task: initial}


def compute_losses(out, batch, tasks, options=None, extra=None, counts=None, world=1):
    """Per task L_initial + L_final (deep supervision, CTAL paper Sec. 2) + extra[task] (the model's
    `extra_losses`): {task: scalar}. 'initial' holds a tensor, or for the multi-scale models a list of per-scale
    predictions (their mean loss), or nothing (stl / mtl). options: `loss_options` (None: the defaults).
    counts: {task: loss_counts summed over the global batch} (None: the means over this batch): then the masked
    losses are this batch's share of the global batch's mean, times `world` since DDP averages the ranks'
    gradients, so that W ranks (and micro-batches) compute one process's step whatever each image's valid pixels."""
    options, extra, losses = options or {}, extra or {}, {}
    for t in tasks:
        kw = dict(options, counts=None if counts is None else counts[t])
        initial = list(initial_predictions(out, t).values())
        losses[t] = task_loss(t, out[t], batch[t], **kw)
        if initial:
            losses[t] = losses[t] + sum(task_loss(t, p, batch[t], **kw) for p in initial) / len(initial)
        if world != 1:
            losses[t] = losses[t] * world
        if t in extra:
            losses[t] = losses[t] + extra[t]
    return losses


def global_counts(batch, tasks):
    """{task: loss_counts of `batch`, summed over the ranks}: the denominators of compute_losses(counts=...)."""
    counts = torch.stack([loss_counts(t, batch[t]) for t in tasks])                     # (T, 2) int64
    if dist.is_initialized():
        dist.all_reduce(counts)
    return dict(zip(tasks, counts))


# ---------------------------------------------------------------------------------------------- meters

class Meter:
    """Float64 sums over a split. Subclasses add to them in update() and read them in compute().
    The sums live on the device of the first prediction; merging two meters (or ranks) = adding sums."""

    def __init__(self, **shapes):
        self.sums = {name: torch.zeros(shape, dtype=torch.float64) for name, shape in shapes.items()}

    def _add(self, **values):
        for name, value in values.items():
            s = self.sums[name]
            if s.device != value.device:
                s = s.to(value.device)
            self.sums[name] = s + value.to(torch.float64)

    def merge(self, other):
        """Add another meter's sums (what all_reduce does across ranks)."""
        for name, value in other.sums.items():
            self._add(**{name: value})
        return self

    def all_reduce(self):
        """Sum the states of all torch.distributed ranks; call once, after the last update. No-op when
        torch.distributed is not initialised."""
        if not (dist.is_available() and dist.is_initialized()):
            return
        cuda = dist.get_backend() == 'nccl'   # NCCL only reduces CUDA tensors
        for name, value in self.sums.items():
            value = value.to(torch.device('cuda', torch.cuda.current_device())) if cuda else value
            dist.all_reduce(value, op=dist.ReduceOp.SUM)
            self.sums[name] = value

    def update(self, pred, target):
        raise NotImplementedError

    def compute(self):
        raise NotImplementedError


class SegmentationMeter(Meter):
    """mIoU (nanmean over classes), pixel accuracy and per-class IoU, all in %, from a confusion matrix."""

    def __init__(self, num_classes, task='semseg'):
        super().__init__(confusion=(num_classes, num_classes))
        self.num_classes, self.task = num_classes, task

    @torch.no_grad()
    def update(self, pred, target):
        K = self.num_classes
        _check(self.task, pred, target, K)
        label = pred.argmax(1)                                   # (B, H, W)
        valid = valid_pixels(self.task, target)
        index = target[valid] * K + label[valid]                 # row = target, column = prediction
        self._add(confusion=torch.bincount(index, minlength=K * K).view(K, K))

    def compute(self):
        c = self.sums['confusion'].cpu()
        tp = c.diag()
        iou = tp / (c.sum(1) + c.sum(0) - tp)        # 0/0 = NaN for a class absent from target and prediction
        return {'mIoU': float(iou.nanmean()) * 100,
                'pixel_acc': float(tp.sum() / c.sum()) * 100,
                'iou_per_class': [float(v) * 100 for v in iou]}


class DepthMeter(Meter):
    """abs_err, rel_err (a ratio) and rmse over pixels with valid depth (target != 0). As in the authors'
    evaluation code, predictions <= 0 are replaced by 1e-9 first."""

    def __init__(self):
        super().__init__(abs_sum=(), rel_sum=(), sq_sum=(), count=())

    @torch.no_grad()
    def update(self, pred, target):
        _check('depth', pred, target, 1)
        valid = valid_pixels('depth', target)
        p, g = pred.double()[valid], target.double()[valid]
        p = torch.where(p <= 0, DEPTH_EVAL_MIN, p)
        err = (p - g).abs()
        self._add(abs_sum=err.sum(), rel_sum=(err / g).sum(), sq_sum=(err * err).sum(),
                  count=valid.sum())

    def compute(self):
        s = {k: float(v) for k, v in self.sums.items()}
        n = s['count'] or float('nan')
        return {'abs_err': s['abs_sum'] / n, 'rel_err': s['rel_sum'] / n, 'rmse': (s['sq_sum'] / n) ** 0.5}


class NormalsMeter(Meter):
    """Angle errors in degrees: mean, median (0.001-degree histogram), % below 11.25 / 22.5 / 30."""

    def __init__(self):
        super().__init__(angle_sum=(), count=(), within=(len(NORMALS_WITHIN),), hist=(NORMALS_BINS,))

    @staticmethod
    def angles(pred, target):
        """Angle (degrees, float64) between normalised prediction and target at the valid pixels: (N,)."""
        valid = valid_pixels('normals', target)                                 # (B, H, W)
        p = F.normalize(pred.double(), dim=1, eps=NORMALS_EPS)
        cos = (p * target.double()).sum(1)[valid].clamp(-1, 1)
        return torch.rad2deg(torch.acos(cos))

    @torch.no_grad()
    def update(self, pred, target):
        _check('normals', pred, target, 3)
        angle = self.angles(pred, target)
        bins = (angle / NORMALS_BIN_DEG).floor().long().clamp(0, NORMALS_BINS - 1)
        within = torch.stack([(angle < t).sum() for t in NORMALS_WITHIN])
        self._add(angle_sum=angle.sum(), count=torch.tensor(angle.numel(), device=angle.device),
                  within=within, hist=torch.bincount(bins, minlength=NORMALS_BINS))

    def median(self):
        """Median of the bin-centre-quantised angles; numpy convention for an even count."""
        hist = self.sums['hist'].cpu()
        n = int(self.sums['count'])
        if n == 0:
            return float('nan')
        cum = hist.cumsum(0)                                       # cum[b] = #angles in bins <= b
        ranks = torch.tensor([(n - 1) // 2, n // 2], dtype=torch.float64)   # 0-based middle ranks
        b = torch.searchsorted(cum, ranks, right=True)             # first bin whose cum exceeds the rank
        return float((b.double() + 0.5).mean()) * NORMALS_BIN_DEG

    def compute(self):
        n = float(self.sums['count']) or float('nan')
        within = (self.sums['within'].cpu() / n * 100).tolist()
        out = {'mean': float(self.sums['angle_sum']) / n, 'median': self.median()}
        out.update({f'{t:g}': w for t, w in zip(NORMALS_WITHIN, within)})   # keys '11.25', '22.5', '30'
        return out


class SaliencyMeter(Meter):
    """maxF (%, beta^2 = 0.3) over thresholds 0.05..0.95 on sigmoid(logit), TP/FP/FN summed over the split."""

    def __init__(self):
        n = len(SAL_THRESHOLDS)
        super().__init__(tp=(n,), fp=(n,), fn=(n,))

    @torch.no_grad()
    def update(self, pred, target):
        _check('saliency', pred, target, 1)
        valid = valid_pixels('saliency', target)
        prob = torch.sigmoid(pred.double())[valid]                             # (N,)
        pos = target[valid] >= 0.5
        thresholds = torch.tensor(SAL_THRESHOLDS, dtype=torch.float64, device=prob.device)
        # level = number of thresholds <= prob: the pixel is predicted salient at thresholds[:level]
        level = torch.bucketize(prob, thresholds, right=True)                  # (N,) in 0..19
        n_levels = len(SAL_THRESHOLDS) + 1
        hist_pos = torch.bincount(level[pos], minlength=n_levels)
        hist_neg = torch.bincount(level[~pos], minlength=n_levels)
        # predicted salient at threshold k <=> level >= k + 1: a reverse cumulative sum of the histogram
        tp = hist_pos.flip(0).cumsum(0).flip(0)[1:]
        fp = hist_neg.flip(0).cumsum(0).flip(0)[1:]
        self._add(tp=tp, fp=fp, fn=pos.sum() - tp)

    def compute(self):
        tp, fp, fn = (self.sums[k].cpu() for k in ('tp', 'fp', 'fn'))
        num = (1 + SAL_BETA2) * tp
        den = num + SAL_BETA2 * fn + fp
        f = torch.where(den > 0, num / den.clamp(min=1e-300), 0.0)             # undefined F counts as 0
        best = int(f.argmax())
        return {'maxF': float(f[best]) * 100, 'maxF_threshold': SAL_THRESHOLDS[best]}


class EdgeMeter(Meter):
    """Mean validation edge loss (balanced BCE, the dataset's positive weight) over all valid pixels of the split."""

    def __init__(self, pos_weight=EDGE_POS_WEIGHT):
        super().__init__(loss_sum=(), count=())
        self.pos_weight = pos_weight

    @torch.no_grad()
    def update(self, pred, target):
        _check('edge', pred, target, 1)
        total, n_valid = _balanced_bce_sum(pred.double(), target.double(), self.pos_weight)
        self._add(loss_sum=total, count=n_valid)

    def compute(self):
        n = float(self.sums['count']) or float('nan')
        return {'loss': float(self.sums['loss_sum']) / n}


def build_meters(tasks, edge_pos_weight=EDGE_POS_WEIGHT):
    """tasks: dict task -> output channels (e.g. data.DATASETS['nyuv2']['tasks']) -> dict task -> meter."""
    meters = {}
    for task, channels in tasks.items():
        if task in SEG_TASKS:
            meters[task] = SegmentationMeter(channels, task)
        elif task in TASK_CHANNELS:
            if channels != TASK_CHANNELS[task]:
                raise ValueError(f"{task} predicts {TASK_CHANNELS[task]} channel(s), got {channels}")
            meters[task] = EdgeMeter(edge_pos_weight) if task == 'edge' else \
                {'depth': DepthMeter, 'normals': NormalsMeter, 'saliency': SaliencyMeter}[task]()
        else:
            raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASKS)}")
    return meters


# ---------------------------------------------------------------------------------------------- evaluation

def run_meters(cfg, tasks):
    """build_meters for `tasks` of a train.py config (its dataset's channels and edge weight)."""
    return build_meters({t: DATASETS[cfg['dataset']]['tasks'][t] for t in tasks}, loss_options(cfg)['edge_pos_weight'])


@torch.no_grad()
def evaluate(net, loader, cfg, device, reference, autocast, world=1, say=print):
    """The network over a val loader (under DDP this rank's share; sums all-reduced): {'val_loss' = sum_t w_t
    L_final_t averaged over images, 'delta_m' against `reference` (None without one), 'metrics', 'initial_metrics'
    (the meters on the initial predictions, which the CTAL authors print beside the final ones)}; a progress
    line every cfg.eval_log_interval batches (through `say`)."""
    net.eval()
    options, t0 = loss_options(cfg), time.time()
    meters, initial = run_meters(cfg, cfg['tasks']), {}
    loss_sum = torch.zeros(2, dtype=torch.float64, device=device)       # (sum of image losses, images)
    for j, batch in enumerate(loader):
        batch = to_device(batch, device)
        with autocast:
            out = net(batch['image'])
        for t in cfg['tasks']:
            pred = out[t].float()                                     # bf16 autocast: meters and loss in float32
            meters[t].update(pred, batch[t])
            loss_sum[0] += cfg['loss_weights'][t] * float(task_loss(t, pred, batch[t], **options)) * len(pred)
            for name, p in initial_predictions(out, t).items():
                if name not in initial:
                    initial[name] = run_meters(cfg, [t])[t]
                initial[name].update(p.float(), batch[t])
        loss_sum[1] += len(batch['image'])
        if cfg['eval_log_interval'] and (j + 1) % cfg['eval_log_interval'] == 0 and j + 1 < len(loader):
            rate = (j + 1) / (time.time() - t0)                       # batches per second
            say(f"  eval batch {j + 1}/{len(loader)} | {rate * len(batch['image']) * world:.1f} img/s | "
                f"ETA {(len(loader) - j - 1) / rate:.0f} s")
    for m in list(meters.values()) + list(initial.values()):
        m.all_reduce()
    if dist.is_initialized():
        dist.all_reduce(loss_sum)
    net.train()
    metrics = {t: m.compute() for t, m in meters.items()}
    dm = delta_m({t: metrics[t] for t in reference}, reference, gain_metrics(cfg['dataset'])) if reference else None
    return {'val_loss': float(loss_sum[0] / loss_sum[1].clamp(min=1)), 'delta_m': dm, 'metrics': metrics,
            'initial_metrics': {name: m.compute() for name, m in initial.items()}}


# ---------------------------------------------------------------------------------------------- MTL gain

# task -> (meter key feeding delta_m, +1 higher is better / -1 lower is better)
TASK_METRIC = {'semseg': ('mIoU', +1), 'human_parts': ('mIoU', +1), 'depth': ('rel_err', -1),
               'normals': ('mean', -1), 'saliency': ('maxF', +1), 'edge': ('loss', -1)}
# ATRC and TIF score NYUD-v2 depth by RMSE (ATRC Sec. 4.1, Tab. 1; TIF Tab. 3)
DATASET_TASK_METRIC = {'nyud': dict(TASK_METRIC, depth=('rmse', -1))}


def gain_metrics(dataset):
    """task -> (meter key, sign) of the gain metric on `dataset`."""
    return DATASET_TASK_METRIC.get(dataset, TASK_METRIC)


def delta_m(results, baseline, metrics=TASK_METRIC):
    """MTL gain in percent: 100 / T * sum_t s_t (M_t - B_t) / B_t (s_t from `metrics`, a gain_metrics table).
    results, baseline: dict task -> the task's gain metric (a float, or a meter's compute() dict)."""
    if not results or set(results) != set(baseline):
        raise ValueError(f"delta_m needs the same non-empty task set in results and baseline, got "
                         f"{sorted(results)} and {sorted(baseline)}")
    total = 0.0
    for task in results:
        if task not in metrics:
            raise ValueError(f"no gain metric for task {task!r}; expected one of {sorted(metrics)}")
        key, sign = metrics[task]
        m, b = (v[key] if isinstance(v, dict) else v for v in (results[task], baseline[task]))
        total += sign * (m - b) / b
    return 100 * total / len(results)


# NYUD-v2 (NYUD_MT) with HRNet-18 as the ATRC and TIF papers print it (5-seed means): mIoU %, depth RMSE (m),
# normals mean angle, edge odsF % (the external SEISM benchmark: not a meter here). Single task, ATRC's
# multi-task baseline, ATRC (ATRC Tab. 1), ATRC + FPM (ATRC Tab. 2), TIF (TIF Tab. 3).
PAPER_NYUD_HRNET18 = {
    'atrc_stl': {'semseg': 38.02, 'depth': 0.6104, 'normals': 20.94, 'edge': 76.22},
    'atrc_mtl': {'semseg': 36.35, 'depth': 0.6284, 'normals': 21.02, 'edge': 76.36},
    'atrc': {'semseg': 38.90, 'depth': 0.6010, 'normals': 20.48, 'edge': 76.34},
    'atrc_ms': {'semseg': 40.80, 'depth': 0.5826, 'normals': 20.51, 'edge': 76.50},
    'tif': {'semseg': 40.28, 'depth': 0.594, 'normals': 20.34, 'edge': 76.92},
}
_NYU, _CS = ('semseg', 'depth', 'normals'), ('semseg', 'depth')
_PASCAL = ('semseg', 'human_parts', 'saliency', 'normals', 'edge')
# The papers' results per (dataset, backbone): (where printed, {model: {task: gain metric}}), in the meters'
# units (mIoU / maxF in %, depth rel_err a ratio (nyud: RMSE), normals mean angle in degrees, edge loss; NYUD's
# edge odsF is left out: no meter here). The first row is the single-task baseline, delta_m's reference.
PAPER_RESULTS = {
    ('nyuv2', 'hrnet18'): ("CTAL Tab. 1 (= EMA-Net Tab. 1), concat: CTAL Tab. 4", {m: dict(zip(_NYU, v)) for m, v in {
        'stl': (49.23, 0.1636, 23.15), 'mtl': (49.25, 0.1658, 24.16), 'padnet': (50.23, 0.1622, 23.63),
        'papnet': (50.00, 0.1615, 23.78), 'ctal_ss': (51.59, 0.1607, 22.84), 'mtinet': (51.51, 0.1538, 23.50),
        'ctal_ms': (52.70, 0.1529, 22.99), 'concat': (50.01, 0.1634, 23.65)}.items()}),
    ('cityscapes', 'hrnet18'): ("CTAL Tab. 1 (= EMA-Net Tab. 1), concat: CTAL Tab. 4", {m: dict(zip(_CS, v)) for m, v in {
        'stl': (48.89, 29.91), 'mtl': (49.78, 31.80), 'padnet': (50.67, 27.37), 'papnet': (50.82, 26.97),
        'ctal_ss': (51.36, 23.84), 'mtinet': (51.77, 29.90), 'ctal_ms': (51.94, 22.89),
        'concat': (50.33, 26.92)}.items()}),
    ('nyuv2', 'swinv2_s'): ("CTAL Tab. 2", {m: dict(zip(_NYU, v)) for m, v in {
        'stl': (55.78, 0.1570, 24.59), 'mtl': (57.07, 0.1500, 24.76), 'padnet': (57.40, 0.1469, 23.70),
        'papnet': (56.80, 0.1500, 23.73), 'ctal_ss': (58.06, 0.1491, 23.27)}.items()}),
    ('pascal', 'swinv2_s'): ("CTAL Tab. 3", {m: dict(zip(_PASCAL, v)) for m, v in {
        'stl': (74.07, 64.28, 83.95, 16.03, 0.0241), 'mtl': (72.99, 60.13, 82.93, 16.76, 0.0236),
        'padnet': (73.27, 60.22, 83.40, 16.44, 0.0235), 'papnet': (72.75, 60.32, 83.22, 16.52, 0.0235),
        'ctal_ss': (73.98, 61.14, 83.50, 15.96, 0.0210)}.items()}),
    ('nyud', 'hrnet18'): ("ATRC Tabs. 1-2, TIF Tab. 3 (without odsF)",
                          {m: {t: v for t, v in row.items() if t != 'edge'} for m, row in PAPER_NYUD_HRNET18.items()}),
}
# the papers' single-task baselines, each table's first row
STL_REFERENCE = {key: next(iter(rows.values())) for key, (_, rows) in PAPER_RESULTS.items()}


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


def format_delta(dm):
    return 'n/a' if dm is None else f'{dm:+.2f} %'


def format_metrics(metrics, reference, dataset):
    lines = []
    for t, values in metrics.items():
        cells = '  '.join(f"{k} {v:.4g}" for k, v in values.items() if isinstance(v, (int, float)))
        ref = f"   [STL {gain_metrics(dataset)[t][0]} {reference[t]:.4g}]" if reference and t in reference else ''
        lines.append(f"  {t:<12}{cells}{ref}")
    return '\n'.join(lines)
