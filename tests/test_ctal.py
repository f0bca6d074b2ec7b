"""CTAL: the literal algorithm against a from-the-definition reference, dense == linear (values and
every gradient), the papers' parameter counts, the `auto` rule, and the error messages."""
import itertools

import pytest
import torch
import torch.nn.functional as F

from ctal import CTAL, LinearDiffusion, choose_impl, dense_diffusion


def make_pair(T, C, size, k=3, fusion="shared", dtype=torch.float64, seed=0):
    """Two modules with identical parameters: dense and linear."""
    torch.manual_seed(seed)
    dense = CTAL(T, C, size, kernel_size=k, fusion=fusion, impl="dense").to(dtype)
    with torch.no_grad():  # a non-zero bias is part of what must match
        dense.fusion.bias.normal_()
    linear = CTAL(T, C, size, kernel_size=k, fusion=fusion, impl="linear").to(dtype)
    linear.load_state_dict(dense.state_dict())
    return dense, linear


def run_with_grads(module, feats, seed=1):
    """Forward, then backward of a fixed random projection of every output; returns outputs and the
    gradients of the inputs and of every parameter, by name."""
    xs = [f.clone().requires_grad_(True) for f in feats]
    module.zero_grad()
    outs = module(xs)
    g = torch.Generator().manual_seed(seed)
    loss = sum((o * torch.randn(o.shape, generator=g, dtype=o.dtype).to(o.device)).sum() for o in outs)
    loss.backward()
    grads = {f"input{i}": x.grad for i, x in enumerate(xs)}
    grads.update({name: p.grad for name, p in module.named_parameters()})
    return [o.detach() for o in outs], grads


def rel_err(a, b):
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-300))


def assert_runs_agree(run, reference, tol_out, tol_grad):
    """Outputs and every gradient of `run` within a relative tolerance of `reference` (same dtypes)."""
    (outs, grads), (ref_outs, ref_grads) = run, reference
    for a, b in zip(outs, ref_outs):
        assert rel_err(a.to(b.dtype), b) < tol_out
    assert set(grads) == set(ref_grads)
    for name in ref_grads:
        assert grads[name].dtype == ref_grads[name].dtype, name
        assert rel_err(grads[name], ref_grads[name]) < tol_grad, name


def reference_ctal(module, feats):
    """CTAL (CTAL paper Sec. 2.1, Eqs. 1-2) written out position by position, with no conv, unfold or
    interleave: an independent check that `dense` really is the algorithm the papers describe."""
    T, (h, w), k = module.num_tasks, module.size, module.kernel_size
    r, hw, m = k // 2, h * w, module.m
    weight = module.fusion.weight.detach()                              # (HW*m, T, k, k)
    bias = module.fusion.bias.detach()
    f_hat = [F.normalize(f, dim=1) for f in feats]                      # (B, C, h, w)
    affinity = [torch.einsum("bcp,bcq->bpq", f.flatten(2), f.flatten(2)).view(-1, hw, h, w)
                for f in f_hat]                                         # A_t[p] as an (h, w) map
    outs = []
    for t in range(T):
        j = t if m > 1 else 0
        g = torch.zeros(feats[0].shape[0], hw, h, w, dtype=feats[0].dtype)   # G_t[p, (y, x)]
        for p in range(hw):
            g[:, p] += bias[p * m + j]
            for n, dy, dx in itertools.product(range(T), range(k), range(k)):
                for y, x in itertools.product(range(h), range(w)):
                    yy, xx = y + dy - r, x + dx - r
                    if 0 <= yy < h and 0 <= xx < w:
                        g[:, p, y, x] += weight[p * m + j, n, dy, dx] * affinity[n][:, p, yy, xx]
        v = module.projection[t](feats[t]).flatten(2)                   # (B, C, HW)
        d = torch.einsum("bcq,bpq->bcp", v, g.flatten(2)).view_as(feats[t])
        outs.append(module.gamma * d + (1 - module.gamma) * feats[t])
    return outs


@pytest.mark.parametrize("fusion", ["shared", "task"])
def test_dense_is_the_papers_algorithm(fusion):
    T, C, size = 3, 4, (3, 4)
    dense, _ = make_pair(T, C, size, fusion=fusion)
    feats = [torch.randn(2, C, *size, dtype=torch.float64) for _ in range(T)]
    with torch.no_grad():
        got, want = dense(feats), reference_ctal(dense, feats)
    for a, b in zip(got, want):
        assert rel_err(a, b) < 1e-12


@pytest.mark.parametrize("fusion,k,T", list(itertools.product(["shared", "task"], [3, 5], [2, 3, 4, 5])))
def test_linear_equals_dense_float64(fusion, k, T):
    C, size, B = 6, (5, 7), 2                       # non-square map, batch > 1
    dense, linear = make_pair(T, C, size, k=k, fusion=fusion)
    feats = [torch.randn(B, C, *size, dtype=torch.float64) for _ in range(T)]
    ref = run_with_grads(dense, feats)
    assert len(ref[1]) == T + 2 + 2 * T          # inputs, fusion weight and bias, T projections' w and b
    assert_runs_agree(run_with_grads(linear, feats), ref, 1e-10, 1e-10)


def test_dense_and_linear_diffusion_gradcheck():
    torch.manual_seed(0)
    B, T, C, size, k = 1, 2, 3, (3, 4), 3
    hw = size[0] * size[1]
    f_hat = torch.randn(B, T, C, hw, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, T, C, hw, dtype=torch.float64, requires_grad=True)
    for m in (1, T):
        weight = torch.randn(hw * m, T, k, k, dtype=torch.float64, requires_grad=True)
        bias = torch.randn(hw * m, dtype=torch.float64, requires_grad=True)
        for function in (dense_diffusion, LinearDiffusion.apply):          # the literal form's own autograd too
            assert torch.autograd.gradcheck(lambda *a: function(*a, size), (f_hat, v, weight, bias))


@pytest.mark.parametrize("fusion", ["shared", "task"])
def test_linear_equals_dense_float32_and_bf16_autocast(fusion):
    T, C, size = 3, 16, (6, 8)
    dense, linear = make_pair(T, C, size, fusion=fusion, dtype=torch.float32)
    feats = [torch.randn(2, C, *size) for _ in range(T)]
    ref = run_with_grads(dense, feats)
    assert_runs_agree(run_with_grads(linear, feats), ref, 1e-5, 1e-4)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # bf16 keeps ~3 significant digits: both
        linear_bf16 = run_with_grads(linear, feats)     # implementations must land near fp32
        dense_bf16 = run_with_grads(dense, feats)
    assert_runs_agree(linear_bf16, ref, 3e-2, 6e-2)
    assert_runs_agree(dense_bf16, ref, 3e-2, 6e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("fusion", ["shared", "task"])
def test_linear_equals_dense_cuda(fusion):
    T, C, size = 3, 32, (12, 16)
    dense, linear = make_pair(T, C, size, fusion=fusion)
    dense, linear = dense.cuda(), linear.cuda()
    feats = [torch.randn(2, C, *size, dtype=torch.float64, device="cuda") for _ in range(T)]
    assert_runs_agree(run_with_grads(linear, feats), run_with_grads(dense, feats), 1e-10, 1e-10)
    feats = [f.float() for f in feats]
    dense, linear = dense.float(), linear.float()
    ref = run_with_grads(dense, feats)
    assert_runs_agree(run_with_grads(linear, feats), ref, 1e-4, 1e-3)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert_runs_agree(run_with_grads(linear, feats), ref, 3e-2, 6e-2)


def test_dict_in_dict_out():
    dense, _ = make_pair(2, 4, (3, 3), dtype=torch.float32)
    feats = {"semseg": torch.randn(1, 4, 3, 3), "depth": torch.randn(1, 4, 3, 3)}
    out = dense(feats)
    assert list(out) == ["semseg", "depth"]
    ref = dense(list(feats.values()))
    assert torch.equal(out["depth"], ref[1])


def test_gamma_blends_refined_and_original_features():
    dense, _ = make_pair(2, 4, (3, 5), dtype=torch.float64)
    feats = [torch.randn(2, 4, 3, 5, dtype=torch.float64) for _ in range(2)]
    dense.gamma = 0.0
    assert all(torch.equal(o, f) for o, f in zip(dense(feats), feats))
    dense.gamma = 1.0
    full = dense(feats)
    dense.gamma = 0.05
    blended = dense(feats)
    for b, d, f in zip(blended, full, feats):
        assert torch.allclose(b, 0.05 * d + 0.95 * f, rtol=0, atol=1e-12)


def test_fusion_parameter_counts_match_the_papers():
    # NYUv2 at 1/4: 288x384 input -> 72x96, T = 3 tasks, k = 3 (the papers' "187K" vs "1.29B")
    ctal = CTAL(3, 128, (72, 96))
    assert ctal.fusion.weight.numel() == 186_624 and ctal.fusion.bias.numel() == 6_912
    assert tuple(ctal.fusion.weight.shape) == (6912, 3, 3, 3) and ctal.fusion.groups == 6912
    standard = (3 * 6912) * 6912 * 9                   # a dense Conv2d(T*HW, HW, 3) over the joint affinities
    assert standard == 1_289_945_088 and round(standard / 1e9, 2) == 1.29
    assert CTAL(3, 128, (72, 96), fusion="task").fusion.weight.numel() == 3 * 186_624
    assert sum(p.numel() for p in ctal.projection.parameters()) == 3 * (128 * 128 * 9 + 128)


def test_auto_picks_the_cheaper_implementation_per_device():
    # GPUs: the FLOP rule; NYUv2 at 1/4, 1/6, 1/8 with C = 128, T = 3 (break-even near HW = 3,338)
    assert choose_impl(3, 128, (72, 96), device="cuda") == "linear"
    assert choose_impl(3, 128, (48, 64), device="cuda") == "dense"
    assert choose_impl(3, 128, (36, 48), device="cuda") == "dense"
    # the break-even written out for a 1 x n map (padded grid 3 x (n + 2)): dense n^2 (2 T C + T k^2) = 795 n^2
    # against linear T^2 k^2 C^2 (3 (n + 2) + n) = 1,327,104 (4 n + 6): equal at n = 6678.75
    assert choose_impl(3, 128, (1, 6678), device="cuda") == "dense"
    assert choose_impl(3, 128, (1, 6679), device="cuda") == "linear"
    # CPU: dense costs 3x as much per FLOP (ctal.DENSE_COST_PER_FLOP): 2385 n^2 = 1,327,104 (4 n + 6), n = 2227.25
    assert choose_impl(3, 128, (1, 2227), device="cpu") == "dense"
    assert choose_impl(3, 128, (1, 2228), device="cpu") == "linear"
    # the synthetic set's 24x32 and NYUv2's 1/8, 1/6, 1/4 (the README's measured table: dense is faster only at 24x32)
    assert [choose_impl(3, 128, s, device="cpu") for s in [(9, 12), (24, 32), (36, 48), (48, 64), (72, 96)]] == \
        ["dense", "dense", "linear", "linear", "linear"]
    auto = CTAL(3, 128, (48, 64))
    assert auto.impl == "auto" and auto.impl_for("cpu") == "linear"
    assert auto.impl_for(torch.device("cuda")) == "dense"
    assert "'auto' (cpu: linear, cuda: dense)" in repr(auto)
    assert CTAL(3, 128, (48, 64), impl="dense").impl_for("cpu") == "dense"


def test_auto_runs_the_linear_form_on_cpu_where_it_is_faster(monkeypatch):
    torch.manual_seed(0)
    # dense 30^2 (2 T C + T k^2) = 30,600 (x 3 on CPU: 91,800) against linear T^2 k^2 C^2 (7 x 8 + 30) = 49,536
    auto = CTAL(2, 4, (5, 6)).double()
    assert choose_impl(2, 4, (5, 6), device="cuda") == "dense"
    assert choose_impl(2, 4, (5, 6), device="cpu") == "linear"
    feats = [torch.randn(1, 4, 5, 6, dtype=torch.float64) for _ in range(2)]
    calls = []
    original = LinearDiffusion.apply
    monkeypatch.setattr(LinearDiffusion, "apply", lambda *args: calls.append(1) or original(*args))
    auto(feats)
    assert calls == [1]


def test_the_linear_form_keeps_no_hw_by_hw_activation():
    """What autograd keeps for backward, counted exactly: the linear form recomputes its weighted queries and
    keeps nothing of HW x HW; the literal dense form keeps its T affinity matrices (1.2 GB at NYUv2 1/4, batch 2:
    that is what the literal algorithm is)."""
    T, C, size, B = 3, 8, (16, 24), 1
    hw = size[0] * size[1]
    feats = [torch.randn(B, C, *size, requires_grad=True) for _ in range(T)]

    def saved_bytes(module):
        seen = {}

        def pack(t):
            seen[(t.data_ptr(), t.dtype, tuple(t.shape))] = t.numel() * t.element_size()
            return t
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            module(feats)
        return max(seen.values())

    dense, linear = make_pair(T, C, size, dtype=torch.float32)
    assert saved_bytes(linear) < hw * hw * 4 <= saved_bytes(dense)


def test_wrong_inputs_are_clear_errors():
    ctal = CTAL(3, 8, (6, 8))
    ok = [torch.randn(2, 8, 6, 8) for _ in range(3)]
    with pytest.raises(ValueError, match=r"expected spatial size \(6, 8\).*got \(12, 16\)"):
        ctal([torch.randn(2, 8, 12, 16)] * 3)
    with pytest.raises(ValueError, match="expected 8 channels, got 4"):
        ctal([torch.randn(2, 4, 6, 8)] * 3)
    with pytest.raises(ValueError, match="built for 3 tasks but got 2"):
        ctal(ok[:2])
    with pytest.raises(ValueError, match="mismatched batch sizes"):
        ctal(ok[:2] + [torch.randn(1, 8, 6, 8)])
    with pytest.raises(ValueError, match=r"a single tensor of shape \(2, 8, 6, 8\)"):
        ctal(torch.randn(2, 8, 6, 8))
    for kwargs, match in [(dict(num_tasks=0), "num_tasks must be a positive int, got 0"),
                          (dict(channels=0), "channels must be a positive int, got 0"),
                          (dict(size=(0, 8)), r"size must be .* got \(0, 8\)"),
                          (dict(size=72), "size must be"), (dict(gamma=1.5), r"gamma must be in \[0, 1\]"),
                          (dict(gamma=-0.1), "gamma must be in"), (dict(kernel_size=2), "must be odd")]:
        args = dict(num_tasks=3, channels=8, size=(6, 8))
        args.update(kwargs)
        with pytest.raises(ValueError, match=match):
            CTAL(**args)
    with pytest.raises(ValueError, match="impl must be one of"):
        CTAL(3, 8, (6, 8), impl="fast")
    with pytest.raises(ValueError, match="fusion must be one of"):
        CTAL(3, 8, (6, 8), fusion="mean")


def test_checkpoint_loads_into_either_implementation():
    a = CTAL(2, 4, (4, 4), impl="dense")
    b = CTAL(2, 4, (4, 4), impl="linear")
    assert a.state_dict().keys() == b.state_dict().keys()
    b.load_state_dict(a.state_dict())
    feats = [torch.randn(1, 4, 4, 4) for _ in range(2)]
    for x, y in zip(a(feats), b(feats)):
        assert torch.allclose(x, y, atol=1e-6)


def test_readme_snippet_runs_as_pasted():
    """The README's 'CTAL in your own project' code block, with its three feature maps defined."""
    import os
    import re
    readme = open(os.path.join(os.path.dirname(__file__), "..", "README.md")).read()
    block = re.search(r"## CTAL in your own project.*?```python\n(.*?)```", readme, re.S).group(1)
    feats = {name: torch.randn(1, 128, 72, 96) for name in ("f_seg", "f_depth", "f_normals")}
    scope = dict(feats)
    exec(block, scope)
    assert isinstance(scope["refined"], dict) and set(scope["refined"]) == {"semseg", "depth", "normals"}
    assert all(v.shape == (1, 128, 72, 96) for v in scope["refined"].values())
