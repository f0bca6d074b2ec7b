"""Datasets for multitask dense prediction, read in the formats they are distributed in (the synthetic
indoor scenes of synthetic.py are written in the NYUv2 format and read here too).

Data flow: files on disk -> numpy arrays (cast to one dtype per task, checked against the declared
format) -> torch tensors in the task conventions below -> optional train-time augmentation (global
torch RNG, so `torch.manual_seed` + a seeded DataLoader reproduce every batch) -> one dict per sample:

    'image'                   float32 (3, H, W) in [0, 1] (where the authors normalise by a mean / std, the
                              model does: DATASETS[name]['image_norm'])
    'semseg', 'human_parts'   int64 (H, W), 255 = ignore
    'depth'                   float32 (1, H, W), 0 = invalid
    'normals'                 float32 (3, H, W), all-zero vector = invalid
    'saliency', 'edge'        float32 (1, H, W) in {0, 1}, 255 = ignore
    'meta' (pascal / nyud)    {'id': str, 'size': (h, w) of the original image}

All samples of a split have the same (H, W), so the default collate works.

Formats: NYUv2 and Cityscapes as MTAN's preprocessed .npy release, PASCAL-Context and NYUD-v2 (nyud) as the
PASCAL_MT and NYUD_MT folders of the ATRC / Multi-Task-Learning-PyTorch releases (SOURCES and TREES below say
where and what); the last two go through ATRC's pipeline (CanvasDataset, atrc_augment).
`python data.py check DATASET ROOT` reads a whole split (validating every sample) and prints samples/s.
"""
import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

# ImageNet's mean and std per RGB channel, on [0, 1] images: the PASCAL-Context pipelines of the CTAL authors'
# transformer code and of ATRC normalise every image by them (the models do it: model.InputNorm).
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# The facts of each dataset, read by train.py, profile.py and the tests: its tasks in canonical order ->
# output channels; the input size (H, W) and backbone of the papers (CTAL paper Sec. 3.1; synthetic:
# synthetic.py's default); validation images; the loss weights of the authors' code (each config file
# repeats its own, so a recipe reads complete; PASCAL semseg is 2.0 for CTAL, 1.0 for the other models);
# image_norm: the (mean, std) the model normalises its input by, where the authors' pipeline does;
# canvas: the images are read at their own size and placed on a canvas of `size` (data.CanvasDataset, ATRC's
# pipeline), where MTAN's files are stored at the model's size; edge_pos_weight: the positive weight of the
# edge loss (ATRC's datasets: PASCAL 0.95, NYUD 0.8); inverse_depth: MTAN's Cityscapes depth is inverse depth
# without a metric unit (ATRC's depth bins then span its training values). nyud is NYUD-v2 as ATRC and TIF report it (NYUD_MT:
# 40 classes, edges, 425x560, ATRC's loss weights), beside nyuv2, MTAN's release that the CTAL papers use.
DATASETS = {
    'nyuv2': dict(tasks={'semseg': 13, 'depth': 1, 'normals': 3}, size=(288, 384), val_images=654,
                  backbone='hrnet18', loss_weights={'semseg': 1.0, 'depth': 1.0, 'normals': 1.0}),
    'cityscapes': dict(tasks={'semseg': 19, 'depth': 1}, size=(128, 256), val_images=500,
                       backbone='hrnet18', loss_weights={'semseg': 1.0, 'depth': 10.0}, inverse_depth=True),
    'pascal': dict(tasks={'semseg': 21, 'human_parts': 7, 'saliency': 1, 'normals': 3, 'edge': 1},
                   size=(512, 512), val_images=5105, backbone='swinv2_s',
                   loss_weights={'semseg': 2.0, 'human_parts': 2.0, 'saliency': 5.0, 'edge': 50.0,
                                 'normals': 10.0}, image_norm=(IMAGENET_MEAN, IMAGENET_STD), canvas=True,
                   edge_pos_weight=0.95),
    'nyud': dict(tasks={'semseg': 40, 'depth': 1, 'normals': 3, 'edge': 1}, size=(425, 560), val_images=654,
                 backbone='hrnet18', loss_weights={'semseg': 1.0, 'depth': 1.0, 'normals': 10.0, 'edge': 50.0},
                 image_norm=(IMAGENET_MEAN, IMAGENET_STD), canvas=True, edge_pos_weight=0.8),
    'synthetic': dict(tasks={'semseg': 13, 'depth': 1, 'normals': 3}, size=(96, 128), val_images=100,
                      backbone='hrnet18', loss_weights={'semseg': 1.0, 'depth': 1.0, 'normals': 1.0}),
}
IGNORE = 255
# The 13-class NYUv2 labels (Couprie et al.), in the order of MTAN's label indices 0..12.
NYU13_CLASSES = ('bed', 'books', 'ceiling', 'chair', 'floor', 'furniture', 'objects', 'painting',
                 'sofa', 'table', 'tv', 'wall', 'window')
CITYSCAPES_LABELS = {'label_19': 19, 'label_7': 7}
MTAN_SCALES = (1.0, 1.2, 1.5)
SPLITS = ('train', 'val')

# ---------------------------------------------------------------------------------------------------
# Where the data comes from, and what the loader expects to find (printed when something is missing)

SOURCES = {
    'nyuv2': "NYUv2 in MTAN's preprocessed .npy format (795 train / 654 val, 288x384): the download "
             "link is in the README of https://github.com/lorenmt/mtan",
    'cityscapes': "Cityscapes in MTAN's preprocessed .npy format (2975 train / 500 val, 128x256): the "
                  "download link is in the README of https://github.com/lorenmt/mtan",
    'pascal': "the PASCAL_MT folder (PASCAL-Context with distilled saliency/normals, 4998 train / 5105 "
              "val) of the ATRC (https://github.com/brdav/atrc) and Multi-Task-Learning-PyTorch "
              "(https://github.com/SimonVandenhende/Multi-Task-Learning-PyTorch) releases; unpack it "
              "and pass the PASCAL_MT folder as root",
    'nyud': "the NYUD_MT folder (NYUD-v2 with 40 classes, depth, normals and edges, 795 train / 654 val, "
            "425x560) of the ATRC (https://github.com/brdav/atrc, src/data/nyud.py) and "
            "Multi-Task-Learning-PyTorch releases; unpack it and pass the NYUD_MT folder as root (or render a "
            "synthetic one: `python synthetic.py ROOT --layout nyud_mt`)",
    'synthetic': "nowhere: generate it with `python synthetic.py ROOT` (or synthetic.make_synthetic)",
}
TREES = {
    'nyuv2': """ROOT/
  train/  image/0.npy ...   (H, W, 3) RGB in [0, 1]
          label/0.npy ...   (H, W) class 0..12, -1 = ignore
          depth/0.npy ...   (H, W, 1) metres, 0 = invalid
          normal/0.npy ...  (H, W, 3) in [-1, 1], zero vector = invalid
  val/    (same folders)""",
    'cityscapes': """ROOT/
  train/  image/0.npy ...     (H, W, 3) RGB in [0, 1]
          label_19/0.npy ...  (H, W) class 0..18, -1 = ignore   (label_7/: 7 classes, optional)
          depth/0.npy ...     (H, W, 1) inverse depth, 0 = invalid
  val/    (same folders)""",
    'pascal': """ROOT/   (the PASCAL_MT folder)
  JPEGImages/<id>.jpg
  ImageSets/Context/train.txt, val.txt      one <id> per line
  semseg/VOC12/<id>.png  or  semseg/pascal-context/<id>.png   21 classes, 255 = ignore
  human_parts/<id>.mat                      PASCAL-Part annotation (key 'anno')
  sal_distill/<id>.png                      saliency, > 0.5 -> 1
  normals_distill/<id>.png                  RGB, normal = 2 * v / 255 - 1
  pascal-context/trainval/<id>.mat          459-class context labels (key 'LabelMap')
  json/nyu_classes.json, json/context_classes.json   the class lists that decide where the
                                                     distilled normals are valid""",
}
TREES['nyud'] = """ROOT/   (the NYUD_MT folder)
  images/<id>.jpg
  gt_sets/train.txt, val.txt       one <id> per line
  segmentation/<id>.png            (H, W) 0 = void, classes 1..40
  depth/<id>.npy                   (H, W) metres, 0 = invalid
  normals/<id>.npy                 (H, W, 3) in [-1, 1], zero vector = invalid
  edge/<id>.npy                    (H, W) 1 = edge, 0 = none"""
TREES['synthetic'] = TREES['nyuv2']


def _missing_data_error(dataset, root, what):
    return FileNotFoundError(
        f"{dataset}: {what} not found (root {root!r}).\nExpected layout:\n{TREES[dataset]}\n"
        f"The data comes from {SOURCES[dataset]}.")


def _check_arguments(dataset, root, split, tasks):
    """A dataset's constructor arguments; returns the tasks as a tuple."""
    if split not in SPLITS:
        raise ValueError(f"{dataset}: split must be 'train' or 'val', got {split!r}")
    tasks = (tasks,) if isinstance(tasks, str) else tuple(tasks)
    known = DATASETS[dataset]['tasks']
    if not tasks or any(t not in known for t in tasks):
        raise ValueError(f"{dataset}: tasks must be a non-empty subset of {tuple(known)}, got {tasks}")
    if not os.path.isdir(root):
        raise _missing_data_error(dataset, root, 'the root directory')
    return tasks

# ---------------------------------------------------------------------------------------------------
# Cheap per-sample checks: each is a few vectorised passes over one array.


def _read(path, reader, what, context=''):
    """reader(path); a missing file is a FileNotFoundError (`context` appended to its message), an unreadable
    one (truncated, another format, a pickled object array) a ValueError that names the file and what it
    should have been."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"missing sample file {path}{context}")
    try:
        return reader(path)
    except Exception as e:
        raise ValueError(f"cannot read {path} as {what}: {e}") from None


def _read_npy(path, context='', **options):
    return _read(path, lambda p: np.load(p, allow_pickle=False, **options), 'a numpy .npy array', context)


def _as_image(x, path):
    if x.ndim != 3 or x.shape[2] != 3:
        raise ValueError(f"{path}: image must have shape (H, W, 3), got {x.shape}")
    if x.dtype == np.uint8:                  # a 0..255 image: the only integer dtype we accept
        return x.astype(np.float32) / 255.0
    x = x.astype(np.float32, copy=False)
    lo, hi = float(x.min()), float(x.max())
    if not (lo >= -0.05 and hi <= 1.05):  # slack for resampling overshoot; also catches NaN
        raise ValueError(f"{path}: image values must be RGB in [0, 1], got range [{lo:.4g}, {hi:.4g}]"
                         " (images normalised with a mean/std, or stored as 0..255 floats, are not "
                         "the declared format)")
    return x


def _as_labels(x, num_classes, path, ignore_values=(-1, IGNORE)):
    """Class map (H, W) of any numeric dtype -> int64 with every ignore value mapped to 255."""
    if x.ndim == 3 and x.shape[2] == 1:
        x = x[..., 0]
    if x.ndim != 2:
        raise ValueError(f"{path}: label map must have shape (H, W), got {x.shape}")
    lab = x.astype(np.int64)
    if x.dtype.kind == 'f' and not np.array_equal(lab, x):  # non-integer values, NaN
        raise ValueError(f"{path}: label map holds non-integer (or NaN) values; expected class indices")
    ignore = np.zeros(lab.shape, dtype=bool)
    for v in ignore_values:
        ignore |= lab == v
    bad = ~ignore & ((lab < 0) | (lab >= num_classes))
    if bad.any():
        raise ValueError(f"{path}: labels must be in 0..{num_classes - 1} or ignore "
                         f"{ignore_values}, found {np.unique(lab[bad])[:10].tolist()}")
    lab[ignore] = IGNORE
    return lab


def _as_depth(x, path):
    if x.ndim == 2:
        x = x[..., None]
    if x.ndim != 3 or x.shape[2] != 1:
        raise ValueError(f"{path}: depth must have shape (H, W, 1) or (H, W), got {x.shape}")
    x = x.astype(np.float32, copy=False)
    if not np.isfinite(x).all():
        raise ValueError(f"{path}: depth holds {int((~np.isfinite(x)).sum())} NaN / inf values; expected finite "
                         f"depths >= 0 (0 = invalid)")
    if not float(x.min()) >= -0.01:
        raise ValueError(f"{path}: depth must be >= 0 (0 = invalid), found {float(x.min()):.4g}")
    return np.maximum(x, 0)  # resampling residue just below 0 means no measurement: invalid


def _as_normals(x, path):
    if x.ndim != 3 or x.shape[2] != 3:
        raise ValueError(f"{path}: normals must have shape (H, W, 3), got {x.shape}")
    x = x.astype(np.float32, copy=False)
    m = float(np.abs(x).max())
    if not m <= 1 + 1e-3:  # also catches NaN
        raise ValueError(f"{path}: normals must be unit vectors with components in [-1, 1] "
                         f"(zero vector = invalid), found |component| up to {m:.4g}")
    return x


def _chw(x):
    """(H, W, C) numpy -> (C, H, W) contiguous torch tensor."""
    return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1)))

# ---------------------------------------------------------------------------------------------------
# Augmentation (train only). Every function maps a sample dict to a new sample dict.


def _maps(sample, fn):
    """fn(key, map) applied to every map (a tensor of >= 2 dims) of a sample; other entries pass."""
    return {key: fn(key, v) if torch.is_tensor(v) and v.dim() >= 2 else v for key, v in sample.items()}


def hflip(sample):
    """Mirror left-right. Normals live in the camera frame with x along image columns, so the mirror
    image of a surface has its normal's x negated; labels, depth, saliency and edges just move."""
    mirror = torch.tensor([-1.0, 1.0, 1.0]).view(3, 1, 1)
    return _maps(sample, lambda key, v: v.flip(-1) * mirror if key == 'normals' else v.flip(-1))


def _resized(key, v, size, image_options):
    x = v.reshape(1, -1, *v.shape[-2:]).float()
    x = (F.interpolate(x, size, mode='bilinear', **image_options) if key == 'image'
         else F.interpolate(x, size, mode='nearest'))
    return x.reshape(*v.shape[:-2], *size).to(v.dtype)


def resize_sample(sample, size, **image_options):
    """Every map of a sample resized to size (h, w): the image bilinearly (F.interpolate's image_options),
    the targets nearest, so a class, a validity mask or a unit normal stays one."""
    return _maps(sample, lambda key, v: _resized(key, v, size, image_options))


def crop_sample(sample, top, left, size):
    """Every map of a sample cut to the window of `size` (h, w) at (top, left)."""
    return _maps(sample, lambda key, v: v[..., top:top + size[0], left:left + size[1]])


def _placed(v, size, top, left, fill):
    # (F.pad: ~50x slower on int64 maps); fill: a number, or one per channel of v (C, h, w)
    fill = torch.as_tensor(fill, dtype=v.dtype)
    canvas = (fill.view(-1, 1, 1) if fill.dim() else fill).expand(*v.shape[:-2], *size).clone()
    canvas[..., top:top + v.shape[-2], left:left + v.shape[-1]] = v
    return canvas


def pad_sample(sample, size, top=0, left=0, image_fill=0.0):
    """Every map of a sample placed at (top, left) on a canvas of `size` (h, w) that holds 'no value': 0 for
    depth and the normals (0 / the zero vector = invalid), the ignore value for every other target; the
    image on `image_fill` (a grey level, or an RGB colour)."""
    fills = {'image': image_fill, 'depth': 0.0, 'normals': 0.0}
    return _maps(sample, lambda key, v: _placed(v, size, top, left, fills.get(key, IGNORE)))


def scale_crop(sample, scale, top, left):
    """MTAN's scale augmentation: crop an (H/scale, W/scale) window at (top, left) and resize it back to
    (H, W). The scene then looks `scale` times closer, so depth is divided by `scale` (MTAN's augmentation; for
    Cityscapes' inverse depth this is MTAN's rule too, although the geometric rule would multiply).
    The image is resized bilinearly (align_corners=True, as MTAN); everything else nearest. MTAN resizes
    normals bilinearly, which blends invalid zero vectors into valid neighbours and shortens vectors;
    nearest keeps the all-zero invalid mask exact and the vectors unit."""
    H, W = sample['image'].shape[-2:]
    h, w = int(H / scale), int(W / scale)
    if not (0 <= top <= H - h and 0 <= left <= W - w):
        raise ValueError(f"crop window ({top}, {left}, {h}, {w}) is outside the {H}x{W} image")
    out = resize_sample(crop_sample(sample, top, left, (h, w)), (H, W), align_corners=True)
    if 'depth' in out:
        out['depth'] = out['depth'] / scale
    return out


# ATRC's training pipeline (brdav/atrc src/data/pl_data.py, transforms.py), for PASCAL-Context and NYUD_MT;
# the CTAL authors' transformer code reuses it for PASCAL-Context (code_transformer/config.py
# get_transformations, data/transforms.py).
ATRC_SCALE_RANGE = (0.5, 2.0)        # random scale U(0.5, 2)
ATRC_CAT_MAX_RATIO = 0.75            # crop redrawn while one class covers >= 75 % of its labelled pixels ...
ATRC_CROP_REDRAWS = 10               # ... at most 10 times; the 11th window is kept unchecked
ATRC_BRIGHTNESS = 32 / 255           # photometric distortion on [0, 1] images (theirs: 32 on 0..255)
ATRC_CONTRAST = (0.5, 1.5)
ATRC_SATURATION = (0.5, 1.5)
ATRC_HUE_STEPS = (-18, 17)           # hue shift: an integer number of OpenCV hue units (2 degrees), inclusive


def _uniform(low, high):
    return low + (high - low) * float(torch.rand(()))


def adjust_hsv_saturation(image, factor):
    """HSV saturation (OpenCV's colour model) scaled by `factor` and clipped to 1, hue and value kept, on a
    (3, H, W) image in [0, 1]. Every channel of an HSV colour is c = V (1 - S g(H)), so S -> S' moves each
    channel to V - (V - c) S'/S, with S'/S = min(factor, 1 / S) and S = (V - min) / V."""
    v, low = image.amax(0), image.amin(0)                                  # (H, W)
    spread = v - low
    ratio = torch.where(spread > 0, torch.minimum(torch.full_like(v, factor), v / spread.clamp(min=1e-12)),
                        torch.zeros_like(v))                               # grey (S = 0): unchanged
    return v - (v - image) * ratio


def shift_hue(image, steps):
    """The HSV hue of a (3, H, W) image in [0, 1] turned by `steps` OpenCV hue units of 2 degrees (their
    (H + k) % 180 on OpenCV's 0..180 hue), saturation and value kept (torchvision's HSV hue shift)."""
    from torchvision.transforms.v2 import functional as TF
    return TF.adjust_hue(image, steps / 180)


def photometric_distortion(image):
    """The authors' PhotoMetricDistortion on a (3, H, W) image in [0, 1], each step with probability 1/2:
    brightness + U(-32, 32) / 255; contrast x U(0.5, 1.5) (first or last, a coin flip); HSV saturation
    x U(0.5, 1.5); hue + k x 2 degrees, k an integer in [-18, 17]; clipped to [0, 1] after each step. Their
    colour model (OpenCV's HSV) in float arithmetic: their uint8 rounding between the steps is left out
    (README Fidelity table)."""
    if float(torch.rand(())) < 0.5:
        image = (image + _uniform(-ATRC_BRIGHTNESS, ATRC_BRIGHTNESS)).clamp(0, 1)
    contrast_first = float(torch.rand(())) < 0.5
    steps = [
        lambda x: (x * _uniform(*ATRC_CONTRAST)).clamp(0, 1),          # their contrast: a plain gain
        lambda x: adjust_hsv_saturation(x, _uniform(*ATRC_SATURATION)).clamp(0, 1),
        lambda x: shift_hue(x, int(torch.randint(ATRC_HUE_STEPS[0], ATRC_HUE_STEPS[1] + 1, ()))),
    ]
    order = steps if contrast_first else steps[1:] + steps[:1]
    for step in order:
        if float(torch.rand(())) < 0.5:
            image = step(image)
    return image


def _crop_window(shape, size):
    """A random (top, left): uniform over the windows of `size` inside `shape` (0 where it does not fit)."""
    return tuple(int(torch.randint(max(n - s, 0) + 1, ())) for n, s in zip(shape, size))


def classes_are_varied(semseg, max_ratio=ATRC_CAT_MAX_RATIO):
    """Their crop test: more than one labelled class, and none covering >= max_ratio of the labelled pixels."""
    counts = torch.bincount(semseg[semseg != IGNORE].flatten())
    counts = counts[counts > 0]
    return len(counts) > 1 and int(counts.max()) / int(counts.sum()) < max_ratio


def random_crop(sample, size):
    """Their RandomCrop(cat_max_ratio=0.75): a random window of `size`, cut to the image where the image is
    smaller; while its semseg is not `classes_are_varied`, redrawn up to ATRC_CROP_REDRAWS times (without a
    semseg task, the first window)."""
    shape = tuple(sample['image'].shape[-2:])
    top, left = _crop_window(shape, size)
    if 'semseg' in sample:
        for _ in range(ATRC_CROP_REDRAWS):
            if classes_are_varied(sample['semseg'][top:top + size[0], left:left + size[1]]):
                break
            top, left = _crop_window(shape, size)
    return crop_sample(sample, top, left, size)


def pad_centred(sample, size):
    """Every map placed in the middle of a canvas of `size` (their PadImage: top (H - h) // 2, left
    (W - w) // 2), the image on the ImageNet mean colour (0 once normalised)."""
    (H, W), (h, w) = size, sample['image'].shape[-2:]
    return pad_sample(sample, size, (H - h) // 2, (W - w) // 2, image_fill=IMAGENET_MEAN)


def atrc_augment(sample, size):
    """ATRC's training augmentation (PASCAL-Context, NYUD_MT) on a sample at its original size, in their order:
    random scale U(0.5, 2) (image bilinear, targets nearest; depth / scale), a random crop of at most `size`
    (`random_crop`: redrawn while one class dominates), horizontal flip with p = 1/2, the photometric
    distortion, then the centred pad to exactly `size` (the normalisation follows in the model)."""
    h, w = sample['image'].shape[-2:]
    s = _uniform(*ATRC_SCALE_RANGE)
    out = resize_sample(sample, (int(h * s), int(w * s)))
    if 'depth' in out:
        out['depth'] = out['depth'] / s
    out = random_crop(out, size)
    if float(torch.rand(())) < 0.5:
        out = hflip(out)
    out['image'] = photometric_distortion(out['image'])
    return pad_centred(out, size)


def random_augment(sample, use_scale_crop):
    """Random MTAN scale-crop (optional) then a random horizontal flip, drawn from the global torch
    RNG (DataLoader workers seed it from the loader's generator, so runs are reproducible)."""
    if use_scale_crop:
        s = MTAN_SCALES[int(torch.randint(len(MTAN_SCALES), ()))]
        H, W = sample['image'].shape[-2:]
        top, left = int(torch.randint(H - int(H / s) + 1, ())), int(torch.randint(W - int(W / s) + 1, ()))
        sample = scale_crop(sample, s, top, left)
    if float(torch.rand(())) < 0.5:
        sample = hflip(sample)
    return sample

# ---------------------------------------------------------------------------------------------------
# NYUv2 / Cityscapes / synthetic: MTAN's .npy format


class _MTANDataset(Dataset):
    name = None
    folders = None  # task -> folder name

    def __init__(self, root, split, tasks, augment, scale_crop, num_classes):
        self.tasks = _check_arguments(self.name, root, split, tasks)
        self.root, self.split, self.augment, self.scale_crop = root, split, augment, scale_crop
        self.num_classes = num_classes
        self.dir = os.path.join(root, split)
        for folder in ['image'] + [self.folders[t] for t in self.tasks]:
            if not os.path.isdir(os.path.join(self.dir, folder)):
                raise _missing_data_error(self.name, root, f"folder {split}/{folder}/")
        names = [f for f in os.listdir(os.path.join(self.dir, 'image')) if f.endswith('.npy')]
        self.n = len(names)
        if self.n == 0:
            raise _missing_data_error(self.name, root, f"any {split}/image/*.npy file")
        expected = {f'{i}.npy' for i in range(self.n)}
        odd = sorted(set(names) - expected)
        if odd:
            raise ValueError(f"{self.name}: {self.dir}/image/ must hold 0.npy .. {self.n - 1}.npy "
                             f"(MTAN numbering), found unexpected {odd[:5]}")
        self.size = self._check_headers()

    def _check_headers(self):
        """Every sample file of the split exists and has the split's shape and a numeric dtype, read from
        the .npy headers only (memory-mapped: no pixel is read). Returns the (H, W) of image 0."""
        size = None
        for i in range(self.n):
            for folder in ['image'] + [self.folders[t] for t in self.tasks]:
                path = self._path(folder, i)
                x = _read_npy(path, f" ({self.split}/image/ has {self.n} files)", mmap_mode='r')
                size = size or tuple(x.shape[:2])
                if x.dtype.kind not in 'fiub' or x.ndim not in (2, 3) or tuple(x.shape[:2]) != size:
                    raise ValueError(f"{path}: a {x.dtype} array of shape {x.shape}; expected numbers of shape "
                                     f"({size[0]}, {size[1]}[, C]) like {self._path('image', 0)}")
        return size

    def __len__(self):
        return self.n

    def _path(self, folder, i):
        return os.path.join(self.dir, folder, f'{i}.npy')

    def __getitem__(self, i):
        if not 0 <= i < self.n:
            raise IndexError(f"{self.name} {self.split}: index {i} out of range 0..{self.n - 1}")
        path = self._path('image', i)
        sample = {'image': _chw(_as_image(_read_npy(path), path))}     # shapes: checked in _check_headers
        for task in self.tasks:
            path = self._path(self.folders[task], i)
            x = _read_npy(path)
            sample[task] = (torch.from_numpy(_as_labels(x, self.num_classes, path)) if task == 'semseg'
                            else _chw(_as_depth(x, path)) if task == 'depth' else _chw(_as_normals(x, path)))
        if self.augment:
            sample = random_augment(sample, self.scale_crop)
        return sample


class NYUv2(_MTANDataset):
    """NYUv2 (MTAN .npy). Labels 13 classes; depth in metres; normals from Eigen & Fergus."""
    name = 'nyuv2'
    folders = {'semseg': 'label', 'depth': 'depth', 'normals': 'normal'}

    def __init__(self, root, split='train', tasks=('semseg', 'depth', 'normals'), augment=False,
                 scale_crop=False):
        super().__init__(root, split, tasks, augment, scale_crop, DATASETS[self.name]['tasks']['semseg'])


class Synthetic(NYUv2):
    """Output of `make_synthetic`: the NYUv2 format, only the error messages differ."""
    name = 'synthetic'


class Cityscapes(_MTANDataset):
    """Cityscapes (MTAN .npy). labels='label_19' (the benchmark) or 'label_7'; depth is inverse depth."""
    name = 'cityscapes'

    def __init__(self, root, split='train', tasks=('semseg', 'depth'), labels='label_19', augment=False,
                 scale_crop=False):
        if labels not in CITYSCAPES_LABELS:
            raise ValueError(f"cityscapes: labels must be one of {tuple(CITYSCAPES_LABELS)}, got {labels!r}")
        self.folders = {'semseg': labels, 'depth': 'depth'}
        super().__init__(root, split, tasks, augment, scale_crop, CITYSCAPES_LABELS[labels])

# ---------------------------------------------------------------------------------------------------
# PASCAL-Context (PASCAL_MT folder)

# PASCAL-Part part name -> one of 6 parts (0 = background): head, torso, upper arm, lower arm (+hand),
# upper leg, lower leg (+foot); left and right merge, so a horizontal flip needs no part swap.
PASCAL_PARTS = {'head': 1, 'hair': 1, 'lear': 1, 'rear': 1, 'lebrow': 1, 'rebrow': 1, 'leye': 1, 'reye': 1,
                'mouth': 1, 'nose': 1, 'torso': 2, 'neck': 2, 'luarm': 3, 'ruarm': 3,
                'llarm': 4, 'rlarm': 4, 'lhand': 4, 'rhand': 4, 'luleg': 5, 'ruleg': 5,
                'llleg': 6, 'rlleg': 6, 'lfoot': 6, 'rfoot': 6}
PASCAL_PERSON = 15  # 'person' in the 20 VOC object classes of PASCAL-Part's class_ind

def thin(mask):
    """Thin a boolean mask to 1-pixel-wide, still connected curves: skimage.morphology.thin (Guo & Hall's
    two-subiteration algorithm, as stated in Lam, Lee & Suen 1992). scikit-image is imported only when
    PASCAL-Context edges are built."""
    from skimage.morphology import thin as skimage_thin
    return skimage_thin(np.asarray(mask, dtype=bool))


def label_edges(label_map):
    """Edge target of PASCAL-Context: pixels where the 4-neighbour Laplacian of the LabelMap is non-zero
    (mirrored borders, as OpenCV's default), thinned to one pixel. A class change marks the pixels on
    both sides of it, so the raw mask is two pixels wide; thinning keeps a one-pixel curve. (A pixel
    whose neighbours' labels happen to sum to 4x its own is missed, as in the releases' recipe.)"""
    lab = np.pad(np.asarray(label_map, dtype=np.int64), 1, mode='reflect')
    c = lab[1:-1, 1:-1]
    lap = lab[:-2, 1:-1] + lab[2:, 1:-1] + lab[1:-1, :-2] + lab[1:-1, 2:] - 4 * c
    return thin(lap != 0)


def _read_mat(path, key):
    import scipy.io  # only PASCAL-Context needs scipy
    mat = _read(path, scipy.io.loadmat, 'a MATLAB .mat file')
    if key not in mat:
        raise ValueError(f"{path}: expected key {key!r}, found {[k for k in mat if not k.startswith('__')]}")
    return mat[key]


def _open_image(path, mode):
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert(mode) if mode else im)


def _read_pil(path, mode=None):
    return _read(path, lambda p: _open_image(p, mode), 'an image')


def _check_shape(x, shape, path):
    if x.shape[:2] != tuple(shape):
        raise ValueError(f"{path}: map is {x.shape[:2]}, but the image is {tuple(shape)}")
    return x


def human_parts_target(anno, shape, path='<anno>'):
    """PASCAL-Part annotation (the 'anno' struct of human_parts/<id>.mat) -> (h, w) int64 part map, as the
    releases' loader builds it: 0 (background) everywhere, then each person's part masks in turn (a later
    person overwrites an earlier one). A person annotated without parts writes nothing: background. Where no
    person has parts the map stays all 0, which `ignore_partless` then turns into all ignore."""
    target = np.zeros(shape, dtype=np.int64)
    try:
        objects = anno[0, 0]['objects']
        objects = objects.reshape(-1) if objects.size else []
        for obj in objects:
            if int(np.asarray(obj['class_ind']).reshape(-1)[0]) != PASCAL_PERSON or obj['parts'].size == 0:
                continue
            for part in obj['parts'].reshape(-1):
                name = str(np.asarray(part['part_name']).reshape(-1)[0])
                if name not in PASCAL_PARTS:
                    raise ValueError(f"unknown part name {name!r} (known: {sorted(PASCAL_PARTS)})")
                m = np.asarray(part['mask']).astype(bool)
                if m.shape != tuple(shape):
                    raise ValueError(f"part mask is {m.shape}, image is {tuple(shape)}")
                target[m] = PASCAL_PARTS[name]
    except (KeyError, ValueError, IndexError, TypeError) as e:
        raise ValueError(f"{path}: not a PASCAL-Part annotation (anno.objects[i].class_ind / mask / "
                         f"parts[j].part_name / mask): {e}") from e
    return target


def ignore_partless(parts):
    """Their AddIgnoreRegions, after the crop and pad: a part map holding only background and ignore (no
    person with parts in view) is all ignore, so that images without people do not teach 'background'."""
    return torch.full_like(parts, IGNORE) if bool(((parts == 0) | (parts == IGNORE)).all()) else parts


def _normals_valid_classes(root):
    """LabelMap classes where the distilled normals count as ground truth: the normals were distilled from
    a model trained on NYUv2, so the releases keep a pixel's normal only if its PASCAL-Context class name
    is also an NYUv2 class name (json/nyu_classes.json, minus 'unknown'), plus 'tvmonitor', which every
    loader of this lineage (MTI-Net's, ATRC's, the CTAL authors') appends."""
    names = [os.path.join(root, 'json', f) for f in ('nyu_classes.json', 'context_classes.json')]
    if not all(os.path.isfile(f) for f in names):
        raise _missing_data_error('pascal', root, "json/nyu_classes.json and json/context_classes.json (the "
                                                  "class lists that decide where the normals are valid)")
    with open(names[0]) as f, open(names[1]) as g:
        nyu, context = json.load(f), json.load(g)                    # [name], {name: LabelMap index}
    valid = {int(context[n]) for n in nyu + ['tvmonitor'] if n in context and n != 'unknown'}
    return np.array(sorted(valid), dtype=np.int64)


def shrunk_to_fit(shape, size):
    """The (h, w) an image of `shape` (h, w) takes in PASCALContext's canvas of `size` (H, W): scaled by
    s = min(1, H / h, W / w), so only an image larger than the canvas shrinks, aspect kept."""
    (h, w), (H, W) = shape, size
    s = min(1.0, H / h, W / w)
    return round(h * s), round(w * s)


def fit_to_canvas(sample, size):
    """The evaluation input of PASCAL-Context: a sample at its original size, resized only if larger than
    `size` (`shrunk_to_fit`, aspect kept), then padded centred to `size` (`pad_centred`, as the authors'
    PadImage). `restore_size` undoes it."""
    shape = tuple(sample['image'].shape[-2:])
    fitted = shrunk_to_fit(shape, size)
    if fitted != shape:
        sample = resize_sample(sample, fitted, antialias=True)
    return pad_centred(sample, size)


class CanvasDataset(Dataset):
    """The datasets of ATRC's pipeline (PASCAL-Context, NYUD_MT): ids listed in a split file, each sample's
    files read at the image's own size, then placed on a canvas of `size` (int or (h, w)). Training samples
    (augment=True) go through `atrc_augment` (scale, crop, flip, photometric distortion, centred pad);
    otherwise `fit_to_canvas` (padded centred on the ImageNet mean colour, targets with 'no value'; an image
    larger than `size` is first resized, aspect kept). `restore_size` maps a prediction back to the image's
    (h, w) = sample['meta']['size']. The images stay in [0, 1]: the model normalises them (image_norm).
    A subclass names its files (FILES: entry -> path patterns, the first that exists) and list (LIST) and
    reads one sample (`_load`)."""
    name = FILES = LIST = None

    def __init__(self, root, split, tasks, size, augment):
        self.tasks = _check_arguments(self.name, root, split, tasks)
        self.root, self.split, self.augment = root, split, augment
        self.size = (size, size) if isinstance(size, int) else tuple(size)
        self.list_name = self.LIST.format(split)
        list_file = os.path.join(root, self.list_name)
        if not os.path.isfile(list_file):
            raise _missing_data_error(self.name, root, f"the split list {self.list_name}")
        needs = self.entries()
        for key in needs:
            folders = [os.path.dirname(p) + '/' for p in self.FILES[key]]
            if not any(os.path.isdir(os.path.join(root, d)) for d in folders):
                raise _missing_data_error(self.name, root, f"folder {' or '.join(folders)} (for {key})")
        with open(list_file) as f:
            self.ids = [line.strip() for line in f if line.strip()]
        if not self.ids:
            raise ValueError(f"{self.name}: {list_file} lists no image id")
        self.files = [{key: self._find(key, id_) for key in needs} for id_ in self.ids]

    def entries(self):
        """The FILES entries a sample of this task set reads."""
        return ['image', *self.tasks]

    def _find(self, key, id_):
        """The file of entry `key` of image `id_` (it must exist; its contents are checked when read)."""
        paths = [os.path.join(self.root, p.format(id_)) for p in self.FILES[key]]
        for path in paths:
            if os.path.isfile(path):
                return path
        raise FileNotFoundError(f"missing sample file {' or '.join(paths)} (listed in {self.list_name})")

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        if not 0 <= i < len(self.ids):
            raise IndexError(f"{self.name} {self.split}: index {i} out of range 0..{len(self.ids) - 1}")
        arrays, shape = self._load(i)
        sample = {key: torch.from_numpy(x) if x.ndim == 2 else _chw(x) for key, x in arrays.items()}
        sample = atrc_augment(sample, self.size) if self.augment else fit_to_canvas(sample, self.size)
        if 'human_parts' in sample:
            sample['human_parts'] = ignore_partless(sample['human_parts'])
        sample['meta'] = {'id': self.ids[i], 'size': tuple(int(v) for v in shape)}
        return sample


class PASCALContext(CanvasDataset):
    """PASCAL-Context multitask (PASCAL_MT), read as the authors' loader reads it (see CanvasDataset)."""
    name = 'pascal'
    # 'context' is the 459-class LabelMap: the edges are computed from it and it masks the normals
    FILES = {'image': ('JPEGImages/{}.jpg',), 'semseg': ('semseg/VOC12/{}.png', 'semseg/pascal-context/{}.png'),
             'human_parts': ('human_parts/{}.mat',), 'saliency': ('sal_distill/{}.png',),
             'normals': ('normals_distill/{}.png',), 'context': ('pascal-context/trainval/{}.mat',)}
    LIST = 'ImageSets/Context/{}.txt'

    def __init__(self, root, split='train', tasks=tuple(DATASETS['pascal']['tasks']),
                 size=DATASETS['pascal']['size'], augment=False):
        super().__init__(root, split, tasks, size, augment)
        self.valid_normal_classes = _normals_valid_classes(root) if 'normals' in self.tasks else None

    def entries(self):
        needs = ['image'] + [t for t in self.tasks if t != 'edge']
        return needs + (['context'] if {'normals', 'edge'} & set(self.tasks) else [])

    def _load(self, i):
        """Sample at original size, as numpy arrays (H, W[, C])."""
        files = self.files[i]
        image = _read_pil(files['image'], 'RGB').astype(np.float32) / 255.0
        out, shape = {'image': image}, image.shape[:2]
        if 'context' in files:
            context = _check_shape(_read_mat(files['context'], 'LabelMap'), shape, files['context'])
        for task in self.tasks:
            path = files['context' if task == 'edge' else task]
            if task == 'semseg':
                x = _as_labels(_read_pil(path), DATASETS['pascal']['tasks']['semseg'], path, (IGNORE,))
            elif task == 'human_parts':
                x = human_parts_target(_read_mat(path, 'anno'), shape, path)
            elif task == 'saliency':
                x = (_read_pil(path, 'L') > 127.5).astype(np.float32)[..., None]  # v / 255 > 0.5
            elif task == 'normals':
                x = 2.0 * _read_pil(path, 'RGB').astype(np.float32) / 255.0 - 1.0
                x[~np.isin(context, self.valid_normal_classes)] = 0.0
            else:  # edge
                x = label_edges(context).astype(np.float32)[..., None]
            out[task] = _check_shape(x, shape, path)
        return out, shape


def _as_edges(x, path):
    if x.ndim == 3 and x.shape[2] == 1:
        x = x[..., 0]
    if x.ndim != 2:
        raise ValueError(f"{path}: edge map must have shape (H, W), got {x.shape}")
    x = x.astype(np.float32, copy=False)
    if not (float(x.min()) >= 0 and float(x.max()) <= 1):                      # also catches NaN
        raise ValueError(f"{path}: edge map must hold values in [0, 1] (1 = edge), found "
                         f"[{float(x.min()):.4g}, {float(x.max()):.4g}]")
    return x[..., None]


class NYUDMT(CanvasDataset):
    """NYUD-v2 as the ATRC / Multi-Task-Learning-PyTorch release NYUD_MT distributes it (ATRC's
    src/data/nyud.py): 795 train / 654 val images of 425x560; semseg in 40 classes (the PNG's 1..40, 0 = void
    -> ignore), depth in metres (0 = invalid), normals (H, W, 3) (zero vector = invalid), edges in {0, 1}.
    Read and placed on the canvas as ATRC's pipeline does (CanvasDataset); `size` 425x560 is theirs, 448x576
    fits Swin's multiples of 32 (our reading: their Swin results do not say)."""
    name = 'nyud'
    FILES = {'image': ('images/{}.jpg',), 'semseg': ('segmentation/{}.png',), 'depth': ('depth/{}.npy',),
             'normals': ('normals/{}.npy',), 'edge': ('edge/{}.npy',)}
    LIST = 'gt_sets/{}.txt'

    def __init__(self, root, split='train', tasks=tuple(DATASETS['nyud']['tasks']), size=DATASETS['nyud']['size'],
                 augment=False):
        super().__init__(root, split, tasks, size, augment)

    def _load(self, i):
        files = self.files[i]
        image = _read_pil(files['image'], 'RGB').astype(np.float32) / 255.0
        out, shape = {'image': image}, image.shape[:2]
        for task in self.tasks:
            path = files[task]
            if task == 'semseg':
                png = _read_pil(path)
                if png.ndim != 2 or png.max(initial=0) > DATASETS['nyud']['tasks']['semseg']:
                    raise ValueError(f"{path}: NYUD_MT segmentation must be an (H, W) map of 0 (void) and classes "
                                     f"1..40, got shape {png.shape}, values up to {png.max(initial=0)}")
                x = _as_labels(png.astype(np.int64) - 1, DATASETS['nyud']['tasks']['semseg'], path, (-1,))
            elif task == 'depth':
                x = _as_depth(_read_npy(path), path)
            elif task == 'normals':
                x = _as_normals(_read_npy(path), path)
            else:  # edge
                x = _as_edges(_read_npy(path), path)
            out[task] = _check_shape(x, shape, path)
        return out, shape


def restore_size(pred, orig_size, size=DATASETS['pascal']['size']):
    """Map a prediction (..., size_h, size_w) on `fit_to_canvas`'s canvas back to the original (h, w): cut out
    the centred window the image was placed in, and undo the resize (bilinearly: pass logits, not class
    maps) when the image was larger than `size`. Images of the PASCAL_MT release (at most 500 px) are only
    padded at 512."""
    (h, w), (H, W) = orig_size, (size, size) if isinstance(size, int) else size
    nh, nw = shrunk_to_fit((h, w), (H, W))
    top, left = (H - nh) // 2, (W - nw) // 2
    pred = pred[..., top:top + nh, left:left + nw]
    if (nh, nw) != (h, w):
        shape = pred.shape
        pred = F.interpolate(pred.reshape(1, -1, nh, nw).float(), (h, w), mode='bilinear',
                             align_corners=False).reshape(*shape[:-2], h, w)
    return pred


def prepare_image(dataset, image, size):
    """A (3, h, w) image in [0, 1] of the user's as `dataset`'s evaluation prepares its images for a model of
    input `size` (predict.py): the centred canvas of ATRC's datasets (`fit_to_canvas`); MTAN's files are
    stored at the model's size, so another image is resized to it (bilinear). `restore_prediction` undoes it."""
    if DATASETS[dataset].get('canvas'):
        return fit_to_canvas({'image': image}, size)['image']
    return F.interpolate(image[None], size, mode='bilinear', align_corners=False)[0]


def restore_prediction(dataset, pred, orig_size, size):
    """A model output (B, K, size_h, size_w) on `prepare_image`'s input, mapped back to the image's (h, w)."""
    if DATASETS[dataset].get('canvas'):
        return restore_size(pred, orig_size, size)
    return F.interpolate(pred, orig_size, mode='bilinear', align_corners=False)


# ---------------------------------------------------------------------------------------------------


def resolve_tasks(dataset, tasks, loss_weights):
    """A config's tasks (None: all; 'a,b'; or a list) in the dataset's canonical order, and one loss weight >= 0
    per task (loss_weights None: the dataset's): ([task], {task: weight}), or a ValueError saying what to pass."""
    known = DATASETS[dataset]['tasks']
    names = tuple(known) if tasks is None else tasks.split(',') if isinstance(tasks, str) else tasks
    names = [str(x).strip() for x in names]
    if not names or any(x not in known for x in names) or len(set(names)) != len(names):
        raise ValueError(f"tasks={tasks!r}: expected None or distinct tasks of {dataset}: {', '.join(known)}")
    ordered = [x for x in known if x in names]
    weights = loss_weights or DATASETS[dataset]['loss_weights']
    if any(not isinstance(weights.get(x), (int, float)) or not weights[x] >= 0 for x in ordered):
        raise ValueError(f"loss_weights={loss_weights!r}: expected None or a dict giving every task "
                         f"({', '.join(ordered)}) a weight >= 0")
    return ordered, {x: float(weights[x]) for x in ordered}


def to_device(batch, device):
    """A loader's batch (dict of tensors; other entries dropped) on `device`."""
    return {k: v.to(device, non_blocking=True) for k, v in batch.items() if torch.is_tensor(v)}


def build_dataset(dataset, root, split, tasks=None, augment=False, size=None, **kw):
    """Dataset by name (a key of DATASETS). tasks=None means all of the dataset's tasks. size: the canvas of
    pascal / nyud (None: theirs, DATASETS); MTAN's files are stored at one size, which a given size must
    equal. kw: nyuv2 / synthetic scale_crop; cityscapes labels, scale_crop. The synthetic set is read from
    root; synthetic.make_synthetic writes it."""
    if dataset not in DATASETS:
        raise ValueError(f"unknown dataset {dataset!r}; expected one of {tuple(DATASETS)}")
    tasks = tuple(DATASETS[dataset]['tasks']) if tasks is None else tasks
    if DATASETS[dataset].get('canvas'):
        if kw.pop('scale_crop', False):
            raise ValueError(f"{dataset}: scale_crop is MTAN's NYUv2/Cityscapes augmentation; {dataset} uses "
                             f"ATRC's (augment=True)")
        size = size or DATASETS[dataset]['size']                      # an int or (H, W)
        return (PASCALContext if dataset == 'pascal' else NYUDMT)(root, split, tasks, augment=augment, size=size, **kw)
    ds = {'nyuv2': NYUv2, 'cityscapes': Cityscapes, 'synthetic': Synthetic}[dataset](root, split, tasks,
                                                                                    augment=augment, **kw)
    if size is not None and tuple(size) != tuple(ds.size):
        raise ValueError(f"img_size={tuple(size)} but the {dataset} files in {root} are {tuple(ds.size)}: leave "
                         f"img_size=None for this dataset (the size is read from the files)")
    return ds


def check_split(dataset, root, split, augment=False, limit=0):
    """Read (and so validate) every sample of one split; its one-line summary. Raises the loaders' clear
    FileNotFoundError / ValueError (naming the file) on the first bad sample."""
    ds = build_dataset(dataset, root, split, augment=augment)
    n = min(len(ds), limit) if limit > 0 else len(ds)
    t0 = time.perf_counter()
    for i in range(n):
        sample = ds[i]
    dt = max(time.perf_counter() - t0, 1e-9)
    shapes = {k: tuple(v.shape) for k, v in sample.items() if torch.is_tensor(v)}
    return (f"{dataset} {split}: {n} of {len(ds)} samples OK in {dt:.2f} s ({n / dt:.1f} samples/s, one "
            f"process, one thread); last sample {shapes}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=' '.join(__doc__.split('\n\n')[0].split()))
    sub = parser.add_subparsers(dest='command', required=True)
    p = sub.add_parser('check', help='read (and validate) every sample of every split (or of --split); '
                                     'print one line per split')
    p.add_argument('dataset', choices=tuple(DATASETS))
    p.add_argument('root')
    p.add_argument('--split', choices=SPLITS, help='check only this split (default: all)')
    p.add_argument('--augment', action='store_true')
    p.add_argument('--limit', type=int, default=0, help='read only the first N samples of each split')
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # as in a DataLoader worker
    failed = 0
    for split in [args.split] if args.split else SPLITS:
        try:
            print(check_split(args.dataset, args.root, split, args.augment, args.limit), flush=True)
        except (FileNotFoundError, ValueError) as e:
            print(f"{args.dataset} {split}: FAILED: {e}", file=sys.stderr, flush=True)
            failed += 1
    return 1 if failed else 0


if __name__ == '__main__':
    sys.exit(main())
