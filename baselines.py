"""The modules of the baselines EMA-Net/CTAL is compared with: PAD-Net, PAP-Net, the Concat ablation,
MTI-Net's multi-scale front end (per-scale heads + feature propagation), and TIF's decoder (ATRC, with its
context pooling, is atrc.py).

model.py composes these; nothing here knows about backbones or final heads. Every distillation module
maps a dict task -> task features (B, C, h, w) (the initial-prediction features F_t, in the canonical
task order) to a dict task -> distilled features D_t, which the final heads decode:

  ConcatDistillation   D_t = ReLU(BN(Conv1x1(cat_s F_s)))                      (ablation, CTAL Tab. 4)
  PADDistillation      D_t = F_t + sum_{s != t} sigmoid(W_ts F_s) * (W'_ts F_s)   (MTI-Net Eq. 1)
  PAPPropagation       Y_t <- beta A^t Y_t + (1 - beta) X_t,  A^t = sum_s softmax(w_t)_s A_s  (PAP-Net)
  MTINetFrontEnd       backbone maps [1/4 .. 1/32] -> per-scale task features and predictions, coarse to
                       fine, with a FeaturePropagation module handing each scale's task features to the
                       next finer one (MTI-Net Sec. 2.3-2.4); reused unchanged by ctal_ms.
  TIFDecoder           TIF's whole decoder (no distillation: no task reads another): backbone maps
                       [1/4 .. 1/32] -> per task logits at 1/4 (SAFF, SFD, LTHD; see its section)

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


# ----------------------------------------------------------------------------------------------------
# TIF ("Task-Interaction-Free Multi-Task Learning with Efficient Hierarchical Feature Representation",
# ACM MM 2024): no cross-task module at all. No code is public and the paper states no widths, kernel
# sizes, head counts or normalisation placement; every such choice below is a reading, and a named
# constructor argument of TIFDecoder (the README's Fidelity table lists them).

def conv_bn_relu(cin, cout, kernel):
    """The paper's FeatureFuse ("convolutional layers followed by batch normalization"): Conv (no bias) + BN,
    then ReLU (reading: the ReLU is ours)."""
    return nn.Sequential(nn.Conv2d(cin, cout, kernel, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout),
                         nn.ReLU(inplace=True))


def feed_forward(width, ratio):
    """The transformer FFN of Eqs. 10 and 13 (reading: Linear(C, rC) - GELU - Linear(rC, C); r = 2 is
    calibrated with the width, see model.TIF)."""
    return nn.Sequential(nn.Linear(width, ratio * width), nn.GELU(), nn.Linear(ratio * width, width))


class SAFF(nn.Module):
    """Scale Attentive Feature Fusion at scale i (TIF Sec. 3.2, Eqs. 2-5), shared by all tasks:

      XL  = BN(Conv1x1(X^i))                                     the target scale, reduced to `width`
      Y   = BN(Conv1x1(cat_{j != i} P_i(X^j)))                   Scale Alignment (Eq. 2)
      SFX = SFF(cat(XL, Y)) + XL                                 Eq. 3; SFF: Conv - ReLU - Conv
      out = Conv1x1(ReLU(DWConv3x3(SFX)))                        Eqs. 4-5: spatial learner, channel mixer
    Readings: P_i is bilinear upsampling from coarser scales and adaptive average pooling from finer ones;
    the alignment weights W_i are Conv1x1 + BN like the reduction; SFF's convs are `sff_kernel` x
    `sff_kernel` on the concatenation; no residual around Eqs. 4-5 (none is written)."""

    def __init__(self, channels, i, width, sff_kernel=3):
        super().__init__()
        self.i = i
        self.reduce = conv1x1_bn(channels[i], width)
        self.align = conv1x1_bn(sum(channels) - channels[i], width)
        p = sff_kernel // 2
        self.sff = nn.Sequential(nn.Conv2d(2 * width, width, sff_kernel, padding=p), nn.ReLU(inplace=True),
                                 nn.Conv2d(width, width, sff_kernel, padding=p))
        self.spatial = nn.Conv2d(width, width, 3, padding=1, groups=width)
        self.mix = nn.Conv2d(width, width, 1)

    def forward(self, xs):
        size = xs[self.i].shape[-2:]
        others = [resize(x, size) if j > self.i else F.adaptive_avg_pool2d(x, size)
                  for j, x in enumerate(xs) if j != self.i]
        xl = self.reduce(xs[self.i])                                     # (B, width, h_i, w_i)
        sfx = self.sff(torch.cat([xl, self.align(torch.cat(others, 1))], 1)) + xl
        return self.mix(F.relu(self.spatial(sfx)))


def tokens(x):
    """(B, C, h, w) -> (B, h*w, C), row-major positions."""
    return x.flatten(2).transpose(1, 2)


class SFD(nn.Module):
    """Self-Feature Distillation of one task at one low scale (TIF Sec. 3.3, Eqs. 6-10): self-attention
    over the task's own features, nothing from another task.

      Z  = LayerNorm(tokens(X))                                 Flat(): "flatten and linear normalization"
      K  = V = Z W_1 + ... + Z W_N                              Eq. 6 (N = `kv_projections`)
      A  = (Z W_Q) K^T / sqrt(C)                                 Eq. 8: the affinity logits, (B, L, L)
      RX = softmax(A) V + tokens(X);  RX = FFN(LayerNorm(RX)) + RX     Eqs. 9-10
    Returns (RX as (B, C, h, w), A). Readings: one head; the 1/sqrt(C) scale (`scaled`; Eq. 8 has none);
    pre-LayerNorm before the FFN; Eq. 6 taken literally, N separate projections summed (one Linear
    computes the same function class; N is the paper's "task number")."""

    def __init__(self, width, kv_projections, ffn_ratio=2, scaled=True):
        super().__init__()
        self.norm, self.norm_ffn = nn.LayerNorm(width), nn.LayerNorm(width)
        self.query = nn.Linear(width, width)
        self.key_value = nn.ModuleList(nn.Linear(width, width) for _ in range(kv_projections))
        self.ffn = feed_forward(width, ffn_ratio)
        self.scale = width ** -0.5 if scaled else 1.0

    def forward(self, x):
        B, C, h, w = x.shape
        z = self.norm(tokens(x))
        kv = sum(project(z) for project in self.key_value)               # (B, L, C)
        logits = self.scale * self.query(z) @ kv.transpose(1, 2)         # (B, L, L)
        rx = logits.softmax(-1) @ kv + tokens(x)
        rx = self.ffn(self.norm_ffn(rx)) + rx
        return rx.transpose(1, 2).reshape(B, C, h, w), logits


def parent_index(src, dst):
    """For every position of a dst (h, w) grid (row-major), the flat index of its nearest-neighbour parent
    on the src grid: row floor(y * h_src / h_dst), column floor(x * w_src / w_dst)."""
    rows = torch.arange(dst[0]) * src[0] // dst[0]
    cols = torch.arange(dst[1]) * src[1] // dst[1]
    return (rows[:, None] * src[1] + cols[None, :]).flatten()


def upsample_affinity(affinity, src, dst):
    """Eq. 11's "upsampled" affinity: (B, L_src, L_src) on the src grid -> (B, L_dst, L_dst) on the dst
    grid, entry (p, q) = affinity[parent(p), parent(q)] (reading: nearest on both the query and the key
    grid; the paper does not define it)."""
    index = parent_index(src, dst).to(affinity.device)
    return affinity[:, index][:, :, index]


class LTHD(nn.Module):
    """Low-To-High scale feature Diffusion of one task at one high scale (TIF Sec. 3.4, Eqs. 12-13):

      RX  = softmax(A_bar) (tokens(Pool(X)) W_v)           Eq. 12, on the 1/16 grid (L_2 positions)
      out = FeatureFuse(cat(up(FFN(RX)), X))               Eq. 13
    `weights` = softmax(A_bar), A_bar = up(A^3) + A^2 (Eq. 11) is computed once per task by TIFDecoder. No
    attention is formed at this scale: Pool brings X down to the 1/16 grid. Readings: Pool = adaptive
    average pooling; FFN without residual or norm (Eq. 13 has none); FeatureFuse = Conv + BN + ReLU over
    the bilinearly upsampled result concatenated with X."""

    def __init__(self, width, ffn_ratio=2, fuse_kernel=3):
        super().__init__()
        self.value = nn.Linear(width, width)
        self.ffn = feed_forward(width, ffn_ratio)
        self.fuse = conv_bn_relu(2 * width, width, fuse_kernel)

    def forward(self, x, weights, grid):
        B, C = x.shape[:2]
        rx = weights @ self.value(tokens(F.adaptive_avg_pool2d(x, grid)))      # (B, L_2, C)
        rx = self.ffn(rx).transpose(1, 2).reshape(B, C, *grid)
        return self.fuse(torch.cat([resize(rx, x.shape[-2:]), x], 1))


class TIFDecoder(nn.Module):
    """TIF after the backbone (TIF Sec. 3, Fig. 2): backbone maps [X^0 .. X^3] at 1/4 .. 1/32 -> logits per
    task at 1/4. Task-shared: a SAFF per scale. Per task t, with nothing from any other task:

      X_t^i   = ReLU(BN(Conv1x1(SAFF_i)))                      task projection (reading: unstated)
      RX_t^i, A_t^i = SFD(X_t^i)                                i = 2, 3 (1/16, 1/32)
      RX_t^s  = LTHD(X_t^s, softmax(up(A_t^3) + A_t^2))         s = 0, 1 (1/4, 1/8)
      logits  = Conv1x1(FeatureFuse(cat_i up(RX_t^i)))          Eq. 14, at 1/4
    The largest attention matrix is L_2 x L_2 per task and image (L_2 = positions of the 1/16 grid).
    kv_projections=None means one per task (Eq. 6's N = the task number)."""

    def __init__(self, tasks, channels, width, sff_kernel=3, fuse_kernel=3, head_kernel=1, ffn_ratio=2,
                 kv_projections=None, scaled=True):
        super().__init__()
        self.tasks = dict(tasks)
        n = kv_projections or len(self.tasks)
        self.saff = nn.ModuleList(SAFF(channels, i, width, sff_kernel) for i in range(4))
        self.project = nn.ModuleDict({t: nn.ModuleList(conv_bn_relu(width, width, 1) for _ in range(4))
                                      for t in self.tasks})
        self.sfd = nn.ModuleDict({t: nn.ModuleList(SFD(width, n, ffn_ratio, scaled) for _ in range(2))
                                  for t in self.tasks})
        self.lthd = nn.ModuleDict({t: nn.ModuleList(LTHD(width, ffn_ratio, fuse_kernel) for _ in range(2))
                                   for t in self.tasks})
        self.head = nn.ModuleDict({t: nn.Sequential(conv_bn_relu(4 * width, width, head_kernel),
                                                    nn.Conv2d(width, k, 1)) for t, k in self.tasks.items()})

    def forward(self, xs):
        shared = [saff(xs) for saff in self.saff]                      # 4 x (B, width, h_i, w_i)
        return {t: self.decode(t, shared) for t in self.tasks}

    def decode(self, t, shared):
        x = [project(s) for project, s in zip(self.project[t], shared)]
        rx2, a2 = self.sfd[t][0](x[2])
        rx3, a3 = self.sfd[t][1](x[3])
        grid = tuple(x[2].shape[-2:])
        weights = (upsample_affinity(a3, tuple(x[3].shape[-2:]), grid) + a2).softmax(-1)   # (B, L_2, L_2)
        rx0, rx1 = (self.lthd[t][s](x[s], weights, grid) for s in (0, 1))
        size = x[0].shape[-2:]
        return self.head[t](torch.cat([resize(r, size) for r in (rx0, rx1, rx2, rx3)], 1))
