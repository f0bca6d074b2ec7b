"""metrics.py: losses and meters on 2x3 images checked by hand, against independent numpy code, under
any batch split and across (simulated and real gloo) ranks; delta_m against every MTL-gain figure of
the papers' tables (EMA-Net, and its extended version CTAL), transcribed below from their per-task numbers."""
import math
import os
import socket

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import metrics
from metrics import PAPER_NYUD_HRNET18, STL_REFERENCE, TASK_METRIC, build_meters, delta_m, gain_metrics, task_loss

LN2, LN3, LN4 = math.log(2), math.log(3), math.log(4)
HALF_BIN = metrics.NORMALS_BIN_DEG / 2 + 1e-9   # normals median resolution (45 deg sits on a bin edge)


def img(rows, dtype=torch.float32):
    """A (1, 1, H, W) tensor from nested rows."""
    return torch.tensor(rows, dtype=dtype)[None, None]


def seg_logits(labels, num_classes):
    """(1, K, H, W) logits whose argmax is `labels`."""
    return F.one_hot(torch.tensor(labels), num_classes).permute(2, 0, 1)[None].float() * 5


def logit(p):
    return math.log(p / (1 - p))


# ------------------------------------------------------------------------------------ losses by hand

def test_segmentation_loss_by_hand():
    # every pixel has logits (0, ln 3): p(class 0) = 1/4, p(class 1) = 3/4; (0, 2) is ignored
    target = torch.tensor([[[0, 1, 255], [1, 1, 0]]])
    pred = torch.zeros(1, 2, 2, 3)
    pred[:, 1] = LN3
    expected = (2 * LN4 + 3 * math.log(4 / 3)) / 5
    assert task_loss('semseg', pred, target).item() == pytest.approx(expected, rel=1e-6)
    assert task_loss('human_parts', pred, target).item() == pytest.approx(expected, rel=1e-6)


def test_depth_loss_by_hand():
    pred = img([[1., 2, 3], [4, 5, 6]])
    target = img([[1., 0, 2], [0, 5, 8]])          # zeros are invalid
    assert task_loss('depth', pred, target).item() == pytest.approx((0 + 1 + 0 + 2) / 4)


def test_normals_loss_by_hand():
    c, s = math.cos(math.radians(20)), math.sin(math.radians(20))
    # per pixel (prediction, target): cos = 1, 0, -1, invalid, 1/sqrt2, cos 20deg
    pairs = [((2, 0, 0), (1, 0, 0)), ((0, 3, 0), (1, 0, 0)), ((0, 0, -1), (0, 0, 1)),
             ((7, 7, 7), (0, 0, 0)), ((1, 1, 0), (1, 0, 0)), ((5 * c, 5 * s, 0), (1, 0, 0))]
    pred = torch.tensor([p for p, _ in pairs], dtype=torch.float32).T.reshape(1, 3, 2, 3)
    target = torch.tensor([g for _, g in pairs], dtype=torch.float32).T.reshape(1, 3, 2, 3)
    expected = 1 - (1 + 0 - 1 + 1 / math.sqrt(2) + c) / 5
    assert task_loss('normals', pred, target).item() == pytest.approx(expected, rel=1e-6)


def test_normals_l1_loss_by_hand():
    """The authors' PASCAL form: sum over x, y, z of |n^ - g|, averaged over the valid pixels."""
    r = 1 / math.sqrt(2)
    pairs = [((2, 0, 0), (1, 0, 0)), ((0, 3, 0), (1, 0, 0)), ((0, 0, -1), (0, 0, 1)),
             ((7, 7, 7), (0, 0, 0)), ((1, 1, 0), (1, 0, 0))]
    pred = torch.tensor([p for p, _ in pairs], dtype=torch.float64).T.reshape(1, 3, 1, 5)
    target = torch.tensor([g for _, g in pairs], dtype=torch.float64).T.reshape(1, 3, 1, 5)
    # per valid pixel: 0; |0-1| + |1-0| = 2; |-1-1| = 2; (invalid); |r-1| + r
    expected = (0 + 2 + 2 + (1 - r) + r) / 4
    assert task_loss('normals', pred, target, 'l1').item() == pytest.approx(expected, rel=1e-12)
    assert task_loss('normals', pred, target).item() != pytest.approx(expected)       # default: cosine
    assert task_loss('normals', pred, torch.zeros_like(target), 'l1').item() == 0.0
    with pytest.raises(ValueError, match="'cosine', 'l1'"):
        task_loss('normals', pred, target, 'l2')


# positives: logits 0, ln3; negatives: logits 0, ln3, -ln3; the ignored pixel (255) has logit 100
SAL_TARGET = [[1., 0, 0], [1, 255, 0]]
SAL_LOGITS = [[0., 0, LN3], [LN3, 100, -LN3]]
POS_TERMS = LN2 + math.log(4 / 3)               # -log sigmoid(0) - log sigmoid(ln3)
NEG_TERMS = LN2 + LN4 + math.log(4 / 3)         # -log(1 - sigmoid(x)) for x = 0, ln3, -ln3


def test_saliency_loss_by_hand():
    # 5 valid pixels, 2 positive, 3 negative: positives weighted 3/5, negatives 2/5
    expected = (3 / 5 * POS_TERMS + 2 / 5 * NEG_TERMS) / 5
    loss = task_loss('saliency', img(SAL_LOGITS), img(SAL_TARGET))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_edge_loss_by_hand():
    expected = (0.95 * POS_TERMS + 0.05 * NEG_TERMS) / 5
    loss = task_loss('edge', img(SAL_LOGITS), img(SAL_TARGET))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


NO_VALID = {   # task -> (pred, target) where every pixel is ignored / invalid
    'semseg': (torch.randn(2, 4, 2, 3), torch.full((2, 2, 3), 255)),
    'human_parts': (torch.randn(2, 7, 2, 3), torch.full((2, 2, 3), 255)),
    'depth': (torch.randn(2, 1, 2, 3), torch.zeros(2, 1, 2, 3)),
    'normals': (torch.randn(2, 3, 2, 3), torch.zeros(2, 3, 2, 3)),
    'saliency': (torch.randn(2, 1, 2, 3), torch.full((2, 1, 2, 3), 255.)),
    'edge': (torch.randn(2, 1, 2, 3), torch.full((2, 1, 2, 3), 255.)),
}


@pytest.mark.parametrize('task', sorted(NO_VALID))
def test_loss_without_valid_pixel_is_zero_with_graph(task):
    pred, target = NO_VALID[task]
    pred = pred.clone().requires_grad_()
    loss = task_loss(task, pred, target)
    assert loss.item() == 0 and loss.requires_grad
    loss.backward()
    assert torch.equal(pred.grad, torch.zeros_like(pred))


def test_losses_match_library_definitions():
    torch.manual_seed(0)
    pred, target = torch.randn(3, 5, 4, 6), torch.randint(0, 5, (3, 4, 6))
    target[0, :2] = 255
    assert task_loss('semseg', pred, target).item() == pytest.approx(
        F.cross_entropy(pred, target, ignore_index=255).item(), rel=1e-6)

    pred, target = torch.randn(3, 1, 4, 6), torch.rand(3, 1, 4, 6) + 0.5
    target[target < 0.8] = 0
    valid = target != 0
    assert task_loss('depth', pred, target).item() == pytest.approx(
        F.l1_loss(pred[valid], target[valid]).item(), rel=1e-6)

    pred, target = torch.randn(3, 3, 4, 6), F.normalize(torch.randn(3, 3, 4, 6), dim=1)
    target[:, :, 0] = 0
    cos = F.cosine_similarity(pred, target, dim=1)[:, 1:]       # row 0 is invalid
    assert task_loss('normals', pred, target).item() == pytest.approx(1 - cos.mean().item(), rel=1e-5)


def test_saliency_loss_matches_explicit_formula():
    torch.manual_seed(1)
    x = torch.randn(2, 1, 5, 7, dtype=torch.float64)
    y = (torch.rand(2, 1, 5, 7) > 0.7).double()
    y[0, 0, 0] = 255
    valid, pos = y != 255, y == 1
    neg = valid & ~pos
    w = neg.sum() / valid.sum()
    log_sig, log_one_minus = F.logsigmoid(x), F.logsigmoid(-x)
    expected = (-w * log_sig[pos].sum() - (1 - w) * log_one_minus[neg].sum()) / valid.sum()
    assert task_loss('saliency', x, y).item() == pytest.approx(expected.item(), rel=1e-5)


def test_loss_input_errors():
    with pytest.raises(ValueError, match='unknown task'):
        task_loss('albedo', torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 2, 2))
    with pytest.raises(ValueError, match='Upsample'):
        task_loss('depth', torch.zeros(1, 1, 2, 2), torch.zeros(1, 1, 4, 4))
    # a label out of range is refused where labels are read, once (not in every loss and meter call)
    import data
    with pytest.raises(ValueError, match=r'labels must be in 0\.\.2 or ignore'):
        data._as_labels(np.array([[0, 1], [3, 255]]), 3, 'label.png')
    with pytest.raises(ValueError, match='int64'):
        task_loss('semseg', torch.zeros(1, 3, 2, 2), torch.zeros(1, 2, 2))
    with pytest.raises(ValueError, match=r'\(B, K, H, W\)'):
        task_loss('edge', torch.zeros(1, 2, 2), torch.zeros(1, 1, 2, 2))


# ------------------------------------------------------------------------------------ meters by hand

def test_segmentation_meter_by_hand():
    # K = 4; class 3 appears in neither target nor prediction -> IoU NaN, left out of the mean
    pred = seg_logits([[0, 1, 1], [1, 2, 0]], 4)
    target = torch.tensor([[[0, 0, 1], [1, 255, 2]]])
    meter = build_meters({'semseg': 4})['semseg']
    meter.update(pred, target)
    out = meter.compute()
    # confusion (row target, col prediction): t0 -> p0, p1; t1 -> p1, p1; t2 -> p0
    iou = out['iou_per_class']
    assert iou[:3] == pytest.approx([100 / 3, 200 / 3, 0.0])
    assert math.isnan(iou[3])
    assert out['mIoU'] == pytest.approx(100 / 3)
    assert out['pixel_acc'] == pytest.approx(60.0)


def test_depth_meter_by_hand():
    meter = build_meters({'depth': 1})['depth']
    meter.update(img([[1., 2, 3], [4, 5, 6]]), img([[1., 0, 2], [0, 4, 8]]))
    out = meter.compute()
    assert out['abs_err'] == pytest.approx((0 + 1 + 1 + 2) / 4)
    assert out['rel_err'] == pytest.approx((0 + 1 / 2 + 1 / 4 + 2 / 8) / 4)
    assert out['rmse'] == pytest.approx(math.sqrt((0 + 1 + 1 + 4) / 4))


def test_depth_meter_evaluates_non_positive_predictions_as_1e_9():
    meter = build_meters({'depth': 1})['depth']
    meter.update(img([[-1., 0], [2, 3]]).double(), img([[2., 4], [0, 3]]).double())
    out = meter.compute()
    e = 1e-9                                        # as the authors' eval: -1 and 0 count as 1e-9
    assert out['abs_err'] == pytest.approx(((2 - e) + (4 - e) + 0) / 3, rel=1e-12)
    assert out['rel_err'] == pytest.approx(((2 - e) / 2 + (4 - e) / 4) / 3, rel=1e-12)
    assert out['rmse'] == pytest.approx(math.sqrt(((2 - e) ** 2 + (4 - e) ** 2) / 3), rel=1e-12)


def test_normals_meter_by_hand():
    c, s = math.cos(math.radians(20)), math.sin(math.radians(20))
    # angles 0, 90, 180, (zero target: invalid), 45, 20
    pairs = [((2, 0, 0), (1, 0, 0)), ((0, 3, 0), (1, 0, 0)), ((0, 0, -1), (0, 0, 1)),
             ((7, 7, 7), (0, 0, 0)), ((1, 1, 0), (1, 0, 0)), ((5 * c, 5 * s, 0), (1, 0, 0))]
    pred = torch.tensor([p for p, _ in pairs], dtype=torch.float64).T.reshape(1, 3, 2, 3)
    target = torch.tensor([g for _, g in pairs], dtype=torch.float64).T.reshape(1, 3, 2, 3)
    meter = build_meters({'normals': 3})['normals']
    meter.update(pred, target)
    out = meter.compute()
    assert out['mean'] == pytest.approx((0 + 90 + 180 + 45 + 20) / 5)
    assert out['median'] == pytest.approx(45, abs=HALF_BIN)
    assert (out['11.25'], out['22.5'], out['30']) == pytest.approx((20.0, 40.0, 40.0))
    # an even count: the median is the mean of the two middle angles, 20 and 45
    meter.update(pred[..., :1, :1], target[..., :1, :1])              # one more 0-degree pixel
    assert meter.compute()['median'] == pytest.approx(32.5, abs=HALF_BIN)


def test_saliency_meter_by_hand():
    probs = [[0.92, 0.42, 0.62], [0.12, 0.99, 0.32]]
    target = img([[1., 1, 0], [0, 255, 1]])      # positives 0.92, 0.42, 0.32; negatives 0.62, 0.12
    meter = build_meters({'saliency': 1})['saliency']
    meter.update(img([[logit(p) for p in row] for row in probs]), target)
    # F = 1.3 TP / (1.3 TP + 0.3 FN + FP); thresholds 0.15..0.30 give TP 3, FP 1, FN 0: the best
    out = meter.compute()
    assert out['maxF'] == pytest.approx(100 * 3.9 / 4.9)
    assert out['maxF_threshold'] == 0.15
    assert meter.sums['tp'].tolist() == [3] * 6 + [2] * 2 + [1] * 10 + [0]
    assert meter.sums['fp'].tolist() == [2] * 2 + [1] * 10 + [0] * 7
    assert meter.sums['fn'].tolist() == [0] * 6 + [1] * 2 + [2] * 10 + [3]


def test_saliency_threshold_is_inclusive():
    # logit 0 is probability exactly 0.5: salient at thresholds <= 0.50 (prob >= t), not at 0.55
    meter = metrics.SaliencyMeter()
    meter.update(img([[0.]]), img([[1.]]))
    assert meter.sums['tp'].tolist() == [1] * 10 + [0] * 9
    assert meter.sums['fn'].tolist() == [0] * 10 + [1] * 9


def test_edge_meter_by_hand_equals_the_loss():
    meter = build_meters({'edge': 1})['edge']
    meter.update(img(SAL_LOGITS, torch.float64), img(SAL_TARGET))
    expected = (0.95 * POS_TERMS + 0.05 * NEG_TERMS) / 5
    assert meter.compute()['loss'] == pytest.approx(expected, rel=1e-12)
    # a second batch with one valid (negative, logit 0) pixel: the split mean weighs pixels, not batches
    meter.update(img([[0., 0]]), img([[0., 255]]))
    assert meter.compute()['loss'] == pytest.approx((expected * 5 + 0.05 * LN2) / 6, rel=1e-12)


def test_build_meters_rejects_wrong_channels_and_tasks():
    with pytest.raises(ValueError, match='normals predicts 3'):
        build_meters({'normals': 1})
    with pytest.raises(ValueError, match='unknown task'):
        build_meters({'albedo': 3})


# ------------------------------------------------------------------------------------ random data

def random_batch(task, b=4, h=6, w=7, k=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    if task in ('semseg', 'human_parts'):
        pred = torch.randn(b, k, h, w, generator=g)
        target = torch.randint(0, k, (b, h, w), generator=g)
        target[torch.rand(b, h, w, generator=g) < 0.2] = 255
        target[1] = 255                                     # an image with nothing valid
    elif task == 'depth':
        pred = torch.rand(b, 1, h, w, generator=g) * 3
        target = torch.rand(b, 1, h, w, generator=g) * 3 + 0.1
        target[torch.rand(b, 1, h, w, generator=g) < 0.3 * torch.arange(b).view(b, 1, 1, 1)] = 0
    elif task == 'normals':
        pred = torch.randn(b, 3, h, w, generator=g)
        target = F.normalize(pred + 0.7 * torch.randn(b, 3, h, w, generator=g), dim=1)
        target[:, :, torch.rand(h, w, generator=g) < 0.3] = 0
    else:   # saliency, edge
        pred = torch.randn(b, 1, h, w, generator=g) * 2
        target = (torch.rand(b, 1, h, w, generator=g) < 0.3).float()
        target[torch.rand(b, 1, h, w, generator=g) < 0.1] = 255
    return pred, target


def numpy_reference(task, pred, target, k=5):
    """The metric definitions of metrics.py's docstring, written independently in numpy."""
    p, g = pred.double().numpy(), target.double().numpy()
    if task == 'semseg':
        label, valid = p.argmax(1), g != 255
        conf = np.zeros((k, k))
        np.add.at(conf, (g[valid].astype(int), label[valid]), 1)
        with np.errstate(invalid='ignore'):
            iou = np.diag(conf) / (conf.sum(0) + conf.sum(1) - np.diag(conf))
        return {'mIoU': np.nanmean(iou) * 100, 'pixel_acc': np.trace(conf) / conf.sum() * 100}
    if task == 'depth':
        valid = g != 0
        e = np.abs(p[valid] - g[valid])
        return {'abs_err': e.mean(), 'rel_err': (e / g[valid]).mean(), 'rmse': np.sqrt((e ** 2).mean())}
    if task == 'normals':
        valid = np.abs(g).sum(1) > 0
        pn = p / np.linalg.norm(p, axis=1, keepdims=True)
        ang = np.degrees(np.arccos(np.clip((pn * g).sum(1)[valid], -1, 1)))
        return {'mean': ang.mean(), 'median': np.median(ang), '11.25': (ang < 11.25).mean() * 100,
                '22.5': (ang < 22.5).mean() * 100, '30': (ang < 30).mean() * 100}
    valid = g != 255
    if task == 'saliency':
        prob, pos = 1 / (1 + np.exp(-p[valid])), g[valid] == 1
        best = 0.0
        for t in np.arange(1, 20) / 20:
            yes = prob >= t
            tp, fp, fn = (yes & pos).sum(), (yes & ~pos).sum(), (~yes & pos).sum()
            prec, rec = tp / max(tp + fp, 1), tp / max(tp + fn, 1)
            best = max(best, 1.3 * prec * rec / (0.3 * prec + rec) if tp else 0.0)
        return {'maxF': best * 100}
    x, pos = p[valid], g[valid] == 1           # edge
    per_pixel = np.where(pos, 0.95 * np.log1p(np.exp(-x)), 0.05 * np.log1p(np.exp(x)))
    return {'loss': per_pixel.mean()}


TASKS = {'semseg': 5, 'depth': 1, 'normals': 3, 'saliency': 1, 'edge': 1}


@pytest.mark.parametrize('task', sorted(TASKS))
def test_meter_matches_numpy_reference(task):
    pred, target = random_batch(task)
    meter = build_meters({task: TASKS[task]})[task]
    meter.update(pred, target)
    out, ref = meter.compute(), numpy_reference(task, pred, target)
    for key, value in ref.items():
        tol = metrics.NORMALS_BIN_DEG / 2 + 1e-9 if key == 'median' else 1e-9
        assert out[key] == pytest.approx(value, rel=1e-9, abs=tol), key


def test_normals_median_is_exact_for_quantised_angles():
    torch.manual_seed(3)
    for n in (1000, 1001):                                 # even and odd counts
        pred, target = torch.randn(1, 3, 1, n), F.normalize(torch.randn(1, 3, 1, n), dim=1)
        meter = metrics.NormalsMeter()
        meter.update(pred, target)
        ang = metrics.NormalsMeter.angles(pred, target).numpy()
        centres = (np.floor(ang / metrics.NORMALS_BIN_DEG) + 0.5) * metrics.NORMALS_BIN_DEG
        assert meter.compute()['median'] == pytest.approx(np.median(centres), abs=1e-12)
        assert abs(meter.compute()['median'] - np.median(ang)) <= metrics.NORMALS_BIN_DEG / 2


def run_split(task, pred, target, sizes):
    meter = build_meters({task: TASKS[task]})[task]
    for p, t in zip(pred.split(sizes), target.split(sizes)):
        meter.update(p, t)
    return meter


def assert_same_results(a, b):
    assert a.keys() == b.keys()
    for key in a:
        x, y = np.asarray(a[key], dtype=float), np.asarray(b[key], dtype=float)
        np.testing.assert_allclose(x, y, rtol=1e-12, atol=1e-12, equal_nan=True, err_msg=key)


@pytest.mark.parametrize('task', sorted(TASKS))
def test_meter_is_batch_split_invariant(task):
    pred, target = random_batch(task)
    whole = run_split(task, pred, target, [4]).compute()
    assert_same_results(whole, run_split(task, pred, target, [1, 1, 1, 1]).compute())
    assert_same_results(whole, run_split(task, pred, target, [3, 1]).compute())


@pytest.mark.parametrize('task', sorted(TASKS))
def test_merged_meters_equal_one_meter(task):
    pred, target = random_batch(task, seed=5)
    rank0, rank1 = run_split(task, pred[:1], target[:1], [1]), run_split(task, pred[1:], target[1:], [2, 1])
    merged = rank0.merge(rank1).compute()
    assert_same_results(merged, run_split(task, pred, target, [4]).compute())


def test_all_reduce_without_distributed_is_a_no_op():
    pred, target = random_batch('semseg')
    meter = run_split('semseg', pred, target, [4])
    before = meter.compute()
    meter.all_reduce()
    assert_same_results(before, meter.compute())


def _free_port():
    with socket.socket() as s:
        s.bind(('127.0.0.1', 0))
        return s.getsockname()[1]


def _gloo_worker(rank, port, out_dir):
    import torch.distributed as dist
    dist.init_process_group('gloo', init_method=f'tcp://127.0.0.1:{port}', rank=rank, world_size=2)
    results = {}
    for task in TASKS:
        pred, target = random_batch(task, seed=7)
        part = slice(0, 1) if rank == 0 else slice(1, 4)   # uneven shares
        meter = run_split(task, pred[part], target[part], [pred[part].shape[0]])
        meter.all_reduce()
        results[task] = meter.compute()
    torch.save(results, os.path.join(out_dir, f'rank{rank}.pt'))
    dist.destroy_process_group()


def test_all_reduce_in_a_one_process_gloo_group():
    # exercises the torch.distributed branch in-process (fast); the 2-process test below checks the sum
    import torch.distributed as dist
    dist.init_process_group('gloo', store=dist.HashStore(), rank=0, world_size=1)
    try:
        for task in TASKS:
            pred, target = random_batch(task)
            meter = run_split(task, pred, target, [4])
            before = meter.compute()
            meter.all_reduce()
            assert_same_results(before, meter.compute())
    finally:
        dist.destroy_process_group()


@pytest.mark.slow   # spawning two torch processes takes ~5-7 s on the shared CPU
def test_all_reduce_across_two_gloo_processes(tmp_path):
    torch.multiprocessing.spawn(_gloo_worker, args=(_free_port(), str(tmp_path)), nprocs=2)
    for rank in (0, 1):
        results = torch.load(tmp_path / f'rank{rank}.pt')
        for task in TASKS:
            pred, target = random_batch(task, seed=7)
            assert_same_results(results[task], run_split(task, pred, target, [4]).compute())


@pytest.mark.skipif(not torch.cuda.is_available(), reason='needs CUDA')
@pytest.mark.parametrize('task', sorted(TASKS))
def test_meters_and_losses_on_cuda_match_cpu(task):
    pred, target = random_batch(task)
    cpu = run_split(task, pred, target, [2, 2]).compute()
    gpu_meter = run_split(task, pred.cuda(), target.cuda(), [2, 2])
    assert all(s.is_cuda for s in gpu_meter.sums.values())
    assert_same_results(cpu, gpu_meter.compute())
    assert task_loss(task, pred.cuda(), target.cuda()).item() == pytest.approx(
        task_loss(task, pred, target).item(), rel=1e-5)


# ------------------------------------------------------------------------------------ MTL gain

def test_task_metric_directions():
    assert TASK_METRIC == {'semseg': ('mIoU', 1), 'human_parts': ('mIoU', 1), 'depth': ('rel_err', -1),
                           'normals': ('mean', -1), 'saliency': ('maxF', 1), 'edge': ('loss', -1)}


def test_delta_m_spec_examples_and_meter_dicts():
    nyu = STL_REFERENCE[('nyuv2', 'hrnet18')]
    assert round(delta_m({'semseg': 51.59, 'depth': 0.1607, 'normals': 22.84}, nyu), 2) == 2.64
    cs = STL_REFERENCE[('cityscapes', 'hrnet18')]
    assert round(delta_m({'semseg': 51.94, 'depth': 22.89}, cs), 2) == 14.85
    # one task better by 10 %, one worse by 10 %: no gain; meter dicts are read through TASK_METRIC
    assert delta_m({'semseg': {'mIoU': 55.0, 'pixel_acc': 1.0}, 'depth': {'rel_err': 1.1}},
                   {'semseg': 50.0, 'depth': 1.0}) == pytest.approx(0.0)
    with pytest.raises(ValueError, match='same non-empty task set'):
        delta_m({'semseg': 50.0}, nyu)
    with pytest.raises(ValueError, match='no gain metric'):
        delta_m({'albedo': 1.0}, {'albedo': 1.0})


NYU = ('semseg', 'depth', 'normals')                  # mIoU, relErr, mErr
CS = ('semseg', 'depth')                              # mIoU, relErr
PASCAL = ('semseg', 'human_parts', 'saliency', 'normals', 'edge')   # mIoU, mIoU, maxF, mErr, Loss

# (table, tasks, STL row, {model: "per-task numbers ... printed delta_m"}), numbers as printed
TABLES = [
    ('EMA-Net Tab.1 NYUv2', NYU, '49.23 0.1636 23.15', {
        'MTL': '49.25 0.1658 24.16 -1.89', 'PAP-Net': '50.00 0.1615 23.78 +0.04',
        'PAD-Net': '50.23 0.1622 23.63 +0.27', 'EMA-Net(SS)': '51.59 0.1607 22.84 +2.64',
        'MTI-Net': '51.51 0.1538 23.50 +3.04', 'EMA-Net(MS)': '52.70 0.1529 22.99 +4.76'}),
    ('EMA-Net Tab.1 Cityscapes', CS, '48.89 29.91', {
        'MTL': '49.78 31.80 -2.25', 'PAP-Net': '50.82 26.97 +6.89', 'PAD-Net': '50.67 27.37 +6.07',
        'EMA-Net(SS)': '51.36 23.84 +12.67', 'MTI-Net': '51.77 29.90 +2.96', 'EMA-Net(MS)': '51.94 22.89 +14.85'}),
    ('EMA-Net Tab.2 NYUv2', NYU, '49.23 0.1636 23.15', {
        'Base': '50.01 0.1634 23.65 -0.15', '+CTAL': '51.59 0.1607 22.84 +2.64',
        '+CTAL+CSF': '52.70 0.1529 22.99 +4.76'}),
    ('EMA-Net Tab.2 Cityscapes', CS, '48.89 29.91', {
        'Base': '50.33 26.92 +6.47', '+CTAL': '51.36 23.84 +12.67', '+CTAL+CSF': '51.94 22.89 +14.85'}),
    # resource tables print only delta_m; the scale-1/4 rows are Tab. 1 models (1/6, 1/8 rows have no
    # per-task numbers anywhere and cannot be checked)
    ('EMA-Net Tab.3 / CTAL Tab.5 (per-task from Tab.1)', NYU, '49.23 0.1636 23.15', {
        'MTL': '49.25 0.1658 24.16 -1.89', 'PAP-Net': '50.00 0.1615 23.78 +0.04',
        'PAD-Net': '50.23 0.1622 23.63 +0.27', 'CTAL-SS 1/4': '51.59 0.1607 22.84 +2.64',
        'MTI-Net': '51.51 0.1538 23.50 +3.04', 'CTAL-MS 1/4': '52.70 0.1529 22.99 +4.76'}),
    ('CTAL Tab.1 NYUv2 (CNN)', NYU, '49.23 0.1636 23.15', {
        'MTL': '49.25 0.1658 24.16 -1.89', 'PAD-Net': '50.23 0.1622 23.63 +0.27',
        'PAP-Net': '50.00 0.1615 23.78 +0.04', 'CTALSS': '51.59 0.1607 22.84 +2.64',
        'MTI-Net': '51.51 0.1538 23.50 +3.04', 'CTALMS': '52.70 0.1529 22.99 +4.76'}),
    ('CTAL Tab.1 Cityscapes (CNN)', CS, '48.89 29.91', {
        'MTL': '49.78 31.80 -2.25', 'PAD-Net': '50.67 27.37 +6.07', 'PAP-Net': '50.82 26.97 +6.89',
        'CTALSS': '51.36 23.84 +12.67', 'MTI-Net': '51.77 29.90 +2.96', 'CTALMS': '51.94 22.89 +14.85'}),
    ('CTAL Tab.2 NYUv2 (Transformer)', NYU, '55.78 0.1570 24.59', {
        'MTL': '57.07 0.1500 24.76 +2.03', 'PAD-Net': '57.40 0.1469 23.70 +4.32',
        'PAP-Net': '56.80 0.1500 23.73 +3.26', 'CTALSS': '58.06 0.1491 23.27 +4.83'}),
    ('CTAL Tab.4 NYUv2 (CNN)', NYU, '49.23 0.1636 23.15', {
        'Concat': '50.01 0.1634 23.65 -0.15', 'CTALSS': '51.59 0.1607 22.84 +2.64',
        'CTALMS': '52.70 0.1529 22.99 +4.76'}),
    ('CTAL Tab.4 Cityscapes (CNN)', CS, '48.89 29.91', {
        'Concat': '50.33 26.92 +6.47', 'CTALSS': '51.36 23.84 +12.67', 'CTALMS': '51.94 22.89 +14.85'}),
    ('CTAL App.D NYUv2 (CNN), additional metrics', NYU, '49.23 0.1636 23.15', {
        'MTL': '49.25 0.1658 24.16 -1.89', 'PAD-Net': '50.23 0.1622 23.63 +0.27',
        'PAP-Net': '50.00 0.1615 23.78 +0.04', 'CTALSS': '51.59 0.1607 22.84 +2.64',
        'MTI-Net': '51.51 0.1538 23.50 +3.04', 'CTALMS': '52.70 0.1529 22.99 +4.76'}),
    ('CTAL Tab.8 blending factor, NYUv2', NYU, '49.23 0.1636 23.15', {
        'SS g=0.025': '50.68 0.1608 22.53 +2.45', 'SS g=0.05': '51.59 0.1607 22.84 +2.64',
        'SS g=0.1': '52.49 0.1631 22.84 +2.76', 'MS g=0.025': '51.71 0.1526 23.01 +4.12',
        'MS g=0.05': '52.70 0.1529 22.99 +4.76', 'MS g=0.1': '53.44 0.1557 23.06 +4.59'}),
    ('CTAL Tab.9 filter size, NYUv2', NYU, '49.23 0.1636 23.15', {
        'SS k=3': '51.59 0.1607 22.84 +2.64', 'SS k=5': '52.19 0.1630 22.89 +2.50',
        'SS k=7': '51.58 0.1640 22.79 +2.03', 'MS k=3': '52.70 0.1529 22.99 +4.76',
        'MS k=5': '53.21 0.1547 23.06 +4.64', 'MS k=7': '52.70 0.1557 23.14 +3.97'}),
    ('CTAL Tab.10 NYUv2 with std', NYU, '49.23 0.1636 23.15', {
        'MTL': '49.25 0.1658 24.16 -1.89', 'PAP-Net': '50.00 0.1615 23.78 +0.04',
        'PAD-Net': '50.23 0.1622 23.63 +0.27', 'CTALSS': '51.59 0.1607 22.84 +2.64',
        'MTI-Net': '51.51 0.1538 23.50 +2.64', 'CTALMS': '52.70 0.1529 22.99 +4.76'}),
    ('CTAL Tab.11 Cityscapes with std', CS, '48.89 29.91', {
        'MTL': '49.78 31.80 -2.25', 'PAP-Net': '50.82 26.97 +6.89', 'PAD-Net': '50.67 27.37 +6.07',
        'CTALSS': '51.36 23.84 +12.67', 'MTI-Net': '51.77 29.90 +2.96', 'CTALMS': '51.94 22.89 +14.85'}),
    ('CTAL Tab.3 PASCAL-Context (Transformer)', PASCAL, '74.07 64.28 83.95 16.03 0.0241', {
        'MTL': '72.99 60.13 82.93 16.76 0.0236 -2.40', 'PAD-Net': '73.27 60.22 83.40 16.44 0.0235 -1.86',
        'PAP-Net': '72.75 60.32 83.22 16.52 0.0235 -1.83', 'CTALSS': '73.98 61.14 83.50 15.96 0.0210 +1.46'}),
]
# Printed figures that the printed per-task numbers cannot give (see the test ids):
MISPRINTS = {
    # same per-task numbers as in Tab. 1 / 10 itself, where the gain is +3.04 (we get +3.037)
    ('CTAL Tab.10 NYUv2 with std', 'MTI-Net'): 'printed +2.64; Tab.1 prints +3.04 for the same numbers',
    # we get -1.62; with every per-task number moved by half a printed digit the range is [-1.73, -1.52]
    ('CTAL Tab.3 PASCAL-Context (Transformer)', 'PAD-Net'): 'printed -1.86 is outside the rounding range',
}
CASES = [pytest.param(table, tasks, stl, row, id=f'{table} | {model}',
                      marks=[pytest.mark.xfail(strict=True, reason=MISPRINTS[table, model])]
                      if (table, model) in MISPRINTS else [])
         for table, tasks, stl, rows in TABLES for model, row in rows.items()]


def half_unit(printed):
    """Half a unit of the last printed digit: the rounding uncertainty of a table entry."""
    decimals = len(printed.split('.')[1]) if '.' in printed else 0
    return 0.5 * 10 ** -decimals


@pytest.mark.parametrize('table, tasks, stl, row', CASES)
def test_delta_m_reproduces_paper_table(table, tasks, stl, row):
    *numbers, printed = row.split()
    baseline = dict(zip(tasks, map(float, stl.split())))
    results = dict(zip(tasks, map(float, numbers)))
    assert len(numbers) == len(tasks)
    value = delta_m(results, baseline)
    if tasks != PASCAL:
        assert value == pytest.approx(float(printed), abs=0.01)
        return
    # PASCAL: the edge loss is printed with 3 significant digits, so the per-task rounding alone moves
    # delta_m by up to ~0.1; the printed figure must lie in the range the rounded inputs allow.
    lo = hi = 0.0
    for task, m, b in zip(tasks, numbers, stl.split()):
        sign = TASK_METRIC[task][1]
        corners = [sign * (float(m) + dm - (float(b) + db)) / (float(b) + db) * 100 / len(tasks)
                   for dm in (-half_unit(m), half_unit(m)) for db in (-half_unit(b), half_unit(b))]
        lo, hi = lo + min(corners), hi + max(corners)
    assert lo <= value <= hi
    assert lo - 0.005 <= float(printed) <= hi + 0.005


@pytest.mark.parametrize('key, table', [
    (('nyuv2', 'hrnet18'), 'CTAL Tab.1 NYUv2 (CNN)'), (('cityscapes', 'hrnet18'), 'CTAL Tab.1 Cityscapes (CNN)'),
    (('nyuv2', 'swinv2_s'), 'CTAL Tab.2 NYUv2 (Transformer)'),
    (('pascal', 'swinv2_s'), 'CTAL Tab.3 PASCAL-Context (Transformer)')])
def test_stl_reference_is_the_papers_stl_row(key, table):
    _, tasks, stl, _ = next(t for t in TABLES if t[0] == table)
    assert STL_REFERENCE[key] == dict(zip(tasks, map(float, stl.split())))
    assert delta_m(STL_REFERENCE[key], STL_REFERENCE[key]) == 0.0


# ---------------------------------------------------------------------------------------------- NYUD_MT

def test_nyud_paper_rows_give_atrcs_printed_delta_m():
    """ATRC Tab. 1 / 2 on NYUD-v2 (HRNet-18): delta_m over semseg mIoU, depth RMSE (gain_metrics('nyud')),
    normals mean and odsF (higher is better), against the single-task row, is the printed figure to the
    rounding of 5-seed means; a run's reference is that row without odsF (no SEISM benchmark here)."""
    gain = dict(gain_metrics('nyud'), edge=('odsF', +1))
    assert gain['depth'] == ('rmse', -1) and gain_metrics('nyuv2')['depth'] == ('rel_err', -1)
    stl = PAPER_NYUD_HRNET18['atrc_stl']
    for model, printed in (('atrc_mtl', -1.89), ('atrc', 1.56), ('atrc_ms', 3.57)):
        assert delta_m(PAPER_NYUD_HRNET18[model], stl, gain) == pytest.approx(printed, abs=0.015), model
    assert STL_REFERENCE[('nyud', 'hrnet18')] == {'semseg': 38.02, 'depth': 0.6104, 'normals': 20.94}
    ours = {'semseg': {'mIoU': 40.0}, 'depth': {'rmse': 0.55, 'rel_err': 9.0}, 'normals': {'mean': 20.0}}
    hand = 100 / 3 * ((40 - 38.02) / 38.02 - (0.55 - 0.6104) / 0.6104 - (20 - 20.94) / 20.94)
    assert delta_m(ours, STL_REFERENCE[('nyud', 'hrnet18')], gain_metrics('nyud')) == pytest.approx(hand, rel=1e-12)


def test_nyud_edge_loss_and_meter_use_atrcs_weight_0_8():
    expected = (0.8 * POS_TERMS + 0.2 * NEG_TERMS) / 5
    assert task_loss('edge', img(SAL_LOGITS), img(SAL_TARGET), edge_pos_weight=0.8).item() == pytest.approx(expected, rel=1e-6)
    meter = build_meters({'edge': 1}, edge_pos_weight=0.8)['edge']
    meter.update(img(SAL_LOGITS, torch.float64), img(SAL_TARGET))
    assert meter.compute()['loss'] == pytest.approx(expected, rel=1e-12)


def test_forty_class_miou_with_ignore_and_rmse_over_valid_pixels_by_hand():
    """NYUD_MT's metrics from their definitions with explicit loops: mIoU over the 40 classes (a class absent
    from target and prediction is left out; 255 skipped), depth RMSE over the pixels with depth != 0."""
    g = torch.Generator().manual_seed(0)
    target = torch.randint(0, 40, (2, 9, 11), generator=g)
    target[:, :2] = 255
    target[target == 7] = 255                                  # class 7 only ever predicted, never a target
    logits = torch.randn(2, 40, 9, 11, generator=g)
    meter = build_meters({'semseg': 40})['semseg']
    meter.update(logits, target)
    pred = logits.argmax(1)
    ious = []
    for k in range(40):
        inter = union = 0
        for t, p in zip(target.flatten().tolist(), pred.flatten().tolist()):
            if t == 255:
                continue
            inter += (t == k and p == k)
            union += (t == k or p == k)
        if union:
            ious.append(inter / union)
    assert meter.compute()['mIoU'] == pytest.approx(100 * sum(ious) / len(ious), rel=1e-12)
    depth_pred = torch.rand(2, 1, 5, 6, generator=g) * 5
    depth_true = torch.rand(2, 1, 5, 6, generator=g) * 5
    depth_true[0, 0, :2] = 0
    meter = build_meters({'depth': 1})['depth']
    meter.update(depth_pred, depth_true)
    pairs = [(p, t) for p, t in zip(depth_pred.flatten().tolist(), depth_true.flatten().tolist()) if t != 0]
    assert len(pairs) == 60 - 12
    assert meter.compute()['rmse'] == pytest.approx(math.sqrt(sum((p - t) ** 2 for p, t in pairs) / len(pairs)), rel=1e-9)
