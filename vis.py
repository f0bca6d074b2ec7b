"""Pictures (matplotlib): predictions coloured like their ground truth, and a run's training curves.

train.py writes `vis_epochNNN.png` (save_val_grid: validation images, input | per task ground truth,
prediction) and `curves.png` (training loss per task over steps, each task's main validation metric over epochs);
predict.py writes one `input | predictions` row per image of the user's.

Colours: class maps with 40 distinct colours (tab20 + tab20b), ignore (255) black; depth with viridis over
the ground truth's valid range (so GT and prediction compare; 0 = invalid in black); normals as
(n + 1) / 2 -> RGB; saliency / edge probabilities in grey, ignore in dark red. Everything is drawn on a
matplotlib Figure (no pyplot state, no display needed).
"""
import json

import numpy as np
import torch

from data import IGNORE
from metrics import TASK_METRIC

TILE_PX = 128            # height of one panel, pixels (small inputs are upscaled so a person can see them)
HEADER_PX = 16           # the column titles above the first row
DPI = 100
def colormap(name):
    """matplotlib's colormap `name`: matplotlib is imported only when a picture is drawn (vis_images=0 runs and
    --help do without it)."""
    from matplotlib import colormaps
    return colormaps[name]


def class_colours():
    return np.concatenate([colormap('tab20').colors, colormap('tab20b').colors])   # (40, 3)


def colour_labels(labels):
    """Class map (H, W) int -> RGB floats (H, W, 3); ignore black."""
    colours = class_colours()
    rgb = colours[np.clip(labels, 0, IGNORE - 1) % len(colours)]
    rgb[labels == IGNORE] = 0
    return rgb


def colour_depth(depth, reference):
    """Viridis over the valid (> 0) range of `reference`, the target depth when there is one."""
    valid = reference[reference > 0]
    lo, hi = (float(valid.min()), float(valid.max())) if valid.numel() else (0.0, 1.0)
    return colormap('viridis')(((depth - lo) / max(hi - lo, 1e-6)).clamp(0, 1).numpy())[..., :3]


def colour_normals(n):
    return ((n + 1) / 2).clamp(0, 1).permute(1, 2, 0).numpy()          # (3, H, W) -> (H, W, 3)


def colour_target(task, target):
    """A ground-truth map (data.py conventions) as RGB floats (H, W, 3); ignored / invalid pixels black."""
    x = target.float().cpu()
    if task in ('semseg', 'human_parts'):
        return colour_labels(x.long().numpy())
    if task == 'depth':
        rgb = colour_depth(x[0], x[0])
        rgb[(x[0] == 0).numpy()] = 0
        return rgb
    if task == 'normals':
        return colour_normals(x)                                         # invalid (zero) vectors: grey
    rgb = colormap('gray')(x[0].clamp(0, 1).numpy())[..., :3]           # saliency / edge in {0, 1}
    rgb[(x[0] == IGNORE).numpy()] = (0.5, 0, 0)
    return rgb


def colour_prediction(task, pred, target=None):
    """A raw prediction (K, H, W) as RGB floats (H, W, 3), coloured like its target (if given)."""
    x = pred.float().cpu()
    if task in ('semseg', 'human_parts'):
        return colour_labels(x.argmax(0).numpy())
    if task == 'depth':
        return colour_depth(x[0], x[0] if target is None else target.float().cpu()[0])
    if task == 'normals':
        return colour_normals(x / x.norm(dim=0, keepdim=True).clamp(min=1e-12))
    return colormap('gray')(torch.sigmoid(x[0]).numpy())[..., :3]      # logits -> probability


def save_prediction_grid(path, images, predictions, targets=None):
    """PNG, one row per image: input | for each task: (ground truth,) prediction. images (N, 3, H, W) in
    [0, 1]; predictions {task: (N, K, H, W)}; targets None or {task: (N, ...)} in data.py's conventions."""
    tasks = list(predictions)
    names = ['input'] + [f"{t} {kind}" for t in tasks for kind in (('GT', 'pred') if targets else ('pred',))]
    n, (H, W) = len(images), images.shape[-2:]
    tile_w = round(W * TILE_PX / H)
    width, height = len(names) * tile_w, HEADER_PX + n * TILE_PX
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width / DPI, height / DPI), dpi=DPI)
    for j, name in enumerate(names):
        fig.text((j + 0.5) / len(names), 1 - 2 / height, name, ha='center', va='top', fontsize=7)
    for i in range(n):
        tiles = [images[i].permute(1, 2, 0).clamp(0, 1).cpu().numpy()]
        for t in tasks:
            target = targets[t][i] if targets else None
            tiles += ([colour_target(t, target)] if targets else []) + [
                colour_prediction(t, predictions[t][i], target)]
        bottom = 1 - (HEADER_PX + (i + 1) * TILE_PX) / height
        for j, tile in enumerate(tiles):
            ax = fig.add_axes((j / len(names), bottom, 1 / len(names), TILE_PX / height))
            ax.imshow(tile, interpolation='nearest', aspect='auto')
            ax.set_axis_off()
    fig.savefig(path, dpi=DPI)


@torch.no_grad()
def save_val_grid(path, net, val_set, tasks, n, autocast):
    """save_prediction_grid of the first n validation images (none if n = 0), the net in eval mode under
    the run's `autocast` context."""
    samples = [val_set[i] for i in range(min(n, len(val_set)))]
    if not samples:
        return
    images = torch.stack([s['image'] for s in samples])
    net.eval()
    with autocast:
        out = net(images.to(next(net.parameters()).device))
    net.train()
    save_prediction_grid(path, images, {t: out[t].float().cpu() for t in tasks},
                         {t: torch.stack([s[t] for s in samples]) for t in tasks})


def save_curves(log_path, tasks, path, metrics=TASK_METRIC):
    """PNG of a run's log.jsonl: each task's training loss over steps, and each task's main validation
    metric (`metrics`: the dataset's metrics.gain_metrics) over epochs."""
    with open(log_path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    train_recs = [r for r in records if r['type'] == 'train']
    eval_recs = [r for r in records if r['type'] == 'eval']
    from matplotlib.figure import Figure
    fig = Figure(figsize=(3.2 * (1 + len(tasks)), 2.8), dpi=DPI, layout='constrained')
    axes = fig.subplots(1, 1 + len(tasks), squeeze=False)[0]
    for t in tasks:
        axes[0].plot([r['step'] for r in train_recs], [r['losses'][t] for r in train_recs], label=t)
    axes[0].set(title='training loss', xlabel='step')
    axes[0].legend(fontsize=7)
    for ax, t in zip(axes[1:], tasks):
        metric = metrics[t][0]
        values = [r['metrics'][t][metric] for r in eval_recs]
        ax.plot([r['epoch'] for r in eval_recs], [float('nan') if v is None else v for v in values], 'o-')
        ax.set(title=f"val {t} {metric}", xlabel='epoch')
    fig.savefig(path)
