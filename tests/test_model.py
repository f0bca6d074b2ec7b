"""model.py + baselines.py: parameter counts against the official code's and the papers' numbers (and
against layer-by-layer arithmetic), every model's forward/backward and output contract, ctal_ss dense ==
linear, the baselines' distillation maths against from-the-definition references, pretrained loading
from local files, and the error messages.

Runs single-threaded: on a shared 2-core machine, two intra-op threads fighting other processes make
small convolutions 10-100x slower. Full-resolution runs (288x384, 128x256, PASCAL 512x512) are `slow`
and use CUDA when it is available.
"""
import socket

import pytest
import timm
import torch
import torch.nn.functional as F

from baselines import (MTINetFrontEnd, PADDistillation, PAPPropagation, FeaturePropagation, pap_affinity,
                       task_softmax)
from model import MODEL_NAMES, SWIN_MODEL_NAMES, CTALDistillation, build_model

NYU = {'semseg': 13, 'depth': 1, 'normals': 3}
CITY = {'semseg': 19, 'depth': 1}
PASCAL = {'semseg': 21, 'human_parts': 7, 'saliency': 1, 'normals': 3, 'edge': 1}
NYU_SIZE, CITY_SIZE = (288, 384), (128, 256)

# official code, untrained, 1/4 scale (SPEC section 4), millions
OFFICIAL = {
    'nyuv2': dict(stl=11.81, mtl=4.09, padnet=12.08, papnet=4.78, ctal_ss=6.06, mtinet=12.64, ctal_ms=11.15),
    'cityscapes': dict(stl=7.87, mtl=4.01, padnet=7.01, papnet=4.50, ctal_ss=5.26, mtinet=8.57, ctal_ms=8.47),
}
# the papers' resource table (NYUv2): parameters relative to STL, per (model, distillation scale)
RELATIVE = {('mtl', 4): 0.346, ('papnet', 4): 0.404, ('padnet', 4): 1.023,
            ('ctal_ss', 4): 0.513, ('ctal_ss', 6): 0.504, ('ctal_ss', 8): 0.500,
            ('mtinet', 4): 1.070, ('ctal_ms', 4): 0.944, ('ctal_ms', 6): 0.935, ('ctal_ms', 8): 0.932}
DATASETS = {'nyuv2': (NYU, NYU_SIZE), 'cityscapes': (CITY, CITY_SIZE)}
SLOW_DEVICE = 'cuda' if torch.cuda.is_available() else 'cpu'


@pytest.fixture(autouse=True, scope='module')
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def n_params(module):
    return sum(p.numel() for p in module.parameters())


_counts = {}


def count(name, dataset, denominator=4):
    key = (name, dataset, denominator)
    if key not in _counts:
        tasks, size = DATASETS[dataset]
        _counts[key] = n_params(build_model(name, tasks, size, scale=1 / denominator))
    return _counts[key]


# ----------------------------------------------------------------------------------------------------
# parameter counts

@pytest.mark.parametrize('dataset', ['nyuv2', 'cityscapes'])
@pytest.mark.parametrize('name', list(OFFICIAL['nyuv2']))
def test_parameter_count_matches_official_code(name, dataset):
    ours = count(name, dataset) / 1e6
    assert ours == pytest.approx(OFFICIAL[dataset][name], rel=0.01)


@pytest.mark.parametrize('name,denominator', list(RELATIVE))
def test_parameters_relative_to_stl_match_papers_table(name, denominator):
    rel = count(name, 'nyuv2', denominator) / count('stl', 'nyuv2')
    assert rel == pytest.approx(RELATIVE[name, denominator], abs=0.01)


# layer arithmetic, written out independently of the modules (weights + biases; BN has 2 per channel)
def conv(cin, cout, k=1, bias=True):
    return cin * cout * k * k + (cout if bias else 0)


def bn(c):
    return 2 * c


def bottleneck(cin, planes):
    width = planes * 4
    n = conv(cin, planes, 1, False) + bn(planes) + conv(planes, planes, 3, False) + bn(planes)
    n += conv(planes, width, 1, False) + bn(width)
    return n + (conv(cin, width, 1, False) + bn(width) if cin != width else 0)


def basic(cin, cout):
    n = conv(cin, cout, 3, False) + bn(cout) + conv(cout, cout, 3, False) + bn(cout)
    return n + (conv(cin, cout, 1, False) + bn(cout) if cin != cout else 0)


def expected_counts(tasks, size, denominator=4):
    """Every model's parameter count from SPEC section 4's layer list."""
    H, W = size
    T, Ks = len(tasks), list(tasks.values())
    hrnet, ch = 3_860_720, (18, 36, 72, 144)
    fuse = conv(270, 270) + bn(270)
    hrhead = lambda k: fuse + conv(270, k)
    ip_head = lambda cin, k: bottleneck(cin, 64) + bottleneck(256, 64) + conv(256, k)
    final = lambda c, k: 2 * bottleneck(c, c // 4) + conv(c, k)
    hw = round(H / denominator) * round(W / denominator)
    ctal = (hw * T * 9 + hw) + T * conv(128, 128, 3)
    conv_out = conv(128, 128, 2) + bn(128) + conv(128, 128, 3)
    ss = hrnet + fuse + sum(ip_head(270, k) for k in Ks)
    se = lambda c: conv(c, c // 16) + conv(c // 16, c)          # two Linear layers
    fpm = lambda c: (basic(T * c, T * c // 4) + basic(T * c // 4, T * c // 4) + conv(T * c // 4, T * c)
                     + basic(T * c, c) + T * se(c))
    front = (hrnet + T * (2 * basic(144, 144) + basic(216, 72) + basic(72, 72) + basic(108, 36)
                          + basic(36, 36) + basic(54, 18) + basic(18, 18))
             + sum(conv(c, k) for c in ch for k in Ks) + sum(fpm(c) for c in ch[1:]))
    return {
        'stl': sum(hrnet + hrhead(k) for k in Ks),
        'mtl': hrnet + sum(hrhead(k) for k in Ks),
        'concat': ss + sum(conv(T * 256, 256) + bn(256) + final(256, k) for k in Ks),
        'padnet': ss + T * (T - 1) * 2 * conv(256, 256, 3, False) + sum(final(256, k) for k in Ks),
        'papnet': ss + T * conv(256, 128) + T * T + sum(final(128, k) for k in Ks),
        'ctal_ss': ss + ctal + sum(conv(256, 128) + bn(128) + conv_out + final(128, k) for k in Ks),
        'mtinet': front + sum(T * (T - 1) * 2 * conv(c, c, 3, False) for c in ch) + sum(hrhead(k) for k in Ks),
        'ctal_ms': front + ctal + sum(fuse + conv(270, 128) + bn(128) + conv_out + final(128, k) for k in Ks),
    }


@pytest.mark.parametrize('dataset', ['nyuv2', 'cityscapes'])
def test_parameter_counts_equal_layer_arithmetic(dataset):
    tasks, size = DATASETS[dataset]
    expected = expected_counts(tasks, size)
    assert {name: count(name, dataset) for name in MODEL_NAMES} == expected
    assert (count('ctal_ss', dataset, 8) - count('ctal_ss', dataset, 4)
            == expected_counts(tasks, size, 8)['ctal_ss'] - expected['ctal_ss'])


def test_ctal_fusion_is_the_papers_187k():
    model = build_model('ctal_ss', NYU, NYU_SIZE)
    assert model.distill.ctal.fusion.weight.numel() == 186_624          # 72*96 * 3 * 3*3
    assert model.distill.ctal.fusion.bias.numel() == 6_912


# the authors' code counted with FlopCounterMode at 288x384, batch 8, in multiply-accumulates (SPEC 4):
# matching them checks where each layer runs (e.g. CTAL's conv_out and final head at 1/2)
OFFICIAL_GMACS = dict(mtl=40.5, padnet=482, papnet=372, ctal_ss=533, mtinet=64, ctal_ms=522)


@pytest.mark.parametrize('name', list(OFFICIAL_GMACS))
def test_multiply_accumulates_match_official_code(name):
    from torch.utils.flop_counter import FlopCounterMode
    model = build_model(name, NYU, NYU_SIZE, ctal_impl='dense').eval().to('meta')    # shapes only
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(torch.empty(8, 3, *NYU_SIZE, device='meta'))
    assert counter.get_total_flops() / 2e9 == pytest.approx(OFFICIAL_GMACS[name], rel=0.01)


@pytest.mark.parametrize('dataset,size,denominator,expected', [
    ('nyuv2', NYU_SIZE, 4, (72, 96)), ('nyuv2', NYU_SIZE, 6, (48, 64)), ('nyuv2', NYU_SIZE, 8, (36, 48)),
    ('cityscapes', CITY_SIZE, 4, (32, 64)), ('cityscapes', CITY_SIZE, 6, (21, 43)),
    ('cityscapes', CITY_SIZE, 8, (16, 32))])
def test_distillation_size_is_rounded_input_times_scale(dataset, size, denominator, expected):
    tasks = DATASETS[dataset][0]
    for name in ('ctal_ss', 'ctal_ms'):
        model = build_model(name, tasks, size, scale=1 / denominator)
        assert model.distill.size == expected and model.distill.ctal.size == expected


def test_swin_ctal_runs_on_the_1_32_grid():
    assert build_model('ctal_ss', NYU, NYU_SIZE, backbone='swinv2_s').distill.ctal.size == (9, 12)
    assert build_model('ctal_ss', PASCAL, (512, 512), backbone='swinv2_s', scale=1 / 32).distill.ctal.size == (16, 16)


# ----------------------------------------------------------------------------------------------------
# forward / backward and the output contract

def run_and_check(model, tasks, size, batch=1, device='cpu'):
    """One training step's forward + backward; checks keys, shapes, finiteness, and that every
    parameter is reached by the loss over final + initial predictions."""
    torch.manual_seed(0)
    model = model.to(device).train()
    out = model(torch.randn(batch, 3, *size, device=device))
    assert set(out) == set(tasks) | {'initial'}
    loss = 0
    for t, k in tasks.items():
        assert out[t].shape == (batch, k, *size)
        assert torch.isfinite(out[t]).all()
        loss = loss + out[t].square().mean()
    for t, init in out['initial'].items():
        preds = init if isinstance(init, list) else [init]
        for p in preds:
            assert p.shape == (batch, tasks[t], *size)
            loss = loss + p.square().mean()
    loss.backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, f"parameters the loss does not reach: {missing[:5]}"
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    return out


def check_initial_structure(name, out, tasks):
    if name in ('stl', 'mtl'):
        assert out['initial'] == {}
    elif name in ('mtinet', 'ctal_ms'):
        assert set(out['initial']) == set(tasks)
        assert all(isinstance(v, list) and len(v) == 4 for v in out['initial'].values())
    else:
        assert set(out['initial']) == set(tasks)
        assert all(torch.is_tensor(v) for v in out['initial'].values())


# small inputs keep the default run fast; the real resolutions are in the slow tests below
@pytest.mark.parametrize('tasks,size', [(NYU, (64, 96)), (CITY, (64, 128))], ids=['T3', 'T2'])
@pytest.mark.parametrize('name', MODEL_NAMES)
def test_every_model_trains_one_step_hrnet(name, tasks, size):
    model = build_model(name, tasks, size)
    out = run_and_check(model, tasks, size)
    check_initial_structure(name, out, tasks)


@pytest.mark.parametrize('tasks,size', [(NYU, (64, 96)), (CITY, (64, 128))], ids=['T3', 'T2'])
@pytest.mark.parametrize('name', SWIN_MODEL_NAMES)
def test_every_model_trains_one_step_swin(name, tasks, size):
    model = build_model(name, tasks, size, backbone='swinv2_s')
    out = run_and_check(model, tasks, size, batch=2)       # DeepLabHead's pooling BN needs batch >= 2
    check_initial_structure(name, out, tasks)


@pytest.mark.slow
@pytest.mark.parametrize('size', [NYU_SIZE, CITY_SIZE], ids=['288x384', '128x256'])
@pytest.mark.parametrize('tasks', [NYU, CITY], ids=['T3', 'T2'])
@pytest.mark.parametrize('name', MODEL_NAMES)
def test_every_model_trains_one_step_full_resolution_hrnet(name, tasks, size):
    run_and_check(build_model(name, tasks, size), tasks, size, batch=2, device=SLOW_DEVICE)


@pytest.mark.slow
@pytest.mark.parametrize('size', [NYU_SIZE, CITY_SIZE], ids=['288x384', '128x256'])
@pytest.mark.parametrize('tasks', [NYU, CITY], ids=['T3', 'T2'])
@pytest.mark.parametrize('name', SWIN_MODEL_NAMES)
def test_every_model_trains_one_step_full_resolution_swin(name, tasks, size):
    run_and_check(build_model(name, tasks, size, backbone='swinv2_s'), tasks, size, batch=2, device=SLOW_DEVICE)


@pytest.mark.slow
@pytest.mark.parametrize('name', SWIN_MODEL_NAMES)
def test_pascal_five_tasks_512_swin(name):
    run_and_check(build_model(name, PASCAL, (512, 512), backbone='swinv2_s'), PASCAL, (512, 512), batch=2,
                  device=SLOW_DEVICE)


def test_stl_shares_nothing_and_mtl_shares_the_backbone():
    torch.manual_seed(0)
    x = torch.randn(1, 3, 64, 96)
    stl = build_model('stl', NYU, (64, 96))
    stl(x)['depth'].mean().backward()
    touched = {t for t, net in stl.nets.items() if any(p.grad is not None for p in net.parameters())}
    assert touched == {'depth'}
    mtl = build_model('mtl', NYU, (64, 96))
    mtl(x)['depth'].mean().backward()
    assert all(p.grad is not None for p in mtl.backbone.parameters())
    assert all(p.grad is None for t in ('semseg', 'normals') for p in mtl.heads[t].parameters())


@pytest.mark.parametrize('name', ['mtinet', 'ctal_ms'])
def test_multiscale_initial_predictions_are_the_front_end_predictions_in_scale_order(name):
    torch.manual_seed(0)
    model = build_model(name, CITY, (64, 128)).eval()
    captured = {}
    for s in range(4):
        model.front.predictors[s]['depth'].register_forward_hook(
            lambda mod, inp, out, s=s: captured.__setitem__(s, out))
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 128))
    for s in range(4):
        assert captured[s].shape[-2:] == (64 // 2 ** (s + 2), 128 // 2 ** (s + 2))     # 1/4 .. 1/32
        up = F.interpolate(captured[s], size=(64, 128), mode='bilinear', align_corners=False)
        torch.testing.assert_close(out['initial']['depth'][s], up)


def test_ctal_ms_reuses_the_mtinet_front_end_and_mtinet_reuses_pad():
    mtinet, ctal_ms = build_model('mtinet', CITY, (64, 128)), build_model('ctal_ms', CITY, (64, 128))
    assert type(mtinet.front) is type(ctal_ms.front) is MTINetFrontEnd
    assert all(type(d) is PADDistillation for d in mtinet.distill)
    assert n_params(mtinet.front) == n_params(ctal_ms.front)


# ----------------------------------------------------------------------------------------------------
# CTAL inside the models

@pytest.mark.parametrize('name,backbone,size,scale', [
    ('ctal_ss', 'hrnet18', (64, 96), 1 / 4), ('ctal_ss', 'hrnet18', (64, 96), 1 / 6),
    ('ctal_ms', 'hrnet18', (64, 128), 1 / 4), ('ctal_ss', 'swinv2_s', (128, 128), 1 / 4)])
def test_ctal_dense_and_linear_give_the_same_model_outputs(name, backbone, size, scale):
    torch.manual_seed(0)
    dense = build_model(name, NYU, size, backbone=backbone, scale=scale, ctal_impl='dense').double().eval()
    linear = build_model(name, NYU, size, backbone=backbone, scale=scale, ctal_impl='linear').double().eval()
    linear.load_state_dict(dense.state_dict())
    assert dense.distill.ctal.impl == 'dense' and linear.distill.ctal.impl == 'linear'
    x = torch.randn(2, 3, *size, dtype=torch.float64)
    with torch.no_grad():
        a, b = dense(x), linear(x)
    for t in NYU:
        torch.testing.assert_close(a[t], b[t], rtol=1e-9, atol=1e-9)


def test_ctal_wrapper_is_conv_in_resize_ctal_conv_out():
    """With gamma = 0 CTAL is the identity, so the wrapper must equal conv_out(resize(conv_in(F)))."""
    torch.manual_seed(0)
    wrap = CTALDistillation(['a', 'b'], 256, (5, 7), gamma=0.0).eval()
    feats = {t: torch.randn(2, 256, 16, 24) for t in 'ab'}
    with torch.no_grad():
        out = wrap(feats)
        for t in 'ab':
            x = F.interpolate(wrap.conv_in[t](feats[t]), size=(5, 7), mode='bilinear', align_corners=False)
            torch.testing.assert_close(out[t], wrap.conv_out[t](x))
            assert out[t].shape == (2, 128, 10, 14)
        wrap.ctal.gamma = 0.5                                  # and with gamma > 0 CTAL does something
        assert not torch.allclose(wrap(feats)['a'], out['a'])


# ----------------------------------------------------------------------------------------------------
# baselines: the distillation maths from the definitions

def test_pap_affinity_from_the_definition():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 2, 3)
    a = pap_affinity(x)
    for b in range(2):
        v = [x[b, :, i, j] for i in range(2) for j in range(3)]
        for p in range(6):
            sims = [max(0.0, float(v[p] @ v[q] / (v[p].norm() * v[q].norm()))) for q in range(6)]
            total = sum(sims)
            for q in range(6):
                assert float(a[b, p, q]) == pytest.approx(sims[q] / total, rel=1e-5, abs=1e-7)
    torch.testing.assert_close(a.sum(2), torch.ones(2, 6))


def test_pap_propagation_from_the_definition():
    torch.manual_seed(0)
    tasks = ['a', 'b', 'c']
    pap = PAPPropagation(tasks, in_channels=8, channels=4, iters=2).double()
    with torch.no_grad():
        pap.task_weights.normal_()
    feats = {t: torch.randn(1, 8, 3, 4, dtype=torch.float64) for t in tasks}
    out = pap(feats)
    xs = {t: pap.reduce[t](feats[t])[0].flatten(1) for t in tasks}                  # (C, HW)
    aff = {t: pap_affinity(pap.reduce[t](feats[t]))[0] for t in tasks}             # (HW, HW)
    for i, t in enumerate(tasks):
        w = torch.softmax(pap.task_weights[i], 0)
        a = sum(w[j] * aff[s] for j, s in enumerate(tasks))
        y = xs[t]
        for _ in range(2):
            y = 0.05 * torch.einsum('pq,cq->cp', a, y) + 0.95 * xs[t]
        torch.testing.assert_close(out[t][0].flatten(1), y)
    assert torch.allclose(torch.softmax(PAPPropagation(tasks).task_weights, 1), torch.full((3, 3), 1 / 3))


def test_pad_distillation_from_the_definition():
    torch.manual_seed(0)
    tasks = ['a', 'b', 'c']
    pad = PADDistillation(tasks, 4).double()
    feats = {t: torch.randn(2, 4, 5, 6, dtype=torch.float64) for t in tasks}
    out = pad(feats)
    for t in tasks:
        expected = feats[t].clone()
        for s in tasks:
            if s != t:
                sa = pad.attention[f'{t}_from_{s}']
                gate = torch.sigmoid(F.conv2d(feats[s], sa.gate.weight, padding=1))
                expected += gate * F.conv2d(feats[s], sa.value.weight, padding=1)
        torch.testing.assert_close(out[t], expected)
    assert len(pad.attention) == 6                                                  # ordered pairs


def test_fpm_softmax_is_over_tasks_not_consecutive_channels():
    torch.manual_seed(0)
    T, C = 3, 4
    logits = torch.randn(2, T * C, 3, 5)
    mask = task_softmax(logits, T)
    for t in range(T):
        for c in range(C):
            den = sum(logits[:, s * C + c].exp() for s in range(T))
            torch.testing.assert_close(mask[:, t * C + c], logits[:, t * C + c].exp() / den)
    torch.testing.assert_close(mask.view(2, T, C, 3, 5).sum(1), torch.ones(2, C, 3, 5))
    # the official grouping (T consecutive channels) would sum to 1 there instead: not what we do
    assert not torch.allclose(mask.view(2, C, T, 3, 5).sum(2), torch.ones(2, C, 3, 5))


def test_fpm_adds_a_per_task_gated_shared_representation():
    torch.manual_seed(0)
    fpm = FeaturePropagation(['a', 'b'], 32).eval()
    feats = {t: torch.randn(1, 32, 4, 6) for t in 'ab'}
    with torch.no_grad():
        out = fpm(feats)
        concat = torch.cat([feats['a'], feats['b']], 1)
        shared = fpm.reduce(task_softmax(fpm.harmonize(concat), 2) * concat)
        for t in 'ab':
            gate = torch.sigmoid(fpm.se[t].mlp[2](torch.relu(fpm.se[t].mlp[0](shared.mean((2, 3))))))
            torch.testing.assert_close(out[t], feats[t] + shared * gate[:, :, None, None])


def test_mtinet_front_end_widths_and_scales():
    front = MTINetFrontEnd(CITY)
    # per-task head inputs: backbone c_s + propagated c_{s+1}; the coarsest sees the backbone alone
    assert [front.heads[s]['depth'][0].conv1.in_channels for s in range(4)] == [54, 108, 216, 144]
    xs = [torch.randn(1, c, 16 // 2 ** s, 32 // 2 ** s) for s, c in enumerate((18, 36, 72, 144))]
    feats, preds = front.eval()(xs)
    for s, c in enumerate((18, 36, 72, 144)):
        assert feats[s]['semseg'].shape == (1, c, 16 // 2 ** s, 32 // 2 ** s)
        assert preds[s]['semseg'].shape == (1, 19, 16 // 2 ** s, 32 // 2 ** s)


# ----------------------------------------------------------------------------------------------------
# pretrained weights and errors

def perturbed_checkpoint(name, path):
    """A timm checkpoint whose every tensor differs from any random init (BN weights included)."""
    torch.manual_seed(1)
    sd = timm.create_model(name).state_dict()
    sd = {k: v + 0.01 * torch.randn_like(v) if v.is_floating_point() else v for k, v in sd.items()}
    torch.save(sd, path)
    return sd


def test_pretrained_hrnet_loads_a_local_file(tmp_path, capsys):
    sd = perturbed_checkpoint('hrnet_w18_small_v2', tmp_path / 'hrnet.pth')
    model = build_model('mtl', CITY, (64, 128), pretrained=tmp_path / 'hrnet.pth')
    printed = capsys.readouterr().out
    assert 'Unexpected keys (incre_modules' in printed                  # the classifier branch is not used
    net = model.backbone.net.state_dict()
    assert all(torch.equal(v, sd[k]) for k, v in net.items())
    assert '432 of 432 parameter tensors' in printed
    run_and_check(model, CITY, (64, 128))


def test_pretrained_swin_loads_a_local_file_at_another_input_size(tmp_path, capsys):
    sd = perturbed_checkpoint('swinv2_small_window8_256', tmp_path / 'swin.pth')
    model = build_model('ctal_ss', NYU, NYU_SIZE, backbone='swinv2_s', pretrained=tmp_path / 'swin.pth')
    printed = capsys.readouterr().out
    assert 'Missing keys (head.fc.weight, head.fc.bias)' in printed
    params = dict(model.backbone.net.named_parameters())              # features_only names: layers_0.*
    assert all(torch.equal(p, sd[k.replace('layers_', 'layers.', 1)]) for k, p in params.items())
    assert f'{len(params)} of {len(params)} parameter tensors' in printed


def test_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match='no file at'):
        build_model('mtl', CITY, (64, 128), pretrained=tmp_path / 'missing.pth')
    torch.save({'unrelated.weight': torch.zeros(3)}, tmp_path / 'other.pth')
    with pytest.raises(ValueError, match='matched no parameter'):
        build_model('mtl', CITY, (64, 128), pretrained=tmp_path / 'other.pth')


def test_default_build_never_touches_the_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError('network access during build_model')
    monkeypatch.setattr(socket.socket, 'connect', refuse)
    monkeypatch.setattr(socket, 'create_connection', refuse)
    build_model('ctal_ms', CITY, (64, 128))
    build_model('mtl', CITY, (64, 128), backbone='swinv2_s')


@pytest.mark.parametrize('kwargs,match', [
    (dict(name='emanet'), "valid names: stl, mtl, concat, padnet, papnet, ctal_ss, mtinet, ctal_ms"),
    (dict(backbone='resnet50'), "valid backbones: hrnet18, swinv2_s"),
    (dict(name='ctal_ms', backbone='swinv2_s'), "valid with swinv2_s: stl, mtl, padnet, papnet, ctal_ss"),
    (dict(name='mtinet', backbone='swinv2_s'), "valid with swinv2_s"),
    (dict(name='concat', backbone='swinv2_s'), "valid with swinv2_s"),
    (dict(tasks={}), "non-empty dict"),
    (dict(tasks=['semseg']), "non-empty dict"),
    (dict(tasks={'semseg': 0}), "positive int"),
    (dict(tasks={'initial': 3}), "other than 'initial'"),
    (dict(img_size=(100, 128)), "multiples of 32"),
    (dict(scale=1 / 2), r"\(0, 1/4\]"),
    (dict(backbone='swinv2_s', scale=1 / 8), "1/32 grid"),
    (dict(name='papnet', pap_iters=0), "pap_iters"),
])
def test_invalid_arguments_are_clear_errors(kwargs, match):
    args = dict(name='ctal_ss', tasks=CITY, img_size=(64, 128))
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        build_model(args.pop('name'), args.pop('tasks'), args.pop('img_size'), **args)


def test_wrong_input_size_is_a_clear_error():
    model = build_model('ctal_ss', CITY, (64, 128))
    with pytest.raises(ValueError, match=r"built for.*img_size=\(64, 96\)"):
        model(torch.randn(1, 3, 64, 96))
