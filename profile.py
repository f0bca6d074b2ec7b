"""The papers' resource table (params, FLOPs, time, memory) for every model, and the CTAL micro-benchmark.

    python profile.py --scale 1/6 [--dataset nyuv2|cityscapes|pascal|nyud] [--models stl mtl ctal_ss ...]
                      [--batch 8] [--device cpu|cuda] [--ctal-impl auto|dense|linear] [--train] [--json F]
    python profile.py --module ctal --scale 1/4 [--batch 2] [--fit-gb 20]

Model table (default): for each model, built by model.build_model with random weights,
  params      count, and relative to STL (the papers' "Rel Param.")
  GFLOP/img   forward FLOPs of one image, counted with torch.utils.flop_counter.FlopCounterMode (GEMMs and
              convs: dense CTAL's grouped conv too)
  GMAC@8      the same in the papers' convention: multiply-accumulates for a batch of 8 (read it against
              their FLOPs column; CTAL's figure depends on --ctal-impl, the papers' is the dense form)
  val time    seconds to run the whole validation split (NYUv2 654 images) at --batch, extrapolated from
              timed forward passes after a warm-up (CUDA events + synchronisation on GPU)
  peak MB     peak memory above the weights: torch.cuda.max_memory_allocated on GPU; on CPU the peak
              resident set of a fresh subprocess per measurement, so one model cannot hide another's
  --train     adds a forward+backward step's time and peak memory
with the papers' figures beside ours where the papers give them (their time is on one RTX A5000);
`--dataset nyud` is the ATRC / TIF papers' NYUD-v2 setting (40 classes, edge, 425x560).
PAP-Net is printed twice: with one propagation iteration (the authors' code default) and with two,
which is what the papers' 521 G matches.

CTAL micro-benchmark (--module ctal): dense vs linear forward+backward at NYUv2 shapes (288x384 input, so
72x96 at 1/4, 48x64 at 1/6, 36x48 at 1/8; C = 128, T = 3; --img-size 96x128: the synthetic set's): the best of --iters
steps, FLOPs as executed (FlopCounterMode: GEMMs and convs; the linear form's padding ring included), the rate
as a fraction of the fp32 GEMM rate measured in the same process between the steps (the linear form's rate
counts the work of its unfold form, `unfold_form_flops`, not its padding), peak memory, the ratios, the cost
per FLOP they imply against ctal.DENSE_COST_PER_FLOP, and what impl='auto' picks; with --fit-gb the largest
batch each implementation fits in that memory at 1/4 and 1/2 scale.
"""
import importlib.util
import os
import sysconfig


def _reexport_stdlib_profile():
    """This file's name shadows the standard library's `profile`, which cProfile (and through it
    torch.compile) imports whenever this folder is on sys.path: hand them the real module's API."""
    path = os.path.join(sysconfig.get_paths()["stdlib"], "profile.py")
    spec = importlib.util.spec_from_file_location("_stdlib_profile", path)
    stdlib = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stdlib)
    return stdlib.run, stdlib.runctx, stdlib.Profile, stdlib._Utils


run, runctx, Profile, _Utils = _reexport_stdlib_profile()

import argparse  # noqa: E402  (after the re-export, so cProfile works even mid-import)
import json  # noqa: E402
import math  # noqa: E402
import operator  # noqa: E402
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from fractions import Fraction  # noqa: E402

import torch  # noqa: E402

from config import parse_fraction, parse_size  # noqa: E402
from ctal import CTAL, DENSE_COST_PER_FLOP, choose_impl, core_flops  # noqa: E402
from data import DATASETS  # noqa: E402

# model.py is imported inside the functions that use it: it pulls in torchvision,
# which imports cProfile, which imports `profile` -- this file -- again; importing it up here would
# make that second import circular.

NYUV2_SIZE = DATASETS["nyuv2"]["size"]
# The papers' figures in their NYUD-v2 setting (dataset nyud): model -> (Params (M), GFLOPs as printed =
# multiply-accumulates per image) (TIF Tab. 3, ATRC Tab. 1).
PAPER_NYUD = {"tif": (5.27, 16.6), "atrc": (5.06, 25.76), "atrc_mtl": (4.52, 17.59), "atrc_stl": (16.09, 40.93)}
# The papers' resource table, NYUv2 with HRNet-W18 (EMA-Net Tab. 3 = CTAL Tab. 5):
# (model, scale) -> (params relative to STL, GMAC for a batch of 8, seconds for the val split on one
# RTX A5000, delta_m). PAP-Net's 521 G matches two propagation iterations (row 'papnet x2').
PAPER_CNN = {
    ('mtl', '1/4'): (0.346, 42, 2.82, -1.89),
    ('papnet x2', '1/4'): (0.404, 521, 17.73, 0.04),
    ('padnet', '1/4'): (1.023, 484, 6.13, 0.27),
    ('ctal_ss', '1/4'): (0.513, 537, 13.85, 2.64),
    ('ctal_ss', '1/6'): (0.504, 194, 5.97, 1.70),
    ('ctal_ss', '1/8'): (0.500, 124, 4.37, 1.50),
    ('mtinet', '1/4'): (1.070, 65, 4.45, 3.04),
    ('ctal_ms', '1/4'): (0.944, 525, 14.26, 4.76),
    ('ctal_ms', '1/6'): (0.935, 190, 6.48, 3.62),
    ('ctal_ms', '1/8'): (0.932, 117, 5.23, 3.43),
}
# Transformer path (CTAL Tabs. 2 and 3): model -> (Params (M), FLOPs (G)) as printed. On PASCAL the
# printed Params of mtl / padnet / ctal_ss equal our FLOP-derived figures and vice versa (see README).
PAPER_SWIN = {
    'nyuv2': {'stl': (166.8, 148.2), 'mtl': (68.8, 60.5), 'padnet': (65.6, 57.4), 'papnet': (55.8, 49.2),
              'ctal_ss': (57.0, 49.9)},
    'pascal': {'stl': (278.0, 477.5), 'mtl': (108.7, 82.1), 'padnet': (112.3, 88.5),
               'papnet': (100.5, 64.9), 'ctal_ss': (114.1, 62.2)},
}


def parse_scale(text):
    """'1/4' (or 0.25) -> Fraction(1, 4), in (0, 1]."""
    scale = parse_fraction(text).limit_denominator(64)
    if not 0 < scale <= 1:
        raise argparse.ArgumentTypeError(f"--scale must be in (0, 1], got {text!r}")
    return scale


GEMM_SIZE = 2048             # the square fp32 matrix product whose rate the CTAL steps are compared with


def positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value


def check_json_path(path):
    """Fail before measuring, not after, when the --json file cannot be written."""
    folder = os.path.dirname(os.path.abspath(path))
    if os.path.isdir(path) or not os.path.isdir(folder) or not os.access(folder, os.W_OK):
        return f"--json {path!r}: cannot write there (expected a file path in an existing, writable folder)"
    return None


def scaled_size(size, scale):
    return round(size[0] * scale), round(size[1] * scale)


def flop_counter():
    """FlopCounterMode with the in-place GEMMs (addmm_, baddbmm_: the linear CTAL sums its per-offset products
    with them) counted like their out-of-place forms, the only ones it knows, and a conv backward that counts
    `groups` (its own formula does not: dense CTAL's grouped conv, one group per position, came out HW times
    too large)."""
    from torch.utils.flop_counter import FlopCounterMode
    return FlopCounterMode(display=False, custom_mapping={
        torch.ops.aten.addmm_: _inplace_gemm_flop, torch.ops.aten.baddbmm_: _inplace_gemm_flop,
        torch.ops.aten.convolution_backward: _conv_backward_flop})


def _inplace_gemm_flop(self_shape, a_shape, b_shape, *args, **kwargs):
    """out += a @ b with a (..., m, k), b (..., k, n): 2 m k n per matrix of the batch."""
    return 2 * math.prod(a_shape) * b_shape[-1]


def _conv_backward_flop(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation, transposed,
                        output_padding, groups, output_mask, *args, **kwargs):
    """Each gradient of a conv (input, weight) costs what its forward does: 2 x the multiply-adds of the
    positions the kernel visits (the output's, or a transposed conv's input's) x prod(w_shape[1:]), which
    already holds C_in / groups (C_out / groups transposed)."""
    forward = 2 * math.prod(x_shape if transposed else grad_out_shape) * math.prod(w_shape[1:])
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def measure(step, device, iters, warmup=1):
    """(seconds per call of `step`, peak bytes allocated above what was live before the first call)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        mem0 = torch.cuda.memory_allocated(device)
        for _ in range(warmup):
            step()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        torch.cuda.synchronize(device)
        return start.elapsed_time(end) / 1e3 / iters, torch.cuda.max_memory_allocated(device) - mem0
    rss0 = reset_peak_rss()
    for _ in range(warmup):
        step()
    t0 = time.perf_counter()
    for _ in range(iters):
        step()
    seconds = (time.perf_counter() - t0) / iters
    return seconds, peak_rss() - rss0


def _proc_status_bytes(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def _lifetime_peak_rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024            # Linux reports KiB


def reset_peak_rss():
    """The resident set now, with the process's peak reset to it where Linux allows (writing 5 to
    /proc/self/clear_refs resets VmHWM); otherwise the lifetime peak, which then includes e.g. building
    the model (Swin's construction peaks above its forward pass, which would then read as 0)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return _proc_status_bytes("VmRSS")
    except (OSError, StopIteration):
        return _lifetime_peak_rss()


def peak_rss():
    """The peak resident set since `reset_peak_rss` (where the reset worked; else since the start)."""
    try:
        return _proc_status_bytes("VmHWM")
    except (OSError, StopIteration):
        return _lifetime_peak_rss()


def isolated(function, **kwargs):
    """Run profile.<function>(**kwargs) in a fresh interpreter and return its (JSON) result, so that
    the peak resident set it measures on CPU is its own and not an earlier measurement's."""
    code = ("import json, sys, profile; "
            f"print(json.dumps(profile.{function}(**json.loads(sys.argv[1]))))")
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-c", code, json.dumps(kwargs)], cwd=here,
                          capture_output=True, text=True)
    last = proc.stderr.strip().splitlines()[-1] if proc.stderr.strip() else ""
    if proc.returncode != 0 and last.startswith("ValueError: "):    # the input refused (e.g. by build_model)
        raise ValueError(last[len("ValueError: "):])
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark subprocess {function}({kwargs}) failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def run_measurement(function, device, **kwargs):
    """Measure in a subprocess on CPU (memory isolation), in this process on CUDA (one context)."""
    if device == "cpu":
        return isolated(function, device=device, **kwargs)
    return globals()[function](device=device, **kwargs)


# ------------------------------------------------------------------------------------- model table

def model_stats(name, dataset, img_size, scale, ctal_impl, pap_iters, batch, device, iters, train):
    """Params, forward FLOPs per image, and time + peak memory of one batch (eval, or train step)."""
    from model import build_model
    torch.manual_seed(0)
    info = DATASETS[dataset]
    model = build_model(name, info["tasks"], tuple(img_size), backbone=info["backbone"],
                        scale=scale, ctal_impl=ctal_impl, pap_iters=pap_iters).to(device)
    params = sum(p.numel() for p in model.parameters())
    images = torch.rand(batch, 3, *img_size, device=device)
    model.train(train)

    def eval_step():
        with torch.no_grad():
            model(images)

    def train_step():
        out = model(images)
        loss = sum(o.float().mean() for o in out.values() if torch.is_tensor(o))   # not 'initial' / 'aux'
        loss.backward()
        model.zero_grad(set_to_none=True)

    seconds, peak = measure(train_step if train else eval_step, device, iters)   # before anything else runs
    model.eval()
    with flop_counter() as counter, torch.no_grad():
        model(images[:1])
    flops = counter.get_total_flops()                                  # forward, one image
    return dict(params=params, flops_per_image=flops, seconds_per_batch=seconds, peak_bytes=peak)


def default_models(backbone, dataset):
    """The rows of the table: every model of the backbone; ATRC's baselines only where its paper counts them."""
    from model import MODEL_NAMES, SWIN_MODEL_NAMES
    names = SWIN_MODEL_NAMES if backbone == "swinv2_s" else MODEL_NAMES
    rows = []
    for name in names:
        if name in ("atrc_stl", "atrc_mtl") and dataset != "nyud":
            continue
        rows.append(name)
        if name == "papnet":
            rows.append("papnet x2")
    return rows


def run_model_table(args):
    from model import build_model
    info = DATASETS[args.dataset]
    img_size = args.img_size or info["size"]
    backbone = info["backbone"]
    val_images = args.val_images or info["val_images"]
    scale_key = f"{args.scale.numerator}/{args.scale.denominator}"
    models = args.models or default_models(backbone, args.dataset)
    print(f"{args.dataset} {img_size[0]}x{img_size[1]} ({backbone}), distillation scale {scale_key}, "
          f"batch {args.batch}, device {args.device}, ctal_impl {args.ctal_impl}; val split "
          f"{val_images} images")
    results, stl_params, t0 = {}, None, time.time()
    for row in ["stl"] + [m for m in models if m != "stl"]:
        name, pap_iters = ("papnet", 2) if row == "papnet x2" else (row, 1)
        common = dict(name=name, dataset=args.dataset, img_size=list(img_size), scale=float(args.scale),
                      ctal_impl=args.ctal_impl, pap_iters=pap_iters, batch=args.batch, iters=args.iters)
        if row == "stl" and "stl" not in models:   # only its parameter count, for the relative column
            torch.manual_seed(0)
            stl = build_model("stl", info["tasks"], tuple(img_size), backbone=backbone)
            stl_params = sum(p.numel() for p in stl.parameters())
            continue
        print(f"  measuring {row} ...", end="\r", flush=True)        # a row takes up to minutes on a CPU
        r = run_measurement("model_stats", args.device, train=False, **common)
        if args.train:
            t = run_measurement("model_stats", args.device, train=True, **common)
            r.update(train_seconds=t["seconds_per_batch"], train_peak_bytes=t["peak_bytes"])
        if row == "stl":
            stl_params = r["params"]
        r["rel_params"] = r["params"] / stl_params
        r["gmac_batch8"] = r["flops_per_image"] / 2 * 8 / 1e9
        r["val_seconds"] = r["seconds_per_batch"] * val_images / args.batch
        results[row] = r
        print_model_row(row, r, args, scale_key, header=len(results) == 1, elapsed=time.time() - t0)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(config={k: str(v) for k, v in vars(args).items()}, models=results), f, indent=2)
    return results


def paper_figures(row, args, scale_key):
    """The papers' figures for this row, as a short string ('' where they give none)."""
    info = DATASETS[args.dataset]
    if args.img_size and tuple(args.img_size) != info["size"]:
        return ""
    if info["backbone"] == "hrnet18" and args.dataset == "nyuv2":
        if (row, scale_key) in PAPER_CNN:
            rel, gmac, sec, dm = PAPER_CNN[(row, scale_key)]
            return f"rel {rel:.3f}  {gmac:4d} G  {sec:6.2f} s  dm {dm:+.2f}"
        return "rel 1.000" if row == "stl" else ""
    if args.dataset == "nyud" and row in PAPER_NYUD:
        return f"Params {PAPER_NYUD[row][0]:.2f} M  GMAC@8 {8 * PAPER_NYUD[row][1]:.1f}"
    swin = PAPER_SWIN.get(args.dataset, {})
    if row in swin:
        return f"Params {swin[row][0]:.1f} M  FLOPs {swin[row][1]:.1f} G"
    return ""


def print_model_row(row, r, args, scale_key, header, elapsed):
    """One row of the table, printed as soon as it is measured, with the seconds the table has taken so far."""
    if header:
        train = f" {'train s/it':>10s} {'train MB':>9s}" if args.train else ""
        print(f"{'model':10s} {'params M':>9s} {'rel':>6s} {'GFLOP/img':>10s} {'GMAC@8':>8s} "
              f"{'val s':>8s} {'peak MB':>8s}{train} {'so far':>7s}   papers")
    train = (f" {r['train_seconds']:10.3f} {r['train_peak_bytes'] / 2**20:9.0f}" if args.train else "")
    print(f"{row:10s} {r['params'] / 1e6:9.2f} {r['rel_params']:6.3f} {r['flops_per_image'] / 1e9:10.1f} "
          f"{r['gmac_batch8']:8.1f} {r['val_seconds']:8.2f} {r['peak_bytes'] / 2**20:8.0f}{train} {elapsed:6.0f}s   "
          f"{paper_figures(row, args, scale_key)}", flush=True)


# ------------------------------------------------------------------------------- CTAL micro-benchmark

def ctal_step_stats(impl, size, batch, channels, tasks, device, iters):
    """Peak memory of a first CTAL forward+backward, the best time of `iters` more, their FLOPs, and the GEMM
    rate of this process measured before and after the steps (the best of both: the machine's rate then)."""
    torch.manual_seed(0)
    module = CTAL(tasks, channels, tuple(size), impl=impl).to(device)
    feats = [torch.randn(batch, channels, *size, device=device, requires_grad=True) for _ in range(tasks)]

    def step():
        out = module(feats)
        sum(o.float().square().mean() for o in out).backward()

    before = gemm_stats(GEMM_SIZE, device, 3)
    _, peak = measure(step, device, 1, warmup=0)
    seconds = best_time(step, device, iters)
    after = gemm_stats(GEMM_SIZE, device, 3)
    with flop_counter() as counter:
        step()
    return dict(impl=impl, size=list(size), batch=batch, seconds=seconds, peak_bytes=peak,
                flops=counter.get_total_flops(), gemm_gflops=max(before['gflops'], after['gflops']))


def best_time(step, device, iters):
    """The shortest of `iters` timed calls of `step`, in seconds (on CUDA synchronised before and after)."""
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    best = math.inf
    for _ in range(iters):
        sync()
        t0 = time.perf_counter()
        step()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def unfold_form_flops(tasks, channels, size, batch, k=3):
    """FLOPs of one forward+backward of the linear form as ctal.py's docstring writes it: K = V U^T and D = K Z,
    two GEMMs of (TC) x (TC k^2) x HW forward and twice that backward, plus the projections' 3x3 convs (forward
    and two backward): the work an exact O(HW) implementation does, whatever its padding."""
    tc, hw = tasks * channels, size[0] * size[1]
    return batch * (3 * 2 * 2 * tc * tc * k * k * hw + 3 * 2 * tasks * channels * channels * 9 * hw)


def gemm_stats(n, device, iters):
    """Best achieved GFLOP/s of an fp32 (n x n) @ (n x n) matrix product over `iters`: the machine's GEMM rate
    (2 n^3 FLOPs per product)."""
    torch.manual_seed(0)
    a, b = (torch.randn(n, n, device=device) for _ in range(2))
    a @ b
    seconds = best_time(lambda: a @ b, device, iters)
    return dict(n=n, seconds=seconds, gflops=2 * n ** 3 / seconds / 1e9)


def run_ctal_benchmark(args):
    device, T, C = args.device, args.tasks, args.channels
    image = tuple(args.img_size or NYUV2_SIZE)
    size = scaled_size(image, args.scale)
    kind = torch.device(device).type
    print(f"CTAL forward+backward on {device} ({torch.get_num_threads()} threads): input {image[0]}x{image[1]}, scale "
          f"{args.scale} -> map {size[0]}x{size[1]} (HW = {size[0] * size[1]}), C={C}, T={T}, batch {args.batch}, best "
          f"of {args.iters}; auto picks {choose_impl(T, C, size, device=kind)!r}")
    rows = {impl: run_measurement("ctal_step_stats", device, impl=impl, size=list(size), batch=args.batch,
                                  channels=C, tasks=T, iters=args.iters)
            for impl in ("dense", "linear")}
    rows["linear"]["work_flops"] = unfold_form_flops(T, C, size, args.batch)
    print(f"{'impl':8s} {'time/step':>10s} {'GFLOP/step':>11s} {'GFLOP/s':>8s} {'GEMM GFLOP/s':>13s} {'% GEMM':>7s} "
          f"{'peak MB':>9s}")
    for impl, r in rows.items():
        rate = r.get('work_flops', r['flops']) / r['seconds'] / 1e9
        r['gflops_per_s'], r['fraction_of_gemm'] = rate, rate / r['gemm_gflops']
        print(f"{impl:8s} {r['seconds']:9.3f}s {r['flops'] / 1e9:11.1f} {rate:8.1f} {r['gemm_gflops']:13.1f} "
              f"{100 * r['fraction_of_gemm']:6.0f}% {r['peak_bytes'] / 2**20:9.0f}")
    d, l = rows["dense"], rows["linear"]
    cost = DENSE_COST_PER_FLOP.get(kind, 1.0)
    flop_ratio = operator.truediv(*core_flops(T, C, size))
    print(f"dense / linear: time {d['seconds'] / l['seconds']:.2f}x, FLOPs {d['flops'] / l['flops']:.2f}x (auto's model: "
          f"{flop_ratio:.2f}x, so a cost per FLOP of {d['seconds'] / l['seconds'] / flop_ratio:.2f}; "
          f"ctal.DENSE_COST_PER_FLOP[{kind!r}] = {cost}), peak memory {d['peak_bytes'] / max(l['peak_bytes'], 1):.2f}x")
    result = dict(rows=rows, auto=choose_impl(T, C, size, device=kind), flop_ratio=flop_ratio)
    if args.fit_gb:
        result["largest_batch"] = report_largest_batches(args)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def report_largest_batches(args):
    """Largest batch whose forward+backward peak fits in --fit-gb, at 1/4 and 1/2 scale.

    The per-image cost is measured as peak(batch 2) - peak(batch 1)."""
    device, T, C = args.device, args.tasks, args.channels
    fit = args.fit_gb * 2**30
    out = {}
    print(f"largest batch for forward+backward within {args.fit_gb} GB:")
    for scale in (Fraction(1, 4), Fraction(1, 2)):
        size = scaled_size(NYUV2_SIZE, scale)
        for impl in ("dense", "linear"):
            one, two = (run_measurement("ctal_step_stats", device, impl=impl, size=list(size), batch=b,
                                        channels=C, tasks=T, iters=1) for b in (1, 2))
            per_image = max(two["peak_bytes"] - one["peak_bytes"], 1)
            batch = max(0, int((fit - one["peak_bytes"] + per_image) // per_image))
            out[f"{impl}@{size[0]}x{size[1]}"] = dict(batch=batch, per_image_bytes=per_image)
            print(f"  {size[0]:4d}x{size[1]:<4d} {impl:7s} batch {batch:5d}   ({per_image / 2**20:,.0f} MB per image)")
    return out


# ------------------------------------------------------------------------------------------- main

def main(argv=None):
    from model import MODEL_NAMES
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--module", choices=["model", "ctal"], default="model",
                        help="'model': the resource table of whole models; 'ctal': CTAL alone, dense vs linear")
    parser.add_argument("--scale", type=parse_scale, default=Fraction(1, 4),
                        help="distillation scale: 1/4, 1/6, 1/8, ... (of the input size)")
    parser.add_argument("--dataset", choices=list(DATASETS), default="nyuv2",
                        help="a dataset of data.DATASETS (nyud: the ATRC / TIF papers' NYUD-v2 setting)")
    parser.add_argument("--models", nargs="+", metavar="NAME",
                        help=f"models to profile (default: all of the backbone's): {', '.join(MODEL_NAMES)}, "
                             f"and 'papnet x2' (two propagation iterations)")
    parser.add_argument("--batch", type=positive_int, default=None,
                        help="batch size (default: 8 for models, 2 for ctal)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=["cpu", "cuda"])
    parser.add_argument("--ctal-impl", choices=["auto", "dense", "linear"], default="auto")
    parser.add_argument("--train", action="store_true", help="also time a forward+backward training step")
    parser.add_argument("--iters", type=positive_int, default=2,
                        help="timed steps after one warm-up step (the model table's mean, CTAL's best)")
    parser.add_argument("--img-size", type=parse_size, help="override the dataset's input size, e.g. 64x96")
    parser.add_argument("--val-images", type=positive_int, help="override the size of the validation split")
    parser.add_argument("--channels", type=positive_int, default=128, help="(--module ctal) feature channels C")
    parser.add_argument("--tasks", type=positive_int, default=3, help="(--module ctal) number of tasks T")
    parser.add_argument("--fit-gb", type=float, default=0,
                        help="(--module ctal) also report the largest batch that fits in this many GB")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch sees no CUDA device")
    for name in args.models or []:
        if name not in MODEL_NAMES and name != "papnet x2":
            parser.error(f"unknown model {name!r}; valid: {', '.join(MODEL_NAMES)}, 'papnet x2'")
    if args.json and check_json_path(args.json):
        parser.error(check_json_path(args.json))
    if args.module == "ctal":
        args.batch = args.batch or 2
        return run_ctal_benchmark(args)
    if args.scale > Fraction(1, 4):
        parser.error(f"--scale {args.scale}: the models distil at most at 1/4 of the input (e.g. 1/4, 1/6, 1/8); "
                     f"--module ctal takes larger scales")
    args.batch = args.batch or 8
    try:
        return run_model_table(args)
    except ValueError as e:                  # e.g. an --img-size a backbone cannot take
        parser.error(str(e))


if __name__ == "__main__":
    main()
