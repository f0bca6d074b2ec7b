"""The distillation modules of the baselines EMA-Net/CTAL is compared with: PAD-Net, PAP-Net, the
Concat ablation, and MTI-Net's multi-scale front end (per-scale heads + feature propagation).

model.py composes these; nothing here knows about backbones or final heads. Every distillation module
maps a dict task -> task features (B, C, h, w) (the initial-prediction features F_t, in the canonical
task order) to a dict task -> distilled features D_t, which the final heads decode:

  ConcatDistillation   D_t = ReLU(BN(Conv1x1(cat_s F_s)))                      (ablation, CTAL Tab. 4)
  PADDistillation      D_t = F_t + sum_{s != t} sigmoid(W_ts F_s) * (W'_ts F_s)   (MTI-Net Eq. 1)
  PAPPropagation       Y_t <- beta A^t Y_t + (1 - beta) X_t,  A^t = sum_s softmax(w_t)_s A_s  (PAP-Net)
  MTINetFrontEnd       backbone maps [1/4 .. 1/32] -> per-scale task features and predictions, coarse to
                       fine, with a FeaturePropagation module handing each scale's task features to the
                       next finer one (MTI-Net Sec. 2.3-2.4); reused unchanged by ctal_ms.

Blocks are torchvision's BasicBlock (what the MTI-Net heads, FPM and official code use), not rewrites.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torchvision.models.resnet import BasicBlock


def resize(x, size):
    """Bilinear resize (align_corners=False) of a (B, C, h, w) map to size; identity if already there."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=tuple(size), mode="bilinear", align_corners=False)


def conv1x1_bn(cin, cout):
    """The downsample branch of a residual block whose width changes: Conv1x1 (no bias) + BN."""
    return nn.Sequential(nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))


def basic_block(cin, cout):
    """torchvision BasicBlock cin -> cout, with a Conv1x1+BN shortcut when the width changes."""
    return BasicBlock(cin, cout, downsample=conv1x1_bn(cin, cout) if cin != cout else None)


# ----------------------------------------------------------------------------------------------------
# Concat (the "base" distillation of the CTAL ablation, CTAL paper Tab. 4 / EMA-Net Tab. 2)

class ConcatDistillation(nn.Module):
    """D_t = ReLU(BN(Conv1x1_t(cat(F_1, ..., F_T)))): every task sees every task's features, no attention.

    (B, T*C, h, w) -> per task (B, C, h, w). The final heads then run on C = 256 channels.
    """

    def __init__(self, tasks, channels=256):
        super().__init__()
        self.tasks = list(tasks)
        T = len(self.tasks)
        self.mix = nn.ModuleDict({
            t: nn.Sequential(nn.Conv2d(T * channels, channels, 1), nn.BatchNorm2d(channels), nn.ReLU(inplace=True))
            for t in self.tasks})

    def forward(self, feats):
        joint = torch.cat([feats[t] for t in self.tasks], 1)          # (B, T*C, h, w)
        return {t: self.mix[t](joint) for t in self.tasks}


# ----------------------------------------------------------------------------------------------------
# PAD-Net (Xu et al. 2018), in the form MTI-Net Eq. 1 writes it and uses at every scale

class SpatialAttention(nn.Module):
    """sigmoid(W F) * (W' F): a per-position, per-channel gate on a projection of another task's features.

    Both W and W' are Conv3x3 C -> C without bias (as in PAD-Net / MTI-Net).
    """

    def __init__(self, channels):
        super().__init__()
        self.gate = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.value = nn.Conv2d(channels, channels, 3, padding=1, bias=False)

    def forward(self, x):
        return torch.sigmoid(self.gate(x)) * self.value(x)


class PADDistillation(nn.Module):
    """Multi-modal distillation by spatial attention, MTI-Net Eq. 1 (PAD-Net's distillation module):

        F^o_t = F^i_t + sum_{s != t} sigmoid(W_{t,s} F^i_s) * (W'_{t,s} F^i_s)

    One SpatialAttention per ordered task pair (t, s): T (T - 1) pairs of 3x3 convs C -> C, which is
    what makes PAD-Net (7.08 M for T = 3, C = 256) and MTI-Net heavy. Used at 1/4 by `padnet` and at
    each of the 4 scales (C = 18, 36, 72, 144) by `mtinet`.
    """

    def __init__(self, tasks, channels):
        super().__init__()
        self.tasks = list(tasks)
        self.attention = nn.ModuleDict({
            f"{t}_from_{s}": SpatialAttention(channels)
            for t in self.tasks for s in self.tasks if s != t})

    def forward(self, feats):
        out = {}
        for t in self.tasks:
            d = feats[t]
            for s in self.tasks:
                if s != t:
                    d = d + self.attention[f"{t}_from_{s}"](feats[s])
            out[t] = d
        return out


# ----------------------------------------------------------------------------------------------------
# PAP-Net (Zhang et al. 2019): cross-task affinity propagation

PAP_AFFINITIES = ('code', 'paper')


def pap_affinity(x, variant='code', eps=1e-6):
    """PAP-Net's pixel affinity of one task's features x (B, C, h, w) -> A (B, HW, HW).

    'code' (default), as the CTAL authors implemented PAP-Net (EMA-Net repository, models/papnet.py), which
    produced the PAP-Net rows of their tables: each channel is L2-normalised over the HW positions,
    A0 = X^T X, and every column q is divided by its sum over p, negatives kept:
        A[p, q] = <x~(p), x~(q)> / sum_p' <x~(p'), x~(q)>,   x~[c, :] = x[c, :] / ||x[c, :]||.
    'paper', the PAP-Net paper's text (Zhang et al., CVPR 2019): cosine similarity per position,
    negatives clamped to 0, each row (query p) normalised over q; the diagonal is 1, so a row sums to
    >= 1 unless x(p) = 0, which eps guards:
        A[p, q] = max(0, <x^(p), x^(q)>) / sum_q' max(0, <x^(p), x^(q')>),   x^(p) = x[:, p] / ||x[:, p]||.
    The 'code' column sums are not guarded (as in the authors' code), so they can be near zero.
    """
    if variant == 'code':
        f = F.normalize(x.flatten(2), dim=2)                          # (B, C, HW), unit rows per channel
        a = f.transpose(1, 2) @ f                                     # (B, HW, HW)
        return a / a.sum(1, keepdim=True)
    if variant == 'paper':
        f = F.normalize(x.flatten(2), dim=1)                          # (B, C, HW), unit columns per position
        a = (f.transpose(1, 2) @ f).clamp_min(0)                      # (B, HW, HW)
        return a / a.sum(2, keepdim=True).clamp_min(eps)
    raise ValueError(f"pap_affinity={variant!r}: expected one of {PAP_AFFINITIES} ('code': the CTAL authors' "
                     f"PAP-Net, 'paper': the PAP-Net paper's row-normalised cosine)")


class PAPPropagation(nn.Module):
    """PAP-Net's cross-task affinity-guided propagation, per target task t:

        X_t = Conv1x1_t(F_t)                            (256 -> 128; the features that are propagated)
        A_s = pap_affinity(X_s)                         (HW x HW, one per source task s)
        A^t = sum_s softmax(w_t)_s A_s                  (w_t: T learnable logits, init 0 -> uniform)
        Y^0 = X_t,   Y^{k+1} = beta A^t Y^k + (1 - beta) X_t   for k < iters    (Y viewed as (C, HW))

    `affinity` picks how A_s is normalised ('code' | 'paper', see `pap_affinity`).
    beta = 0.05 (PAP-Net's value, fixed), iters = `pap_iters` (default 1, the papers' resource table;
    two iterations cost about 147 G more MACs per batch of 8 at NYUv2 1/4). The affinities are taken
    of X_s (128 channels), which reproduces the authors' FLOP count (372 G). Memory: T + 1 dense
    HW x HW matrices per image (~0.8 GB at NYUv2 1/4 in float32).
    """

    def __init__(self, tasks, in_channels=256, channels=128, beta=0.05, iters=1, affinity='code'):
        super().__init__()
        self.tasks = list(tasks)
        self.beta, self.iters, self.affinity = float(beta), int(iters), affinity
        self.reduce = nn.ModuleDict({t: nn.Conv2d(in_channels, channels, 1) for t in self.tasks})
        self.task_weights = nn.Parameter(torch.zeros(len(self.tasks), len(self.tasks)))  # w_t[s], row t

    def forward(self, feats):
        xs = {t: self.reduce[t](feats[t]) for t in self.tasks}          # (B, 128, h, w)
        aff = torch.stack([pap_affinity(xs[s], self.affinity) for s in self.tasks], 1)  # (B, T, HW, HW)
        mix = self.task_weights.softmax(1)                              # (T target, T source)
        out = {}
        for i, t in enumerate(self.tasks):
            a = sum(mix[i, j] * aff[:, j] for j in range(len(self.tasks)))  # A^t (B, HW, HW)
            x0 = xs[t].flatten(2)                                       # (B, C, HW)
            y = x0
            for _ in range(self.iters):
                y = self.beta * (y @ a.transpose(1, 2)) + (1 - self.beta) * x0  # Y[:, p] = sum_q A[p, q] Y[:, q]
            out[t] = y.view_as(xs[t])
        return out


# ----------------------------------------------------------------------------------------------------
# MTI-Net (Vandenhende et al. 2020): per-scale heads and the feature propagation module

class SEBlock(nn.Module):
    """Squeeze-and-excitation channel gate (Hu et al.), squeeze ratio 16: x * sigmoid(MLP(mean_HW x))."""

    def __init__(self, channels, ratio=16):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(channels, channels // ratio), nn.ReLU(inplace=True),
                                 nn.Linear(channels // ratio, channels), nn.Sigmoid())

    def forward(self, x):
        return x * self.mlp(x.mean((2, 3)))[:, :, None, None]


FPM_SOFTMAXES = ('code', 'paper')


def fpm_softmax(logits, num_tasks, variant='code'):
    """The FPM's attention mask from a (B, T*C, h, w) map whose channel t*C + c belongs to task t.

    'code' (default), as the MTI-Net authors' code (and the CTAL authors' copy of it, which produced the
    MTI-Net and CTAL-MS rows of their tables): the map is viewed as (B, C, T, h, w), so the softmax runs
    over groups of T CONSECUTIVE channels (channel j*T + i, i < T), which mostly lie in one task's chunk.
    'paper', MTI-Net paper Sec. 2.4 ("a softmax function along the task dimension"): the softmax runs
    over the T tasks' copies of one channel (channels t*C + c, t < T).
    """
    B, TC, h, w = logits.shape
    if variant == 'code':
        return logits.view(B, TC // num_tasks, num_tasks, h, w).softmax(2).view(B, TC, h, w)
    if variant == 'paper':
        return logits.view(B, num_tasks, TC // num_tasks, h, w).softmax(1).view(B, TC, h, w)
    raise ValueError(f"fpm_softmax={variant!r}: expected one of {FPM_SOFTMAXES} ('code': MTI-Net's code, over "
                     f"T consecutive channels; 'paper': MTI-Net Sec. 2.4, over tasks)")


class FeaturePropagation(nn.Module):
    """MTI-Net's Feature Propagation Module (FPM, Sec. 2.4, Fig. 3) at one scale with C channels per task.

        concat = cat_t F_t                                                  (B, T*C, h, w)
        f      = Conv1x1(BasicBlock(BasicBlock(concat -> T*C/4)))            (B, T*C, h, w)  harmonization
        shared = BasicBlock(fpm_softmax(f) * concat -> C)                    (B, C, h, w)
        out_t  = SE_t(shared) + F_t                                          per-task refinement
    """

    def __init__(self, tasks, channels, softmax='code'):
        super().__init__()
        self.tasks = list(tasks)
        self.softmax = softmax
        T = len(self.tasks)
        wide, narrow = T * channels, T * channels // 4
        self.harmonize = nn.Sequential(basic_block(wide, narrow), basic_block(narrow, narrow),
                                       nn.Conv2d(narrow, wide, 1))
        self.reduce = basic_block(wide, channels)
        self.se = nn.ModuleDict({t: SEBlock(channels) for t in self.tasks})

    def forward(self, feats):
        concat = torch.cat([feats[t] for t in self.tasks], 1)         # (B, T*C, h, w)
        mask = fpm_softmax(self.harmonize(concat), len(self.tasks), self.softmax)
        shared = self.reduce(mask * concat)                             # (B, C, h, w)
        return {t: self.se[t](shared) + feats[t] for t in self.tasks}


class MTINetFrontEnd(nn.Module):
    """MTI-Net's front end (Sec. 2.3-2.4): initial task features and predictions at 4 scales.

    Input: the backbone maps [x_0 .. x_3] at 1/4, 1/8, 1/16, 1/32 with `channels` (18, 36, 72, 144).
    Coarse to fine, s = 3 .. 0:
      input_t,s    = x_3                                          (s = 3)
                   = cat(x_s, upsample(FPM_{s+1}(features_{s+1})_t))  (s < 3)   c_s + c_{s+1} channels
      features_t,s = BasicBlock(BasicBlock(input_t,s -> c_s))     (Conv1x1+BN shortcut when widths differ)
      pred_t,s     = Conv1x1(features_t,s -> K_t)                 (deep supervision)
    with an FPM at 1/32, 1/16 and 1/8 (`softmax`: its mask variant, see `fpm_softmax`). Returns
    (features, predictions): two lists indexed by scale
    [1/4, 1/8, 1/16, 1/32], each a dict task -> tensor at that scale's resolution.
    Used by `mtinet` (then per-scale PAD distillation) and by `ctal_ms` (then cross-scale fusion + CTAL).
    """

    def __init__(self, tasks, channels=(18, 36, 72, 144), softmax='code'):
        super().__init__()
        self.tasks = dict(tasks)
        self.channels = tuple(channels)
        n = len(self.channels)
        c_in = [c + (self.channels[s + 1] if s + 1 < n else 0) for s, c in enumerate(self.channels)]
        self.heads = nn.ModuleList(
            nn.ModuleDict({t: nn.Sequential(basic_block(c_in[s], c), basic_block(c, c)) for t in self.tasks})
            for s, c in enumerate(self.channels))
        self.predictors = nn.ModuleList(
            nn.ModuleDict({t: nn.Conv2d(c, k, 1) for t, k in self.tasks.items()}) for c in self.channels)
        # fpm[s] propagates the task features of scale s to scale s - 1 (none at the finest scale)
        self.fpm = nn.ModuleList([nn.Identity()] + [FeaturePropagation(self.tasks, c, softmax)
                                                     for c in self.channels[1:]])

    def forward(self, xs):
        n = len(self.channels)
        features, predictions = [None] * n, [None] * n
        propagated = None
        for s in reversed(range(n)):
            if propagated is None:
                inputs = {t: xs[s] for t in self.tasks}
            else:
                size = xs[s].shape[-2:]
                inputs = {t: torch.cat([xs[s], resize(propagated[t], size)], 1) for t in self.tasks}
            features[s] = {t: self.heads[s][t](inputs[t]) for t in self.tasks}
            predictions[s] = {t: self.predictors[s][t](features[s][t]) for t in self.tasks}
            if s > 0:
                propagated = self.fpm[s](features[s])
        return features, predictions
