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

`impl='dense'` computes exactly that: O(HW^2 (T C + T k^2)) time and O(T HW^2) memory, e.g. at the
NYUv2 1/4 scale (72 x 96) each A_t is 6912 x 6912 = 191 MB per image in float32.

`impl='linear'` computes the same numbers without ever forming an HW x HW tensor. Nothing nonlinear
sits between steps 1 and 4, so with d ranging over the k*k kernel offsets (zero padding):

  G_t[p, q] = b_t[p] + sum_{n,d} w_t[p, n, d] <f̂_n(p), f̂_n(q + d)>
  D_t[:, p] = b_t[p] * sum_q V_t[:, q]  +  sum_{n,d} w_t[p, n, d] K_{t,n,d} f̂_n(p)
  K_{t,n,d} = sum_q V_t[:, q] f̂_n(q + d)^T            (C x C; f̂_n(q + d) = 0 outside the map)

Stacking the shifted maps f̂_n(. + d) over (n, c, d) gives U = unfold(f̂) (T*C*k^2, HW), and
Z_t[(n, c, d), p] = w_t[p, n, d] f̂_n(p)[c] has the same shape. Then the whole module is two GEMMs:

  K = V U^T   (T*C, T*C*k^2)     then     D = K Z + outer(sum_q V, b)     (T*C, HW)

O(HW T^2 k^2 C^2) time, O(HW T C k^2) memory. At 72 x 96, C = 128, T = 3, k = 3 that is about half
the FLOPs of the dense form; at 1/6 and 1/8 the dense form needs fewer (`choose_impl` picks per device).
The backward
pass recomputes U and Z (cheap reshapes and products) instead of keeping them, so the only
activations saved are f̂, V and the small K.

Both implementations hold the SAME parameters, so a checkpoint trained with one loads into the other.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F

IMPLS = ("auto", "dense", "linear")
FUSIONS = ("shared", "task")


# per FLOP, how much slower the dense form runs than the linear one: PyTorch's CPU backward of a grouped
# conv with thousands of groups runs far below GEMM speed (measurements in `choose_impl`)
DENSE_COST_PER_FLOP = {"cpu": 2.0}


def choose_impl(num_tasks, channels, size, kernel_size=3, fusion="shared", device="cuda"):
    """What impl='auto' runs on a device of type `device` ('cpu', 'cuda', ...): 'dense' or 'linear'.

    The one with the lower cost = multiply-adds per image x the device's cost per FLOP. Both share
    normalisation, projections and the blend; they differ in the core:
      dense:  A_t (T C HW^2) + grouped conv (m T k^2 HW^2) + diffusion (T C HW^2)
      linear: K = V U^T (T^2 k^2 C^2 HW) + K Z (T^2 k^2 C^2 HW)
    With dense costing r times more per FLOP, linear wins when HW > 2 T k^2 C^2 / (r (2 C + m k^2)).
    GPUs (r = 1): for T = 3, C = 128, k = 3, shared fusion the break-even is HW ~ 3,338: NYUv2 at 1/4
    (72 x 96 = 6,912) -> linear, at 1/6 (48 x 64 = 3,072) and 1/8 (36 x 48 = 1,728) -> dense.
    CPU (r = 2): break-even HW ~ 1,669, so linear from NYUv2 1/8 up, dense on small maps. Measured fwd +
    bwd on a 2-core CPU (C = 128, T = 3, batch 2, fp32; time dense / time linear, FLOP ratio):
      9x12 0.26 (0.03) · 16x16 0.33 (0.08) · 24x32 0.80 (0.23) · 36x48 1.00 (0.52) · 48x64 2.01 (0.92)
      · 72x96 4.4 (2.07)
    i.e. about twice the FLOP ratio once the maps are large enough for the GEMMs to dominate.
    The backward pass costs about twice the forward for both, so the same rule holds for training
    (memory always favours linear). The choice depends only on the shapes and the device type, so a
    run, and its resume, always makes the same one.
    """
    T, C, k, hw = num_tasks, channels, kernel_size, size[0] * size[1]
    m = T if fusion == "task" else 1
    dense = hw * hw * (2 * T * C + m * T * k * k) * DENSE_COST_PER_FLOP.get(device, 1.0)
    linear = 2 * T * T * k * k * C * C * hw
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
            d = dense_diffusion(f_hat, v, self.fusion.weight, self.fusion.bias, (h, w))
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


def dense_diffusion(f_hat, v, weight, bias, size):
    """The literal algorithm: D_t = V_t G_t^T with G from the grouped conv over interleaved affinities.

    f_hat, v: (B, T, C, HW); weight (HW*m, T, k, k); bias (HW*m,). Returns D (B, T, C, HW).
    """
    B, T, C, hw = f_hat.shape
    h, w = size
    m = weight.shape[0] // hw
    a = f_hat.transpose(2, 3) @ f_hat                                 # (B, T, HW, HW): A_t[p, q]
    joint = a.transpose(1, 2).reshape(B, hw * T, h, w)                # (B, HW*T, h, w): channel p*T + t
    g = F.conv2d(joint, weight, bias, padding=weight.shape[-1] // 2, groups=hw)  # (B, HW*m, h, w)
    g = g.view(B, hw, m, hw).transpose(1, 2)                          # (B, m, HW, HW): G_t[p, q]
    return v @ g.transpose(2, 3)                                      # (B, T, C, HW), m broadcast over T


def _shifted_maps(f_hat, size, k):
    """U: the k*k shifted copies of every normalised map, zero outside. (B, T*C*k*k, HW), rows (n, c, d)."""
    B, T, C, hw = f_hat.shape
    return F.unfold(f_hat.reshape(B, T * C, *size), k, padding=k // 2)


def _weighted_queries(f_hat, weight):
    """Z_t[(n, c, d), p] = w_t[p, n, d] f̂_n(p)[c]. (B, m, T*C*k*k, HW), rows ordered as in U."""
    B, T, C, hw = f_hat.shape
    m, k = weight.shape[0] // hw, weight.shape[-1]
    w = weight.view(hw, m, T, k * k).permute(1, 2, 3, 0)              # (m, T, k*k, HW)
    z = f_hat[:, None, :, :, None, :] * w[None, :, :, None, :, :]     # (B, m, T, C, k*k, HW)
    return z.reshape(B, m, T * C * k * k, hw)


class LinearDiffusion(torch.autograd.Function):
    """D of `dense_diffusion`, computed as K = V U^T, D = K Z + outer(sum_q V, b), in O(HW) memory.

    Forward saves f̂, V, K (T*C x T*C*k^2 per image, tiny) and the parameters; backward recomputes U
    and Z. Images are processed one at a time: each GEMM is already large (K = T*C*k^2 = 3,456 deep at
    C = 128, T = 3), and the (T*C*k^2, HW) temporaries then cost the memory of one image, whatever the
    batch. Autocast: the GEMMs run in the ambient autocast dtype; backward re-enters the same state
    (what torch.amp.custom_bwd does, but for whichever device the inputs live on).
    """

    @staticmethod
    def forward(ctx, f_hat, v, weight, bias, size):
        hw = f_hat.shape[-1]
        b = bias.view(hw, -1).t()[:, None]                            # (m, 1, HW): b_t[p]
        kmats, outs = [], []
        for f_i, v_i in zip(f_hat.split(1), v.split(1)):               # one image: (1, T, C, HW)
            kmat, d = _linear_forward(f_i, v_i, weight, size)
            kmats.append(kmat)
            outs.append(d)
        d = torch.cat(outs) + v.sum(3, keepdim=True) * b              # + b_t[p] sum_q V_t[:, q]
        dev = f_hat.device.type
        ctx.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))
        ctx.size = size
        ctx.save_for_backward(f_hat, v, weight, bias, torch.cat(kmats))
        return d                                                      # (B, T, C, HW)

    @staticmethod
    def backward(ctx, grad_d):
        f_hat, v, weight, bias, kmat = ctx.saved_tensors
        dev, enabled, dtype = ctx.autocast
        hw = f_hat.shape[-1]
        grad_d = grad_d.reshape(v.shape)
        with torch.autocast(dev, dtype=dtype, enabled=enabled):
            grad_f, grad_v, grad_w = [], [], 0
            for i in range(f_hat.shape[0]):
                gf, gv, gw = _linear_backward(grad_d[i:i + 1], f_hat[i:i + 1], v[i:i + 1], weight,
                                              kmat[i:i + 1], ctx.size)
                grad_f.append(gf)
                grad_v.append(gv)
                grad_w = grad_w + gw
            # the bias term b_t[p] * sum_q V_t[:, q]
            b = bias.view(hw, -1).t()[:, None]                        # (m, 1, HW)
            grad_v = torch.cat(grad_v) + (grad_d * b).sum(3, keepdim=True)
            grad_b = torch.einsum("btcp,btc->tp", grad_d, v.sum(3))  # (T, HW)
            grad_b = grad_b if b.shape[0] > 1 else grad_b.sum(0, keepdim=True)   # (m, HW)
        grads = (torch.cat(grad_f), grad_v, grad_w, grad_b.t().reshape(bias.shape))
        return tuple(g.to(x.dtype) for g, x in zip(grads, (f_hat, v, weight, bias))) + (None,)


def _linear_forward(f_hat, v, weight, size):
    """K = V U^T and D = K Z (without the bias term) for one image. f_hat, v: (1, T, C, HW)."""
    _, T, C, hw = f_hat.shape
    u = _shifted_maps(f_hat, size, weight.shape[-1])                  # (1, TCkk, HW)
    kmat = v.reshape(1, T * C, hw) @ u.transpose(1, 2)                # (1, TC, TCkk): K_{t,n,d}
    del u
    z = _weighted_queries(f_hat, weight)                              # (1, m, TCkk, HW)
    if z.shape[1] == 1:                                               # shared G: one GEMM for all tasks
        d = (kmat @ z[:, 0]).view(1, T, C, hw)
    else:                                                             # D_t = K_t Z_t
        d = kmat.view(1, T, C, -1) @ z                                # (1, T, C, HW)
    return kmat, d


def _linear_backward(grad_d, f_hat, v, weight, kmat, size):
    """Gradients of D = K Z, K = V U^T for one image w.r.t. f̂, V and the fusion weight.

    Temporaries of size (T*C*k^2, HW) are recomputed or formed one at a time and dropped at once.
    """
    _, T, C, hw = f_hat.shape
    k = weight.shape[-1]
    m = weight.shape[0] // hw
    z = _weighted_queries(f_hat, weight)                              # (1, m, TCkk, HW), recomputed
    if m == 1:
        grad_k = grad_d.reshape(1, T * C, hw) @ z[:, 0].transpose(1, 2)           # (1, TC, TCkk)
    else:
        grad_k = (grad_d @ z.transpose(2, 3)).reshape(1, T * C, -1)               # (1, TC, TCkk)
    del z
    u = _shifted_maps(f_hat, size, k)                                 # (1, TCkk, HW), recomputed
    grad_v = (grad_k @ u).view(1, T, C, hw)                           # through K = V U^T
    del u
    grad_u = grad_k.transpose(1, 2) @ v.reshape(1, T * C, hw)         # (1, TCkk, HW)
    grad_f = F.fold(grad_u, size, k, padding=k // 2).view(1, T, C, hw)   # fold is unfold's adjoint
    del grad_u
    if m == 1:                                                        # through D = K Z
        grad_z = (kmat.transpose(1, 2) @ grad_d.reshape(1, T * C, hw))[:, None]  # (1, 1, TCkk, HW)
    else:
        grad_z = kmat.view(1, T, C, -1).transpose(2, 3) @ grad_d                  # (1, T, TCkk, HW)
    grad_z = grad_z.view(1, m, T, C, k * k, hw)
    w = weight.view(hw, m, T, k * k).permute(1, 2, 3, 0)              # (m, T, kk, HW)
    grad_f = grad_f + torch.einsum("bmncdp,mndp->bncp", grad_z, w)    # through Z = w * f̂
    grad_w = torch.einsum("bmncdp,bncp->mndp", grad_z, f_hat)         # (m, T, kk, HW)
    return grad_f, grad_v, grad_w.permute(3, 0, 1, 2).reshape(weight.shape)


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
