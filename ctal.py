"""CTAL: the Cross-Task Affinity Learning module (EMA-Net), written literally and in an exact linear form.

This file imports only torch: copy it into any project.

CTAL refines T task feature maps F_t (B, C, h, w) with each other's affinity patterns. With HW = h*w
positions p, q and f̂_t(p) = F_t[:, p] / ||F_t[:, p]|| (L2 over channels):

  1. intra-task affinity   A_t[p, q] = <f̂_t(p), f̂_t(q)>                       (HW x HW, cosine)
  2. interleave            M[p*T + t] = A_t[p] viewed as an (h, w) map over q   (T*HW, h, w)
  3. inter-task fusion     G = fusion(M): ONE grouped conv, groups = HW, so query position p owns a
                           kernel w[p] of shape (T, k, k) that mixes the T affinity maps of p
                           (HW*m, h, w): m = 1 ('shared', one G for every task, as in the official
                           code and the papers' parameter counts) or m = T ('task', a G_t per task,
                           as the papers' figure draws it); G_t[p, q] = channel p*m + t at q
  4. diffusion             V_t = projection_t(F_t);  D_t[:, p] = sum_q V_t[:, q] G_t[p, q]
  5. blend                 out_t = gamma * D_t + (1 - gamma) * F_t

`impl='dense'` is exactly that, in plain autograd (`dense_diffusion`, the authors' own computation): time
O(HW^2 (T C + T k^2)), and T HW x HW affinities in memory (191 MB each per image at NYUv2's 1/4, 72 x 96).

`impl='linear'` computes the same numbers without ever forming an HW x HW tensor. Nothing nonlinear
sits between steps 1 and 4, so with d ranging over the k*k kernel offsets (zero padding):

  G_t[p, q] = b_t[p] + sum_{n,d} w_t[p, n, d] <f̂_n(p), f̂_n(q + d)>
  D_t[:, p] = b_t[p] * sum_q V_t[:, q]  +  sum_{n,d} w_t[p, n, d] K_{t,n,d} f̂_n(p)
  K_{t,n,d} = sum_q V_t[:, q] f̂_n(q + d)^T            (C x C; f̂_n(q + d) = 0 outside the map)

Stacking the shifted maps f̂_n(. + d) over (n, c, d) gives U = unfold(f̂) (T*C*k^2, HW), and
Z_t[(n, c, d), p] = w_t[p, n, d] f̂_n(p)[c] has the same shape. Then the whole module is two GEMMs:

  K = V U^T   (T*C, T*C*k^2)     then     D = K Z + outer(sum_q V, b)     (T*C, HW)

O(HW T^2 k^2 C^2) time and O(HW T C) memory. `LinearDiffusion` takes the (n, c, d) rows one offset d at a
time, K_d = V S_d^T and D = sum_d K_d Z_d, with the maps in channels-last layout (positions x channels) on a
zero-padded grid: there a shift by d is a block of rows, so S_d is a view, and each product is one GEMM batched
over the images (`choose_impl` says which form is cheaper where; `python profile.py --module ctal` measures both).

Both implementations hold the SAME parameters, so a checkpoint trained with one loads into the other.
"""
import contextlib

import torch
import torch.nn as nn
import torch.nn.functional as F

IMPLS = ("auto", "dense", "linear")
FUSIONS = ("shared", "task")

# per FLOP, how much more the dense form costs than the linear one on a device type: on a CPU its grouped conv
# (one group per query position: thousands of tiny kernels, and a backward far below GEMM speed) and its
# HW x HW tensors, which run at memory speed, cost more than their FLOPs. Chosen between the ratios measured
# where the two forms break even (`python profile.py --module ctal`; the README has the table). GPUs: not
# measured, the FLOP rule (1).
DENSE_COST_PER_FLOP = {"cpu": 3.0}


def core_flops(num_tasks, channels, size, kernel_size=3, fusion="shared"):
    """(dense, linear) multiply-adds per image of the two cores; normalisation, projections and blend are shared.
      dense:  A_t (T C HW^2) + grouped conv (m T k^2 HW^2) + diffusion (T C HW^2)
      linear: K_d = V S_d^T over the zero-padded grid (T^2 k^2 C^2 L, L = (h + 2r)(w + 2r), r = k // 2)
              + sum_d K_d Z_d (T^2 k^2 C^2 HW)"""
    T, C, k, (h, w) = num_tasks, channels, kernel_size, size
    m, hw = T if fusion == "task" else 1, h * w
    return hw * hw * (2 * T * C + m * T * k * k), T * T * k * k * C * C * ((h + k - 1) * (w + k - 1) + hw)


def choose_impl(num_tasks, channels, size, kernel_size=3, fusion="shared", device="cuda"):
    """What impl='auto' runs on a device of type `device` ('cpu', 'cuda', ...): 'dense' or 'linear', the one
    with the lower cost = `core_flops` x the device's cost per FLOP (DENSE_COST_PER_FLOP; 1 where it is not
    measured: on GPUs the FLOP rule). It depends only on the shapes and the device type, so a run and its
    resume make the same choice."""
    dense, linear = core_flops(num_tasks, channels, size, kernel_size, fusion)
    return "linear" if linear < dense * DENSE_COST_PER_FLOP.get(device, 1.0) else "dense"


class CTAL(nn.Module):
    """Cross-Task Affinity Learning for T tasks at one feature size (h, w): feats, a list of T tensors
    (B, C, h, w) or a dict task -> tensor, -> the refined features, same shapes (a dict for a dict). The grouped
    conv has one kernel per query position, so the module is tied to the (h, w) it was built for."""

    def __init__(self, num_tasks, channels, size, kernel_size=3, gamma=0.05, fusion="shared", impl="auto"):
        super().__init__()
        if fusion not in FUSIONS:
            raise ValueError(f"CTAL fusion must be one of {FUSIONS}, got {fusion!r}")
        if impl not in IMPLS:
            raise ValueError(f"CTAL impl must be one of {IMPLS}, got {impl!r}")
        for name, value in (("num_tasks", num_tasks), ("channels", channels), ("kernel_size", kernel_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"CTAL {name} must be a positive int, got {value!r}")
        if kernel_size % 2 != 1:
            raise ValueError(f"CTAL kernel_size must be odd (same-size grouped conv), got {kernel_size}")
        if (not isinstance(size, (tuple, list)) or len(size) != 2
                or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in size)):
            raise ValueError(f"CTAL size must be the feature map's (h, w), two positive ints, got {size!r}")
        if not 0.0 <= float(gamma) <= 1.0:
            raise ValueError(f"CTAL gamma must be in [0, 1] (out = gamma * D + (1 - gamma) * F), got {gamma!r}")
        hw = size[0] * size[1]
        self.num_tasks, self.channels, self.size = num_tasks, channels, tuple(size)
        self.kernel_size, self.gamma, self.fusion_mode = kernel_size, float(gamma), fusion
        self.m = num_tasks if fusion == "task" else 1
        # group p reads channels p*T .. p*T+T-1 of M (the T affinity maps of position p) and writes
        # channels p*m .. p*m+m-1 of G: weight (HW*m, T, k, k), bias (HW*m,)
        self.fusion = nn.Conv2d(num_tasks * hw, hw * self.m, kernel_size, padding=kernel_size // 2, groups=hw)
        self.projection = nn.ModuleList(nn.Conv2d(channels, channels, 3, padding=1) for _ in range(num_tasks))
        self.impl = impl                      # 'auto' is resolved per device in forward (`impl_for`)

    def impl_for(self, device):
        """The implementation this module runs on `device` (a torch.device or its type string)."""
        if self.impl != "auto":
            return self.impl
        kind = device if isinstance(device, str) else device.type
        return choose_impl(self.num_tasks, self.channels, self.size, self.kernel_size, self.fusion_mode, kind)

    def extra_repr(self):
        impl = (f"'auto' (cpu: {self.impl_for('cpu')}, cuda: {self.impl_for('cuda')})" if self.impl == "auto"
                else repr(self.impl))
        return (f"tasks={self.num_tasks}, channels={self.channels}, size={self.size}, "
                f"kernel_size={self.kernel_size}, gamma={self.gamma}, fusion={self.fusion_mode!r}, "
                f"impl={impl}")

    def forward(self, feats):
        keys = list(feats) if isinstance(feats, dict) else None
        xs = [feats[key] for key in keys] if keys is not None else feats
        self._check_inputs(xs)
        xs = list(xs)
        x = torch.stack(xs, 1)                                               # (B, T, C, h, w)
        f_hat = F.normalize(x, dim=2).flatten(3)                             # (B, T, C, HW)
        v = torch.stack([proj(xi) for proj, xi in zip(self.projection, xs)], 1).flatten(3)
        diffusion = dense_diffusion if self.impl_for(x.device) == "dense" else LinearDiffusion.apply
        d = diffusion(f_hat, v, self.fusion.weight, self.fusion.bias, self.size)
        out = (self.gamma * d.view(x.shape) + (1 - self.gamma) * x).unbind(1)
        return dict(zip(keys, out)) if keys is not None else list(out)

    def _check_inputs(self, xs):
        if torch.is_tensor(xs):
            raise ValueError(f"CTAL takes a list (or dict) of {self.num_tasks} feature maps (B, C, h, w), one per "
                             f"task, got a single tensor of shape {tuple(xs.shape)}")
        if len(xs) != self.num_tasks:
            raise ValueError(f"CTAL was built for {self.num_tasks} tasks but got {len(xs)} feature maps")
        for i, x in enumerate(xs):
            if x.dim() != 4:
                raise ValueError(f"CTAL input {i}: expected a (B, C, h, w) tensor, got shape {tuple(x.shape)}")
            if x.shape[1] != self.channels:
                raise ValueError(f"CTAL input {i}: expected {self.channels} channels, got {x.shape[1]}")
            if tuple(x.shape[2:]) != self.size:
                raise ValueError(
                    f"CTAL input {i}: expected spatial size {self.size} (the size this module was built "
                    f"for: its grouped conv has one kernel per position), got {tuple(x.shape[2:])}. "
                    f"Resize the features to {self.size} or build CTAL with size={tuple(x.shape[2:])}.")
            if x.shape[0] != xs[0].shape[0]:
                raise ValueError(f"CTAL inputs have mismatched batch sizes: input 0 has {xs[0].shape[0]}, "
                                 f"input {i} has {x.shape[0]}")


def dense_diffusion(f_hat, v, weight, bias, size):
    """D of the literal algorithm (steps 1-4) with ordinary autograd: f_hat, v (B, T, C, HW); weight
    (HW*m, T, k, k) and bias (HW*m,) of the grouped conv (`CTAL.fusion`)."""
    B, T, C, hw = f_hat.shape
    a = f_hat.transpose(2, 3) @ f_hat                                  # (B, T, HW, HW): A_t[p, q]
    m_in = a.transpose(1, 2).reshape(B, hw * T, *size)                 # (B, HW*T, h, w): M[p*T + t] = A_t[p]
    g = F.conv2d(m_in, weight, bias, padding=weight.shape[-1] // 2, groups=hw)         # (B, HW*m, h, w)
    g = g.view(B, hw, -1, hw).transpose(1, 2)                          # (B, m, HW, HW): G_j[p, q]
    v_m = v.reshape(B, g.shape[1], -1, hw)                             # (B, m, T*C/m, HW): the V_t each G_j serves
    return (v_m @ g.transpose(2, 3)).reshape(B, T, C, hw)              # D[:, p] = sum_q V[:, q] G[p, q]


class _Grid:
    """The zero-padded grid of the linear form, channels-last: the (h, w) map padded by r = k // 2 to
    (h + 2r) x (w + 2r) = L positions, flattened row-major, with `margin` = r (w + 2r) + r more zero rows at
    both ends. A shift by d = (dy, dx) is then the fixed row offset offsets[d] (in unfold's (ky, kx) order), so
    `shifted` is a view. On the padding ring the view reads the neighbouring row, but what it meets there (V,
    dL/dV) is zero."""

    def __init__(self, size, k):
        self.size, self.r = tuple(size), k // 2
        self.padded = (size[0] + 2 * self.r, size[1] + 2 * self.r)
        self.length, self.margin = self.padded[0] * self.padded[1], self.r * self.padded[1] + self.r
        self.offsets = [self.margin + dy * self.padded[1] + dx for dy in range(-self.r, self.r + 1)
                        for dx in range(-self.r, self.r + 1)]
        self.center = len(self.offsets) // 2                          # d = (0, 0)

    def place(self, x, margin=0):
        """(B, HW, N) -> (B, L + 2 margin, N): x on the padded grid, zeros around."""
        out = x.new_zeros(x.shape[0], self.length + 2 * margin, x.shape[2])
        self.interior(out[:, margin:margin + self.length]).copy_(x.unflatten(1, self.size))
        return out

    def interior(self, flat):
        """(B, L, N) on the padded grid -> (B, h, w, N) view without the ring."""
        (ph, pw), r = self.padded, self.r
        return flat.unflatten(1, (ph, pw))[:, r:ph - r, r:pw - r]

    def shifted(self, ext, d):
        """(B, L, N) view of ext = place(x, margin): at padded position q it holds x(q + d)."""
        return ext[:, self.offsets[d]:self.offsets[d] + self.length]


def _accumulate(out, a, b):
    """out += a @ b (batched). Low-precision operands (autocast) multiply in their dtype and add into out's
    float32, so the k*k partial products are rounded once, as one big GEMM's would be."""
    if a.dtype != out.dtype:
        out.add_(a @ b)
    else:
        out.baddbmm_(a, b)


def _autocast_dtype(device):
    """The autocast dtype on `device` (a type string) at a custom Function's forward, None where autocast is
    off or the device has none (e.g. 'meta', for shape-only FLOP counts); backward re-enters that state."""
    on = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    return torch.get_autocast_dtype(device) if on else None


def _autocast_off(device, dtype):
    """The Functions choose their GEMMs' dtypes themselves: autocast off inside them where it was on."""
    return torch.autocast(device, enabled=False) if dtype is not None else contextlib.nullcontext()


class LinearDiffusion(torch.autograd.Function):
    """D of `dense_diffusion` without any HW x HW tensor: per kernel offset d (S_d = the maps shifted by d,
    Z_d[(n, c), p] = w_t[p, n, d] f̂_n(p)[c] the weighted queries)

        K_d = V S_d^T   (T*C x T*C),     D = sum_d K_d Z_d + outer(sum_q V, b)

    in channels-last layout (positions as rows, so that a shift is a block of whole rows) and as one GEMM over
    all images per product and offset: K_d = V_padᵀ S_d is (B, TC x L) @ (B, L x TC), Dᵀ += Z_dᵀ K_dᵀ is
    (B, HW x TC) @ (B, TC x TC), and the backward's four products have these shapes. Forward saves f̂ and V on
    the padded grid and the K_d (tiny); backward recomputes Z_d. Under autocast the GEMMs run in its dtype and
    their sums in float32; backward re-enters the same state (what torch.amp.custom_bwd does for one device
    type). f_hat, v: (B, T, C, HW); weight (HW*m, T, k, k), bias (HW*m,)."""

    @staticmethod
    def forward(ctx, f_hat, v, weight, bias, size):
        ctx.device, ctx.size, ctx.dtypes = f_hat.device.type, size, (f_hat.dtype, v.dtype)
        ctx.autocast = _autocast_dtype(ctx.device)
        with _autocast_off(ctx.device, ctx.autocast):
            d, saved = _linear_forward(f_hat, v, weight, bias, size, ctx.autocast or f_hat.dtype)
        ctx.save_for_backward(weight, bias, *saved)
        return d

    @staticmethod
    def backward(ctx, grad_d):
        weight, bias, *saved = ctx.saved_tensors
        with _autocast_off(ctx.device, ctx.autocast):
            grads = _linear_backward(grad_d, weight, bias, *saved, ctx.size)
        dtypes = ctx.dtypes + (weight.dtype, bias.dtype)
        return tuple(g.to(dtype) for g, dtype in zip(grads, dtypes)) + (None,)


def _offset_weights(weight, hw, d):
    """w_t[p, n, d] for one offset d, (1, m, HW, T, 1): from the grouped conv's weight (HW*m, T, k, k)."""
    w = weight.view(hw, weight.shape[0] // hw, weight.shape[1], -1)[..., d]      # (HW, m, T)
    return w.permute(1, 0, 2)[None, ..., None]


def _weighted(f_t, w_d):
    """Z_dᵀ (B*m, HW, TC) from f̂ᵀ (B, HW, TC) and one offset's weights (1, m, HW, T, 1)."""
    B, hw, tc = f_t.shape
    return (f_t.view(B, 1, hw, w_d.shape[3], -1) * w_d).reshape(-1, hw, tc)


def _linear_forward(f_hat, v, weight, bias, size, gemm):
    """Dᵀ = sum_d Z_dᵀ K_dᵀ per image and fused map, then D + the bias term (B, T, C, HW); what backward needs."""
    B, T, C, hw = f_hat.shape
    acc, grid, m = torch.promote_types(gemm, torch.float32), _Grid(size, weight.shape[-1]), weight.shape[0] // hw
    f_t = f_hat.to(gemm).flatten(1, 2).transpose(1, 2).contiguous()    # (B, HW, TC): f̂ channels-last
    f_ext = grid.place(f_t, grid.margin)                               # (B, L + 2 margin, TC)
    v_pad = grid.place(v.to(gemm).flatten(1, 2).transpose(1, 2))       # (B, L, TC)
    w = weight.to(gemm)
    kmats = torch.stack([v_pad.transpose(1, 2) @ grid.shifted(f_ext, d) for d in range(len(grid.offsets))], 1)
    d_t = f_t.new_zeros(B * m, hw, T * C // m, dtype=acc)              # Dᵀ of each fused map j
    for d in range(len(grid.offsets)):
        _accumulate(d_t, _weighted(f_t, _offset_weights(w, hw, d)), kmats[:, d].reshape(B * m, -1, T * C).mT)
    d_out = d_t.view(B, m, hw, -1).transpose(2, 3).reshape(B, T, C, hw)
    v_sum = v.sum(3, keepdim=True).to(acc)                             # (B, T, C, 1): sum_q V_t[:, q]
    return d_out + v_sum * bias.to(acc).view(hw, m).t()[:, None], (f_ext, v_pad, kmats, v_sum)


def _linear_backward(grad_d, weight, bias, f_ext, v_pad, kmats, v_sum, size):
    """Gradients of D = sum_d K_d Z_d + outer(sum_q V, b), K_d = V_padᵀ S_d, w.r.t. f̂, V, the weight and the
    bias (B, T, C, HW), (HW*m, T, k, k), (HW*m,). Every temporary has the size of f̂ (Z_d, dL/dZ_d) or of K_d."""
    B, T, C, hw = grad_d.shape
    gemm, acc = f_ext.dtype, v_sum.dtype
    grid, m, kk = _Grid(size, weight.shape[-1]), weight.shape[0] // hw, kmats.shape[1]
    f_t = grid.interior(grid.shifted(f_ext, grid.center)).reshape(B, hw, T * C)       # (B, HW, TC)
    g_t = grad_d.to(gemm).view(B, m, -1, hw).transpose(2, 3).reshape(B * m, hw, -1)   # dL/dDᵀ (B*m, HW, TC/m)
    w = weight.to(gemm)
    grad_f = f_t.new_zeros(B, hw, T * C, dtype=acc)                    # through Z
    grad_f_ext = torch.zeros_like(f_ext, dtype=acc)                    # through K_d, every offset
    grad_v_pad = torch.zeros_like(v_pad, dtype=acc)
    grad_w = f_t.new_empty(kk, m, hw, T, dtype=acc)
    for d in range(kk):
        w_d = _offset_weights(w, hw, d)                                # (1, m, HW, T, 1)
        grad_k = (g_t.mT @ _weighted(f_t, w_d)).view(B, T * C, T * C)  # dL/dK_d
        grad_z = (g_t @ kmats[:, d].reshape(B * m, -1, T * C)).view(B, m, hw, T, C)    # dL/dZ_dᵀ
        for j in range(m):                                             # through Z_d = w_d f̂, in place
            grad_f.view(B, hw, T, C).addcmul_(grad_z[:, j], w_d[:, j])
        grad_w[d] = (grad_z * f_t.view(B, 1, hw, T, C)).sum((0, 4))
        _accumulate(grad_v_pad, grid.shifted(f_ext, d), grad_k.mT)    # K_d = V_padᵀ S_d: both factors
        grid.shifted(grad_f_ext, d).add_(v_pad @ grad_k)
    grad_f += grid.interior(grid.shifted(grad_f_ext, grid.center)).reshape(B, hw, T * C)
    b = bias.to(acc).view(hw, m).t()[:, None]                          # (m, 1, HW): b_t[p]
    grad_v = grid.interior(grad_v_pad).reshape(B, hw, T * C).transpose(1, 2).reshape(B, T, C, hw)
    grad_v = grad_v + (grad_d.to(acc) * b).sum(3, keepdim=True)
    grad_b = torch.einsum("btcp,btc->tp", grad_d.to(acc), v_sum[..., 0]).view(m, -1, hw).sum(1)   # (m, HW)
    return (grad_f.transpose(1, 2).reshape(B, T, C, hw), grad_v, grad_w.permute(2, 1, 3, 0).reshape(weight.shape),
            grad_b.t().reshape(bias.shape))
