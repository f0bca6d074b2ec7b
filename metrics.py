"""Per-task losses, evaluation meters and the MTL gain (delta_m): every number a table reports.

Data flow (train.py is the only user):
  training:   losses = compute_losses(out, batch, tasks, loss_options(cfg), the model's extra losses): per task
              the final prediction's task_loss + the mean of its initial ones; loss = sum_t w_t * losses[t]
  evaluation: meters = build_meters(tasks); for each val batch: meters[t].update(pred_t, target_t);
              under DDP meters[t].all_reduce() once at the end; meters[t].compute() -> {name: float};
              delta_m({t: results[t][TASK_METRIC[t][0]]}, STL_REFERENCE[(dataset, backbone)]).
Predictions are the raw model outputs at target resolution, (B, K, H, W): semseg / human_parts logits,
depth values, unnormalised normals, saliency / edge logits. Targets follow data.py's conventions:
semseg / human_parts int64 (B, H, W) with 255 = ignore; depth (B, 1, H, W) with 0 = invalid;
normals (B, 3, H, W) with the all-zero vector = invalid; saliency / edge (B, 1, H, W) in {0, 1}, 255 = ignore.

Definitions (the papers' metrics, CTAL paper Sec. 3.2 and its appendix; the formulas are repeated next
to the code that computes them):
Losses, each a mean over the valid pixels of the whole batch (a batch with no valid pixel gives an exact 0
that is still attached to the graph, never NaN):
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

import torch
import torch.distributed as dist
import torch.nn.functional as F

from config import UserError
from data import DATASETS, IGNORE        # IGNORE: the label to skip (seg / saliency / edge), with the data format

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

def segmentation_loss(pred, target, task='semseg'):
    """Cross-entropy over the non-ignored pixels. pred (B, K, H, W) logits, target (B, H, W) int64."""
    _check(task, pred, target)
    n_valid = (target != IGNORE).sum()
    ce = F.cross_entropy(pred.float(), target, ignore_index=IGNORE, reduction='sum')
    return ce / n_valid.clamp(min=1)   # sum / count instead of 'mean': 0 rather than NaN when all ignored


def depth_loss(pred, target):
    """L1 over pixels with valid depth (target != 0). pred, target (B, 1, H, W)."""
    _check('depth', pred, target)
    valid = target != 0
    err = torch.where(valid, (pred.float() - target).abs(), 0.0)
    return err.sum() / valid.sum().clamp(min=1)


NORMALS_LOSSES = ('cosine', 'l1')


def normals_loss(pred, target, form='cosine'):
    """Loss of the normalised prediction against the (unit) target over valid pixels (an all-zero target
    vector is invalid). pred (B, 3, H, W) unnormalised, target (B, 3, H, W).
    'cosine': mean over valid pixels of 1 - cos (the CTAL authors' CNN code, NYUv2 / Cityscapes).
    'l1': sum over the 3 channels of |n^ - g|, averaged over valid pixels (the CTAL authors' transformer
    code on PASCAL-Context, inherited from ATRC / MTI-Net)."""
    _check('normals', pred, target)
    valid = (target != 0).any(dim=1)                                            # (B, H, W)
    unit = F.normalize(pred.float(), dim=1, eps=NORMALS_EPS)                    # (B, 3, H, W)
    if form == 'cosine':
        err = 1 - (unit * target).sum(1)                                        # (B, H, W)
    elif form == 'l1':
        err = (unit - target).abs().sum(1)
    else:
        raise ValueError(f"normals_loss={form!r}: expected one of {NORMALS_LOSSES}")
    # mean over valid pixels, but 0 (not NaN) when there is no valid pixel
    return torch.where(valid, err, 0.0).sum() / valid.sum().clamp(min=1)


def _balanced_bce_sum(logits, target, pos_weight=None):
    """Weighted per-pixel BCE summed over the valid pixels, and the number of valid pixels.
    logits, target (B, 1, H, W); pos_weight None = the batch's fraction of negatives (saliency)."""
    valid = target != IGNORE
    pos = valid & (target >= 0.5)
    neg = valid & ~pos
    n_valid = valid.sum()
    w = neg.sum().to(logits.dtype) / n_valid.clamp(min=1) if pos_weight is None else pos_weight
    # -log sigmoid(x) on positives, -log(1 - sigmoid(x)) on negatives, in the stable logits form
    bce = F.binary_cross_entropy_with_logits(logits, pos.to(logits.dtype), reduction='none')
    weight = pos.to(logits.dtype) * w + neg.to(logits.dtype) * (1 - w)   # 0 on ignored pixels
    return (weight * bce).sum(), n_valid


def saliency_loss(pred, target):
    """Balanced BCE, positives weighted by the batch's fraction of negatives. pred logits (B, 1, H, W)."""
    _check('saliency', pred, target)
    total, n_valid = _balanced_bce_sum(pred.float(), target)
    return total / n_valid.clamp(min=1)


def edge_loss(pred, target, pos_weight=EDGE_POS_WEIGHT):
    """Balanced BCE with a fixed positive weight (the dataset's). pred logits (B, 1, H, W), target (B, 1, H, W)."""
    _check('edge', pred, target)
    total, n_valid = _balanced_bce_sum(pred.float(), target, pos_weight)
    return total / n_valid.clamp(min=1)


TASK_LOSS = {
    'semseg': lambda pred, target: segmentation_loss(pred, target, 'semseg'),
    'human_parts': lambda pred, target: segmentation_loss(pred, target, 'human_parts'),
    'depth': depth_loss,
    'normals': normals_loss,
    'saliency': saliency_loss,
    'edge': edge_loss,
}


def task_loss(task, pred, target, normals_form='cosine', edge_pos_weight=EDGE_POS_WEIGHT):
    """The loss of `task` (a key of TASK_LOSS) on a prediction at target resolution: a scalar tensor.
    normals_form: the form of the normals loss ('cosine' | 'l1', see `normals_loss`); edge_pos_weight: the
    edge loss's positive weight (the dataset's)."""
    if task not in TASK_LOSS:
        raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASK_LOSS)}")
    if task == 'normals':
        return normals_loss(pred, target, normals_form)
    if task == 'edge':
        return edge_loss(pred, target, edge_pos_weight)
    return TASK_LOSS[task](pred, target)


def loss_options(cfg):
    """task_loss's options in a run of train.py: the normals loss form (its config), the edge weight (its dataset)."""
    return {'normals_form': cfg['normals_loss'],
            'edge_pos_weight': DATASETS[cfg['dataset']].get('edge_pos_weight', EDGE_POS_WEIGHT)}


def compute_losses(out, batch, tasks, options=None, extra=None):
    """Per task L_initial + L_final (deep supervision, CTAL paper Sec. 2) + extra[task] (the model's
    `extra_losses`): {task: scalar}. 'initial' holds a tensor, or for the multi-scale models a list of per-scale
    predictions (their mean loss), or nothing (stl / mtl). options: `loss_options` (None: the defaults)."""
    options, extra, losses = options or {}, extra or {}, {}
    for t in tasks:
        initial = out['initial'].get(t)
        initial = [] if initial is None else initial if isinstance(initial, (list, tuple)) else [initial]
        losses[t] = task_loss(t, out[t], batch[t], **options)
        if initial:
            losses[t] = losses[t] + sum(task_loss(t, p, batch[t], **options) for p in initial) / len(initial)
        if t in extra:
            losses[t] = losses[t] + extra[t]
    return losses


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
        valid = target != IGNORE
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
        valid = target != 0
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
        valid = (target != 0).any(dim=1)                                        # (B, H, W)
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
        valid = target != IGNORE
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
            raise ValueError(f"unknown task {task!r}; expected one of {sorted(TASK_LOSS)}")
    return meters


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


# The papers' single-task baselines, in the meters' units (mIoU / maxF in %, depth rel_err a ratio (nyud:
# RMSE), normals mean angle in degrees, edge loss). hrnet18: EMA-Net / CTAL papers, Table 1 (CNN), nyud: ATRC
# Tab. 1; swinv2_s: CTAL paper, Tables 2 (NYUv2, transformer) and 3 (PASCAL-Context, transformer).
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
STL_REFERENCE = {
    ('nyuv2', 'hrnet18'): {'semseg': 49.23, 'depth': 0.1636, 'normals': 23.15},
    ('nyud', 'hrnet18'): {t: v for t, v in PAPER_NYUD_HRNET18['atrc_stl'].items() if t != 'edge'},   # no odsF
    ('cityscapes', 'hrnet18'): {'semseg': 48.89, 'depth': 29.91},
    ('nyuv2', 'swinv2_s'): {'semseg': 55.78, 'depth': 0.1570, 'normals': 24.59},
    ('pascal', 'swinv2_s'): {'semseg': 74.07, 'human_parts': 64.28, 'saliency': 83.95,
                             'normals': 16.03, 'edge': 0.0241},
}


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
