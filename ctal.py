"""CTAL: the Cross-Task Affinity Learning module (EMA-Net), exact and in linear memory.

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

`impl='dense'` computes exactly that, in O(HW^2 (T C + T k^2)) time: at the NYUv2 1/4 scale (72 x 96)
each A_t is 6912 x 6912 (191 MB per image in float32). `DenseDiffusion` forms A_t and G one block of query
rows p at a time (the grouped conv restricted to rows p is a weighted sum of k*k shifted copies of those
rows of A), so only a block is ever held: memory O(rows T HW), not O(T HW^2).

`impl='linear'` computes the same numbers without ever forming an HW x HW tensor. Nothing nonlinear
sits between steps 1 and 4, so with d ranging over the k*k kernel offsets (zero padding):

  G_t[p, q] = b_t[p] + sum_{n,d} w_t[p, n, d] <f̂_n(p), f̂_n(q + d)>
  D_t[:, p] = b_t[p] * sum_q V_t[:, q]  +  sum_{n,d} w_t[p, n, d] K_{t,n,d} f̂_n(p)
  K_{t,n,d} = sum_q V_t[:, q] f̂_n(q + d)^T            (C x C; f̂_n(q + d) = 0 outside the map)

Stacking the shifted maps f̂_n(. + d) over (n, c, d) gives U = unfold(f̂) (T*C*k^2, HW), and
Z_t[(n, c, d), p] = w_t[p, n, d] f̂_n(p)[c] has the same shape. Then the whole module is two GEMMs:

  K = V U^T   (T*C, T*C*k^2)     then     D = K Z + outer(sum_q V, b)     (T*C, HW)

O(HW T^2 k^2 C^2) time. At 72 x 96, C = 128, T = 3, k = 3 that is about half the FLOPs of the dense form;
at 1/6 and 1/8 the dense form needs fewer (`choose_impl` picks per device). `LinearDiffusion` takes the
(n, c, d) rows one offset d at a time, K_d = V S_d^T and D = sum_d K_d Z_d, where S_d (the maps shifted by
d) is a strided view of the zero-padded maps and Z_d has the size of f̂: so no (T*C*k^2, HW) tensor is
ever written, memory is O(HW T C), and the time is the GEMMs'. Backward recomputes the Z_d; the only
activations saved are f̂, V and the small K_d.

Both implementations hold the SAME parameters, so a checkpoint trained with one loads into the other.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

IMPLS = ("auto", "dense", "linear")
FUSIONS = ("shared", "task")


# per FLOP, how much slower the dense form runs than the linear one on a CPU: its fusion (k*k passes over every
# affinity block) runs at memory speed, and its backward recomputes the affinities (measurements in `choose_impl`)
DENSE_COST_PER_FLOP = {"cpu": 1.7}


def choose_impl(num_tasks, channels, size, kernel_size=3, fusion="shared", device="cuda"):
    """What impl='auto' runs on a device of type `device` ('cpu', 'cuda', ...): 'dense' or 'linear'.

    The one with the lower cost = multiply-adds per image x the device's cost per FLOP. Both share
    normalisation, projections and the blend; they differ in the core:
      dense:  A_t (T C HW^2) + grouped conv (m T k^2 HW^2) + diffusion (T C HW^2)
      linear: K_d = V S_d^T over the zero-padded grid (T^2 k^2 C^2 L, L = (h + 2r)(w + 2r), r = k // 2)
              + sum_d K_d Z_d (T^2 k^2 C^2 HW)
    GPUs (dense and linear at the same cost per FLOP; not measured here): for T = 3, C = 128, k = 3, shared
    fusion, NYUv2 at 1/4 (72 x 96) -> linear, at 1/6 (48 x 64) and 1/8 (36 x 48) -> dense.
    CPU (dense costs 1.7x more per FLOP): linear from NYUv2 1/6 up, dense from 1/8 down. Measured fwd + bwd
    on a 2-core CPU (C = 128, T = 3, batch 2, fp32; time dense / time linear, and the FLOP ratio of the rule):
      9x12 0.20 (0.03) · 16x16 0.25 (0.07) · 24x32 0.50 (0.21) · 36x48 0.89 (0.49) · 48x64 1.44 (0.89)
      · 72x96 3.05 (2.02)
    i.e. 1.5-1.8x the FLOP ratio where the GEMMs dominate (more on small maps, where both are fast); any
    factor from 1.13 to 2.03 picks the faster one at every size measured. The choice depends only on the
    shapes and the device type, so a run, and its resume, always makes the same one.
    """
    T, C, k, (h, w) = num_tasks, channels, kernel_size, size
    m = T if fusion == "task" else 1
    hw, padded = h * w, (h + k - 1) * (w + k - 1)
    dense = hw * hw * (2 * T * C + m * T * k * k) * DENSE_COST_PER_FLOP.get(device, 1.0)
    linear = T * T * k * k * C * C * (padded + hw)
    return "linear" if linear < dense else "dense"


class CTAL(nn.Module):
    """Cross-Task Affinity Learning for T tasks at one feature size (h, w).

    feats: list of T tensors (B, C, h, w), or a dict task -> tensor (then a dict comes back).
    Returns the refined features, same shapes. The grouped conv has one kernel per query position,
    so the module is tied to the (h, w) it was built for.
    """

    def __init__(self, num_tasks, channels, size, kernel_size=3, gamma=0.05, fusion="shared",
                 impl="auto"):
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
        h, w = size
        hw = h * w
        self.num_tasks, self.channels, self.size = num_tasks, channels, (h, w)
        self.kernel_size, self.gamma, self.fusion_mode = kernel_size, float(gamma), fusion
        self.m = num_tasks if fusion == "task" else 1
        # group p reads channels p*T .. p*T+T-1 of M (the T affinity maps of position p) and writes
        # channels p*m .. p*m+m-1 of G: weight (HW*m, T, k, k), bias (HW*m,)
        self.fusion = nn.Conv2d(num_tasks * hw, hw * self.m, kernel_size, padding=kernel_size // 2,
                                groups=hw)
        self.projection = nn.ModuleList(
            nn.Conv2d(channels, channels, 3, padding=1) for _ in range(num_tasks))
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
        B, C, (h, w), T = xs[0].shape[0], self.channels, self.size, self.num_tasks
        x = torch.stack(xs, 1)                                               # (B, T, C, h, w)
        f_hat = F.normalize(x, dim=2).flatten(3)                             # (B, T, C, HW)
        v = torch.stack([proj(xi) for proj, xi in zip(self.projection, xs)], 1).flatten(3)
        if self.impl_for(x.device) == "dense":
            d = DenseDiffusion.apply(f_hat, v, self.fusion.weight, self.fusion.bias, (h, w))
        else:
            d = LinearDiffusion.apply(f_hat, v, self.fusion.weight, self.fusion.bias, (h, w))
        out = self.gamma * d.view(B, T, C, h, w) + (1 - self.gamma) * x      # (B, T, C, h, w)
        out = out.unbind(1)
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


class _Shifts:
    """The k*k shifted copies f̂(. + d) of one image's maps as strided views, never materialised.

    The maps are zero-padded by r = k // 2 to (h + 2r) x (w + 2r) = L positions and flattened, with
    `margin` = r (w + 2r) + r more zeros at both ends. On that flat layout a shift by d = (dy, dx) is a fixed
    offset, so the shifted copy of every padded position is the column range [off_d, off_d + L) of one
    matrix: a view a GEMM reads in place (unfold would write k*k copies). On the padding ring the view
    reads the neighbouring row, but every matrix it meets there (V, and dL/dV) is zero on the ring.
    """

    def __init__(self, size, k):
        (h, w), self.r = size, k // 2
        self.padded = (h + 2 * self.r, w + 2 * self.r)
        self.length = self.padded[0] * self.padded[1]
        self.margin = self.r * self.padded[1] + self.r
        self.extended = self.length + 2 * self.margin                     # pad(x, margin)'s length
        self.offsets = [self.margin + dy * self.padded[1] + dx              # d in unfold's (ky, kx) order
                        for dy in range(-self.r, self.r + 1) for dx in range(-self.r, self.r + 1)]
        self.center = len(self.offsets) // 2                               # d = (0, 0); d and k*k - 1 - d mirror

    def pad(self, x, margin=0):
        """(N, h, w) -> (N, L + 2 margin): the zero ring, flattened, `margin` zeros at both ends."""
        return F.pad(F.pad(x, (self.r,) * 4).flatten(1), (margin, margin))

    def shifted(self, ext, d):
        """(N, L) view of ext = pad(x, self.margin): position q of the padded grid holds x(q + d)."""
        return ext[:, self.offsets[d]:self.offsets[d] + self.length]

    def window(self, ext, d):
        """(..., h, w) view of ext = pad(x, self.margin) (..., L + 2 margin): at (y, x) it holds x((y, x) + d)."""
        return self.interior(ext[..., self.offsets[d]:self.offsets[d] + self.length])

    def interior(self, flat):
        """(..., L) on the padded grid -> (..., h, w) view: the map without its ring."""
        (ph, pw), r = self.padded, self.r
        return flat.unflatten(-1, (ph, pw))[..., r:ph - r, r:pw - r]


def _add_product(out, a, b):
    """out += a @ b. Low-precision operands (autocast) multiply in their dtype and add into out's float32,
    so the k*k partial products are rounded once, as one big GEMM's would be."""
    if a.dtype != out.dtype:
        out.add_(a @ b)
    elif out.dim() == 2:
        out.addmm_(a, b)
    else:
        out.baddbmm_(a, b)


def _autocast_state(device):
    """(device type, autocast on, its dtype) at a custom Function's forward, which its backward re-enters.
    A device without autocast (e.g. 'meta', for shape-only FLOP counts) has it off."""
    on = torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)
    return device, on, torch.get_autocast_dtype(device) if on else None


def _without_autocast(state, fn, *args):
    """fn(*args) with autocast off: the Functions choose their GEMMs' dtypes themselves (`_compute_dtypes`)."""
    if not state[1]:
        return fn(*args)
    with torch.autocast(state[0], enabled=False):
        return fn(*args)


def _compute_dtypes(autocast, dtype):
    """(dtype of the GEMMs, dtype of the sums): the autocast dtype if autocast is on, and float32 sums."""
    _, enabled, low = autocast
    gemm = low if enabled else dtype
    return gemm, torch.promote_types(gemm, torch.float32)


# bytes of one block of dense CTAL's affinity rows (B, T, rows, ~HW): on a CPU small enough to stay in the
# last-level cache through the k*k passes of the fusion (at 72x96, batch 2, 64-128 rows per image ran fastest on
# a 2-core EPYC with 32 MB of L3); on other devices (GPUs) big, so that the blocks are few kernel launches
DENSE_BLOCK_BYTES = {"cpu": 16 * 2**20}


class DenseDiffusion(torch.autograd.Function):
    """D of the literal algorithm, D_t[:, p] = sum_q V_t[:, q] G_t[p, q], computed block by block of query
    rows P: A_t[P, :] = f̂_t(P)^T f̂_t (a GEMM), G[P, :] = the grouped conv of those rows, written as what it
    is, a per-row weighted sum of the k*k shifted affinity maps (`_AffinityBlocks.fusion`), then
    D[:, P] = V G[P, :]^T (a GEMM). f_hat, v: (B, T, C, HW); weight (HW*m, T, k, k); bias (HW*m,).

    The numbers are the grouped conv's; the cost is not. PyTorch's CPU backward of a conv with thousands of
    groups runs far below GEMM speed, and the (T*HW, h, w) interleaved tensor and its gradient are copies
    of every affinity. A block of rows small enough to stay in the CPU's cache (`DENSE_BLOCK_BYTES`) avoids
    both, and keeps memory O(rows * T * HW): backward recomputes each block's A and G (one GEMM more
    than saving them) instead of keeping T HW x HW matrices. Autocast is handled as in `LinearDiffusion`.
    """

    @staticmethod
    def forward(ctx, f_hat, v, weight, bias, size):
        ctx.autocast, ctx.size = _autocast_state(f_hat.device.type), size
        ctx.save_for_backward(f_hat, v, weight, bias)
        return _without_autocast(ctx.autocast, _dense_forward, f_hat, v, weight, bias, size, ctx.autocast)

    @staticmethod
    def backward(ctx, grad_d):
        f_hat, v, weight, bias = ctx.saved_tensors
        grads = _without_autocast(ctx.autocast, _dense_backward, grad_d.reshape(v.shape), f_hat, v, weight, bias,
                                  ctx.size, ctx.autocast)
        return tuple(g.reshape(x.shape).to(x.dtype) for g, x in zip(grads, (f_hat, v, weight, bias))) + (None,)


def _dense_operands(f_hat, v, weight, bias, size, autocast):
    """The affinity blocks of f̂, V, and the grouped conv's parameters per query position p, w (HW, m, T, k*k)
    and b (HW, m), in the GEMM dtype; and the dtype sums are kept in."""
    gemm, acc = _compute_dtypes(autocast, f_hat.dtype)
    hw, k = f_hat.shape[-1], weight.shape[-1]
    w, b = _per_position(weight.to(gemm), hw), bias.to(gemm).view(hw, -1)
    return _AffinityBlocks(f_hat.to(gemm), size, k), v.to(gemm), w, b, acc


class _AffinityBlocks:
    """The affinity rows A_t[P, :] and fused rows G[P, :] of a batch, for blocks P of query positions, in
    buffers reused from block to block (a fresh large tensor per block costs page faults). A is kept on the
    zero-padded flat layout of `_Shifts`, so that A_t[p, q + d] for every interior q is a strided view."""

    def __init__(self, f_hat, size, k):
        B, T, C, hw = f_hat.shape
        self.f_hat, self.shifts, self.size = f_hat, _Shifts(size, k), size
        block_bytes = DENSE_BLOCK_BYTES.get(f_hat.device.type, 2**30)
        rows = max(1, min(hw, block_bytes // (B * T * self.shifts.extended * f_hat.element_size())))
        self.blocks = [slice(p, min(p + rows, hw)) for p in range(0, hw, rows)]
        self._a = f_hat.new_empty(B * T * rows * hw)
        self._a_ext = f_hat.new_zeros(B, T, rows, self.shifts.extended)   # the ring and margins stay zero

    def affinity(self, rows):
        """A_t[P, :] for P = rows (a slice), (B, T, n, L + 2 margin) on the padded layout."""
        B, T, _, hw = self.f_hat.shape
        n = rows.stop - rows.start
        a = torch.matmul(self.f_hat[..., rows].transpose(2, 3), self.f_hat,
                         out=self._a[:B * T * n * hw].view(B, T, n, hw))
        a_ext = self._a_ext[:, :, :n]
        self.shifts.window(a_ext, self.shifts.center).copy_(a.view(B, T, n, *self.size))
        return a_ext

    def fusion(self, rows, w, b, acc):
        """(G[P, :] (B, m, n, HW) in dtype acc, A_t[P, :] on the padded layout): the grouped conv of rows P,
        G[p, q] = b[p] + sum_{t,d} w[p, t, d] A_t[p, q + d]; w (n, m, T, k*k), b (n, m) of those rows."""
        a_ext = self.affinity(rows)
        n, m, T, kk = w.shape
        g = b.t().to(acc)[None, :, :, None, None].repeat(a_ext.shape[0], 1, 1, *self.size)   # (B, m, n, h, w)
        for j in range(m):
            for t in range(T):
                for d in range(kk):
                    g[:, j].addcmul_(self.shifts.window(a_ext[:, t], d), w[:, j, t, d, None, None])
        return g.flatten(3), a_ext


def _dense_forward(f_hat, v, weight, bias, size, autocast):
    """D (B, T, C, HW) of the literal algorithm, block by block of query rows; f_hat, v (B, T, C, HW)."""
    blocks, v, w, b, acc = _dense_operands(f_hat, v, weight, bias, size, autocast)
    B, T, C, hw = v.shape
    m = w.shape[1]
    v_m = v.reshape(B, m, -1, hw)                                     # (B, m, T*C/m, HW): the V_t each G serves
    d_rows = v.new_empty(B, hw, m, T * C // m, dtype=acc)             # D^T
    for rows in blocks.blocks:
        g, _ = blocks.fusion(rows, w[rows], b[rows], acc)
        d_rows[:, rows] = (g.to(v.dtype) @ v_m.transpose(2, 3)).transpose(1, 2)   # D[:, P]^T = G[P] V^T
    return d_rows.view(B, hw, T * C).transpose(1, 2).reshape(B, T, C, hw)


def _dense_backward(grad_d, f_hat, v, weight, bias, size, autocast):
    """Gradients of D w.r.t. f̂, V (B, T, C, HW), w (HW, m, T, k*k) and b (HW, m). Per block of rows:
    dG[P] = dD[:, P]^T V, then dA_t[p, q'] = sum_d w[p, t, d] dG[p, q' - d] (the fusion's transpose: the same
    shifted views, mirrored) and, as A_t = f̂_t^T f̂_t, df̂_t += f̂_t dA^T (rows P) + f̂_t(P) dA."""
    blocks, v, w, b, acc = _dense_operands(f_hat, v, weight, bias, size, autocast)
    f_hat, grad_d, shifts, n_max = blocks.f_hat, grad_d.to(v.dtype), blocks.shifts, blocks.blocks[0].stop
    B, T, C, hw = f_hat.shape
    m, kk = w.shape[1], w.shape[-1]
    v_m, grad_m = v.reshape(B * m, -1, hw), grad_d.reshape(B * m, -1, hw)
    grad_f, grad_v = torch.zeros_like(f_hat, dtype=acc), torch.zeros_like(v_m, dtype=acc)
    grad_w, grad_b = torch.empty_like(w, dtype=acc), torch.empty_like(b, dtype=acc)
    dg_ext = f_hat.new_zeros(B, m, n_max, shifts.extended)             # dG on the padded layout, zero ring
    da_buf = f_hat.new_empty(B * T * n_max * hw, dtype=acc)
    for rows in blocks.blocks:
        n = rows.stop - rows.start
        g, a_ext = blocks.fusion(rows, w[rows], b[rows], acc)
        grad_rows = grad_m[..., rows]                                 # (B*m, T*C/m, n): dD[:, P]
        dg = (grad_rows.transpose(1, 2) @ v_m).view(B, m, n, hw)      # dL/dG[P]
        _add_product(grad_v, grad_rows, g.to(v.dtype).flatten(0, 1))   # D[:, P] = V G[P]^T
        grad_b[rows] = dg.sum((0, 3), dtype=acc).t()
        shifts.window(dg_ext[:, :, :n], shifts.center).copy_(dg.view(B, m, n, *size))
        da = da_buf[:B * T * n * hw].view(B, T, n, *size).zero_()
        for j in range(m):
            dg_j = dg[:, j].view(B, n, *size)
            for t in range(T):
                for d in range(kk):                                   # G[p, q] += w[p, t, d] A_t[p, q + d]
                    grad_w[rows, j, t, d] = (dg_j * shifts.window(a_ext[:, t], d)).sum((0, 2, 3), dtype=acc)
                    da[:, t].addcmul_(shifts.window(dg_ext[:, j, :n], kk - 1 - d), w[rows, j, t, d, None, None])
        da = da.view(B, T, n, hw).to(f_hat.dtype)
        grad_f[..., rows] += f_hat @ da.transpose(2, 3)               # A_t[P, :] = f̂_t(P)^T f̂_t: both factors
        _add_product(grad_f.flatten(0, 1), f_hat[..., rows].flatten(0, 1), da.flatten(0, 1))
    return grad_f, grad_v, grad_w, grad_b


def _per_position(weight, hw):
    """The grouped conv's weight (HW*m, T, k, k) per query position p: (HW, m, T, k*k), entry [p, j, n, d] the
    weight of source task n at kernel offset d in fused map j (of m)."""
    return weight.view(hw, weight.shape[0] // hw, weight.shape[1], -1)


def _offset_weights(weight, hw, d):
    """w_t[p, n, d] for one kernel offset d, (m, T, 1, HW), from the grouped conv's weight (HW*m, T, k, k)."""
    return _per_position(weight, hw)[..., d].permute(1, 2, 0)[:, :, None]


class LinearDiffusion(torch.autograd.Function):
    """D of `DenseDiffusion` without any HW x HW tensor: per kernel offset d (S_d = the maps shifted by d, Z_d the
    weighted queries Z_d[(n, c), p] = w_t[p, n, d] f̂_n(p)[c]),

        K_d = V S_d^T   (T*C x T*C),     D = sum_d K_d Z_d + outer(sum_q V, b)

    which is K = V U^T, D = K Z of the module docstring with the (n, c, d) rows taken d by d: no
    (T*C*k^2, HW) tensor is ever formed, S_d is a view (`_Shifts`) and Z_d has the size of f̂. Forward
    saves f̂, V, the K_d (tiny) and the parameters. Images are processed one at a time (each GEMM is
    already T*C x T*C x HW). Under autocast the GEMMs run in the autocast dtype and their sums in float32;
    backward re-enters the same state, on whichever device the inputs live (what torch.amp.custom_bwd
    does for one device type).
    """

    @staticmethod
    def forward(ctx, f_hat, v, weight, bias, size):
        ctx.autocast, ctx.size = _autocast_state(f_hat.device.type), size
        d, kmats = _without_autocast(ctx.autocast, LinearDiffusion.batch_forward, f_hat, v, weight, bias, size,
                                     ctx.autocast)
        ctx.save_for_backward(f_hat, v, weight, bias, kmats)
        return d                                                      # (B, T, C, HW)

    @staticmethod
    def backward(ctx, grad_d):
        f_hat, v, weight, bias, kmats = ctx.saved_tensors
        grads = _without_autocast(ctx.autocast, LinearDiffusion.batch_backward, grad_d.reshape(v.shape), f_hat, v,
                                  weight, bias, kmats, ctx.size, ctx.autocast)
        return tuple(g.to(x.dtype) for g, x in zip(grads, (f_hat, v, weight, bias))) + (None,)

    @staticmethod
    def batch_forward(f_hat, v, weight, bias, size, autocast):
        gemm, acc = _compute_dtypes(autocast, f_hat.dtype)
        b = bias.view(f_hat.shape[-1], -1).t()[:, None]               # (m, 1, HW): b_t[p]
        kmats, outs = [], []
        for f_i, v_i in zip(f_hat.to(gemm), v.to(gemm)):              # one image: (T, C, HW)
            kmat, d = _linear_forward(f_i, v_i, weight.to(gemm), size, acc)
            kmats.append(kmat)
            outs.append(d)
        return torch.stack(outs) + v.sum(3, keepdim=True) * b, torch.stack(kmats)   # + b_t[p] sum_q V_t[:, q]

    @staticmethod
    def batch_backward(grad_d, f_hat, v, weight, bias, kmats, size, autocast):
        gemm, acc = _compute_dtypes(autocast, f_hat.dtype)
        grads = [_linear_backward(g.to(gemm), f.to(gemm), vi.to(gemm), weight.to(gemm), kmat, size, acc)
                 for g, f, vi, kmat in zip(grad_d, f_hat, v, kmats)]
        grad_f = torch.stack([g[0] for g in grads])
        grad_w = sum(g[2] for g in grads)
        # the bias term b_t[p] * sum_q V_t[:, q]
        b = bias.view(f_hat.shape[-1], -1).t()[:, None]               # (m, 1, HW)
        grad_v = torch.stack([g[1] for g in grads]) + (grad_d * b).sum(3, keepdim=True)
        grad_b = torch.einsum("btcp,btc->tp", grad_d.to(acc), v.sum(3).to(acc))       # (T, HW)
        grad_b = grad_b if b.shape[0] > 1 else grad_b.sum(0, keepdim=True)           # (m, HW)
        return grad_f, grad_v, grad_w, grad_b.t().reshape(bias.shape)


def _padded_maps(f_hat, v, size, k):
    """The `_Shifts` of one image's maps, f̂ on its extended layout (TC, L + 2 margin) and V zero-padded (TC, L):
    the operands of K_d = V S_d^T, S_d = shifts.shifted(f̂_ext, d)."""
    T, C, _ = f_hat.shape
    shifts = _Shifts(size, k)
    return shifts, shifts.pad(f_hat.reshape(T * C, *size), shifts.margin), shifts.pad(v.reshape(T * C, *size))


def _linear_forward(f_hat, v, weight, size, acc):
    """The K_d = V S_d^T (k*k, T*C, T*C) and D = sum_d K_d Z_d (T, C, HW) of one image (no bias term).
    f_hat, v: (T, C, HW); `acc` the dtype D is summed in."""
    T, C, hw = f_hat.shape
    m = weight.shape[0] // hw
    shifts, f_ext, v_pad = _padded_maps(f_hat, v, size, weight.shape[-1])
    kmats = torch.stack([v_pad @ shifts.shifted(f_ext, d).t() for d in range(len(shifts.offsets))])
    d_out = f_hat.new_zeros(m, T * C // m, hw, dtype=acc)             # D_t = sum_d K_d,t Z_d,t (m = T) or D
    for d, kmat in enumerate(kmats):
        z = (f_hat * _offset_weights(weight, hw, d)).reshape(m, T * C, hw)        # Z_d: (m, TC, HW)
        _add_product(d_out, kmat.view(m, -1, T * C), z)
    return kmats, d_out.view(T, C, hw)


def _linear_backward(grad_d, f_hat, v, weight, kmats, size, acc):
    """Gradients of one image's D = sum_d K_d Z_d, K_d = V S_d^T w.r.t. f̂, V and the fusion weight;
    grad_d, f_hat, v: (T, C, HW). Every temporary has the size of f̂ (Z_d, dL/dZ_d) or of K_d."""
    T, C, hw = f_hat.shape
    m, k = weight.shape[0] // hw, weight.shape[-1]
    shifts, f_ext, v_pad = _padded_maps(f_hat, v, size, k)
    grad_f_ext = torch.zeros_like(f_ext, dtype=acc)                   # dL/d(padded f̂), all offsets
    grad_v_pad = torch.zeros_like(v_pad, dtype=acc)
    grad_f = torch.zeros_like(f_hat, dtype=acc)                       # through Z
    grad_w = f_hat.new_empty(k * k, m, T, hw, dtype=acc)
    g = grad_d.reshape(m, -1, hw)                                     # (m, TC/m, HW)
    for d, kmat in enumerate(kmats):
        w_d = _offset_weights(weight, hw, d)                          # (m, T, 1, HW)
        z = (f_hat * w_d).reshape(m, T * C, hw)                       # Z_d, recomputed
        grad_k = (g @ z.transpose(1, 2)).reshape(T * C, T * C)        # dL/dK_d
        grad_z = (kmat.view(m, -1, T * C).transpose(1, 2) @ g).view(m, T, C, hw)     # dL/dZ_d
        grad_f += (grad_z * w_d).sum(0)                               # through Z_d = w_d f̂
        grad_w[d] = (grad_z * f_hat).sum(2)                           # (m, T, HW)
        _add_product(grad_v_pad, grad_k, shifts.shifted(f_ext, d))    # through K_d = V S_d^T
        _add_product(shifts.shifted(grad_f_ext, d), grad_k.t(), v_pad)
    grad_f += shifts.window(grad_f_ext, shifts.center).reshape(T, C, hw)
    grad_v = shifts.interior(grad_v_pad).reshape(T, C, hw)
    return grad_f, grad_v, grad_w.permute(3, 1, 2, 0).reshape(weight.shape)


def fusion_parameter_counts(num_tasks, size, kernel_size=3, fusion="shared"):
    """(grouped-conv weights, biases, weights of a standard conv over the joint affinity tensor M).

    The papers' example, NYUv2 at 1/4 (72 x 96), T = 3, k = 3: 186,624 + 6,912 (their "187K")
    against 6,912*3 * 6,912 * 9 ~ 1.29 B for a dense Conv2d(T*HW, HW, k).
    """
    hw = size[0] * size[1]
    m = num_tasks if fusion == "task" else 1
    grouped = hw * m * num_tasks * kernel_size ** 2
    standard = (num_tasks * hw) * (hw * m) * kernel_size ** 2
    return grouped, hw * m, standard


if __name__ == "__main__":
    # smoke check: both implementations agree on a small example
    torch.manual_seed(0)
    ctal = CTAL(3, 16, (6, 8), impl="dense").double()
    feats = [torch.randn(2, 16, 6, 8, dtype=torch.float64) for _ in range(3)]
    with torch.no_grad():
        dense = ctal(feats)
        ctal.impl = "linear"
        linear = ctal(feats)
    err = max(float((a - b).abs().max() / a.abs().max()) for a, b in zip(dense, linear))
    print(f"max relative difference dense vs linear: {err:.2e}")
    print("fusion parameters at 72x96, T=3, k=3: %d weights + %d biases; standard conv: %.3g"
          % fusion_parameter_counts(3, (72, 96)))
