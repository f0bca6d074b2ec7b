"""TIF (Task-Interaction-Free network): every module against its equations written out in float64 (explicit
layer norm, linear maps, GELU, softmax of the explicit matrix, pooling bins, the parent map of the affinity
upsampling, the diffusion product), and the properties that define TIF: no attention above the 1/16 grid,
and no task's output depends on another task's parameters."""
import math

import pytest
import torch
import torch.nn.functional as F

from baselines import LTHD, SAFF, SFD, TIFDecoder, parent_index, upsample_affinity
from conftest import randomise
from model import build_model

TOL = dict(rtol=0, atol=1e-10)


def linear(x, layer):
    return x @ layer.weight.T + layer.bias


def layer_norm(x, layer):
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + layer.eps) * layer.weight + layer.bias


def gelu(x):
    return 0.5 * x * (1 + torch.erf(x / math.sqrt(2)))


def ffn(x, seq):
    return linear(gelu(linear(x, seq[0])), seq[2])


def softmax(a):
    e = torch.exp(a - a.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def batch_norm(x, bn):
    shape = (1, -1, 1, 1)
    return ((x - bn.running_mean.view(shape)) / torch.sqrt(bn.running_var.view(shape) + bn.eps)
            * bn.weight.view(shape) + bn.bias.view(shape))


def conv(x, layer, groups=1):
    return F.conv2d(x, layer.weight, layer.bias, padding=layer.weight.shape[-1] // 2, groups=groups)


def conv_bn_relu(x, seq):
    return torch.relu(batch_norm(conv(x, seq[0]), seq[1]))


def average_pool(x, size):
    """Adaptive average pooling by its bins: output (i, j) averages rows floor(i H / h) .. ceil((i+1) H / h)."""
    H, W = x.shape[-2:]
    out = torch.zeros(*x.shape[:-2], *size, dtype=x.dtype)
    for i in range(size[0]):
        for j in range(size[1]):
            r0, r1 = i * H // size[0], -(-(i + 1) * H // size[0])
            c0, c1 = j * W // size[1], -(-(j + 1) * W // size[1])
            out[..., i, j] = x[..., r0:r1, c0:c1].mean((-2, -1))
    return out


def flat(x):
    return x.flatten(2).transpose(1, 2)


# ----------------------------------------------------------------------------------------------------
# modules against their equations

@pytest.mark.parametrize('i', range(4))
def test_saff_computes_equations_2_to_5(i):
    channels, sizes = (4, 6, 8, 10), [(8, 12), (4, 6), (2, 3), (1, 2)]
    saff = randomise(SAFF(channels, i, width=5).double())
    g = torch.Generator().manual_seed(1)
    xs = [torch.randn(2, c, *s, generator=g, dtype=torch.float64) for c, s in zip(channels, sizes)]
    size = sizes[i]
    others = [F.interpolate(x, size, mode='bilinear', align_corners=False) if j > i else average_pool(x, size)
              for j, x in enumerate(xs) if j != i]
    xl = batch_norm(conv(xs[i], saff.reduce[0]), saff.reduce[1])
    y = batch_norm(conv(torch.cat(others, 1), saff.align[0]), saff.align[1])                 # Eq. 2
    sfx = conv(torch.relu(conv(torch.cat([xl, y], 1), saff.sff[0])), saff.sff[2]) + xl       # Eq. 3
    expected = conv(torch.relu(conv(sfx, saff.spatial, groups=5)), saff.mix)                 # Eqs. 4-5
    torch.testing.assert_close(saff(xs), expected, **TOL)


@pytest.mark.parametrize('scaled', [True, False])
def test_sfd_is_self_attention_with_the_explicit_matrix(scaled):
    B, C, h, w, N = 2, 6, 3, 4, 3
    sfd = randomise(SFD(C, N, ffn_ratio=2, scaled=scaled).double())
    x = torch.randn(B, C, h, w, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    t = flat(x)                                                           # (B, L, C)
    z = layer_norm(t, sfd.norm)
    kv = sum(linear(z, layer) for layer in sfd.key_value)                 # Eq. 6: K = V
    q = linear(z, sfd.query)
    L = h * w
    A = torch.zeros(B, L, L, dtype=torch.float64)
    for p in range(L):                                                    # Eq. 8, entry by entry
        for r in range(L):
            A[:, p, r] = (q[:, p] * kv[:, r]).sum(-1) / (math.sqrt(C) if scaled else 1.0)
    rx = softmax(A) @ kv + t                                              # Eq. 9
    rx = ffn(layer_norm(rx, sfd.norm_ffn), sfd.ffn) + rx                  # Eq. 10
    out, logits = sfd(x)
    torch.testing.assert_close(logits, A, **TOL)
    torch.testing.assert_close(out, rx.transpose(1, 2).reshape(B, C, h, w), **TOL)


@pytest.mark.parametrize('src,dst', [((3, 4), (6, 8)), ((2, 3), (5, 7)), ((3, 4), (3, 4))])
def test_affinity_upsampling_is_the_nearest_parent_map(src, dst):
    A = torch.randn(2, src[0] * src[1], src[0] * src[1], dtype=torch.float64)
    parent = lambda p: (p // dst[1] * src[0] // dst[0]) * src[1] + (p % dst[1]) * src[1] // dst[1]
    L = dst[0] * dst[1]
    expected = torch.stack([torch.stack([torch.stack([A[b, parent(p), parent(q)] for q in range(L)])
                                         for p in range(L)]) for b in range(2)])
    assert upsample_affinity(A, src, dst).shape == (2, L, L)
    torch.testing.assert_close(upsample_affinity(A, src, dst), expected, rtol=0, atol=0)
    assert parent_index(src, dst).tolist() == [parent(p) for p in range(L)]


def test_exact_2x_affinity_upsampling_is_nearest_interpolation_of_both_grids():
    """At the 2x ratio of 1/32 -> 1/16, the parent map equals F.interpolate(mode='nearest') applied to the
    key grid and then to the query grid of A viewed as (h, w, h, w)."""
    h, w = 3, 4
    A = torch.randn(2, h * w, h * w, dtype=torch.float64)
    keys = F.interpolate(A.reshape(2 * h * w, 1, h, w), scale_factor=2, mode='nearest')       # (., 1, 2h, 2w)
    keys = keys.reshape(2, h, w, 4 * h * w).permute(0, 3, 1, 2).reshape(2 * 4 * h * w, 1, h, w)
    both = F.interpolate(keys, scale_factor=2, mode='nearest').reshape(2, 4 * h * w, 4 * h * w).transpose(1, 2)
    torch.testing.assert_close(upsample_affinity(A, (h, w), (2 * h, 2 * w)), both, rtol=0, atol=0)


@pytest.mark.parametrize('size,grid', [((12, 16), (3, 4)), ((11, 13), (3, 4))])
def test_lthd_diffuses_pooled_features_with_the_given_weights(size, grid):
    B, C = 2, 6
    lthd = randomise(LTHD(C, ffn_ratio=2, fuse_kernel=3).double())
    g = torch.Generator().manual_seed(3)
    x = torch.randn(B, C, *size, generator=g, dtype=torch.float64)
    L = grid[0] * grid[1]
    weights = softmax(torch.randn(B, L, L, generator=g, dtype=torch.float64))
    values = linear(flat(average_pool(x, grid)), lthd.value)              # (B, L, C): Pool(X) W_v
    rx = torch.zeros(B, L, C, dtype=torch.float64)
    for p in range(L):                                                    # Eq. 12 as the explicit product
        for q in range(L):
            rx[:, p] += weights[:, p, q, None] * values[:, q]
    rx = ffn(rx, lthd.ffn).transpose(1, 2).reshape(B, C, *grid)
    up = F.interpolate(rx, size, mode='bilinear', align_corners=False)
    expected = conv_bn_relu(torch.cat([up, x], 1), lthd.fuse)             # Eq. 13
    torch.testing.assert_close(lthd(x, weights, grid), expected, **TOL)


def test_decoder_composes_the_modules_per_task():
    """TIFDecoder = SAFF per scale, then per task: projections, SFD at 1/16 and 1/32, the merged affinity
    softmax(up(A^3) + A^2) handed to both LTHDs, and the head over the four upsampled maps."""
    channels, sizes = (4, 6, 8, 10), [(16, 24), (8, 12), (4, 6), (2, 3)]
    tasks = {'a': 3, 'b': 1}
    dec = randomise(TIFDecoder(tasks, channels, width=5).double())
    g = torch.Generator().manual_seed(4)
    xs = [torch.randn(2, c, *s, generator=g, dtype=torch.float64) for c, s in zip(channels, sizes)]
    shared = [saff(xs) for saff in dec.saff]
    out = dec(xs)
    for t, k in tasks.items():
        x = [conv_bn_relu(s, project) for s, project in zip(shared, dec.project[t])]
        (rx2, a2), (rx3, a3) = dec.sfd[t][0](x[2]), dec.sfd[t][1](x[3])
        L2 = 4 * 6
        up = torch.stack([torch.stack([a3[:, (p // 6 // 2) * 3 + (p % 6) // 2, (q // 6 // 2) * 3 + (q % 6) // 2]
                                       for q in range(L2)], -1) for p in range(L2)], 1)
        weights = softmax(up + a2)
        rx0, rx1 = dec.lthd[t][0](x[0], weights, (4, 6)), dec.lthd[t][1](x[1], weights, (4, 6))
        cat = torch.cat([F.interpolate(r, (16, 24), mode='bilinear', align_corners=False)
                         for r in (rx0, rx1, rx2, rx3)], 1)
        expected = conv(conv_bn_relu(cat, dec.head[t][0]), dec.head[t][1])
        assert expected.shape == (2, k, 16, 24)
        torch.testing.assert_close(out[t], expected, **TOL)


# ----------------------------------------------------------------------------------------------------
# what defines TIF

TASKS = {'semseg': 5, 'depth': 1, 'normals': 3}


def saved_shapes(function):
    """Shapes of every tensor autograd saves for the backward while `function` runs."""
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        function()
    return shapes


def attention_shapes(shapes, grids):
    """The saved tensors whose last two dimensions both count positions of one of the grids."""
    positions = {h * w for h, w in grids}
    return [s for s in shapes if len(s) >= 2 and s[-1] in positions and s[-2] in positions]


def test_no_attention_is_formed_above_the_1_16_grid():
    """Per image and task: the only position-by-position tensors are L_2 x L_2 (the 1/16 grid) and
    L_3 x L_3 (1/32). The same accounting flags self-attention applied at 1/4 (it can fail)."""
    torch.manual_seed(0)
    model = build_model('tif', TASKS, (96, 128))
    grids = [(24, 32), (12, 16), (6, 8), (3, 4)]
    shapes = saved_shapes(lambda: model(torch.rand(1, 3, 96, 128)))
    found = attention_shapes(shapes, grids)
    L2, L3 = 6 * 8, 3 * 4
    assert found and {s[-2:] for s in found} == {(L2, L2), (L3, L3)}
    assert all(s[0] == 1 for s in found)                                  # one image
    assert max(math.prod(s) for s in found) == L2 * L2
    sfd = model.decoder.sfd['semseg'][0]
    flagged = attention_shapes(saved_shapes(lambda: sfd(torch.rand(1, sfd.query.in_features, 24, 32))), grids)
    assert (24 * 32, 24 * 32) in {s[-2:] for s in flagged}


@pytest.mark.parametrize('mode', ['eval', 'train'])
def test_a_tasks_outputs_do_not_depend_on_another_tasks_parameters(mode):
    torch.manual_seed(0)
    model = build_model('tif', TASKS, (64, 96)).train(mode == 'train')
    x = torch.rand(2, 3, 64, 96)
    with torch.no_grad():
        before = model(x)
        for part in (model.decoder.project, model.decoder.sfd, model.decoder.lthd, model.decoder.head):
            for p in part['depth'].parameters():
                p.add_(torch.randn_like(p))
        after = model(x)
    assert torch.equal(before['semseg'], after['semseg']) and torch.equal(before['normals'], after['normals'])
    assert not torch.allclose(before['depth'], after['depth'])          # the perturbation does reach depth
