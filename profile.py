"""Resource benchmarks: the CTAL micro-benchmark (dense vs linear), on CPU or CUDA.

    python profile.py --module ctal --scale 1/4 [--batch 2] [--device cpu|cuda] [--fit-gb 20]

For each implementation of CTAL it times forward+backward at NYUv2 shapes (288x384 input, so the
distillation map is 72x96 at 1/4, 48x64 at 1/6, 36x48 at 1/8; C = 128, T = 3), counts FLOPs with
torch.utils.flop_counter.FlopCounterMode, and measures peak memory: on CPU the peak resident set of a
fresh subprocess per implementation (so one implementation's allocations cannot hide the other's), on
CUDA torch.cuda.max_memory_allocated. It prints both side by side with the ratios, and the largest batch
each implementation fits in --fit-gb GB at 1/4 and 1/2 scale (from the measured per-image memory).
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
import resource  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from fractions import Fraction  # noqa: E402

import torch  # noqa: E402

from ctal import CTAL, choose_impl  # noqa: E402

NYUV2_SIZE = (288, 384)


def parse_scale(text):
    """'1/4' -> Fraction(1, 4); also accepts decimals such as 0.25."""
    try:
        scale = Fraction(text).limit_denominator(64)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"--scale must look like 1/4 or 0.25, got {text!r}")
    if not 0 < scale <= 1:
        raise argparse.ArgumentTypeError(f"--scale must be in (0, 1], got {text!r}")
    return scale


def scaled_size(size, scale):
    return round(size[0] * scale), round(size[1] * scale)


def _grouped_conv_backward_flop(grad_out_shape, x_shape, w_shape, bias, stride, padding, dilation,
                                transposed, output_padding, groups, output_mask, **kwargs):
    """FlopCounterMode's own formula for the conv backward ignores `groups` (it counts the weight
    gradient of CTAL's grouped conv, 6,912 groups at 1/4, as if it were a dense conv). Each of the input
    and weight gradients costs exactly what the forward costs, whatever the groups."""
    from torch.utils.flop_counter import conv_flop_count
    forward = conv_flop_count(x_shape, w_shape, grad_out_shape, transposed=transposed)
    return forward * (int(output_mask[0]) + int(output_mask[1]))


def flop_counter():
    """FlopCounterMode with the grouped-conv backward formula fixed (see above)."""
    from torch.utils.flop_counter import FlopCounterMode
    return FlopCounterMode(display=False,
                           custom_mapping={torch.ops.aten.convolution_backward: _grouped_conv_backward_flop})


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def ctal_step_stats(impl, size, batch, channels, tasks, device, iters, warmup=1):
    """Time, FLOPs and peak memory of one CTAL forward+backward. Runs in the calling process."""
    torch.manual_seed(0)
    device = torch.device(device)
    module = CTAL(tasks, channels, size, impl=impl).to(device)
    feats = [torch.randn(batch, channels, *size, device=device, requires_grad=True) for _ in range(tasks)]

    def step():
        out = module(feats)
        sum(o.float().square().mean() for o in out).backward()

    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        mem0 = torch.cuda.memory_allocated(device)
    for _ in range(warmup):
        step()
    _sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            step()
        end.record()
        _sync(device)
        seconds = start.elapsed_time(end) / 1e3 / iters
        peak = torch.cuda.max_memory_allocated(device) - mem0
    else:
        t0 = time.perf_counter()
        for _ in range(iters):
            step()
        seconds = (time.perf_counter() - t0) / iters
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss0
    with flop_counter() as counter:
        step()
    return dict(impl=impl, size=list(size), batch=batch, seconds=seconds, peak_bytes=peak,
                flops=counter.get_total_flops())


def ctal_stats_isolated(impl, size, batch, channels, tasks, device, iters):
    """On CPU, run `ctal_step_stats` in a fresh interpreter so its peak RSS is its own."""
    if device != "cpu":
        return ctal_step_stats(impl, size, batch, channels, tasks, device, iters)
    args = json.dumps([impl, list(size), batch, channels, tasks, device, iters])
    code = "import json, sys, profile; print(json.dumps(profile.ctal_step_stats(*json.loads(sys.argv[1]))))"
    here = os.path.dirname(os.path.abspath(__file__))
    proc = subprocess.run([sys.executable, "-c", code, args], cwd=here, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"benchmark subprocess for impl={impl} size={size} batch={batch} failed:\n"
                           f"{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def dense_bytes_per_image(size, tasks, m=1, bytes_per=4):
    """What dense CTAL keeps alive per image at its peak, in HW x HW tensors: the joint affinity M
    (T HW^2, saved for the conv's backward), G (m HW^2, saved for the diffusion's backward), and in
    backward dM, dA (T HW^2 each) and dG. A lower bound; measured peaks add the small O(HW) terms."""
    hw = size[0] * size[1]
    return (3 * tasks + 2 * m) * hw * hw * bytes_per


def largest_batch(fit_bytes, base, per_image):
    return max(0, int((fit_bytes - base) // per_image))


def run_ctal_benchmark(args):
    device, T, C = args.device, args.tasks, args.channels
    size = scaled_size(NYUV2_SIZE, args.scale)
    print(f"CTAL forward+backward on {device}: input {NYUV2_SIZE[0]}x{NYUV2_SIZE[1]}, scale "
          f"{args.scale} -> map {size[0]}x{size[1]} (HW = {size[0] * size[1]}), C={C}, T={T}, "
          f"batch {args.batch}; auto picks {choose_impl(T, C, size)!r}")
    rows = {impl: ctal_stats_isolated(impl, size, args.batch, C, T, device, args.iters)
            for impl in ("dense", "linear")}
    print(f"{'impl':8s} {'time/step':>10s} {'GFLOP/step':>11s} {'peak MB':>9s}")
    for impl, r in rows.items():
        print(f"{impl:8s} {r['seconds']:9.3f}s {r['flops'] / 1e9:11.1f} {r['peak_bytes'] / 2**20:9.0f}")
    d, l = rows["dense"], rows["linear"]
    print(f"dense / linear: time {d['seconds'] / l['seconds']:.2f}x, FLOPs {d['flops'] / l['flops']:.2f}x, "
          f"peak memory {d['peak_bytes'] / max(l['peak_bytes'], 1):.2f}x")
    result = dict(rows=rows)
    if args.fit_gb:
        result["largest_batch"] = report_largest_batches(args, rows)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return result


def report_largest_batches(args, rows):
    """Largest batch whose forward+backward peak fits in --fit-gb, at 1/4 and 1/2 scale.

    The per-image cost is measured (batch 1 vs the benchmark batch) at the benchmarked size. At 1/2 scale
    linear is measured the same way; dense is measured only where its lower-bound estimate fits in 80%
    of this machine's free memory, and is otherwise the lower bound itself (marked 'bound')."""
    device, T, C = args.device, args.tasks, args.channels
    fit = args.fit_gb * 2**30
    out = {}
    print(f"largest batch for forward+backward within {args.fit_gb} GB:")
    for scale in (Fraction(1, 4), Fraction(1, 2)):
        size = scaled_size(NYUV2_SIZE, scale)
        for impl in ("dense", "linear"):
            bound = dense_bytes_per_image(size, T) if impl == "dense" else 0
            if bound * 2 > 0.8 * available_bytes(device):
                batch, how = (0 if bound > fit else int(fit // bound)), "bound"
                per_image = bound
            else:
                one = ctal_stats_isolated(impl, size, 1, C, T, device, 1)
                two = ctal_stats_isolated(impl, size, 2, C, T, device, 1)
                per_image = max(two["peak_bytes"] - one["peak_bytes"], 1)
                base = one["peak_bytes"] - per_image
                batch, how = largest_batch(fit, base, per_image), "measured"
            out[f"{impl}@{size[0]}x{size[1]}"] = dict(batch=batch, per_image_bytes=per_image, how=how)
            print(f"  {size[0]:4d}x{size[1]:<4d} {impl:7s} batch {batch:5d}   "
                  f"({per_image / 2**20:,.0f} MB per image, {how})")
    return out


def available_bytes(device):
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    with open("/proc/meminfo") as f:
        info = dict(line.split(":", 1) for line in f)
    return int(info["MemAvailable"].split()[0]) * 1024


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--module", choices=["ctal"], default="ctal",
                        help="what to benchmark: 'ctal' = the CTAL module alone, dense vs linear")
    parser.add_argument("--scale", type=parse_scale, default=Fraction(1, 4),
                        help="distillation scale relative to the 288x384 NYUv2 input (1/4, 1/6, 1/8, ...)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--channels", type=int, default=128)
    parser.add_argument("--tasks", type=int, default=3)
    parser.add_argument("--iters", type=int, default=3, help="timed steps after one warm-up step")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        choices=["cpu", "cuda"])
    parser.add_argument("--fit-gb", type=float, default=0,
                        help="also report the largest batch that fits in this many GB (at 1/4 and 1/2)")
    parser.add_argument("--json", help="write the figures to this file")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda asked for, but torch sees no CUDA device")
    return run_ctal_benchmark(args)


if __name__ == "__main__":
    main()
