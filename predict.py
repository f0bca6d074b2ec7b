"""Run a checkpoint of train.py (ckpt.pt or best.pt) on your own images and save coloured predictions.

    python predict.py out/nyuv2_ctal_ss/best.pt photo1.jpg photo2.png [--out_dir predictions] [--device cpu]

Data flow: image file -> RGB (3, h, w) in [0, 1] -> prepared as the checkpoint's dataset is evaluated, at the
input size the model was trained at (CTAL's grid is fixed by it; data.prepare_image: PASCAL-Context's
centred canvas on the mean colour, the other datasets a bilinear resize; the model normalises where the
authors do) -> model -> each task's raw output mapped back to (h, w) (data.restore_prediction) ->
<out_dir>/<image name>_pred.png: the input and one panel per task, coloured as in vis.py (class colours,
viridis depth, normals as RGB, saliency / edge probability in grey).
"""
import argparse
import os
import sys

import numpy as np
import torch

from checkpoint import load_checkpoint, load_weights
from config import UserError
from data import prepare_image, restore_prediction
from model import build_net, pick_device
from vis import save_prediction_grid


def read_image(path):
    """An image file -> float32 (3, h, w) in [0, 1]."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            rgb = np.asarray(im.convert('RGB'), dtype=np.float32) / 255.0
    except (OSError, ValueError) as e:
        raise UserError(f"cannot read {path} as an image: {e}") from None
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


def predict_image(net, image, cfg, size, device):
    """{task: (1, K_t, h, w) raw output} of the net for one (3, h, w) image, at the image's own size."""
    out = net(prepare_image(cfg['dataset'], image, size)[None].to(device))
    return {t: restore_prediction(cfg['dataset'], out[t].float(), tuple(image.shape[-2:]), size).cpu()
            for t in cfg['tasks']}


@torch.no_grad()
def predict(checkpoint, paths, out_dir, device='cpu'):
    """Predict every image of `paths` with the checkpoint's model; returns the PNG files written."""
    try:
        device = pick_device(device)
    except ValueError as e:
        raise UserError(str(e)) from None
    ckpt = load_checkpoint(checkpoint, device)
    cfg, size = ckpt['config'], tuple(ckpt.get('input_size', ()))
    if len(size) != 2:
        raise UserError(f"{checkpoint} does not record its input size (written by an older train.py)")
    net = build_net(dict(cfg, pretrained=None), size, device)
    load_weights(net, ckpt, checkpoint)
    net.eval()
    os.makedirs(out_dir, exist_ok=True)
    written = []
    for path in paths:
        image = read_image(path)
        predictions = predict_image(net, image, cfg, size, device)
        written.append(os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + '_pred.png'))
        save_prediction_grid(written[-1], image[None], predictions)
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('checkpoint', help="a train.py checkpoint (out/<run>/best.pt or ckpt.pt)")
    parser.add_argument('images', nargs='+', help='image files (anything PIL reads)')
    parser.add_argument('--out_dir', default='predictions', help='where the PNGs go (default: predictions)')
    parser.add_argument('--device', default='cpu', help='auto | cpu | cuda | cuda:N (default: cpu)')
    args = parser.parse_args(argv)
    try:
        for path in predict(args.checkpoint, args.images, args.out_dir, args.device):
            print(path)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
