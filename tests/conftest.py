"""pytest setup and the fixture writers shared by several test files.

Tests marked `slow` (big inputs, whole models at paper resolution) run only with
`python -m pytest --runslow`, so the default run stays within CI's time budget on a 2-core CPU.
`write_pascal_sample` writes one sample in the PASCAL_MT release's on-disk formats (jpg, png, mat);
`synthetic_root` is a tiny synthetic set per test module; `randomise` and `n_params` serve the model tests.
"""
import json
import os

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image


def pytest_addoption(parser):
    parser.addoption("--runslow", action="store_true", help="also run tests marked slow")


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: slow test, run only with --runslow")


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def keep_thread_count():
    """A test that runs a command-line main() (e.g. `data.py check` sets one thread, as in a DataLoader worker)
    must not change the thread count of the tests after it: float sums, and so the losses, depend on it."""
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope='module')
def synthetic_root(tmp_path_factory):
    """8 train / 4 val synthetic scenes of 32x64 (the smallest input the backbones take), once per module."""
    from synthetic import make_synthetic
    root = str(tmp_path_factory.mktemp('synthetic'))
    os.rmdir(root)                                   # make_synthetic wants an empty or absent folder
    return make_synthetic(root, 8, 4, (32, 64), seed=0)


def randomise(module, seed=0):
    """Every parameter and BatchNorm statistic random (so no term of an equation can hide behind a 0 or 1)."""
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.data = torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.5
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean = torch.randn(m.num_features, generator=g, dtype=m.running_mean.dtype)
            m.running_var = torch.rand(m.num_features, generator=g, dtype=m.running_var.dtype) + 0.5
    return module.eval()


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def _struct(fields, rows):
    arr = np.zeros((1, len(rows)), dtype=[(f, 'O') for f in fields])
    for j, row in enumerate(rows):
        arr[0, j] = row
    return arr


def write_pascal_sample(root, id_, size, rng, person=True, split='train', semseg_folder='VOC12'):
    """One sample of the PASCAL_MT layout. LabelMap: left half class 2 ('aeroplane', no valid
    normals), right half class 440 ('wall', valid), as the json class lists written beside it say. Returns the arrays written."""
    h, w = size
    for d in ('JPEGImages', 'ImageSets/Context', f'semseg/{semseg_folder}', 'human_parts', 'sal_distill',
              'normals_distill', 'pascal-context/trainval'):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    with open(os.path.join(root, 'ImageSets', 'Context', f'{split}.txt'), 'a') as f:
        f.write(id_ + '\n')
    yy, xx = np.mgrid[0:h, 0:w]                   # smooth, so that JPEG keeps it close
    img = np.stack([yy * 255 // h, xx * 255 // w, (yy + xx) * 127 // (h + w)], -1).astype(np.uint8)
    Image.fromarray(img).save(os.path.join(root, 'JPEGImages', id_ + '.jpg'), quality=95)
    sem = rng.integers(0, 21, (h, w)).astype(np.uint8)
    sem[0, :] = 255
    png = Image.frombytes('P', (w, h), sem.tobytes())
    png.putpalette([v for i in range(256) for v in (i, 255 - i, (7 * i) % 256)])
    png.save(os.path.join(root, 'semseg', semseg_folder, id_ + '.png'))
    sal = rng.choice(np.array([0, 127, 128, 255], dtype=np.uint8), (h, w))
    Image.fromarray(sal).save(os.path.join(root, 'sal_distill', id_ + '.png'))
    nrm = rng.integers(0, 256, (h, w, 3)).astype(np.uint8)
    Image.fromarray(nrm).save(os.path.join(root, 'normals_distill', id_ + '.png'))
    ctx = np.full((h, w), 440, dtype=np.uint16)
    ctx[:, : w // 2] = 2
    scipy.io.savemat(os.path.join(root, 'pascal-context', 'trainval', id_ + '.mat'), {'LabelMap': ctx})
    os.makedirs(os.path.join(root, 'json'), exist_ok=True)   # the release's class lists: only 'wall' has normals
    with open(os.path.join(root, 'json', 'nyu_classes.json'), 'w') as f:
        json.dump(['unknown', 'wall', 'chair'], f)
    with open(os.path.join(root, 'json', 'context_classes.json'), 'w') as f:
        json.dump({'aeroplane': 2, 'wall': 440, 'unknown': 431}, f)

    parts = np.zeros((h, w), dtype=np.int64)
    objects = [('dog', 12, np.ones((h, w), np.uint8), np.zeros((0, 0)))]
    if person:
        masks = {}
        for name, (r0, r1), part in (('hair', (2, 5), 1), ('nose', (5, 8), 1), ('torso', (8, 14), 2),
                                     ('ruarm', (14, 16), 3), ('lhand', (16, 18), 4),
                                     ('luleg', (18, 20), 5), ('rfoot', (20, 22), 6)):
            m = np.zeros((h, w), np.uint8)
            m[r0:r1, 4:10] = 1
            masks[name] = m
            parts[r0:r1, 4:10] = part
        person_mask = (parts > 0).astype(np.uint8)
        objects.append(('person', 15, person_mask, _struct(('part_name', 'mask'), list(masks.items()))))
        lonely = np.zeros((h, w), np.uint8)
        lonely[2:10, 20:24] = 1                  # a person annotated without parts: background, as theirs
        objects.append(('person', 15, lonely, np.zeros((0, 0))))
    else:
        parts[:] = 255                           # no person with parts: all ignore
    anno = {'imname': id_, 'objects': _struct(('class', 'class_ind', 'mask', 'parts'), objects)}
    scipy.io.savemat(os.path.join(root, 'human_parts', id_ + '.mat'), {'anno': anno})
    return {'image': img, 'semseg': sem, 'saliency': sal, 'normals': nrm, 'context': ctx, 'parts': parts}


def write_nyud_sample(root, id_, size, rng, split='train'):
    """One sample of the NYUD_MT layout (ATRC's src/data/nyud.py): images/<id>.jpg, segmentation/<id>.png
    (0 = void, classes 1..40), depth/<id>.npy (H, W) metres with a hole of 0, normals/<id>.npy (H, W, 3) unit
    vectors with a hole of zeros, edge/<id>.npy (H, W) in {0, 1}, and the id appended to gt_sets/<split>.txt.
    Returns the arrays written."""
    h, w = size
    for d in ('images', 'segmentation', 'depth', 'normals', 'edge', 'gt_sets'):
        os.makedirs(os.path.join(root, d), exist_ok=True)
    with open(os.path.join(root, 'gt_sets', f'{split}.txt'), 'a') as f:
        f.write(id_ + '\n')
    yy, xx = np.mgrid[0:h, 0:w]                   # smooth, so that JPEG keeps it close
    img = np.stack([yy * 255 // h, xx * 255 // w, (yy + xx) * 127 // (h + w)], -1).astype(np.uint8)
    Image.fromarray(img).save(os.path.join(root, 'images', id_ + '.jpg'), quality=95)
    seg = rng.integers(0, 41, (h, w)).astype(np.uint8)             # 0 = void
    Image.fromarray(seg).save(os.path.join(root, 'segmentation', id_ + '.png'))
    depth = rng.uniform(0.5, 9.0, (h, w)).astype(np.float32)
    depth[:3, :4] = 0
    normals = rng.normal(size=(h, w, 3)).astype(np.float32)
    normals /= np.linalg.norm(normals, axis=2, keepdims=True)
    normals[-2:, -3:] = 0
    edge = (rng.random((h, w)) < 0.1).astype(np.float32)
    for name, x in (('depth', depth), ('normals', normals), ('edge', edge)):
        np.save(os.path.join(root, name, id_ + '.npy'), x)
    return {'image': img, 'semseg': seg, 'depth': depth, 'normals': normals, 'edge': edge}
