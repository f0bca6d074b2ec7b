"""data.py: loaders read small fixtures written in each dataset's exact on-disk format (MTAN .npy,
PASCAL_MT jpg/png/mat) and return the task conventions of data.py; augmentation keeps the tasks
consistent; the synthetic generator's geometry agrees with itself and is deterministic."""
import json
import os
import shutil

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

import data
import synthetic
from conftest import write_nyud_sample, write_pascal_sample

torch.manual_seed(0)

# ---------------------------------------------------------------------------------------------------
# MTAN fixtures (NYUv2 / Cityscapes)


def write_mtan(root, split, n, size, label_folders=('label',), num_classes=13, normals=True, seed=0):
    """n random samples in MTAN's layout, with ignore labels, invalid depth and invalid normals; the
    dtypes are deliberately not float32 (float64 images/labels, float64 depth) so casting is exercised.
    Returns the arrays written, per sample."""
    rng = np.random.default_rng(seed)
    H, W = size
    written = []
    for i in range(n):
        s = {'image': rng.uniform(0, 1, (H, W, 3)),
             'depth': rng.uniform(0.5, 5, (H, W, 1))}
        s['depth'][rng.random((H, W)) < 0.1] = 0.0
        for folder in label_folders:
            lab = rng.integers(0, num_classes, (H, W)).astype(np.float64)
            lab[rng.random((H, W)) < 0.2] = -1
            s[folder] = lab
        if normals:
            nrm = rng.normal(size=(H, W, 3))
            nrm /= np.linalg.norm(nrm, axis=-1, keepdims=True)
            nrm[rng.random((H, W)) < 0.1] = 0.0
            s['normal'] = nrm
        for key, arr in s.items():
            os.makedirs(os.path.join(root, split, key), exist_ok=True)
            np.save(os.path.join(root, split, key, f'{i}.npy'), arr)
        written.append(s)
    return written


@pytest.fixture
def nyu(tmp_path):
    root = str(tmp_path / 'nyuv2')
    arrays = write_mtan(root, 'train', 3, (12, 16))
    write_mtan(root, 'val', 2, (12, 16), seed=1)
    return root, arrays


def test_dataset_facts_table():
    """Tasks and channels, the papers' sizes / val counts / backbones, the authors' loss weights."""
    facts = data.DATASETS
    assert facts['nyuv2']['tasks'] == {'semseg': 13, 'depth': 1, 'normals': 3}
    assert facts['cityscapes']['tasks'] == {'semseg': 19, 'depth': 1}
    assert facts['pascal']['tasks'] == {'semseg': 21, 'human_parts': 7, 'saliency': 1, 'normals': 3, 'edge': 1}
    assert facts['synthetic']['tasks'] == facts['nyuv2']['tasks']
    assert [facts[d]['size'] for d in ('nyuv2', 'cityscapes', 'pascal')] == [(288, 384), (128, 256), (512, 512)]
    assert [facts[d]['val_images'] for d in ('nyuv2', 'cityscapes', 'pascal')] == [654, 500, 5105]
    assert [facts[d]['backbone'] for d in ('nyuv2', 'cityscapes', 'pascal')] == ['hrnet18', 'hrnet18', 'swinv2_s']
    assert facts['nyuv2']['loss_weights'] == {'semseg': 1, 'depth': 1, 'normals': 1}
    assert facts['synthetic']['loss_weights'] == facts['nyuv2']['loss_weights']
    assert facts['cityscapes']['loss_weights'] == {'semseg': 1, 'depth': 10}
    assert facts['pascal']['loss_weights'] == {'semseg': 2, 'human_parts': 2, 'saliency': 5, 'edge': 50,
                                               'normals': 10}
    assert len(data.NYU13_CLASSES) == 13


def test_nyuv2_sample_matches_files(nyu):
    root, arrays = nyu
    ds = data.NYUv2(root, 'train')
    assert len(ds) == 3 and len(data.NYUv2(root, 'val')) == 2
    s, a = ds[1], arrays[1]
    assert set(s) == {'image', 'semseg', 'depth', 'normals'}
    assert s['image'].dtype == torch.float32 and s['image'].shape == (3, 12, 16)
    assert s['semseg'].dtype == torch.int64 and s['semseg'].shape == (12, 16)
    assert s['depth'].dtype == torch.float32 and s['depth'].shape == (1, 12, 16)
    assert s['normals'].dtype == torch.float32 and s['normals'].shape == (3, 12, 16)
    np.testing.assert_allclose(s['image'].numpy(), a['image'].transpose(2, 0, 1), rtol=1e-6)
    expected = np.where(a['label'] == -1, 255, a['label']).astype(np.int64)
    assert np.array_equal(s['semseg'].numpy(), expected)
    assert (s['semseg'] == 255).any() and s['semseg'][s['semseg'] != 255].max() <= 12
    np.testing.assert_allclose(s['depth'][0].numpy(), a['depth'][..., 0], rtol=1e-6)
    assert np.array_equal(s['depth'][0].numpy() == 0, a['depth'][..., 0] == 0)
    np.testing.assert_allclose(s['normals'].numpy(), a['normal'].transpose(2, 0, 1), rtol=1e-6)
    invalid = (s['normals'] == 0).all(0)
    assert np.array_equal(invalid.numpy(), (a['normal'] == 0).all(-1))


def test_task_subset_and_build_dataset(nyu):
    root, _ = nyu
    s = data.build_dataset('nyuv2', root, 'val', ('depth',))[0]
    assert set(s) == {'image', 'depth'}
    assert set(data.build_dataset('nyuv2', root, 'val')[0]) == {'image', 'semseg', 'depth', 'normals'}
    with pytest.raises(ValueError, match='subset'):
        data.NYUv2(root, 'train', tasks=('semseg', 'saliency'))
    with pytest.raises(ValueError, match='unknown dataset'):
        data.build_dataset('kitti', root, 'train')
    with pytest.raises(ValueError, match="'train' or 'val'"):
        data.NYUv2(root, 'test')


def test_cityscapes_label_19_and_label_7(tmp_path):
    root = str(tmp_path / 'cs')
    write_mtan(root, 'val', 2, (8, 16), label_folders=('label_7',), num_classes=7, normals=False, seed=3)
    a19 = write_mtan(root, 'val', 2, (8, 16), label_folders=('label_19',), num_classes=19, normals=False)
    s = data.Cityscapes(root, 'val')[0]
    assert set(s) == {'image', 'semseg', 'depth'}
    assert np.array_equal(s['semseg'].numpy(), np.where(a19[0]['label_19'] == -1, 255, a19[0]['label_19']))
    s7 = data.build_dataset('cityscapes', root, 'val', labels='label_7')[1]
    assert s7['semseg'][s7['semseg'] != 255].max() <= 6
    # a 19-class map read as label_7 must be refused (values up to 18 > 6)
    shutil.rmtree(os.path.join(root, 'val', 'label_7'))
    os.replace(os.path.join(root, 'val', 'label_19'), os.path.join(root, 'val', 'label_7'))
    with pytest.raises(ValueError, match=r'0\.\.6'):
        [data.Cityscapes(root, 'val', labels='label_7')[i] for i in range(2)]
    with pytest.raises(ValueError, match='label_19'):
        data.Cityscapes(root, 'val', labels='label_20')


def test_uint8_image_and_integer_labels_are_cast(tmp_path):
    root = str(tmp_path / 'nyu')
    write_mtan(root, 'train', 1, (6, 8))
    img = (np.arange(6 * 8 * 3) % 256).astype(np.uint8).reshape(6, 8, 3)
    np.save(os.path.join(root, 'train', 'image', '0.npy'), img)
    lab = np.full((6, 8), -1, dtype=np.int16)
    lab[:, :4] = 12
    np.save(os.path.join(root, 'train', 'label', '0.npy'), lab)
    s = data.NYUv2(root)[0]
    np.testing.assert_allclose(s['image'].numpy(), img.transpose(2, 0, 1) / 255.0, rtol=1e-6)
    assert (s['semseg'][:, :4] == 12).all() and (s['semseg'][:, 4:] == 255).all()


@pytest.mark.parametrize('folder, value, message', [
    ('label', 13, r'0\.\.12'),                 # class outside NYUv2's 13
    ('label', 2.5, 'non-integer'),
    ('image', 255.0, r'\[0, 1\]'),             # 0..255 stored as floats
    ('depth', -1.0, '>= 0'),
    ('normal', 3.0, r'\[-1, 1\]'),
])
def test_values_that_cannot_be_the_format_are_refused(tmp_path, folder, value, message):
    root = str(tmp_path / 'nyu')
    arrays = write_mtan(root, 'train', 1, (6, 8))
    key = folder
    arr = arrays[0][key].copy()
    arr.reshape(-1)[5] = value
    path = os.path.join(root, 'train', folder, '0.npy')
    np.save(path, arr)
    with pytest.raises(ValueError, match=message) as e:
        data.NYUv2(root)[0]
    assert path in str(e.value)


def test_missing_root_split_and_sample_errors(nyu, tmp_path):
    root, _ = nyu
    with pytest.raises(FileNotFoundError) as e:
        data.NYUv2(str(tmp_path / 'nowhere'))
    msg = str(e.value)
    assert 'label/0.npy' in msg and 'normal/0.npy' in msg and 'lorenmt/mtan' in msg
    with pytest.raises(FileNotFoundError, match='pascal|PASCAL_MT'):
        data.PASCALContext(str(tmp_path / 'nowhere'))
    with pytest.raises(FileNotFoundError, match='python synthetic.py ROOT'):
        data.build_dataset('synthetic', str(tmp_path / 'nowhere'), 'train')
    os.rename(os.path.join(root, 'val', 'normal'), os.path.join(root, 'val', 'normals'))
    with pytest.raises(FileNotFoundError, match='val/normal/'):
        data.NYUv2(root, 'val')
    assert len(data.NYUv2(root, 'val', tasks=('semseg', 'depth'))) == 2  # normals not asked for
    ds = data.NYUv2(root, 'train')
    # every file of the split is checked when the dataset is built, from the .npy headers
    missing = os.path.join(root, 'train', 'depth', '2.npy')
    os.rename(missing, missing + '.bak')
    n = len(os.listdir(os.path.join(root, 'train', 'image')))
    with pytest.raises(FileNotFoundError, match=rf"missing sample file {missing} \(train/image/ has {n} files\)"):
        data.NYUv2(root, 'train')
    with pytest.raises(FileNotFoundError, match=missing):      # also once the dataset exists
        ds[2]
    os.rename(missing + '.bak', missing)
    corrupt = os.path.join(root, 'train', 'label', '1.npy')
    good = open(corrupt, 'rb').read()
    with open(corrupt, 'wb') as f:
        f.write(b'not an npy file')
    with pytest.raises(ValueError, match=corrupt):
        data.NYUv2(root, 'train')
    with pytest.raises(ValueError, match=corrupt):
        ds[1]
    with open(corrupt, 'wb') as f:
        f.write(good)
    shaped = os.path.join(root, 'train', 'depth', '0.npy')
    np.save(shaped, np.ones((5, 16, 1)))
    with pytest.raises(ValueError, match=r'shape \(5, 16, 1\); expected numbers of shape \(12, 16'):
        data.NYUv2(root, 'train')
    np.save(shaped, np.array([['a'] * 16] * 12))
    with pytest.raises(ValueError, match='<U1 array'):
        data.NYUv2(root, 'train')


# ---------------------------------------------------------------------------------------------------
# Augmentation


def test_hflip_negates_normals_x_and_is_an_involution(nyu):
    root, arrays = nyu
    s = data.NYUv2(root)[0]
    f = data.hflip(s)
    a = arrays[0]
    np.testing.assert_allclose(f['image'].numpy(), a['image'][:, ::-1].transpose(2, 0, 1), rtol=1e-6)
    assert np.array_equal(f['semseg'].numpy(), np.where(a['label'] == -1, 255, a['label'])[:, ::-1])
    np.testing.assert_allclose(f['depth'][0].numpy(), a['depth'][:, ::-1, 0], rtol=1e-6)
    expected_normals = a['normal'][:, ::-1] * np.array([-1, 1, 1])
    np.testing.assert_allclose(f['normals'].numpy(), expected_normals.transpose(2, 0, 1), rtol=1e-6, atol=0)
    twice = data.hflip(f)
    for key in s:
        assert torch.equal(twice[key], s[key]), key


def test_augment_is_flip_or_identity_and_reproducible(nyu):
    root, _ = nyu
    plain = data.NYUv2(root)[2]
    flipped = data.hflip(plain)
    ds = data.NYUv2(root, augment=True)
    seen = set()
    for seed in range(12):
        torch.manual_seed(seed)
        s = ds[2]
        is_plain = all(torch.equal(s[k], plain[k]) for k in s)
        is_flip = all(torch.equal(s[k], flipped[k]) for k in s)
        assert is_plain != is_flip
        seen.add(is_flip)
        torch.manual_seed(seed)
        assert all(torch.equal(s[k], v) for k, v in ds[2].items())
    assert seen == {True, False}
    assert all(torch.equal(data.NYUv2(root, augment=False)[2][k], plain[k]) for k in plain)


def test_scale_crop_divides_depth_and_crops_every_task_alike(nyu):
    root, arrays = nyu
    s = data.NYUv2(root)[0]
    a = arrays[0]
    H, W, scale, top, left = 12, 16, 1.5, 3, 2
    out = data.scale_crop(s, scale, top, left)
    h, w = int(H / scale), int(W / scale)                # 8 x 10 window
    rows = top + np.floor(np.arange(H) * h / H).astype(int)   # nearest: src = floor(dst * in / out)
    cols = left + np.floor(np.arange(W) * w / W).astype(int)
    depth = a['depth'][..., 0][np.ix_(rows, cols)]
    np.testing.assert_allclose(out['depth'][0].numpy(), depth / scale, rtol=1e-6)
    assert np.array_equal((out['depth'][0] == 0).numpy(), depth == 0)   # invalid stays invalid
    label = np.where(a['label'] == -1, 255, a['label'])[np.ix_(rows, cols)]
    assert np.array_equal(out['semseg'].numpy(), label) and out['semseg'].dtype == torch.int64
    nrm = a['normal'][np.ix_(rows, cols)].transpose(2, 0, 1)
    np.testing.assert_allclose(out['normals'].numpy(), nrm, rtol=1e-6)      # unit or exactly zero
    # bilinear with align_corners=True maps the output corners onto the window's corner pixels
    img = a['image'].transpose(2, 0, 1)
    for (r, c), (sr, sc) in {(0, 0): (top, left), (H - 1, W - 1): (top + h - 1, left + w - 1)}.items():
        np.testing.assert_allclose(out['image'][:, r, c].numpy(), img[:, sr, sc], rtol=1e-5)
    with pytest.raises(ValueError, match='outside'):
        data.scale_crop(s, 1.5, 5, 0)


def test_random_scale_crop_uses_mtan_scales(nyu):
    root, arrays = nyu
    ds = data.NYUv2(root, tasks=('depth',), augment=True, scale_crop=True)
    d0 = arrays[1]['depth'][..., 0]
    valid_values = np.unique(d0[d0 > 0])
    scales = set()
    for seed in range(20):
        torch.manual_seed(seed)
        d = ds[1]['depth'][0].numpy()
        v = d[d > 0]
        # every output depth is an input depth divided by one of MTAN's scales
        for s in data.MTAN_SCALES:
            if (np.abs(v[:, None] * s - valid_values[None]).min(1) < 1e-5 * s).all():
                scales.add(s)
                break
        else:
            raise AssertionError('depth values are not input depths / a scale in (1, 1.2, 1.5)')
    assert scales == set(data.MTAN_SCALES)


def test_seeded_dataloader_is_reproducible(nyu):
    root, _ = nyu
    ds = data.NYUv2(root, augment=True, scale_crop=True)

    def batches():
        torch.manual_seed(3)
        loader = torch.utils.data.DataLoader(ds, batch_size=2, shuffle=True,
                                             generator=torch.Generator().manual_seed(7))
        return [b for b in loader]
    first, second = batches(), batches()
    for b1, b2 in zip(first, second):
        assert all(torch.equal(b1[k], b2[k]) for k in b1)

# ---------------------------------------------------------------------------------------------------
# PASCAL-Context fixtures (the PASCAL_MT folder)


@pytest.fixture
def pascal(tmp_path):
    root = str(tmp_path / 'PASCAL_MT')
    rng = np.random.default_rng(0)
    written = {'2008_000001': write_pascal_sample(root, '2008_000001', (30, 40), rng),
               '2008_000002': write_pascal_sample(root, '2008_000002', (36, 28), rng, person=False)}
    return root, written


def test_pascal_loads_every_task_padded_with_ignore(pascal):
    root, written = pascal
    ds = data.PASCALContext(root, 'train', size=48)
    assert len(ds) == 2
    s = ds[0]
    a = written['2008_000001']
    h, w = 30, 40
    assert s['meta'] == {'id': '2008_000001', 'size': (30, 40)}
    shapes = {'image': (3, 48, 48), 'semseg': (48, 48), 'human_parts': (48, 48), 'saliency': (1, 48, 48),
              'normals': (3, 48, 48), 'edge': (1, 48, 48)}
    dtypes = {'semseg': torch.int64, 'human_parts': torch.int64}
    for key, shape in shapes.items():
        assert s[key].shape == shape, key
        assert s[key].dtype == dtypes.get(key, torch.float32), key
    # padded centred (their PadImage): rows 9..38, columns 4..43 hold the image; the image pads with the
    # ImageNet mean colour, the normals with the invalid zero vector, everything else with ignore
    top, left = (48 - h) // 2, (48 - w) // 2
    inside = torch.zeros(48, 48, dtype=torch.bool)
    inside[top:top + h, left:left + w] = True
    assert (top, left) == (9, 4)
    mean = torch.tensor(data.IMAGENET_MEAN).view(3, 1)
    assert torch.equal(s['image'][:, ~inside], mean.expand(3, int((~inside).sum())))
    assert (s['normals'][:, ~inside] == 0).all()
    for key in ('semseg', 'human_parts', 'saliency', 'edge'):
        assert (s[key].reshape(-1, 48, 48)[:, ~inside] == 255).all(), key
    crop = lambda x: x[..., top:top + h, left:left + w].numpy()
    # JPEG is lossy: the image only approximately equals what was written
    assert np.abs(crop(s['image']) * 255 - a['image'].transpose(2, 0, 1)).mean() < 3
    assert np.array_equal(crop(s['semseg']), a['semseg'])
    assert np.array_equal(crop(s['human_parts']), a['parts'])
    assert set(np.unique(a['parts']).tolist()) == {0, 1, 2, 3, 4, 5, 6}
    assert np.array_equal(crop(s['saliency'])[0], (a['saliency'] >= 128).astype(np.float32))
    normals = 2 * a['normals'].astype(np.float32) / 255 - 1
    normals[:, : w // 2] = 0                          # class 2 (aeroplane) has no valid normals
    np.testing.assert_allclose(crop(s['normals']), normals.transpose(2, 0, 1), atol=1e-6)
    for key in s:                                     # restore_size cuts out exactly the image's window
        if torch.is_tensor(s[key]):
            assert np.array_equal(data.restore_size(s[key], (h, w), 48).numpy(), crop(s[key])), key
    # the LabelMap has one vertical class boundary at column w/2: a one-pixel edge on every row
    edge = crop(s['edge'])[0]
    assert set(np.unique(edge).tolist()) == {0.0, 1.0}
    # (thinning may shorten a curve by one pixel where it meets the image border)
    assert (edge[1:-1].sum(1) == 1).all() and edge.sum() >= h - 2
    assert set(edge[1:-1].argmax(1).tolist()) <= {w // 2 - 1, w // 2}

    s2 = ds[1]                                       # no person: human parts all ignore
    assert s2['meta']['size'] == (36, 28) and (s2['human_parts'] == 255).all()


def test_pascal_task_subset_semseg_fallback_and_collate(tmp_path):
    root = str(tmp_path / 'PASCAL_MT')
    rng = np.random.default_rng(1)
    a = write_pascal_sample(root, 'x1', (20, 24), rng, split='val', semseg_folder='pascal-context')
    write_pascal_sample(root, 'x2', (24, 20), rng, split='val', semseg_folder='pascal-context')
    ds = data.build_dataset('pascal', root, 'val', ('semseg',), size=32)
    s = ds[0]
    assert set(s) == {'image', 'semseg', 'meta'}
    assert np.array_equal(s['semseg'][6:26, 4:28].numpy(), a['semseg'])       # centred on 32x32
    batch = next(iter(torch.utils.data.DataLoader(ds, batch_size=2)))
    assert batch['image'].shape == (2, 3, 32, 32)
    assert batch['meta']['id'] == ['x1', 'x2'] and batch['meta']['size'][0].tolist() == [20, 24]
    with pytest.raises(ValueError, match='scale_crop'):
        data.build_dataset('pascal', root, 'val', ('semseg',), scale_crop=True)


def test_pascal_augmentation_flip_and_centred_padding(tmp_path, monkeypatch):
    """The authors' PASCAL augmentation with the scale fixed to 1 and no photometric step: the 40x64
    sample fits the 64x64 crop, is flipped or not, then padded centred (12 rows above and below, the image
    on the mean colour): the flip never moves the image, and it equals the validation sample or its mirror."""
    root = str(tmp_path / 'PASCAL_MT')
    write_pascal_sample(root, 'big', (40, 64), np.random.default_rng(2))
    plain = data.PASCALContext(root, size=64)[0]                       # val path: padded centred too
    monkeypatch.setattr(data, 'ATRC_SCALE_RANGE', (1.0, 1.0))
    monkeypatch.setattr(data, 'photometric_distortion', lambda image: image)
    ds = data.PASCALContext(root, size=64, augment=True)
    mean = torch.tensor(data.IMAGENET_MEAN).view(3, 1, 1)
    flips = 0
    for seed in range(8):
        torch.manual_seed(seed)
        s = ds[0]
        assert s['image'].shape == (3, 64, 64) and s['semseg'].shape == (64, 64)
        assert (s['semseg'][:12] == 255).all() and (s['semseg'][52:] == 255).all()
        assert (s['normals'][:, :12] == 0).all() and torch.equal(s['image'][:, 52:], mean.expand(3, 12, 64))
        if torch.equal(s['semseg'], plain['semseg']):
            assert torch.equal(s['normals'], plain['normals']) and torch.equal(s['image'], plain['image'])
            continue
        flips += 1
        mid = slice(12, 52)
        assert torch.equal(s['semseg'][mid], plain['semseg'][mid].flip(-1))
        assert torch.equal(s['image'][:, mid], plain['image'][:, mid].flip(-1))
        assert torch.equal(s['normals'][0, mid], -plain['normals'][0, mid].flip(-1))           # x negated
        assert torch.equal(s['normals'][1:, mid], plain['normals'][1:, mid].flip(-1))
        assert torch.equal(s['edge'][:, mid], plain['edge'][:, mid].flip(-1))
    assert 0 < flips < 8
    small = data.PASCALContext(root, size=32)[0]      # 40x64 > 32: resized to 20x32, then padded (6 rows above)
    assert small['image'].shape == (3, 32, 32) and small['meta']['size'] == (40, 64)
    assert (small['semseg'][:6] == 255).all() and (small['semseg'][26:] == 255).all()
    assert (small['semseg'][6:26] != 255).any()
    assert data.restore_size(small['image'], (40, 64), 32).shape == (3, 40, 64)
    assert torch.equal(data.restore_size(plain['semseg'], (40, 64), 64), plain['semseg'][12:52])


def test_centred_pad_of_an_odd_size_and_its_restore():
    """A 29x37 sample on a 48x50 canvas: top (48 - 29) // 2 = 9, left (50 - 37) // 2 = 6, as their PadImage;
    the image on the mean colour, depth and normals on 0, labels on ignore; restore_size inverts it."""
    g = torch.Generator().manual_seed(0)
    sample = {'image': torch.rand(3, 29, 37, generator=g), 'semseg': torch.randint(0, 21, (29, 37), generator=g),
              'depth': torch.rand(1, 29, 37, generator=g) + 1, 'normals': torch.rand(3, 29, 37, generator=g) - 0.5,
              'saliency': torch.ones(1, 29, 37), 'meta': {'id': 'x'}}
    out = data.fit_to_canvas(sample, (48, 50))
    assert out['meta'] == {'id': 'x'}
    fills = {'image': data.IMAGENET_MEAN, 'semseg': 255, 'depth': 0.0, 'normals': 0.0, 'saliency': 255}
    for key, fill in fills.items():
        x = out[key].reshape(-1, 48, 50)
        expected = torch.empty_like(x)
        expected[:] = torch.tensor(fill, dtype=x.dtype).reshape(-1, 1, 1)        # written out: every pixel
        expected[:, 9:38, 6:43] = sample[key].reshape(-1, 29, 37)
        assert torch.equal(x, expected), key
        assert torch.equal(data.restore_size(out[key], (29, 37), (48, 50)), sample[key]), key


def test_crop_is_redrawn_while_one_class_dominates():
    """Their RandomCrop(cat_max_ratio=0.75), against an explicit loop over the same draws: a window is kept
    once its labelled pixels hold > 1 class and none >= 75 % of them; after 10 redraws the 11th is kept."""
    def varied(window):                                   # from the definition, in numpy
        labels, counts = np.unique(window, return_counts=True)
        counts = counts[labels != 255]
        return len(counts) > 1 and counts.max() / counts.sum() < 0.75

    assert not varied(np.array([1, 1, 1, 2, 255])) and varied(np.array([1, 1, 2, 255, 255]))
    for counts, expected in (([3, 1], False), ([2, 1], True), ([5], False), ([], False), ([1, 1, 1], True)):
        seg = torch.cat([torch.full((n,), c) for c, n in enumerate(counts)] + [torch.full((4,), 255)])
        assert data.classes_are_varied(seg) == expected == varied(seg.numpy()), counts
    H, W, size = 40, 50, (16, 20)
    seg = torch.ones(H, W, dtype=torch.int64)             # class 1 everywhere but a corner of class 2 ...
    seg[26:, 36:] = 2
    seg[:, :3] = 255                                      # ... and an ignored strip
    sample = {'image': torch.rand(3, H, W), 'semseg': seg, 'depth': torch.rand(1, H, W)}
    draws = {'kept first': 0, 'redrawn': 0, 'eleventh': 0}
    for seed in range(40):
        torch.manual_seed(seed)
        out = data.random_crop(sample, size)
        torch.manual_seed(seed)
        for k in range(11):
            top, left = int(torch.randint(H - size[0] + 1, ())), int(torch.randint(W - size[1] + 1, ()))
            if k == 10 or varied(seg[top:top + 16, left:left + 20].numpy()):
                break
        draws['kept first' if k == 0 else 'eleventh' if k == 10 else 'redrawn'] += 1
        for key in sample:
            assert torch.equal(out[key], sample[key][..., top:top + 16, left:left + 20]), (seed, key)
    assert all(n > 0 for n in draws.values()), draws
    small = {'image': torch.rand(3, 10, 30), 'semseg': seg[:10, :30]}     # smaller than the crop: cut to it
    torch.manual_seed(0)
    out = data.random_crop(small, size)
    assert out['image'].shape == (3, 10, 20) and out['semseg'].shape == (10, 20)


def test_human_parts_rules_on_hand_built_annotations():
    """As the releases' loader: background 0 where some person has parts; a person without parts is
    background and overwrites nothing; without any part in view (the whole image, or after the crop) the
    map is all ignore."""
    from conftest import _struct
    h, w = 12, 16
    mask = lambda r0, r1, c0, c1: np.pad(np.ones((r1 - r0, c1 - c0), np.uint8), ((r0, h - r1), (c0, w - c1)))
    with_parts = ('person', 15, mask(0, 8, 0, 8), _struct(('part_name', 'mask'), [('head', mask(0, 3, 0, 8)),
                                                                                  ('torso', mask(3, 8, 0, 8))]))
    partless = ('person', 15, mask(2, 12, 4, 16), np.zeros((0, 0)))     # overlaps the first person's parts
    dog = ('dog', 12, mask(8, 12, 0, 4), _struct(('part_name', 'mask'), [('head', mask(8, 10, 0, 4))]))
    anno = lambda objects: {'objects': _struct(('class', 'class_ind', 'mask', 'parts'), objects)}
    import scipy.io, io
    def roundtrip(objects):                              # through a real .mat file, as the loader reads it
        f = io.BytesIO()
        scipy.io.savemat(f, {'anno': anno(objects)})
        f.seek(0)
        return scipy.io.loadmat(f)['anno']
    target = data.human_parts_target(roundtrip([with_parts, partless, dog]), (h, w))
    expected = np.zeros((h, w), np.int64)
    expected[0:3, 0:8], expected[3:8, 0:8] = 1, 2                        # head, torso; the rest background
    assert np.array_equal(target, expected)
    for objects in ([partless], [dog], [partless, dog]):                 # no person with parts
        t = data.human_parts_target(roundtrip(objects), (h, w))
        assert (t == 0).all()
        assert (data.ignore_partless(torch.from_numpy(t)) == 255).all()
    parts = torch.from_numpy(target)
    assert torch.equal(data.ignore_partless(parts), parts)
    view = parts[8:, :]                                                  # a crop with only background
    assert (data.ignore_partless(view) == 255).all()
    padded = data.pad_sample({'human_parts': parts[:4, :4]}, (8, 8))['human_parts']   # parts + ignore: kept
    assert torch.equal(data.ignore_partless(padded), padded)


def test_pascal_augmentation_scales_crops_and_distorts(tmp_path):
    root = str(tmp_path / 'PASCAL_MT')
    write_pascal_sample(root, 'big', (40, 64), np.random.default_rng(2))
    plain = data.PASCALContext(root, size=64)[0]
    ds = data.PASCALContext(root, size=48, augment=True)
    labels = set(plain['semseg'].unique().tolist()) | {255}
    vectors = lambda n: set(map(tuple, n.flatten(1).T.tolist()))                  # {(x, y, z)} of a map
    mirrored = plain['normals'] * torch.tensor([-1.0, 1, 1]).view(3, 1, 1)
    normals = vectors(plain['normals']) | vectors(mirrored)
    images, padded = [], 0
    for seed in range(6):
        torch.manual_seed(seed)
        s = ds[0]
        assert s['image'].shape == (3, 48, 48) and s['semseg'].shape == (48, 48)
        assert set(s['semseg'].unique().tolist()) <= labels                          # nearest: no new labels
        assert vectors(s['normals']) <= normals                                      # nearest (or mirrored)
        assert 0 <= s['image'].min() and s['image'].max() <= 1
        pad = s['saliency'][0] == 255                # the padding: distortion before the pad leaves it the mean
        padded += bool(pad.any())
        assert torch.equal(s['image'][:, pad], torch.tensor(data.IMAGENET_MEAN).view(3, 1).expand(3, int(pad.sum())))
        torch.manual_seed(seed)
        again = ds[0]
        assert all(torch.equal(s[k], again[k]) for k in ('image', 'semseg', 'normals'))   # seeded
        images.append(s['image'])
    assert len({round(float(x.mean()), 6) for x in images}) == 6                   # every draw differs
    assert padded > 0
    torch.manual_seed(0)
    x = torch.rand(3, 8, 8)
    changed = [not torch.equal(data.photometric_distortion(x), x) for _ in range(8)]
    assert any(changed)


def test_photometric_colours_are_opencv_hsv_by_hand(monkeypatch):
    """Saturation and hue as OpenCV's HSV model moves them (colorsys: the same hexcone model): S scaled and
    clipped at 1 with H and V kept; H turned by k x 2 degrees with S and V kept; k an integer in [-18, 17] and
    the saturation factor in [0.5, 1.5], as their PhotoMetricDistortion draws them."""
    import colorsys
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 5, 6, generator=g, dtype=torch.float64)
    x[:, 0, 0], x[:, 0, 1], x[:, 0, 2] = 0.5, 0.0, torch.tensor([1.0, 0.2, 0.0])     # grey, black, saturated
    pixels = x.flatten(1).T.tolist()
    def by_hand(fn):
        return torch.tensor([fn(*colorsys.rgb_to_hsv(*p)) for p in pixels], dtype=torch.float64).T.reshape(x.shape)
    for factor in (0.5, 1.0, 1.3, 4.0):
        expected = by_hand(lambda h, s, v: colorsys.hsv_to_rgb(h, min(s * factor, 1.0), v))
        torch.testing.assert_close(data.adjust_hsv_saturation(x, factor), expected, atol=1e-12, rtol=0)
    x32 = x.float()
    for k in (-18, -7, 0, 5, 17):
        expected = by_hand(lambda h, s, v: colorsys.hsv_to_rgb((h + k / 180) % 1.0, s, v)).float()
        torch.testing.assert_close(data.shift_hue(x32, k), expected, atol=1e-5, rtol=0)
    drawn = {'hue': [], 'saturation': []}
    hue, saturation = data.shift_hue, data.adjust_hsv_saturation
    monkeypatch.setattr(data, 'shift_hue', lambda im, k: (drawn['hue'].append(k), hue(im, k))[1])
    monkeypatch.setattr(data, 'adjust_hsv_saturation', lambda im, f: (drawn['saturation'].append(f), saturation(im, f))[1])
    for seed in range(600):
        torch.manual_seed(seed)
        out = data.photometric_distortion(x32)
        assert 0 <= out.min() and out.max() <= 1
    assert all(isinstance(k, int) for k in drawn['hue']) and set(drawn['hue']) == set(range(-18, 18))
    assert 0.5 <= min(drawn['saturation']) < 0.55 and 1.45 < max(drawn['saturation']) <= 1.5
    assert 250 < len(drawn["hue"]) < 350 and 250 < len(drawn["saturation"]) < 350   # each with p = 1/2


def test_pascal_normals_classes_from_release_json(pascal):
    root, written = pascal
    with open(os.path.join(root, 'json', 'nyu_classes.json'), 'w') as f:
        json.dump(['aeroplane', 'chair', 'unknown'], f)   # aeroplane valid, wall not
    with open(os.path.join(root, 'json', 'context_classes.json'), 'w') as f:
        json.dump({'aeroplane': 2, 'wall': 440, 'unknown': 431}, f)
    normals = lambda: data.restore_size(data.PASCALContext(root, tasks=('normals',), size=48)[0]['normals'], (30, 40), 48)
    n = normals()
    assert (n[:, :, 20:] == 0).all() and (n[:, :, :20] != 0).any()
    with open(os.path.join(root, 'json', 'context_classes.json'), 'w') as f:   # 'wall' renamed 'tvmonitor' ...
        json.dump({'aeroplane': 2, 'tvmonitor': 440, 'unknown': 431}, f)
    n = normals()                                     # ... is valid although no NYU class: the releases add it
    assert (n[:, :, 20:] != 0).any() and (n[:, :, :20] != 0).any()
    assert data.PASCALContext(root, tasks=('normals',), size=48).valid_normal_classes.tolist() == [2, 440]
    os.remove(os.path.join(root, 'json', 'context_classes.json'))
    data.PASCALContext(root, tasks=('semseg', 'edge'), size=48)          # only normals need the class lists
    with pytest.raises(FileNotFoundError, match=r'json/nyu_classes.json and json/context_classes.json'):
        data.PASCALContext(root, tasks=('normals',), size=48)


def test_pascal_errors_name_the_file(pascal):
    root, _ = pascal
    with pytest.raises(FileNotFoundError, match='ImageSets/Context/val.txt'):
        data.PASCALContext(root, 'val')
    os.remove(os.path.join(root, 'sal_distill', '2008_000002.png'))
    with pytest.raises(FileNotFoundError, match='2008_000002.png'):
        data.PASCALContext(root, size=48)[1]
    bad = np.full((30, 40), 21, np.uint8)
    Image.fromarray(bad).save(os.path.join(root, 'semseg', 'VOC12', '2008_000001.png'))
    with pytest.raises(ValueError, match=r'0\.\.20'):
        data.PASCALContext(root, tasks=('semseg',), size=48)[0]
    scipy.io.savemat(os.path.join(root, 'human_parts', '2008_000001.mat'), {'annotation': 1})
    with pytest.raises(ValueError, match="'anno'"):
        data.PASCALContext(root, tasks=('human_parts',), size=48)[0]
    for path, what in (('human_parts/2008_000001.mat', 'a MATLAB .mat file'), ('JPEGImages/2008_000001.jpg', 'an image')):
        with open(os.path.join(root, path), 'wb') as f:
            f.write(b'not a file of that format')
        with pytest.raises(ValueError, match=f"cannot read .*{path} as {what}: "):
            data.PASCALContext(root, tasks=('human_parts',), size=48)[0]


def test_label_edges_match_the_previous_hand_written_thinning():
    """Edges of a 6x7 LabelMap with a vertical and a diagonal boundary, pinned to what the project's
    earlier hand-written Guo-Hall thinning produced before scikit-image's replaced it (the two agreed
    on this map and on 600 random masks and label maps). Every pixel of the raw two-pixel band that
    survives lies on a class boundary, and the curve is one pixel wide."""
    lm = np.array([[1, 1, 1, 2, 2, 2, 2],
                   [1, 1, 1, 2, 2, 2, 2],
                   [1, 1, 1, 2, 2, 2, 3],
                   [1, 1, 1, 2, 2, 3, 3],
                   [1, 1, 1, 2, 3, 3, 3],
                   [1, 1, 1, 2, 3, 3, 3]])
    expected = np.array([[0, 0, 0, 0, 0, 0, 0],
                         [0, 0, 1, 0, 0, 0, 1],
                         [0, 0, 1, 0, 0, 1, 0],
                         [0, 0, 0, 1, 1, 0, 0],
                         [0, 0, 1, 0, 1, 0, 0],
                         [0, 0, 1, 0, 1, 0, 0]], dtype=bool)
    assert np.array_equal(data.label_edges(lm), expected), data.label_edges(lm).astype(int)


def test_thin_keeps_one_pixel_connected_curves():
    band = np.zeros((12, 12), bool)
    band[1:11, 5:7] = True                            # a 2-pixel-wide vertical band
    t = data.thin(band)
    assert (t[2:10].sum(1) == 1).all() and not (t & ~band).any()
    ell = np.zeros((14, 14), bool)
    ell[2:12, 2:4] = True
    ell[10:12, 2:12] = True                           # a 2-pixel-wide L
    t = data.thin(ell)
    assert not (t & ~ell).any() and t.sum() < ell.sum() / 1.5
    from scipy.ndimage import label
    assert label(t, structure=np.ones((3, 3)))[1] == 1   # still one 8-connected curve
    square = np.zeros((7, 7), bool)
    square[2:5, 2:5] = True
    assert data.thin(square).sum() == 1
    # label_edges of a 3-class map: thin curves exactly along the class boundaries
    lm = np.zeros((10, 10), int)
    lm[:, 5:] = 7
    lm[6:, :] = 3
    e = data.label_edges(lm)
    assert e[1:5].sum(1).tolist() == [1] * 4 and (e[1:5, 4] | e[1:5, 5]).all()
    assert e[5:7, :8].sum(0).tolist() == [1] * 8 and not e[8:].any() and not e[:5, 6:].any()


# ---------------------------------------------------------------------------------------------------
# Synthetic scenes

def _scenes(n, size=(96, 128), seed=5):
    return [synthetic.render_scene(np.random.default_rng([seed, 0, i]), size) for i in range(n)]


def _back_project(depth, size):
    """Camera-frame points (3, H, W) of a z-depth map: pinhole with f = SYN_FOCAL * W, principal point
    at the image centre, x right, y up, camera looking along -z."""
    H, W = size
    f = synthetic.SYN_FOCAL * W
    u, v = np.meshgrid(np.arange(W) + 0.5 - W / 2, np.arange(H) + 0.5 - H / 2)
    depth = depth.astype(np.float64)
    return np.stack([depth * u / f, -depth * v / f, -depth])


def test_synthetic_normals_agree_with_depth_on_planes():
    size = (96, 128)
    checked = 0
    for s in _scenes(6, size):
        P = _back_project(s['depth'][..., 0], size)
        n = s['normal'].transpose(2, 0, 1).astype(np.float64)
        face, valid = s['face'], s['depth'][..., 0] > 0
        assert np.allclose(np.linalg.norm(n[:, valid], axis=0), 1, atol=1e-5)   # unit where valid
        assert (n[:, ~valid] == 0).all()                                         # zero where not
        assert ((n * P).sum(0)[valid] < 0).all()       # every visible surface faces the camera
        # interior pixels of a face: their 3x3 neighbourhood is that face, all valid
        same = np.ones_like(valid)
        for dv in (-1, 0, 1):
            for du in (-1, 0, 1):
                shifted = np.roll(np.roll(face, dv, 0), du, 1)
                ok = np.roll(np.roll(valid, dv, 0), du, 1)
                same &= (shifted == face) & ok
        same[[0, -1]] = False
        same[:, [0, -1]] = False
        tu = np.roll(P, -1, 2) - np.roll(P, 1, 2)       # tangents from neighbouring depths
        tv = np.roll(P, -1, 1) - np.roll(P, 1, 1)
        m = np.cross(tu, tv, axis=0)[:, same]
        m /= np.linalg.norm(m, axis=0, keepdims=True)
        cos = np.abs((m * n[:, same]).sum(0))
        assert np.degrees(np.arccos(np.clip(cos.min(), -1, 1))) < 0.5
        checked += same.sum()
    assert checked > 20000


def test_synthetic_normals_convention_floor_up_ceiling_down():
    for s in _scenes(10):
        lab, ny = s['label'], s['normal'][..., 1]
        valid = s['depth'][..., 0] > 0
        assert (ny[(lab == synthetic.CLS['floor']) & valid] > 0.5).all()
        assert (ny[(lab == synthetic.CLS['ceiling']) & valid] < -0.5).all()


def test_synthetic_labels_change_where_depth_jumps():
    jumps = label_changes = 0
    for s in _scenes(10):
        d, lab, face = s['depth'][..., 0], s['label'], s['face']
        for axis in (0, 1):
            a, b = (d[1:], d[:-1]) if axis == 0 else (d[:, 1:], d[:, :-1])
            sl = (np.s_[1:], np.s_[:-1]) if axis == 0 else (np.s_[:, 1:], np.s_[:, :-1])
            jump = (a > 0) & (b > 0) & (np.abs(a - b) > 0.15 * np.minimum(a, b))
            assert (face[sl[0]][jump] != face[sl[1]][jump]).all()   # a jump is always a face change
            valid = (lab[sl[0]] >= 0) & (lab[sl[1]] >= 0)
            jumps += (jump & valid).sum()
            label_changes += (jump & valid & (lab[sl[0]] != lab[sl[1]])).sum()
        # one face, one label
        lab_valid = lab >= 0
        for f in np.unique(face[lab_valid]):
            assert len(np.unique(lab[(face == f) & lab_valid])) == 1
    assert jumps > 100 and label_changes / jumps > 0.7


def test_synthetic_scene_content():
    counts = np.zeros(13)
    invalid_depth = ignored = 0
    for s in _scenes(30, (48, 64)):
        lab = s['label']
        assert set(np.unique(lab).tolist()) <= set(range(-1, 13))
        counts += np.bincount(lab[lab >= 0].astype(int), minlength=13)
        invalid_depth += (s['depth'] == 0).sum()
        ignored += (lab == -1).sum()
        img = s['image']
        assert img.dtype == np.float32 and img.min() >= 0 and img.max() <= 1 and img.std() > 0.03
    assert (counts > 0).sum() >= 11            # nearly every class appears in 30 scenes
    assert invalid_depth > 0 and ignored > 0


def test_make_synthetic_is_deterministic_and_nyuv2_readable(tmp_path):
    a, b, c = (str(tmp_path / n) for n in 'abc')
    synthetic.make_synthetic(a, 3, 2, size=(24, 32), seed=1)
    synthetic.make_synthetic(b, 3, 2, size=(24, 32), seed=1)
    synthetic.make_synthetic(c, 3, 2, size=(24, 32), seed=2)
    files = [os.path.join(split, folder, f'{i}.npy') for split, n in (('train', 3), ('val', 2))
             for folder in ('image', 'label', 'depth', 'normal') for i in range(n)]
    def read(root, f):
        with open(os.path.join(root, f), 'rb') as fh:
            return fh.read()
    assert all(read(a, f) == read(b, f) for f in files)
    assert any(read(a, f) != read(c, f) for f in files)
    ds = data.build_dataset('synthetic', a, 'train', augment=True, scale_crop=True)
    s = ds[0]
    assert len(ds) == 3 and s['image'].shape == (3, 24, 32) and s['normals'].shape == (3, 24, 32)
    assert set(s['semseg'].unique().tolist()) <= set(range(13)) | {255}
    # the same arguments again: nothing rewritten; other arguments: rewritten
    mtime = os.path.getmtime(os.path.join(a, 'train', 'image', '0.npy'))
    synthetic.make_synthetic(a, 3, 2, size=(24, 32), seed=1)
    assert os.path.getmtime(os.path.join(a, 'train', 'image', '0.npy')) == mtime
    synthetic.make_synthetic(a, 2, 1, size=(16, 20), seed=1)
    assert len(data.NYUv2(a, 'train')) == 2 and data.NYUv2(a, 'val')[0]['image'].shape == (3, 16, 20)
    with pytest.raises(ValueError, match='not empty'):
        synthetic.make_synthetic(str(tmp_path), 2, 1)
    # an interrupted run (marker says incomplete) is redone, not trusted
    with open(os.path.join(b, 'synthetic.json')) as f:
        marker = json.load(f)
    with open(os.path.join(b, 'synthetic.json'), 'w') as f:
        json.dump({**marker, 'complete': False}, f)
    before = [read(b, f) for f in files]
    os.remove(os.path.join(b, 'val', 'depth', '1.npy'))
    synthetic.make_synthetic(b, 3, 2, size=(24, 32), seed=1)
    assert [read(b, f) for f in files] == before
    with open(os.path.join(b, 'synthetic.json')) as f:
        assert json.load(f)['complete'] is True


def test_cli_synthetic_and_check(tmp_path, capsys):
    out = str(tmp_path / 'syn')
    synthetic.main([out, '--n-train', '2', '--n-val', '1', '--size', '20x28', '--seed', '4'])
    assert len(data.NYUv2(out, 'train')) == 2
    assert data.main(['check', 'synthetic', out, '--split', 'train']) == 0
    assert 'samples/s' in capsys.readouterr().out
    # every split by default, one line each; a broken training file fails with its name, no traceback
    assert data.main(['check', 'synthetic', out]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(':')[0] for line in lines] == ['synthetic train', 'synthetic val']
    np.save(os.path.join(out, 'train', 'depth', '1.npy'), np.zeros((3, 3), np.float32))     # wrong shape
    assert data.main(['check', 'synthetic', out]) == 1
    captured = capsys.readouterr()
    assert 'synthetic val: 1 of 1 samples OK' in captured.out
    assert 'synthetic train: FAILED:' in captured.err and '1.npy' in captured.err
    assert 'Traceback' not in captured.err
    with pytest.raises(SystemExit):
        synthetic.main([out, '--size', '20-28'])


# ---------------------------------------------------------------------------------------------------
# NYUD_MT (ATRC's NYUD-v2 release)

@pytest.fixture
def nyud(tmp_path):
    root = str(tmp_path / 'NYUD_MT')
    rng = np.random.default_rng(5)
    written = {'0001': write_nyud_sample(root, '0001', (30, 44), rng),
               '0002': write_nyud_sample(root, '0002', (30, 44), rng),
               '0003': write_nyud_sample(root, '0003', (30, 44), rng, split='val')}
    return root, written


def test_nyud_reads_the_release_formats_onto_the_centred_canvas(nyud):
    """Every task as ATRC's loader reads it: semseg PNG v - 1 with 0 = void -> ignore, depth in metres with 0
    invalid, normals with the zero vector invalid, edges in {0, 1}; placed centred on the 36x48 canvas
    (rows 3.., columns 2..) with 'no value' around, and the image in [0, 1] (the model normalises)."""
    root, written = nyud
    ds = data.build_dataset('nyud', root, 'train', size=(36, 48))
    assert len(ds) == 2 and isinstance(ds, data.NYUDMT) and ds.size == (36, 48)
    s, a = ds[1], written['0002']
    assert s['meta'] == {'id': '0002', 'size': (30, 44)}
    crop = lambda x: data.restore_size(x, (30, 44), (36, 48)).numpy()
    seg = a['semseg'].astype(np.int64) - 1
    seg[seg < 0] = 255
    assert s['semseg'].dtype == torch.int64 and np.array_equal(crop(s['semseg']), seg)
    assert (s['semseg'][:3] == 255).all() and (s['semseg'][:, :2] == 255).all()          # padding: ignore
    assert np.array_equal(crop(s['depth'])[0], a['depth']) and (s['depth'][0, :3] == 0).all()
    assert np.array_equal(crop(s['normals']), a['normals'].transpose(2, 0, 1)) and (s['normals'][:, :3] == 0).all()
    assert np.array_equal(crop(s['edge'])[0], a['edge']) and (s['edge'][0, :3] == 255).all()
    assert np.abs(crop(s['image']) * 255 - a['image'].transpose(2, 0, 1)).mean() < 3
    assert torch.equal(s['image'][:, 0, 0], torch.tensor(data.IMAGENET_MEAN))
    assert data.DATASETS['nyud']['tasks'] == {'semseg': 40, 'depth': 1, 'normals': 3, 'edge': 1}
    assert data.DATASETS['nyud']['size'] == (425, 560) and data.DATASETS['nyud']['edge_pos_weight'] == 0.8
    sub = data.build_dataset('nyud', root, 'val', ('depth',), size=(36, 48))
    assert set(sub[0]) == {'image', 'depth', 'meta'}
    torch.manual_seed(0)                                    # ATRC's augmentation: the canvas size, depth / scale
    aug = data.build_dataset('nyud', root, 'train', augment=True, size=(36, 48))[0]
    assert all(aug[k].shape[-2:] == (36, 48) for k in ('image', 'semseg', 'depth', 'normals', 'edge'))
    with pytest.raises(ValueError, match='scale_crop'):
        data.build_dataset('nyud', root, 'train', scale_crop=True)


def test_nyud_bad_files_are_named(nyud, tmp_path, capsys):
    root, _ = nyud
    assert data.main(['check', 'nyud', root]) == 0
    out = capsys.readouterr().out
    assert 'nyud train: 2 of 2 samples OK' in out and 'nyud val: 1 of 1 samples OK' in out
    os.makedirs(tmp_path / 'empty')
    with pytest.raises(FileNotFoundError, match='gt_sets/train.txt'):
        data.NYUDMT(str(tmp_path / 'empty'))
    bad = [('segmentation/0002.png', lambda p: Image.fromarray(np.full((30, 44), 41, np.uint8)).save(p),
            'classes 1..40'),
           ('normals/0002.npy', lambda p: np.save(p, np.full((30, 44, 3), 2.0, np.float32)), 'unit vectors'),
           ('depth/0002.npy', lambda p: np.save(p, np.zeros((10, 10), np.float32)), 'but the image is'),
           ('edge/0002.npy', lambda p: np.save(p, np.full((30, 44), 3.0, np.float32)), r'values in \[0, 1\]')]
    for path, write, words in bad:
        full = os.path.join(root, path)
        keep = open(full, 'rb').read()
        write(full)
        assert data.main(['check', 'nyud', root, '--split', 'train']) == 1
        err = capsys.readouterr().err
        assert 'nyud train: FAILED:' in err and path in err and 'Traceback' not in err, err
        with pytest.raises(ValueError, match=words):
            data.NYUDMT(root)[1]
        open(full, 'wb').write(keep)
    os.remove(os.path.join(root, 'edge', '0001.npy'))
    with pytest.raises(FileNotFoundError, match=r'edge/0001.npy \(listed in gt_sets/train.txt\)'):
        data.NYUDMT(root)


def test_synthetic_scenes_in_the_nyud_mt_layout(tmp_path, capsys):
    """`python synthetic.py OUT --layout nyud_mt` writes the scenes of the NYUv2-format set as a NYUD_MT
    release: the same labels (+ 1 in the PNG), depth, normals, edges from the label boundaries."""
    mtan = synthetic.make_synthetic(str(tmp_path / 'mtan'), 3, 2, (24, 32), seed=1)
    synthetic.main([str(tmp_path / 'nyud'), '--n-train', '3', '--n-val', '2', '--size', '24x32', '--seed', '1',
                    '--layout', 'nyud_mt'])
    assert 'nyud_mt' in capsys.readouterr().out
    for split, first in (('train', 0), ('val', 3)):
        plain, ds = data.NYUv2(mtan, split), data.NYUDMT(str(tmp_path / 'nyud'), split, size=(24, 32))
        assert ds.ids == [f'{first + i:05d}' for i in range(len(plain))]
        for i in range(len(plain)):
            a, b = plain[i], ds[i]
            assert torch.equal(a['semseg'], b['semseg']) and torch.equal(a['depth'], b['depth'])
            assert torch.equal(a['normals'], b['normals'])
            label = np.load(os.path.join(mtan, split, 'label', f'{i}.npy'))
            assert np.array_equal(b['edge'][0].numpy(), data.label_edges(label).astype(np.float32))
            assert (a['image'] - b['image']).abs().mean() < 0.04              # JPEG (quality 95) of textured 24x32 scenes
    again = synthetic.make_synthetic(str(tmp_path / 'nyud'), 3, 2, (24, 32), seed=1, layout='nyud_mt')
    assert open(os.path.join(again, 'gt_sets', 'val.txt')).read() == '00003\n00004\n'      # not rewritten
    synthetic.make_synthetic(again, 2, 1, (24, 32), seed=1, layout='nyud_mt')              # other arguments: redone
    assert sorted(os.listdir(os.path.join(again, 'edge'))) == ['00000.npy', '00001.npy', '00002.npy']
