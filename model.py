"""Backbones, heads, cross-scale fusion and the model builder: EMA-Net/CTAL and every baseline.

    model = build_model('ctal_ss', {'semseg': 13, 'depth': 1, 'normals': 3}, (288, 384))
    out = model(images)          # images (B, 3, H, W) at exactly img_size
    out['semseg']                # (B, 13, H, W) final prediction at input resolution
    out['initial']['semseg']     # (B, 13, H, W) initial prediction (deep supervision)
                                 # mtinet / ctal_ms: a list of 4, from scales [1/4, 1/8, 1/16, 1/32]
                                 # stl / mtl / tif / atrc / atrc_stl / atrc_mtl: 'initial' is {}
    out['aux']                   # atrc: {task: (B, R_t, H, W)} auxiliary predictions

Data flow (CNN path, HRNet-W18-small-v2; CTAL paper Sec. 2, EMA-Net Sec. 3.4):

  stl      per task: HRNet -> HRHead                                  (T networks, nothing shared)
  mtl      HRNet -> per task HRHead                                   (hard parameter sharing)
  concat / padnet / papnet / ctal_ss  (single scale, "SS"):
           HRNet -> Fuse (270 @ 1/4) -> per task IP head -> F_t (256 @ 1/4) + initial prediction
                 -> distillation (baselines.py: Concat / PAD / PAP; here: CTALDistillation)
                 -> per task final head -> upsample
  mtinet   HRNet -> MTINetFrontEnd (4 scales, FPMs) -> PAD distillation at every scale
                 -> per task HRHead over the 4 distilled maps (MTI-Net's feature aggregation)
  ctal_ms  HRNet -> MTINetFrontEnd -> per task Fuse of its 4 feature maps (270 @ 1/4)
                 -> CTALDistillation -> per task final head(128)   (EMA-Net Sec. 3.4, Fig. 3)
  atrc     HRNet -> upsample + concat (270 @ 1/4) -> per task F_t (67) -> ATRCDistillation (+ auxiliary
                 heads on the detached concat for the label contexts) -> Conv1x1 -> upsample   (ATRC Sec. 3;
                 atrc.py holds ATRC whole, on this file's backbones and blocks)
  atrc_ms  HRNet -> MTINetFrontEnd -> per task Fuse of its 4 maps (270 @ 1/4) -> F_t -> ATRC as atrc
                 (ATRC Tab. 2 "ATRC + FPM"; deep supervision on the 4 per-scale predictions, as mtinet)
  atrc_mtl HRNet -> upsample + concat (270 @ 1/4) -> per task Conv3x3-BN-ReLU (67) -> Conv1x1 -> upsample
                 (ATRC's multi-task baseline, their FCNHead; atrc_stl: one such network per task)
  tif      HRNet -> baselines.TIFDecoder (shared SAFF per scale; per task SFD at 1/16, 1/32 and LTHD at
                 1/4, 1/8; head over the 4 scales) -> upsample   (TIF paper Sec. 3, no cross-task module)

Transformer path (backbone='swinv2_s'; stl, mtl, padnet, papnet, ctal_ss, tif: the CTAL papers exclude
the multi-scale models, and Concat was only run on CNNs): torchvision's Swin-V2-S (features, final
LayerNorm; 768 @ 1/32) replaces HRNet + Fuse, the IP heads take 768 channels, CTAL runs at 1/32 and the
final heads are torchvision DeepLabHead(C, K) (mtl/stl: DeepLabHead(768, K) on the backbone features;
tif decodes all four stages). DeepLabHead's image-pooling branch normalises a 1x1 map, so training on
this path needs batches of 2 or more.

Every resize is bilinear with align_corners=False; every output is upsampled to the input size.
Nothing is downloaded: backbones start from random weights unless `pretrained` names a local file.

Fidelity: by default every model computes the function of the authors' code (the CTAL repository's
code_cnn/ and code_transformer/; ATRC's for atrc): timm's HRNet made to fuse like each method's authors' HRNet
(`use_authors_hrnet`), the input normalised where their pipeline does it (`InputNorm`), CTAL's
input layer per path (`ctal_input_layer`), the CTAL authors' PAP-Net affinity and MTI-Net's FPM grouping
(baselines.py). The paper-text readings are options (pap_affinity='paper', fpm_softmax='paper'); the
README's Fidelity table lists every difference. On NYUv2 288x384 / Cityscapes 128x256 the parameter
counts equal the authors' code exactly and the multiply-accumulates at batch 8 equal its FlopCounterMode
counts (tests/test_model.py).
"""
import math
import os
import pickle
import re

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from timm.models.hrnet import HighResolutionModule
from torchvision.models.resnet import Bottleneck
from torchvision.models.segmentation.deeplabv3 import DeepLabHead

from baselines import (FPM_SOFTMAXES, PAP_AFFINITIES, ConcatDistillation, MTINetFrontEnd, PADDistillation,
                       PAPPropagation, TIFDecoder, conv1x1_bn, resize)
from checkpoint import pickled_object
from ctal import CTAL
from data import DATASETS

MODEL_NAMES = ('stl', 'mtl', 'concat', 'padnet', 'papnet', 'ctal_ss', 'mtinet', 'ctal_ms', 'tif', 'atrc', 'atrc_ms',
               'atrc_stl', 'atrc_mtl')
BACKBONES = ('hrnet18', 'swinv2_s')
# the papers run only these on the transformer backbone (CTAL paper Sec. 3.3, Tabs. 2-3; ATRC and its baselines:
# our reading, see class ATRC)
SWIN_MODEL_NAMES = ('stl', 'mtl', 'padnet', 'papnet', 'ctal_ss', 'tif', 'atrc', 'atrc_stl', 'atrc_mtl')

HRNET_CHANNELS = (18, 36, 72, 144)      # branch outputs at 1/4, 1/8, 1/16, 1/32
SWIN_CHANNELS = 768                     # last stage, 1/32
SWIN_STAGE_CHANNELS = (96, 192, 384, 768)   # stages at 1/4, 1/8, 1/16, 1/32
HRNET_BN_MOMENTUM = 0.01                # the authors' HRNet BN_MOMENTUM (timm: 0.1)
FEATURE_CHANNELS = 256                  # F_t: the IP heads' Bottleneck(64 * 4) output
CTAL_CHANNELS = 128                     # conv_in width of the CTAL wrapper (and PAP-Net's X_t)
TIF_WIDTH = {'hrnet18': 58, 'swinv2_s': 108}    # TIF's decoder width C_L, calibrated (see class TIF)


# ----------------------------------------------------------------------------------------------------
# backbones (timm)

def read_weights(path, name):
    """The state dict in a local weights file for the backbone `name`: .safetensors, or a torch file read with
    weights_only=True (tensors and plain data: a file holding pickled code is refused, never run). A dict
    wrapped in 'state_dict' / 'model' is unwrapped, DDP's 'module.' prefix dropped."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"pretrained weights for {name}: no file at {path!r}. Pass the path of a local "
                                f"checkpoint (.pth/.bin/.safetensors) or pretrained=None for random init.")
    try:
        if path.endswith('.safetensors'):
            from safetensors.torch import load_file
            state = load_file(path)
        else:
            state = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        found = pickled_object(e)
        if not found:
            raise ValueError(f"pretrained weights {path!r} cannot be loaded into {name}: not a readable checkpoint "
                             f"(UnpicklingError)") from None
        raise ValueError(f"pretrained weights {path!r} are refused: the file holds pickled Python objects besides "
                         f"tensors ({found}), which could run code when loaded; pass a plain state dict "
                         f"or .safetensors") from None
    except Exception as e:                                  # not a torch file, truncated ...
        raise ValueError(f"pretrained weights {path!r} cannot be loaded into {name}: not a readable checkpoint "
                         f"({type(e).__name__}: {str(e)[:200]})") from None
    if isinstance(state, dict) and {'model', 'config'} <= set(state):
        raise ValueError(f"pretrained weights {path!r} cannot be loaded into {name}: it is a checkpoint of train.py; "
                         f"a checkpoint of train.py goes to init_from")
    state = state.get('state_dict', state.get('model', state)) if isinstance(state, dict) else state
    if not isinstance(state, dict) or not all(torch.is_tensor(v) for v in state.values()):
        raise ValueError(f"pretrained weights {path!r} cannot be loaded into {name}: expected a state dict of "
                         f"tensors, got {type(state).__name__}")
    return {k.removeprefix('module.'): v for k, v in state.items()}


def load_backbone_weights(model, state, path, name):
    """state -> model (strict=False), reporting what load_state_dict found incompatible; a file matching no
    tensor of the model, or tensors of other shapes, is a ValueError."""
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:                               # tensors of other shapes: another model
        raise ValueError(f"pretrained weights {path!r} cannot be loaded into {name}: {str(e)[:300]}") from None
    loaded = len(set(model.state_dict()) & set(state))
    if loaded == 0:
        raise ValueError(f"pretrained weights {path!r} matched no parameter of {name}: expected a {name} checkpoint "
                         f"(its own key names, e.g. {next(iter(model.state_dict()))!r}); a checkpoint of train.py "
                         f"goes to init_from")
    print(f"[{name} <- {path}] loaded {loaded} tensors; missing {len(result.missing_keys)}"
          f"{_first(result.missing_keys)}, unexpected {len(result.unexpected_keys)}{_first(result.unexpected_keys)}")


def _first(keys):
    return f" ({', '.join(keys[:3])}{', ...' * (len(keys) > 3)})" if keys else ''


def create_timm_backbone(name, pretrained=None, **kwargs):
    """timm model `name` as a feature extractor; weights random, or loaded from the local file `pretrained`
    (read_weights; the HRNet checkpoints need none of timm's checkpoint filters)."""
    if pretrained is None:
        return timm.create_model(name, pretrained=False, **kwargs)
    state = read_weights(pretrained, name)
    with torch.random.fork_rng(devices=[]):                 # the weights are the file's: leave the RNG alone
        model = timm.create_model(name, pretrained=False, **kwargs)
    load_backbone_weights(model, state, os.fspath(pretrained), name)
    return model


class AuthorsFuseModule(HighResolutionModule):
    """timm's HRNet module computing the function of the HRNet code the MTI-Net / CTAL authors used
    (HRNet-Semantic-Segmentation's HighResolutionModule): a lower-resolution branch j is added to branch i
    after Conv1x1 + BN and a BILINEAR resize to branch i's exact size (align_corners=False), where timm
    upsamples by a nearest-neighbour factor 2^(j - i). Same parameters and summation order, so the same
    checkpoints load. A size-based resize also lets the backbone run on sizes that are not multiples of 32
    (e.g. the ATRC/TIF papers' NYUD-v2 425x560)."""

    def upsample(self, z, j, i, size):
        return F.interpolate(z, size=size, mode='bilinear', align_corners=False)

    def forward(self, x):
        if self.num_branches == 1:
            return [self.branches[0](x[0])]
        x = [branch(xi) for branch, xi in zip(self.branches, x)]
        fused = []
        for i, layers in enumerate(self.fuse_layers):
            y = None
            for j, layer in enumerate(layers):
                z = layer(x[j])
                if j > i:
                    z = self.upsample(z, j, i, x[i].shape[-2:])
                y = z if y is None else y + z
            fused.append(self.fuse_act(y))
        return fused


class MMSegFuseModule(AuthorsFuseModule):
    """The fuse of the HRNet in ATRC's code (mmsegmentation's HRModule): branch j is first upsampled by its
    fixed factor 2^(j - i) (bilinear, align_corners=False), then resized to branch i's size. Both equal
    AuthorsFuseModule where the sizes halve exactly (inputs that are multiples of 32); elsewhere the factor
    overshoots (425x560: the 1/8 map 54x70 goes to 108x140, then 107x140) and the outputs differ."""

    def upsample(self, z, j, i, size):
        z = F.interpolate(z, scale_factor=2 ** (j - i), mode='bilinear', align_corners=False)
        return F.interpolate(z, size=size, mode='bilinear', align_corners=False)


# whose HRNet-18 the backbone computes: its fuse module and its BatchNorm momentum (the CTAL authors'
# BN_MOMENTUM 0.01; ATRC's mmseg HRNet keeps torch's default 0.1, which is also timm's)
HRNET_VARIANTS = {'ctal': (AuthorsFuseModule, HRNET_BN_MOMENTUM), 'atrc': (MMSegFuseModule, 0.1)}


def set_bn_momentum(module, momentum):
    for m in module.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    return module


def use_authors_hrnet(net, authors='ctal'):
    """Make timm's HRNet compute the function of `authors`' HRNet code ('ctal': the CTAL / MTI-Net authors',
    'atrc': ATRC's), in place: their fuse upsampling (`HRNET_VARIANTS`) and their BatchNorm momentum (timm's
    0.1 against the CTAL authors' 0.01 changes the running statistics from the first training step on).
    Parameters are untouched."""
    fuse_module, momentum = HRNET_VARIANTS[authors]
    for m in net.modules():
        if isinstance(m, HighResolutionModule):
            m.__class__ = fuse_module
            for i, layers in enumerate(m.fuse_layers if m.num_branches > 1 else []):
                for j in range(i + 1, m.num_branches):
                    layers[j][-1] = nn.Identity()          # timm's nn.Upsample; the resize is in forward
    return set_bn_momentum(net, momentum)


class HRNetBackbone(nn.Module):
    """timm hrnet_w18_small_v2 (3.86 M params), features_only, feature_location='': the 4 branch outputs
    (B, 18, H/4, W/4), (B, 36, H/8, W/8), (B, 72, H/16, W/16), (B, 144, H/32, W/32) (sizes rounded up
    by the stride-2 convolutions), computing the function of `authors`' HRNet (`use_authors_hrnet`).

    timm's feature list starts with the 64-ch stem at 1/2; out_indices=(1, 2, 3, 4) drops it (the stem
    still runs, it only stops being returned).
    """
    channels = HRNET_CHANNELS

    def __init__(self, pretrained=None, authors='ctal'):
        super().__init__()
        self.net = use_authors_hrnet(create_timm_backbone('hrnet_w18_small_v2', pretrained, features_only=True,
                                                          feature_location='', out_indices=(1, 2, 3, 4)), authors)

    def forward(self, x):
        return list(self.net(x))


def load_torchvision_weights(model, path):
    """Load a local torchvision checkpoint (a state dict, e.g. swin_v2_s-6cf4c8c5.pth) into `model`."""
    load_backbone_weights(model, read_weights(path, 'swin_v2_s'), os.fspath(path), 'swin_v2_s')


class SwinBackbone(nn.Module):
    """torchvision swin_v2_s, as the CTAL authors' transformer code uses it: `features`, then the final
    LayerNorm `norm`, then `permute` to channels-first: (B, 768, H/32, W/32). Stochastic depth 0.3
    (torchvision's default for this model). With all_stages=True it returns the four stage outputs
    [(B, 96, H/4, W/4), (B, 192, H/8, W/8), (B, 384, H/16, W/16), (B, 768, H/32, W/32)] instead, the last
    one after the final norm (for models that decode every scale).

    torchvision pads each stage's map to whole windows (8x8) itself, so any H, W divisible by 32 work;
    Swin-V2's log-spaced continuous position bias makes the ImageNet weights valid at any size.
    """
    channels = SWIN_CHANNELS
    stage_channels = SWIN_STAGE_CHANNELS

    def __init__(self, pretrained=None, all_stages=False):
        super().__init__()
        net = torchvision.models.swin_v2_s(weights=None)
        if pretrained is not None:
            load_torchvision_weights(net, os.fspath(pretrained))
        self.features, self.norm, self.permute = net.features, net.norm, net.permute
        self.all_stages = all_stages

    def forward(self, x):
        stages = []
        for i, layer in enumerate(self.features):
            x = layer(x)                                                # NHWC
            if i % 2 == 1:                                              # after stages 1..4 (odd indices)
                stages.append(x)
        stages[-1] = self.norm(stages[-1])
        if not self.all_stages:
            return self.permute(stages[-1]).contiguous()                 # (B, 768, H/32, W/32)
        return [s.permute(0, 3, 1, 2).contiguous() for s in stages]


def make_backbone(backbone, img_size, pretrained):
    return HRNetBackbone(pretrained) if backbone == 'hrnet18' else SwinBackbone(pretrained)


# ----------------------------------------------------------------------------------------------------
# blocks and heads

def concat_scales(xs):
    """The backbone's maps upsampled to the first (1/4) one and concatenated: (B, sum c = 270, H/4, W/4)."""
    return torch.cat([resize(x, xs[0].shape[-2:]) for x in xs], 1)


class Fuse(nn.Module):
    """Cross-scale fusion (HRNet's segmentation head, MTI-Net's aggregation, EMA-Net's CSF block):
    `concat_scales` (sum c = 270), Conv1x1 270 -> 270 (bias), BN, ReLU.
    """

    def __init__(self, channels=HRNET_CHANNELS):
        super().__init__()
        c = sum(channels)
        self.mix = nn.Sequential(nn.Conv2d(c, c, 1), nn.BatchNorm2d(c), nn.ReLU(inplace=True))

    def forward(self, xs):
        return self.mix(concat_scales(xs))                              # (B, 270, H/4, W/4)


class HRHead(nn.Module):
    """Fuse followed by Conv1x1 270 -> K: the per-task head of stl/mtl and MTI-Net's final head."""

    def __init__(self, num_outputs, channels=HRNET_CHANNELS):
        super().__init__()
        self.fuse = Fuse(channels)
        self.predict = nn.Conv2d(sum(channels), num_outputs, 1)

    def forward(self, xs):
        return self.predict(self.fuse(xs))


class InitialHead(nn.Module):
    """Initial-prediction (IP) head of one task: Bottleneck(c_in -> 64*4, Conv1x1+BN shortcut) ->
    Bottleneck(256) gives the task features F_t (256 ch); Conv1x1 256 -> K gives the initial prediction.
    """

    def __init__(self, in_channels, num_outputs):
        super().__init__()
        planes = FEATURE_CHANNELS // Bottleneck.expansion
        self.features = nn.Sequential(
            Bottleneck(in_channels, planes, downsample=conv1x1_bn(in_channels, FEATURE_CHANNELS)),
            Bottleneck(FEATURE_CHANNELS, planes))
        self.predict = nn.Conv2d(FEATURE_CHANNELS, num_outputs, 1)

    def forward(self, x):
        f = self.features(x)
        return f, self.predict(f)                                       # (B, 256, h, w), (B, K, h, w)


def final_head(channels, num_outputs, backbone):
    """Final head of one task on the distilled features (C channels).

    CNN: Bottleneck(C, C/4) x 2 -> Conv1x1 C -> K (the IP head's architecture, CTAL paper App. E).
    Transformer: torchvision DeepLabHead(C, K) (ASPP rates 12/24/36 + Conv3x3 + Conv1x1). Note its
    image-pooling branch has a BatchNorm on a 1x1 map, so training needs batches of 2 or more.
    """
    if backbone == 'swinv2_s':
        return DeepLabHead(channels, num_outputs)
    planes = channels // Bottleneck.expansion
    return nn.Sequential(Bottleneck(channels, planes), Bottleneck(channels, planes),
                         nn.Conv2d(channels, num_outputs, 1))


def ctal_input_layer(in_channels, channels, backbone):
    """CTAL's per-task input projection: a plain Conv1x1 in the authors' CNN code (code_cnn/models/ctal.py),
    Conv1x1 + BN + ReLU in their transformer code (code_transformer/models/ctal.py)."""
    if backbone == 'hrnet18':
        return nn.Conv2d(in_channels, channels, 1)
    return nn.Sequential(nn.Conv2d(in_channels, channels, 1), nn.BatchNorm2d(channels), nn.ReLU(inplace=True))


class CTALDistillation(nn.Module):
    """The CTAL distillation step shared by ctal_ss and ctal_ms: per task
        conv_in  Conv1x1 c_in -> 128 (bias)               c_in = 256 (ss, F_t) or 270 (ms, fused F_t)
                 (Swin: Conv1x1 c_in -> 128, BN, ReLU)    as the authors' CNN / transformer code do
        resize   bilinear to the distillation size (h, w) (identity when the features are already there)
        CTAL     ctal.py, all tasks jointly: EMA-Net Eqs. 1-2, F^r_t = gamma F^p_t G_t^T + (1 - gamma) F^i_t
        conv_out ConvTranspose2d(128, 128, 2, stride 2), BN, ReLU, Conv3x3 128 -> 128   (2h, 2w)
    so the final heads run at twice the distillation resolution (NYUv2 at 1/4: 144x192).
    The plain conv_in of the CNN path lets affinities range over [-1, 1]; after the transformer path's
    ReLU every affinity is >= 0.
    """

    def __init__(self, tasks, in_channels, size, gamma=0.05, impl='auto', fusion='shared', kernel_size=3,
                 backbone='hrnet18'):
        super().__init__()
        self.tasks = list(tasks)
        self.size = tuple(size)
        c = CTAL_CHANNELS
        self.conv_in = nn.ModuleDict({t: ctal_input_layer(in_channels, c, backbone) for t in self.tasks})
        self.ctal = CTAL(len(self.tasks), c, self.size, kernel_size=kernel_size, gamma=gamma,
                         fusion=fusion, impl=impl)
        self.conv_out = nn.ModuleDict({
            t: nn.Sequential(nn.ConvTranspose2d(c, c, 2, stride=2), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                             nn.Conv2d(c, c, 3, padding=1))
            for t in self.tasks})

    def forward(self, feats):
        xs = [resize(self.conv_in[t](feats[t]), self.size) for t in self.tasks]   # T x (B, 128, h, w)
        refined = self.ctal(xs)
        return {t: self.conv_out[t](r) for t, r in zip(self.tasks, refined)}      # (B, 128, 2h, 2w)


# ----------------------------------------------------------------------------------------------------
# models

class InputNorm(nn.Module):
    """(x - mean) / std per RGB channel, on images in [0, 1]: the normalisation the authors' PASCAL-Context
    pipelines apply to the image before the model (theirs: Normalize(ImageNet mean, std) after / 255). As
    the model's first layer it travels with every checkpoint's config to predict.py; the buffers are not
    saved (the dataset's facts decide them), so checkpoints with and without it hold the same tensors."""

    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer('mean', torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer('std', torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1), persistent=False)

    def forward(self, x):
        return (x - self.mean.to(x.dtype)) / self.std.to(x.dtype)


class MultiTaskModel(nn.Module):
    """Common input step: the models are built for one input size (CTAL's per-position kernels and Swin's
    attention masks are tied to it), so any other size is an error rather than a silent resize; then the
    input normalisation (identity unless build_model's image_norm sets an InputNorm).

    The training loop's hooks (train.py calls them on every model; only atrc.ATRC does something in them):
      prepare(train_set, cache_dir, seed, inverse_depth)   before the first step: fit what the model learns
                                                          from the training data (its buffers)
      schedule(fraction)                 before each training step, at this fraction (0 -> 1) of the run
      extra_losses(out, batch, edge_pos_weight)  {task: loss} added to that task's loss, at its weight
      regulariser(out)                   a scalar added to the step's total loss
      own_optimizer()                    a new optimiser over parameters the model trains itself, stepped after
                                         the main one, which trains all the others (None: there are none)
      artifacts()                        {file name: JSON data} written into out_dir after every evaluation
      uses_all_parameters                False where a step may leave some parameters without gradient (DDP)"""
    uses_all_parameters = True

    def __init__(self, tasks, img_size):
        super().__init__()
        self.tasks = dict(tasks)
        self.img_size = tuple(img_size)
        self.input_norm = nn.Identity()

    def prepare_input(self, x):
        if x.dim() != 4 or x.shape[1] != 3 or tuple(x.shape[-2:]) != self.img_size:
            raise ValueError(f"expected images (B, 3, {self.img_size[0]}, {self.img_size[1]}) (the img_size this "
                             f"model was built for), got {tuple(x.shape)}; resize the images or rebuild the "
                             f"model with img_size={tuple(x.shape[-2:])}")
        return self.input_norm(x)

    def prepare(self, train_set, cache_dir, seed, inverse_depth=False):
        pass

    def schedule(self, fraction):
        pass

    def extra_losses(self, out, batch, edge_pos_weight):
        return {}

    def regulariser(self, out):
        return 0.0

    def own_optimizer(self):
        return None

    def artifacts(self):
        return {}


class HardSharing(MultiTaskModel):
    """`mtl`: one backbone, one head per task (HRHead on HRNet, DeepLabHead(768, K) on Swin).
    With a single task this is one network of `stl`. 'initial' is empty: nothing to deep-supervise."""

    def __init__(self, tasks, img_size, backbone='hrnet18', pretrained=None):
        super().__init__(tasks, img_size)
        self.backbone = make_backbone(backbone, img_size, pretrained)
        if backbone == 'hrnet18':
            self.heads = nn.ModuleDict({t: HRHead(k) for t, k in self.tasks.items()})
        else:
            self.heads = nn.ModuleDict({t: DeepLabHead(SWIN_CHANNELS, k) for t, k in self.tasks.items()})

    def forward(self, x):
        x = self.prepare_input(x)
        feats = self.backbone(x)
        out = {t: resize(head(feats), self.img_size) for t, head in self.heads.items()}
        out['initial'] = {}
        return out


class SingleTask(MultiTaskModel):
    """`stl`: T independent single-task networks (backbone + head each), trained together, sharing nothing;
    each is a one-task `network` (HardSharing; `atrc_stl`: ATRCBaseline, ATRC's single-task baseline)."""

    def __init__(self, tasks, img_size, backbone='hrnet18', pretrained=None, network=None):
        super().__init__(tasks, img_size)
        network = network or HardSharing
        self.nets = nn.ModuleDict({t: network({t: k}, img_size, backbone, pretrained) for t, k in self.tasks.items()})

    def forward(self, x):
        x = self.prepare_input(x)                       # the nets' own input_norm stays the identity
        out = {t: net(x)[t] for t, net in self.nets.items()}
        out['initial'] = {}
        return out


class SingleScaleDistillation(MultiTaskModel):
    """concat / padnet / papnet / ctal_ss: task-prediction distillation at a single scale
    (CTAL paper Fig. 1, SS variant; EMA-Net Sec. 3.4 "for comparison with other methods that operate on
    a single feature scale"):

      shared  = Fuse(HRNet(x))              (B, 270, H/4, W/4)   or  Swin(x)  (B, 768, H/32, W/32)
      F_t, P_t = IPHead_t(shared)           (B, 256, ., .), initial prediction (deep supervision)
      D       = distill({F_t})              (B, C_d, ., .) per task; C_d = `distill_channels`
      out_t   = upsample(FinalHead_t(D_t))
    """

    def __init__(self, tasks, img_size, backbone, distill, distill_channels, pretrained=None):
        super().__init__(tasks, img_size)
        self.backbone = make_backbone(backbone, img_size, pretrained)
        if backbone == 'hrnet18':
            self.fuse, shared_channels = Fuse(HRNET_CHANNELS), sum(HRNET_CHANNELS)
        else:
            self.fuse, shared_channels = nn.Identity(), SWIN_CHANNELS
        self.initial_heads = nn.ModuleDict({t: InitialHead(shared_channels, k) for t, k in self.tasks.items()})
        self.distill = distill
        self.final_heads = nn.ModuleDict({t: final_head(distill_channels, k, backbone)
                                          for t, k in self.tasks.items()})

    def forward(self, x):
        x = self.prepare_input(x)
        shared = self.fuse(self.backbone(x))
        feats, initial = {}, {}
        for t, head in self.initial_heads.items():
            feats[t], pred = head(shared)
            initial[t] = resize(pred, self.img_size)
        distilled = self.distill(feats)
        out = {t: resize(self.final_heads[t](distilled[t]), self.img_size) for t in self.tasks}
        out['initial'] = initial
        return out


class MTINet(MultiTaskModel):
    """`mtinet` (MTI-Net, Vandenhende et al. 2020, Fig. 1 right): multi-scale multi-modal distillation.

      xs          = HRNet(x)                                   4 maps, 1/4 .. 1/32
      F_{t,s}, P_{t,s} = MTINetFrontEnd(xs)                     per-scale heads + FPMs (Sec. 2.3-2.4)
      F^o_{.,s}   = PADDistillation_s(F_{.,s})                 MTI-Net Eq. 1 at every scale
      out_t       = upsample(HRHead_t([F^o_{t,0} .. F^o_{t,3}]))  feature aggregation (Sec. 2.5)
    'initial'[t] = the 4 per-scale predictions P_{t,s}, upsampled, scales [1/4, 1/8, 1/16, 1/32].
    """

    def __init__(self, tasks, img_size, pretrained=None, fpm_softmax='code'):
        super().__init__(tasks, img_size)
        self.backbone = HRNetBackbone(pretrained)
        self.front = MTINetFrontEnd(self.tasks, HRNET_CHANNELS, fpm_softmax)
        self.distill = nn.ModuleList(PADDistillation(self.tasks, c) for c in HRNET_CHANNELS)
        self.heads = nn.ModuleDict({t: HRHead(k) for t, k in self.tasks.items()})

    def forward(self, x):
        x = self.prepare_input(x)
        feats, preds = self.front(self.backbone(x))
        distilled = [d(f) for d, f in zip(self.distill, feats)]
        out = {t: resize(self.heads[t]([d[t] for d in distilled]), self.img_size) for t in self.tasks}
        out['initial'] = {t: [resize(p[t], self.img_size) for p in preds] for t in self.tasks}
        return out


class CTALMultiScale(MultiTaskModel):
    """`ctal_ms` (EMA-Net MS, EMA-Net Sec. 3.4 / Fig. 3; CTAL paper Sec. 2.2): MTI-Net's front end for
    multi-scale deep supervision, then cross-scale fusion BEFORE a single distillation step:

      F_{t,s}, P_{t,s} = MTINetFrontEnd(HRNet(x))                  (no per-scale distillation)
      F_t     = Fuse_t([F_{t,0} .. F_{t,3}])                        (B, 270, H/4, W/4), one CSF per task
      D       = CTALDistillation({F_t})                             conv_in 270 -> 128, CTAL, conv_out
      out_t   = upsample(FinalHead_t(D_t))                          Bottleneck(128) x 2 -> Conv1x1
    'initial'[t] = the 4 per-scale predictions, upsampled, scales [1/4, 1/8, 1/16, 1/32].
    """

    def __init__(self, tasks, img_size, distill_size, gamma=0.05, ctal_impl='auto', ctal_fusion='shared',
                 pretrained=None, fpm_softmax='code'):
        super().__init__(tasks, img_size)
        self.backbone = HRNetBackbone(pretrained)
        self.front = MTINetFrontEnd(self.tasks, HRNET_CHANNELS, fpm_softmax)
        self.fuse = nn.ModuleDict({t: Fuse(HRNET_CHANNELS) for t in self.tasks})
        self.distill = CTALDistillation(self.tasks, sum(HRNET_CHANNELS), distill_size, gamma, ctal_impl, ctal_fusion)
        self.final_heads = nn.ModuleDict({t: final_head(CTAL_CHANNELS, k, 'hrnet18') for t, k in self.tasks.items()})

    def forward(self, x):
        x = self.prepare_input(x)
        feats, preds = self.front(self.backbone(x))
        fused = {t: self.fuse[t]([f[t] for f in feats]) for t in self.tasks}
        distilled = self.distill(fused)
        out = {t: resize(self.final_heads[t](distilled[t]), self.img_size) for t in self.tasks}
        out['initial'] = {t: [resize(p[t], self.img_size) for p in preds] for t in self.tasks}
        return out


class TIF(MultiTaskModel):
    """`tif` (TIF paper Sec. 3, Fig. 2): backbone (all four scales) -> baselines.TIFDecoder -> per task logits
    at 1/4 -> upsample. No task reads another task's features; no deep supervision ('initial' is {}: the
    paper has none). decoder_options go to TIFDecoder (its readings).

    Calibration (the paper states no width): in its NYUD-v2 setting (40 classes; semseg, depth, normals,
    edge; 425x560) the decoder width C_L = 58 with FFN ratio 2 (and 3x3 SFF / LTHD fuse convs, a 1x1 head
    fuse) gives HRNet-18 TIF 5,286,231 parameters and 16.67 G multiply-accumulates per image (paper
    Tab. 3: 5.27 M, 16.6 G; ATRC's convention, which TIF's table copies, counts MACs as FLOPs). Swin-V2-S
    has Swin-T's stage widths: C_L = 108 gives the decoder the paper's Swin-T budget (32.91 M - 27.52 M of
    Swin-T features = 5.39 M; ours 5.32 M), on top of Swin-V2-S's larger backbone."""

    def __init__(self, tasks, img_size, backbone='hrnet18', pretrained=None, width=None, **decoder_options):
        super().__init__(tasks, img_size)
        if backbone == 'hrnet18':
            self.backbone, channels = HRNetBackbone(pretrained), HRNET_CHANNELS
        else:
            self.backbone, channels = SwinBackbone(pretrained, all_stages=True), SWIN_STAGE_CHANNELS
        self.decoder = TIFDecoder(self.tasks, channels, width or TIF_WIDTH[backbone], **decoder_options)

    def forward(self, x):
        x = self.prepare_input(x)
        out = {t: resize(logits, self.img_size) for t, logits in self.decoder(self.backbone(x)).items()}
        out['initial'] = {}
        return out


# ----------------------------------------------------------------------------------------------------
# builder

def distillation_size(img_size, scale, backbone):
    """(h, w) at which CTAL runs.

    HRNet: (round(H * scale), round(W * scale)), resized from the 1/4 map (identity at scale 1/4), e.g.
    NYUv2 288x384: 1/4 -> 72x96, 1/6 -> 48x64, 1/8 -> 36x48.
    Swin: always the backbone's 1/32 grid (H/32, W/32) (as the authors' transformer code), e.g. 9x12 on
    NYUv2, 16x16 on PASCAL 512x512. Our choice: no resize on this path, so `scale` must be left at its
    default 1/4 (or given as 1/32); any other value is an error instead of being silently ignored.
    """
    H, W = img_size
    if backbone == 'swinv2_s':
        if not (math.isclose(scale, 1 / 4) or math.isclose(scale, 1 / 32)):
            raise ValueError(f"scale={scale}: with backbone='swinv2_s' CTAL runs on the backbone's 1/32 grid "
                             f"({H // 32}x{W // 32}); leave scale at its default 1/4 (or pass 1/32)")
        return H // 32, W // 32
    if not 0 < scale <= 1 / 4:
        raise ValueError(f"scale={scale}: the distillation scale must be in (0, 1/4] (e.g. 1/4, 1/6, 1/8): CTAL "
                         f"reads the 1/4 feature map, resized down to (round(H*scale), round(W*scale))")
    h, w = round(H * scale), round(W * scale)
    if h < 1 or w < 1:
        raise ValueError(f"scale={scale} leaves no position at img_size {img_size} ({h}x{w})")
    return h, w


def check_arguments(name, tasks, img_size, backbone, pap_iters, pap_affinity, fpm_softmax):
    if name not in MODEL_NAMES:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODEL_NAMES)}")
    if backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {backbone!r}; valid backbones: {', '.join(BACKBONES)}")
    if backbone == 'swinv2_s' and name not in SWIN_MODEL_NAMES:
        raise ValueError(f"model {name!r} does not exist with backbone 'swinv2_s' (the papers evaluate only "
                         f"single-scale models on it); valid with swinv2_s: {', '.join(SWIN_MODEL_NAMES)}; "
                         f"{name!r} is valid with 'hrnet18'")
    if not isinstance(tasks, dict) or not tasks:
        raise ValueError(f"tasks must be a non-empty dict task -> output channels, e.g. "
                         f"{{'semseg': 13, 'depth': 1}}, got {tasks!r}")
    for t, k in tasks.items():
        if not isinstance(t, str) or not t or '.' in t or t == 'initial':
            raise ValueError(f"task name {t!r}: expected a non-empty string without '.', other than 'initial' "
                             f"(that output key holds the initial predictions)")
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise ValueError(f"task {t!r}: output channels must be a positive int, got {k!r}")
    # HRNet resizes by size (any H, W >= 32 works); Swin's patch merging needs multiples of 32
    multiple = 32 if backbone == 'swinv2_s' else 1
    if (len(img_size) != 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 32 or s % multiple
                                  for s in img_size)):
        need = "positive multiples of 32 (Swin downsamples by 32)" if multiple == 32 else "ints >= 32"
        raise ValueError(f"img_size must be (H, W), {need}, got {tuple(img_size)!r}")
    if isinstance(pap_iters, bool) or not isinstance(pap_iters, int) or pap_iters < 1:
        raise ValueError(f"pap_iters must be a positive int, got {pap_iters!r}")
    if pap_affinity not in PAP_AFFINITIES:
        raise ValueError(f"pap_affinity={pap_affinity!r}: expected one of {PAP_AFFINITIES} ('code': the CTAL "
                         f"authors' PAP-Net, 'paper': the PAP-Net paper's row-normalised cosine)")
    if fpm_softmax not in FPM_SOFTMAXES:
        raise ValueError(f"fpm_softmax={fpm_softmax!r}: expected one of {FPM_SOFTMAXES} ('code': MTI-Net's code, "
                         f"over T consecutive channels; 'paper': MTI-Net Sec. 2.4, over tasks)")


def build_model(name, tasks, img_size, backbone='hrnet18', scale=1 / 4, gamma=0.05, ctal_impl='auto',
                ctal_fusion='shared', pretrained=None, pap_iters=1, pap_affinity='code', fpm_softmax='code',
                hrnet_bn_momentum=None, genotype=None, atrc_search=False, image_norm=None):
    """Build model `name` for `tasks` (dict task -> output channels, in canonical order) at img_size (H, W).

    scale: CTAL's distillation scale (ctal_ss/ctal_ms on HRNet; see `distillation_size`); gamma,
    ctal_impl ('auto' | 'dense' | 'linear'), ctal_fusion ('shared' | 'task'): passed to CTAL.
    pretrained: None (random init, never touches the network) or a local backbone checkpoint file
    (timm's hrnet_w18_small_v2 / torchvision's swin_v2_s).
    pap_iters: PAP-Net propagation iterations; pap_affinity ('code' | 'paper'): PAP-Net's affinity
    normalisation (baselines.pap_affinity); fpm_softmax ('code' | 'paper'): the MTI-Net FPM mask of
    mtinet / ctal_ms (baselines.fpm_softmax). 'code' = the authors' code, the default everywhere.
    hrnet_bn_momentum: momentum of the HRNet backbone's BatchNorms; None = the authors' of the model (0.01,
    the CTAL authors', for every model but atrc / atrc_ms: 0.1, ATRC's). It changes only how fast the running
    statistics follow training, not the function; runs of a few hundred steps need a larger one (0.1) for
    their eval-mode statistics to catch up.
    genotype: atrc's {target: {source: context}} (atrc.atrc_genotype); None = the authors' searched one.
    atrc_search: atrc as the architecture search's network instead (genotype is then ignored).
    image_norm: None, or the (mean, std) per RGB channel the model normalises its [0, 1] input by
    (`InputNorm`; data.DATASETS[name]['image_norm'], PASCAL-Context's ImageNet statistics).
    Arguments a model does not use are ignored.
    """
    img_size = tuple(img_size)
    check_arguments(name, tasks, img_size, backbone, pap_iters, pap_affinity, fpm_softmax)
    if hrnet_bn_momentum is not None and not (isinstance(hrnet_bn_momentum, (int, float)) and 0 < hrnet_bn_momentum <= 1):
        raise ValueError(f"hrnet_bn_momentum must be None or in (0, 1], got {hrnet_bn_momentum!r}")
    model = build_architecture(name, dict(tasks), img_size, backbone, scale, gamma, ctal_impl, ctal_fusion,
                               pretrained, pap_iters, pap_affinity, fpm_softmax, genotype, atrc_search)
    if hrnet_bn_momentum is not None:
        for backbone_module in [m for m in model.modules() if isinstance(m, HRNetBackbone)]:
            set_bn_momentum(backbone_module, hrnet_bn_momentum)
    if image_norm is not None:
        model.input_norm = InputNorm(*image_norm)
    return model


def build_architecture(name, tasks, img_size, backbone, scale, gamma, ctal_impl, ctal_fusion, pretrained,
                       pap_iters, pap_affinity, fpm_softmax, genotype, atrc_search):
    """The model `name` with checked arguments (see build_model)."""
    if name == 'stl':
        return SingleTask(tasks, img_size, backbone, pretrained)
    if name == 'mtl':
        return HardSharing(tasks, img_size, backbone, pretrained)
    if name == 'tif':
        return TIF(tasks, img_size, backbone, pretrained)
    if name.startswith('atrc'):
        from atrc import ATRC, ATRCBaseline          # atrc.py builds on this file's backbones and blocks
        if name == 'atrc_mtl':
            return ATRCBaseline(tasks, img_size, backbone, pretrained)
        if name == 'atrc_stl':
            return SingleTask(tasks, img_size, backbone, pretrained, network=ATRCBaseline)
        return ATRC(tasks, img_size, pretrained, genotype, atrc_search, backbone, name == 'atrc_ms', fpm_softmax)
    if name == 'mtinet':
        return MTINet(tasks, img_size, pretrained, fpm_softmax)
    if name == 'ctal_ms':
        return CTALMultiScale(tasks, img_size, distillation_size(img_size, scale, backbone), gamma,
                              ctal_impl, ctal_fusion, pretrained, fpm_softmax)
    if name == 'concat':
        distill, channels = ConcatDistillation(tasks, FEATURE_CHANNELS), FEATURE_CHANNELS
    elif name == 'padnet':
        distill, channels = PADDistillation(tasks, FEATURE_CHANNELS), FEATURE_CHANNELS
    elif name == 'papnet':
        distill = PAPPropagation(tasks, FEATURE_CHANNELS, CTAL_CHANNELS, beta=0.05, iters=pap_iters,
                                 affinity=pap_affinity)
        channels = CTAL_CHANNELS
    else:  # ctal_ss
        distill = CTALDistillation(tasks, FEATURE_CHANNELS, distillation_size(img_size, scale, backbone),
                                   gamma, ctal_impl, ctal_fusion, backbone=backbone)
        channels = CTAL_CHANNELS
    return SingleScaleDistillation(tasks, img_size, backbone, distill, channels, pretrained)


def check_device_name(name):
    if not (name in ('auto', 'cpu', 'cuda') or re.fullmatch(r'cuda:\d+', str(name))):
        raise ValueError(f"device={name!r}: expected auto, cpu, cuda or cuda:N")


def pick_device(name, tf32=True):
    """'auto' (CUDA if available) | 'cpu' | 'cuda' | 'cuda:N' -> torch.device, or a ValueError saying what to pass.
    On CUDA it sets the speed switches: TF32 matmuls and convolutions (`tf32`; False: full float32 products) and
    cuDNN's autotuner, which pays off since a run's input size is fixed."""
    check_device_name(name)
    if name == 'auto':
        name = 'cuda' if torch.cuda.is_available() else 'cpu'
    if name != 'cpu' and not torch.cuda.is_available():
        raise ValueError(f"device={name!r}: CUDA is not available here; use --device=cpu")
    if name != 'cpu':
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cudnn.benchmark = True
    return torch.device(name)


def build_net(cfg, size, device):
    """The model of a train.py config (train.py, predict.py) for inputs of `size`, on `device`; the input
    normalisation is the dataset's (data.DATASETS image_norm)."""
    tasks = {t: DATASETS[cfg['dataset']]['tasks'][t] for t in cfg['tasks']}
    return build_model(cfg['model'], tasks, size, backbone=cfg['backbone'], scale=cfg['scale'], gamma=cfg['gamma'],
                       ctal_impl=cfg['ctal_impl'], ctal_fusion=cfg['ctal_fusion'], pretrained=cfg['pretrained'],
                       pap_iters=cfg['pap_iters'], pap_affinity=cfg['pap_affinity'], fpm_softmax=cfg['fpm_softmax'],
                       hrnet_bn_momentum=cfg['hrnet_bn_momentum'], genotype=cfg['genotype'],
                       atrc_search=cfg['search'], image_norm=DATASETS[cfg['dataset']].get('image_norm')).to(device)
