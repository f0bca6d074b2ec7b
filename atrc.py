"""ATRC, the adaptive task-relational context network ("Exploring Relational Context for Multi-Task Dense
Prediction", Bruggemann et al., ICCV 2021; code github.com/brdav/atrc), in one file: the genotypes, the four
context-pooling (CP) blocks, the architecture search, the distillation, the auxiliary label spaces and
losses, the models `atrc` / `atrc_ms` and ATRC's own baselines `atrc_mtl` / `atrc_stl` (model.build_model
builds them), and the training loop's hooks they provide (model.MultiTaskModel lists them).

Data flow of `atrc` (HRNet-18, as the authors' code):
  x -> HRNet (ATRC's mmseg fuse) -> 4 maps upsampled + concatenated at 1/4 (270 ch)
    -> per task F_t = Conv3x3-BN-ReLU (270 -> 67)
    -> ATRCDistillation: for target t, CP_ts(F_t, F_s) for every source s the genotype names (global: linear
       attention; local: a 9x9 window; T-label / S-label: attention over the region prototypes of the
       target's / source's auxiliary prediction; none), projected and fused with F_t
    -> Conv1x1 logits -> upsample;
  auxiliary heads on the DETACHED concatenation -> R_t region logits, trained by `aux_loss` on the targets
  discretised into the label spaces (depth bins, normals clusters) that `ATRC.prepare` fits on training data.
"""
import hashlib
import math
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from baselines import MTINetFrontEnd, conv_bn_relu, resize
from checkpoint import save_checkpoint
from data import IGNORE
from metrics import EDGE_POS_WEIGHT, SEG_TASKS
from model import HRNET_CHANNELS, SWIN_CHANNELS, Fuse, HRNetBackbone, MultiTaskModel, SwinBackbone, concat_scales

# ----------------------------------------------------------------------------------------------------
# genotypes: {target: {source: context}}

ATRC_CONTEXTS = ('none', 'global', 'local', 'tlabel', 'slabel')    # the ids 0..4 of the authors' genotypes
AUTHORS_TASK_NAMES = {'sal': 'saliency'}                          # their task names that differ from ours
LOCAL_WINDOW = 9


def atrc_genotype(genotype, tasks):
    """{target: {source: context}} for every pair of `tasks`; context a name of ATRC_CONTEXTS or its id.
    The authors' files load as they are: {"data": {target: {source: id}}, "step": ...}, rows = target,
    saliency named 'sal'. 'slabel' on the diagonal is 'tlabel' (the same regions), so the search never
    offers it there; a given one is kept."""
    names = list(tasks)
    if isinstance(genotype, dict) and isinstance(genotype.get('data'), dict):
        rename = lambda d: {AUTHORS_TASK_NAMES.get(k, k): v for k, v in d.items()}
        genotype = {t: rename(row) if isinstance(row, dict) else row for t, row in rename(genotype['data']).items()}
    if not isinstance(genotype, dict) or set(genotype) != set(names) or any(
            not isinstance(row, dict) or set(row) != set(names) for row in genotype.values()):
        raise ValueError(f"ATRC genotype: expected {{target: {{source: context}}}} over the tasks {names} (every "
                         f"pair once), got {genotype!r}")
    out = {}
    for t in names:
        out[t] = {}
        for s in names:
            c = genotype[t][s]
            c = ATRC_CONTEXTS[c] if isinstance(c, int) and not isinstance(c, bool) and 0 <= c < 5 else c
            if c not in ATRC_CONTEXTS:
                raise ValueError(f"ATRC genotype[{t!r}][{s!r}] = {genotype[t][s]!r}: expected one of "
                                 f"{ATRC_CONTEXTS} or its index 0..4")
            out[t][s] = c
    return out


# The ATRC authors' searched genotypes for HRNet-18 (their genotypes/atrc_nyud_hrnet18.json and
# atrc_pascal_hrnet18.json, step 40000), rows = target, columns = source. Other task sets take the
# sub-matrix of the one that holds their tasks (our NYUv2 and Cityscapes: the NYUD-v2 one).
ATRC_NYUD = {'semseg': dict(semseg='tlabel', depth='tlabel', normals='slabel', edge='slabel'),
             'depth': dict(semseg='slabel', depth='tlabel', normals='slabel', edge='slabel'),
             'normals': dict(semseg='slabel', depth='tlabel', normals='tlabel', edge='slabel'),
             'edge': dict(semseg='tlabel', depth='tlabel', normals='global', edge='tlabel')}
ATRC_PASCAL = {
    'semseg': dict(semseg='tlabel', human_parts='tlabel', saliency='slabel', normals='none', edge='slabel'),
    'human_parts': dict(semseg='tlabel', human_parts='tlabel', saliency='slabel', normals='tlabel', edge='slabel'),
    'saliency': dict(semseg='tlabel', human_parts='tlabel', saliency='tlabel', normals='slabel', edge='tlabel'),
    'normals': dict(semseg='tlabel', human_parts='tlabel', saliency='tlabel', normals='tlabel', edge='slabel'),
    'edge': dict(semseg='tlabel', human_parts='tlabel', saliency='tlabel', normals='global', edge='tlabel')}
def default_atrc_genotype(tasks):
    table = ATRC_PASCAL if {'human_parts', 'saliency'} & set(tasks) else ATRC_NYUD
    unknown = [t for t in tasks if t not in table]
    if unknown:
        raise ValueError(f"atrc: no published genotype covers the tasks {unknown}; pass a genotype "
                         f"{{target: {{source: context}}}} (contexts: none, global, local, tlabel, slabel)")
    return {t: {s: table[t][s] for s in tasks} for t in tasks}


# ----------------------------------------------------------------------------------------------------
# context pooling blocks, the search, the distillation

def spatial_softmax(aux_logits):
    """Â: the auxiliary logits (B, R, h, w) softmaxed over the h*w positions per region r, (B, R, L)."""
    return aux_logits.flatten(2).softmax(-1)


def two_conv_bn(cin, d, last):
    """f_q / f_k of the authors' code: Conv1x1-BN-ReLU, then Conv1x1-BN and `last` (Softplus or ReLU)."""
    return nn.Sequential(conv_bn_relu(cin, d, 1), nn.Conv2d(d, d, 1, bias=False), nn.BatchNorm2d(d), last)


def value_projection(channels, d, affine=True):
    """v = Conv1x1-BN-ReLU; the BN has no affine parameters during the search (the authors' code)."""
    v = conv_bn_relu(channels, d, 1)
    v[1] = nn.BatchNorm2d(d, affine=affine)
    return v


class ContextBlock(nn.Module):
    """What every CP block has (the authors' code): query f_q(target) and key f_k(source) projections ending
    in `activation`, and the value projection of the source."""
    activation = nn.ReLU

    def __init__(self, channels, d, affine=True):
        super().__init__()
        self.query = two_conv_bn(channels, d, self.activation())
        self.key = two_conv_bn(channels, d, self.activation())
        self.value = value_projection(channels, d, affine)


class GlobalContext(ContextBlock):
    """Global context: linear attention over all positions of the source with the dot-product kernel on
    Softplus features (no 1/sqrt(d): the authors' code), never an L x L tensor:
        out_i = sum_j v_j <k_j, q_i> / max(sum_j <k_j, q_i>, 1e-12)          q_i, k_j, v_j in R^d."""
    activation = nn.Softplus

    def forward(self, target, source, regions=None):
        B, _, h, w = target.shape
        q, k, v = self.query(target).flatten(2), self.key(source).flatten(2), self.value(source).flatten(2)
        kv = v @ k.transpose(1, 2)                                        # (B, d, d)
        norm = (k.sum(-1, keepdim=True).transpose(1, 2) @ q).clamp_min(1e-12)   # (B, 1, L)
        return (kv @ q / norm).view(B, -1, h, w)


class LocalContext(ContextBlock):
    """Local context: softmax attention over the 9 x 9 window around each position, logits / sqrt(d).
    Window positions outside the map count as logit 0 and value 0 (the authors' CUDA op: they stay in the
    softmax's denominator). Pure PyTorch via unfold: (B, d * 81, L) per map; the two contractions as
    einsums (batched matrix products, which FLOP counters see)."""

    def forward(self, target, source, regions=None):
        B, _, h, w = target.shape
        q, k, v = self.query(target), self.key(source), self.value(source)
        d, n = q.shape[1], LOCAL_WINDOW * LOCAL_WINDOW
        window = lambda x: F.unfold(x, LOCAL_WINDOW, padding=LOCAL_WINDOW // 2).view(B, d, n, h * w)
        logits = torch.einsum('bdl,bdnl->bnl', q.flatten(2), window(k)) * d ** -0.5      # (B, 81, L)
        return torch.einsum('bdnl,bnl->bdl', window(v), logits.softmax(1)).view(B, d, h, w)


class LabelContext(ContextBlock):
    """T-label / S-label context: attention over R region prototypes of the source features, the regions
    being the target's (T-label) or the source's (S-label) auxiliary prediction, softmaxed over positions:
        P = Â F_s^T (B, R, C), seen as a (B, C, R, 1) map;  out_i = sum_r softmax_r(<q_i, k_r> / sqrt(d)) v_r."""

    def forward(self, target, source, regions):
        B, _, h, w = target.shape
        prototypes = (regions @ source.flatten(2).transpose(1, 2)).transpose(1, 2)[..., None]   # (B, C, R, 1)
        q = self.query(target).flatten(2)                                 # (B, d, L)
        k, v = self.key(prototypes).flatten(2), self.value(prototypes).flatten(2)    # (B, d, R)
        attention = (q.transpose(1, 2) @ k * q.shape[1] ** -0.5).softmax(-1)         # (B, L, R)
        return (v @ attention.transpose(1, 2)).view(B, -1, h, w)


CONTEXT_BLOCKS = {'global': GlobalContext, 'local': LocalContext, 'tlabel': LabelContext, 'slabel': LabelContext}
FREEZE_MARGIN = 0.3          # the search fixes a block once its top two probabilities differ by this much
# the search's schedules (the authors' code), linear over the run: the Gumbel temperature, and the weight of the
# entropy term, negative at first (spread the choice), then positive (commit to one); the logits' own Adam lr
SEARCH_TAU, SEARCH_ENTROPY, SEARCH_ARCH_LR = (1.0, 0.05), (-0.02, 0.06), 5e-4


class SearchedContext(nn.Module):
    """One CP block during ATRC's architecture search (ATRC Sec. 3.3, the authors' code): the Gumbel-softmax
    mixture sum_i w_i op_i of the candidate contexts, weights w = gumbel_softmax(logits, tau) over
    ('none', 'global', 'local', 'tlabel'[, 'slabel']): 'none' adds nothing but takes its share. The diagonal
    (target = source) offers no S-label: its regions are the T-label's. In training, once the top two of
    softmax(logits) differ by >= FREEZE_MARGIN the block is fixed for good to the argmax (the `frozen`
    one-hot buffer); at evaluation the argmax alone runs."""

    def __init__(self, channels, d, diagonal):
        super().__init__()
        self.kinds = ATRC_CONTEXTS[:4] if diagonal else ATRC_CONTEXTS
        self.ops = nn.ModuleList(CONTEXT_BLOCKS[k](channels, d, affine=False) for k in self.kinds[1:])
        self.arch_logits = nn.Parameter(torch.zeros(len(self.kinds)))
        self.register_buffer('frozen', torch.zeros(len(self.kinds)))
        self.d = d

    def choice(self):
        """The context this block stands for now: the frozen one, else the argmax."""
        return self.kinds[int((self.frozen if self.frozen.any() else self.arch_logits).argmax())]

    def entropy(self):
        log_p = self.arch_logits.log_softmax(0)
        return -(log_p.exp() * log_p).sum()

    def mixture(self, tau):
        if self.training and not self.frozen.any():
            top = self.arch_logits.detach().softmax(0).topk(2).values
            if top[0] - top[1] >= FREEZE_MARGIN:
                self.frozen[self.arch_logits.argmax()] = 1.0
        if self.frozen.any() or not self.training:
            return F.one_hot(torch.tensor(self.kinds.index(self.choice())), len(self.kinds)).to(self.frozen)
        return F.gumbel_softmax(self.arch_logits, tau=tau, hard=False)

    def forward(self, target, source, regions_t, regions_s, tau):
        weights = self.mixture(tau)
        out = target.new_zeros(target.shape[0], self.d, *target.shape[2:])
        for w, kind, op in zip(weights[1:], self.kinds[1:], self.ops):
            if w.requires_grad or w > 0:                                # a one-hot skips the others
                out = out + w * op(target, source, regions_t if kind == 'tlabel' else regions_s)
        return out


class ATRCDistillation(nn.Module):
    """ATRC's distillation (its Fig. 2): for every target t, the CP blocks of its row of the genotype,
    their outputs concatenated and projected back to C (Conv1x1 + BN with BN weight and bias 0, so that
    ATRC adds exactly nothing at the start), then cat(F_t, projection) -> Conv1x1-BN-ReLU -> Dropout2d.
    A row of 'none' keeps only F_t -> Conv1x1-BN-ReLU -> Dropout2d. forward(feats, regions): feats
    {task: (B, C, h, w)}, regions {task: Â (B, R, L)} for the tasks a label context reads."""

    def __init__(self, tasks, genotype, channels, d, dropout=0.05, search=False):
        super().__init__()
        self.search, self.tau = search, SEARCH_TAU[0]       # tau: the search's Gumbel temperature (`schedule`)
        if search:                                          # every pair a mixture; no dropout (their code)
            self.genotype, dropout = None, 0.0
            self.blocks = nn.ModuleDict({t: nn.ModuleDict({s: SearchedContext(channels, d, s == t) for s in tasks})
                                         for t in tasks})
        else:
            self.genotype = atrc_genotype(genotype, tasks)
            self.blocks = nn.ModuleDict({t: nn.ModuleDict({s: CONTEXT_BLOCKS[c](channels, d) for s, c in row.items()
                                                           if c != 'none'}) for t, row in self.genotype.items()})
        self.project, self.bottleneck = nn.ModuleDict(), nn.ModuleDict()
        for t, blocks in self.blocks.items():
            if len(blocks):
                self.project[t] = nn.Sequential(nn.Conv2d(d * len(blocks), channels, 1, bias=False),
                                                nn.BatchNorm2d(channels))
                nn.init.zeros_(self.project[t][1].weight)
                nn.init.zeros_(self.project[t][1].bias)
            cin = 2 * channels if len(blocks) else channels
            self.bottleneck[t] = nn.Sequential(conv_bn_relu(cin, channels, 1), nn.Dropout2d(dropout))

    def region_tasks(self):
        """The tasks whose auxiliary regions some label context reads (in the search: every task)."""
        if self.search:
            return set(self.blocks)
        return {t if c == 'tlabel' else s for t, row in self.genotype.items() for s, c in row.items()
                if c in ('tlabel', 'slabel')}

    def current_genotype(self):
        """The genotype: fixed, or what the search stands for now (frozen blocks, else each argmax)."""
        if not self.search:
            return self.genotype
        return {t: {s: block.choice() for s, block in row.items()} for t, row in self.blocks.items()}

    def schedule(self, progress):
        """At `progress` (0 -> 1) of the search: sets the Gumbel temperature, returns the entropy term's weight."""
        self.tau = SEARCH_TAU[0] + progress * (SEARCH_TAU[1] - SEARCH_TAU[0])
        return SEARCH_ENTROPY[0] + progress * (SEARCH_ENTROPY[1] - SEARCH_ENTROPY[0])

    def entropy(self):
        """The search's entropy term: the mean entropy of the blocks' softmax(logits)."""
        return torch.stack([b.entropy() for row in self.blocks.values() for b in row.values()]).mean()

    def context(self, t, s, feats, regions):
        """CP_ts(F_t, F_s): (B, d, h, w)."""
        block = self.blocks[t][s]
        if self.search:
            return block(feats[t], feats[s], regions[t], regions[s], self.tau)
        return block(feats[t], feats[s], regions.get(t if self.genotype[t][s] == 'tlabel' else s))

    def forward(self, feats, regions):
        out = {}
        for t, blocks in self.blocks.items():
            x = feats[t]
            if len(blocks):
                context = torch.cat([self.context(t, s, feats, regions) for s in blocks], 1)
                x = torch.cat([x, self.project[t](context)], 1)
            out[t] = self.bottleneck[t](x)
        return out


# ----------------------------------------------------------------------------------------------------
# label spaces and auxiliary losses

# regions of the auxiliary prediction per task (ATRC's label spaces): segmentation tasks their classes;
# depth 40 log-spaced bins, normals 40 clusters on the sphere, edge and saliency 2 classes
ATRC_REGIONS = {'depth': 40, 'normals': 40, 'edge': 2, 'saliency': 2}
ATRC_DEPTH_RANGE = (0.7, 10.0)          # metres: the authors' log-spaced depth bins (NYUD-v2)


def discretise(task, target, depth_range=None, normals_centroids=None, depth_bins=None):
    """ATRC's label spaces: a target map -> (B, H, W) int64 region indices, 255 where it is invalid.
    depth: n = depth_bins bins spaced evenly in log(depth) over depth_range (bin floor(n log(d / lo) /
    log(hi / lo)), clipped to 0..n-1); normals: the nearest of the centroids (K, 3) by cosine; saliency /
    edge: the class 0 / 1; segmentation tasks: their labels."""
    if task in SEG_TASKS:
        return target
    if task == 'depth':
        lo, hi = (float(v) for v in depth_range)
        n = depth_bins
        bins = torch.floor(n * torch.log(target.clamp(min=1e-12) / lo) / math.log(hi / lo)).clamp(0, n - 1)
        return torch.where(target > 0, bins, float(IGNORE))[:, 0].long()
    if task == 'normals':
        index = torch.einsum('bchw,kc->bkhw', target, normals_centroids.to(target.dtype)).argmax(1)
        return torch.where((target != 0).any(1), index, IGNORE)
    return torch.where(target == IGNORE, float(IGNORE), (target >= 0.5).float())[:, 0].long()


def normals_centroids(normals, k, seed=0, iters=30):
    """k unit vectors that cluster the unit normals (N, 3) (N >= k): spherical k-means (cosine
    assignment, centroid = normalised mean) from a k-means++ start drawn with `seed`. ATRC's normals
    label space, computed here from training normals (theirs ship as a file of their data release)."""
    x = F.normalize(torch.as_tensor(normals, dtype=torch.float64), dim=1)
    g = torch.Generator().manual_seed(seed)
    centroids = x[torch.randint(len(x), (1,), generator=g)]
    for _ in range(k - 1):                # k-means++: the next start far (in angle) from those chosen
        far = (1 - (x @ centroids.T).max(1).values).clamp(min=0) ** 2 + 1e-12
        centroids = torch.cat([centroids, x[torch.multinomial(far, 1, generator=g)]])
    for _ in range(iters):
        sums = torch.zeros_like(centroids).index_add_(0, (x @ centroids.T).argmax(1), x)
        kept = sums.norm(dim=1) > 0                                   # an empty cluster keeps its centroid
        centroids[kept] = F.normalize(sums[kept], dim=1)
    return centroids.float()


def aux_loss(task, logits, target, depth_range=None, normals_centroids=None, edge_pos_weight=EDGE_POS_WEIGHT):
    """The loss of ATRC's auxiliary prediction (B, R, H, W) of `task` on its discretised target: cross-entropy
    over the regions, for edge with the class weights (1 - w, w) of the edge loss, for saliency with the
    batch's balance (positives weighted by the fraction of negatives), as ATRC's 2-class losses. The
    regions are the prediction's channels: R depth bins, or one per normals centroid."""
    labels = discretise(task, target, depth_range, normals_centroids, depth_bins=logits.shape[1])
    weight = None
    if task == 'edge':
        weight = torch.tensor([1 - edge_pos_weight, edge_pos_weight], device=logits.device)
    elif task == 'saliency':
        valid = labels != IGNORE
        neg = ((labels == 0) & valid).sum() / valid.sum().clamp(min=1)
        weight = torch.stack([1 - neg, neg]).float()
    ce = F.cross_entropy(logits.float(), labels, weight=weight, ignore_index=IGNORE, reduction='none')
    return ce.sum() / (labels != IGNORE).sum().clamp(min=1)


# ----------------------------------------------------------------------------------------------------
# models

def atrc_logits(tasks, width):
    """ATRC's final layers: per task Conv1x1 width -> K, initialised as their heads' init_weights initialise
    every *logits* layer (weights N(0, 0.01), bias 0)."""
    logits = nn.ModuleDict({t: nn.Conv2d(width, k, 1) for t, k in tasks.items()})
    for conv in logits.values():
        nn.init.normal_(conv.weight, std=0.01)
        nn.init.zeros_(conv.bias)
    return logits


class ATRCBaseline(MultiTaskModel):
    """`atrc_mtl`: ATRC's multi-task baseline (their FCNHead, ATRC paper Tab. 1 "multi-task"): the 4 HRNet maps
    (ATRC's HRNet) upsampled and concatenated at 1/4 (270 channels) -> per task Conv3x3-BN-ReLU (270 -> 67)
    -> Conv1x1 logits -> upsample; ATRC without its distillation. With one task it is one network of
    `atrc_stl` (their single-task baseline: SingleTask over this). On Swin-V2-S: the 768 @ 1/32 map, 192 wide,
    as ATRC there. 'initial' is {}."""

    def __init__(self, tasks, img_size, backbone='hrnet18', pretrained=None):
        super().__init__(tasks, img_size)
        swin = backbone == 'swinv2_s'
        self.backbone = SwinBackbone(pretrained) if swin else HRNetBackbone(pretrained, authors='atrc')
        c = SWIN_CHANNELS if swin else sum(HRNET_CHANNELS)
        self.features = nn.ModuleDict({t: conv_bn_relu(c, c // 4, 3) for t in self.tasks})
        self.logits = atrc_logits(self.tasks, c // 4)

    def forward(self, x):
        x = self.prepare_input(x)
        xs = self.backbone(x)
        shared = xs if torch.is_tensor(xs) else concat_scales(xs)                 # (B, 270, H/4, W/4)
        out = {t: resize(self.logits[t](f(shared)), self.img_size) for t, f in self.features.items()}
        out['initial'] = {}
        return out


class ATRC(MultiTaskModel):
    """`atrc` (ATRC paper Sec. 3, as the authors' code builds it on HRNet-18): the 4 HRNet maps upsampled
    and concatenated at 1/4 (270 channels, no fuse conv) -> per task F_t = Conv3x3-BN-ReLU (270 -> 67)
    -> ATRCDistillation (d = 33) -> Conv1x1 logits -> upsample. The label contexts read auxiliary
    predictions: per task that needs one, Conv1x1-BN-ReLU (270 -> 270) -> Conv1x1 -> R_t regions on the
    DETACHED concatenation (their code: the auxiliary losses do not train the backbone), returned upsampled in
    out['aux'] and trained on discretised targets (`aux_loss`, through the `extra_losses` hook). The depth bins
    and normals clusters they are discretised by are buffers (`label_spaces`, fitted by `prepare`), so a
    checkpoint carries them. search=True: the architecture search's network (every pair a SearchedContext,
    every task an auxiliary head): out['entropy'] its entropy term, weighted by the search's schedule
    (`schedule`, `regulariser`), the architecture logits trained by their own Adam (`own_optimizer`), and
    what it has found (`distill.current_genotype()`) written to genotype.json after every evaluation
    (`artifacts`).

    fpm=True is `atrc_ms` (ATRC paper Tab. 2, "ATRC + FPM"; their code has none, the reading is ours): MTI-Net's
    front end (per-scale heads + FPMs, deep supervision in out['initial'] as mtinet), each task's 4 maps
    fused at 1/4 (Fuse, 270 channels, as ctal_ms), then F_t and ATRC as above.
    backbone='swinv2_s' (our reading; the paper has no transformer): ATRC on Swin-V2-S's 768 @ 1/32, the
    grid this project's other models distil on with that backbone: F_t 768 -> 192, d = 96, the auxiliary
    heads on the detached 768 channels.
    """

    def __init__(self, tasks, img_size, pretrained=None, genotype=None, search=False, backbone='hrnet18',
                 fpm=False, fpm_softmax='code'):
        super().__init__(tasks, img_size)
        swin = backbone == 'swinv2_s'
        self.backbone = SwinBackbone(pretrained) if swin else HRNetBackbone(pretrained, authors='atrc')
        c = SWIN_CHANNELS if swin else sum(HRNET_CHANNELS)
        width = c // 4                                                  # HRNet: 67, and d = 33 in the blocks
        self.front = MTINetFrontEnd(self.tasks, HRNET_CHANNELS, fpm_softmax) if fpm else None
        self.fuse = nn.ModuleDict({t: Fuse(HRNET_CHANNELS) for t in self.tasks}) if fpm else None
        self.features = nn.ModuleDict({t: conv_bn_relu(c, width, 3) for t in self.tasks})
        genotype = None if search else genotype or default_atrc_genotype(self.tasks)
        self.distill = ATRCDistillation(self.tasks, genotype, width, width // 2, search=search)
        self.aux_heads = nn.ModuleDict({t: nn.Sequential(conv_bn_relu(c, c, 1), nn.Conv2d(c, ATRC_REGIONS.get(t, k), 1))
                                        for t, k in self.tasks.items() if t in self.distill.region_tasks()})
        self.logits = atrc_logits(self.tasks, width)
        self.register_buffer('depth_range', torch.tensor(ATRC_DEPTH_RANGE))
        self.register_buffer('normals_centroids', torch.zeros(ATRC_REGIONS['normals'], 3))
        self.entropy_weight = SEARCH_ENTROPY[0]                         # the search's, set by `schedule`

    @property
    def uses_all_parameters(self):
        return not self.distill.search                  # a frozen search block skips its other contexts

    def label_spaces(self):
        """What `aux_loss` discretises the targets by."""
        return {'depth_range': self.depth_range, 'normals_centroids': self.normals_centroids}

    def prepare(self, train_set, cache_dir, seed, inverse_depth=False):
        """The label spaces for this data (`fit_label_spaces`), fitted once on every len/64-th training sample
        and cached in cache_dir (the data folder) under a name that hashes the data, so it cannot go stale;
        a read-only folder means no cache."""
        first = train_set[0]
        digest = hashlib.sha1(repr(len(train_set)).encode())
        for t in self.tasks:
            digest.update(first[t].numpy().tobytes())
        path = os.path.join(cache_dir, f"atrc_label_spaces_{digest.hexdigest()[:12]}_seed{seed}.pt")
        if os.path.isfile(path):
            for name, value in torch.load(path, weights_only=True).items():
                getattr(self, name).copy_(value)
            return
        samples = [train_set[i] for i in range(0, len(train_set), max(1, len(train_set) // 64))]
        spaces = self.fit_label_spaces(samples, seed, inverse_depth)
        try:
            save_checkpoint(path, spaces)
        except OSError:
            pass

    def schedule(self, fraction):
        if self.distill.search:
            self.entropy_weight = self.distill.schedule(fraction)

    def extra_losses(self, out, batch, edge_pos_weight):
        return {t: aux_loss(t, logits, batch[t], **self.label_spaces(), edge_pos_weight=edge_pos_weight)
                for t, logits in out['aux'].items()}

    def regulariser(self, out):
        return self.entropy_weight * out['entropy'] if self.distill.search else 0.0

    def own_optimizer(self):
        """The search's architecture logits: their own Adam (lr SEARCH_ARCH_LR, no weight decay), as the
        authors' single-level search trains them beside the weights."""
        arch = [p for n, p in self.named_parameters() if n.endswith('arch_logits')]
        return torch.optim.Adam(arch, lr=SEARCH_ARCH_LR, weight_decay=0) if arch else None

    def artifacts(self):
        return {'genotype.json': self.distill.current_genotype()} if self.distill.search else {}

    @torch.no_grad()
    def fit_label_spaces(self, samples, seed, inverse_depth=False):
        """Fit the label spaces to training samples [{task: target}], at most 200,000 valid values of each
        drawn with `seed`: the normals clusters (`normals_centroids`); the depth bins stay on the
        authors' 0.7-10 m, unless the depth is inverse depth without a metric unit (MTAN's Cityscapes): then
        they span its 1st-99th percentile. Returns label_spaces()."""
        g = torch.Generator().manual_seed(seed)
        pick = lambda x: x[torch.randperm(len(x), generator=g)[:200_000]]
        if 'normals' in self.tasks:
            n = torch.cat([s['normals'].flatten(1).T for s in samples])           # (N, 3), zero = invalid
            self.normals_centroids.copy_(normals_centroids(pick(n[(n != 0).any(1)]), len(self.normals_centroids),
                                                           seed=seed))
        if inverse_depth and 'depth' in self.tasks:
            d = torch.cat([s['depth'].flatten() for s in samples])
            self.depth_range.copy_(torch.quantile(pick(d[d > 0]), torch.tensor([0.01, 0.99])))
        return self.label_spaces()

    def forward(self, x):
        x = self.prepare_input(x)
        xs = self.backbone(x)
        shared = xs if torch.is_tensor(xs) else concat_scales(xs)
        inputs, initial = {t: shared for t in self.tasks}, {}          # (B, 270, H/4, W/4) or (B, 768, H/32, W/32)
        if self.front is not None:
            feats, preds = self.front(xs)
            inputs = {t: self.fuse[t]([f[t] for f in feats]) for t in self.tasks}
            initial = {t: [resize(p[t], self.img_size) for p in preds] for t in self.tasks}
        aux = {t: head(shared.detach()) for t, head in self.aux_heads.items()}
        refined = self.distill({t: f(inputs[t]) for t, f in self.features.items()},
                               {t: spatial_softmax(a) for t, a in aux.items()})
        out = {t: resize(self.logits[t](refined[t]), self.img_size) for t in self.tasks}
        out['initial'] = initial
        out['aux'] = {t: resize(a, self.img_size) for t, a in aux.items()}
        if self.distill.search:                 # inside forward, so that DDP sees every use of the logits
            out['entropy'] = self.distill.entropy()
        return out


