"""Synthetic indoor scenes in the NYUv2 format: the embedded default dataset, rendered on the CPU in
seconds, so that everything runs with nothing downloaded.

    python synthetic.py data/synthetic --n-train 800 --n-val 200 --size 96x128 --seed 0
    python synthetic.py data/nyud_synthetic --layout nyud_mt      # the same scenes as a NYUD_MT release

Data flow: a seeded RNG -> a random room (walls, floor, ceiling, a window) with box furniture and a
camera pose -> one ray per pixel, cast against every box -> per pixel the hit's class (the 13 NYUv2
classes), z-depth in metres, camera-frame normal and a textured, shaded colour -> sensor-like holes
(invalid depth / normals) -> root/{train,val}/{image,label,depth,normal}/{i}.npy, which data.NYUv2
(data.Synthetic) reads like the real release; or (--layout nyud_mt) NYUD_MT's images / segmentation / depth /
normals / edge files and gt_sets lists, which data.NYUDMT reads, edges from the label boundaries.

"""
import argparse
import functools
import json
import os
import sys
import time

import numpy as np

from config import parse_size
from data import NYU13_CLASSES, label_edges

# World frame: x, z horizontal, y up; the room is the box [0, X] x [0, Y] x [0, Z]; furniture is a set
# of axis-aligned boxes. Camera frame follows the NYUv2 normals convention as we read it: x right (image
# columns), y up, z towards the viewer (the camera looks along -z), so a visible surface has n_z > 0, a
# floor seen level has n = (0, 1, 0) and a wall facing the camera (0, 0, 1). (Only "x = image columns"
# matters to the rest of the code: the flip negates it.) Depth is z-depth in metres, as the Kinect's:
# the ray through pixel (v, u) is d = ((u + .5 - W/2) / f, -(v + .5 - H/2) / f, -1), so the hit
# distance t along d is the depth itself.

SYN_FOCAL = 0.81  # focal length / image width, as NYUv2's Kinect (518.9 px at 640 px wide)
CLS = {name: i for i, name in enumerate(NYU13_CLASSES)}
# class -> (texture id, texels per metre, texture contrast, base colours); colours overlap between
# classes (wood floors, tables, chairs, furniture) so colour alone does not give the class.
_WOOD = ((0.55, 0.36, 0.2), (0.42, 0.28, 0.17), (0.7, 0.55, 0.38), (0.3, 0.22, 0.16))
_SURFACE_STYLE = {
    'wall': (0, 30, 0.1, ((0.85, 0.82, 0.75), (0.9, 0.9, 0.9), (0.72, 0.78, 0.84), (0.84, 0.76, 0.68),
                          (0.7, 0.75, 0.64))),
    'ceiling': (0, 30, 0.06, ((0.93, 0.93, 0.9), (0.86, 0.87, 0.88))),
    'floor': (1, 40, 0.35, _WOOD + ((0.58, 0.58, 0.56), (0.35, 0.3, 0.32), (0.3, 0.36, 0.46))),
    'bed': (2, 120, 0.2, ((0.92, 0.92, 0.94), (0.58, 0.68, 0.85), (0.85, 0.75, 0.6), (0.7, 0.5, 0.5))),
    'sofa': (2, 120, 0.2, ((0.4, 0.4, 0.42), (0.25, 0.3, 0.5), (0.5, 0.3, 0.2), (0.6, 0.2, 0.2),
                           (0.75, 0.7, 0.6))),
    'chair': (3, 60, 0.25, _WOOD + ((0.15, 0.15, 0.15), (0.8, 0.8, 0.8), (0.3, 0.45, 0.6))),
    'table': (3, 60, 0.25, _WOOD + ((0.9, 0.9, 0.88), (0.2, 0.2, 0.2))),
    'furniture': (3, 60, 0.25, _WOOD + ((0.86, 0.86, 0.83), (0.55, 0.6, 0.62))),
    'books': (0, 80, 0.1, None),    # None: a random colour per box
    'objects': (4, 50, 0.3, None),
    'painting': (4, 120, 0.9, None),
    'tv': (0, 60, 0.1, ((0.05, 0.05, 0.06), (0.1, 0.1, 0.12))),
    'window': (0, 20, 0.08, ((0.75, 0.85, 0.95), (0.9, 0.92, 0.95))),  # emissive: not shaded
}
_TEX = 64  # texture tile side (texels); tiles are periodic so lookups wrap around


def _smooth_noise(rng, sigma):
    """A periodic (64, 64) tile of Gaussian-filtered white noise (filter width sigma texels), rescaled to [0, 1]."""
    f = np.fft.fftfreq(_TEX)
    r2 = f[:, None] ** 2 + f[None, :] ** 2
    x = np.fft.ifft2(np.fft.fft2(rng.standard_normal((_TEX, _TEX))) * np.exp(-2 * np.pi ** 2 * sigma ** 2 * r2)).real
    return (x - x.min()) / (x.max() - x.min())


@functools.lru_cache(maxsize=None)
def _texture_bank():
    """5 periodic (64, 64) textures in [0, 1] from a fixed seed (shared by every scene and seed):
    0 paint (smooth noise), 1 planks, 2 fabric, 3 wood grain, 4 blobs."""
    rng = np.random.default_rng(20240601)
    rows, cols = np.mgrid[0:_TEX, 0:_TEX]
    paint = _smooth_noise(rng, 4.0)
    planks = 0.6 * rng.uniform(0.3, 1, _TEX // 8)[cols // 8] + 0.4 * _smooth_noise(rng, 1.0)
    planks[:, ::8] *= 0.4                      # dark seams between planks
    fabric = 0.5 * _smooth_noise(rng, 0.7) + 0.25 * (1 + np.sin(rows * np.pi / 2) * np.sin(cols * np.pi / 2))
    grain = 0.5 + 0.5 * np.sin(2 * np.pi * rows / 16 + 6 * _smooth_noise(rng, 6.0))
    blobs = _smooth_noise(rng, 5.0)
    bank = np.stack([paint, planks, fabric, grain, blobs]).astype(np.float32)
    return (bank - bank.min(axis=(1, 2), keepdims=True)) / np.ptp(bank, axis=(1, 2), keepdims=True)


@functools.lru_cache(maxsize=8)
def _camera_rays(H, W):
    """(3, H, W) camera-frame ray directions with z = -1, and the focal length in pixels."""
    f = SYN_FOCAL * W
    u = (np.arange(W) + 0.5 - W / 2) / f
    v = -(np.arange(H) + 0.5 - H / 2) / f
    rays = np.stack(np.broadcast_arrays(u[None, :], v[:, None], -np.ones((H, W)))).astype(np.float32)
    rays.flags.writeable = False  # cached: shared by every call
    return rays, f


class _RoomBuilder:
    """Random furnished room: a list of (lo (3,), hi (3,), class name) boxes that leaves room around
    the camera. Floor footprints are (x0, x1, z0, z1) rectangles that must not overlap."""

    def __init__(self, rng):
        self.rng = rng
        self.room = np.array([rng.uniform(3.5, 6.5), rng.uniform(2.5, 3.0), rng.uniform(3.5, 7.0)])
        X, _, Z = self.room
        self.cam = np.array([rng.uniform(0.9, X - 0.9), rng.uniform(1.0, 1.7), rng.uniform(0.9, Z - 0.9)])
        self.boxes, self.footprints = [], []

    def _free(self, rect, margin=0.05):
        x0, x1, z0, z1 = rect
        X, _, Z = self.room
        if x0 < -1e-9 or z0 < -1e-9 or x1 > X + 1e-9 or z1 > Z + 1e-9:
            return False
        # keep the camera 0.45 m away from every floor object
        dx = max(x0 - self.cam[0], 0, self.cam[0] - x1)
        dz = max(z0 - self.cam[2], 0, self.cam[2] - z1)
        if dx * dx + dz * dz < 0.45 ** 2:
            return False
        return all(x0 >= b[1] + margin or x1 <= b[0] - margin or z0 >= b[3] + margin or z1 <= b[2] - margin
                   for b in self.footprints)

    def _wall_frame(self, wall, along):
        """Local (a along the wall, b away from it) -> world (x, z) rectangle."""
        X, _, Z = self.room

        def rect(a0, a1, b0, b1):
            a0, a1 = along + a0, along + a1
            return [(b0, b1, a0, a1), (X - b1, X - b0, a0, a1),
                    (a0, a1, b0, b1), (a0, a1, Z - b1, Z - b0)][wall]
        return rect

    def _add(self, rect, y0, y1, cls):
        x0, x1, z0, z1 = rect
        self.boxes.append((np.array([x0, y0, z0]), np.array([x1, y1, z1]), cls))

    def against_wall(self, width, depth, tries=8):
        """A local frame for an object of footprint (width, depth) backed against a random wall."""
        for _ in range(tries):
            wall = int(self.rng.integers(4))
            length = self.room[2] if wall < 2 else self.room[0]
            if length < width + 0.2:
                continue
            frame = self._wall_frame(wall, self.rng.uniform(0.1, length - width - 0.1))
            if self._free(frame(0, width, 0, depth)):
                self.footprints.append(frame(0, width, 0, depth))
                return frame
        return None

    def on_wall(self, width, height, y0, protrude, cls):
        wall = int(self.rng.integers(4))
        length = self.room[2] if wall < 2 else self.room[0]
        if length < width + 0.2:
            return
        frame = self._wall_frame(wall, self.rng.uniform(0.1, length - width - 0.1))
        self._add(frame(0, width, 0, protrude), y0, min(y0 + height, self.room[1] - 0.05), cls)

    def on_top(self, box, n, size_range, cls):
        """n small boxes standing on the top face of `box`."""
        lo, hi, _ = box
        for _ in range(n):
            sx, sy, sz = (self.rng.uniform(*r) for r in size_range)
            if hi[0] - lo[0] < sx or hi[2] - lo[2] < sz:
                continue
            x0 = self.rng.uniform(lo[0], hi[0] - sx)
            z0 = self.rng.uniform(lo[2], hi[2] - sz)
            self._add((x0, x0 + sx, z0, z0 + sz), hi[1], hi[1] + sy, cls)

    def furnish(self):
        rng = self.rng
        if rng.random() < 0.4:
            w, d = rng.uniform(1.4, 2.0), rng.uniform(1.9, 2.1)
            frame = self.against_wall(w, d)
            if frame:
                self._add(frame(0, w, 0.08, d), 0.0, rng.uniform(0.4, 0.6), 'bed')
                self._add(frame(0, w, 0, 0.08), 0.0, rng.uniform(0.9, 1.2), 'bed')  # headboard
        if rng.random() < 0.5:
            w, d = rng.uniform(1.5, 2.2), rng.uniform(0.8, 0.95)
            frame = self.against_wall(w, d)
            if frame:
                seat = rng.uniform(0.4, 0.48)
                self._add(frame(0.15, w - 0.15, 0.2, d), 0.0, seat, 'sofa')
                self._add(frame(0, w, 0, 0.2), 0.0, seat + rng.uniform(0.3, 0.45), 'sofa')  # back
                self._add(frame(0, 0.15, 0.2, d), 0.0, seat + 0.18, 'sofa')             # arms
                self._add(frame(w - 0.15, w, 0.2, d), 0.0, seat + 0.18, 'sofa')
        for _ in range(int(rng.integers(1, 5))):
            w, d, h = rng.uniform(0.5, 1.8), rng.uniform(0.35, 0.6), rng.uniform(0.5, 2.0)
            frame = self.against_wall(w, d)
            if frame:
                self._add(frame(0, w, 0, d), 0.0, h, 'furniture')
                if h < 1.3 and rng.random() < 0.4:
                    self.on_top(self.boxes[-1], 1, ((0.6, 1.1), (0.4, 0.65), (0.05, 0.08)), 'tv')
                elif rng.random() < 0.5:
                    self.on_top(self.boxes[-1], int(rng.integers(2, 6)),
                                ((0.03, 0.07), (0.18, 0.3), (0.12, 0.2)), 'books')
                elif rng.random() < 0.5:
                    self.on_top(self.boxes[-1], int(rng.integers(1, 3)),
                                ((0.1, 0.35), (0.1, 0.4), (0.1, 0.3)), 'objects')
        for _ in range(int(rng.integers(1, 3))):
            if rng.random() < 0.7:
                self._table_with_chairs()
        for _ in range(int(rng.integers(0, 5))):
            s = rng.uniform(0.2, 0.5)
            x, z = rng.uniform(0.1, self.room[0] - s - 0.1), rng.uniform(0.1, self.room[2] - s - 0.1)
            rect = (x, x + s, z, z + s * rng.uniform(0.6, 1.4))
            if self._free(rect):
                self.footprints.append(rect)
                self._add(rect, 0.0, rng.uniform(0.2, 0.9), 'objects')
        for _ in range(int(rng.integers(0, 4))):
            self.on_wall(rng.uniform(0.5, 1.4), rng.uniform(0.4, 1.0), rng.uniform(1.1, 1.6), 0.03,
                         'painting')
        for _ in range(int(rng.integers(0, 3))):
            self.on_wall(rng.uniform(0.8, 1.6), rng.uniform(1.0, 1.5), rng.uniform(0.8, 1.0), 0.05, 'window')
        if rng.random() < 0.35:
            self.on_wall(rng.uniform(0.9, 1.3), rng.uniform(0.5, 0.75), rng.uniform(1.2, 1.5), 0.06, 'tv')
        return self

    def _table_with_chairs(self):
        rng = self.rng
        w, d = rng.uniform(0.8, 1.6), rng.uniform(0.6, 1.0)
        x, z = rng.uniform(0.3, self.room[0] - w - 0.3), rng.uniform(0.3, self.room[2] - d - 0.3)
        rect = (x, x + w, z, z + d)
        if not self._free(rect):
            return
        self.footprints.append(rect)
        top = rng.uniform(0.7, 0.78)
        self._add(rect, top - 0.04, top, 'table')
        leg = 0.05
        for lx in (x, x + w - leg):
            for lz in (z, z + d - leg):
                self._add((lx, lx + leg, lz, lz + leg), 0.0, top - 0.04, 'table')
        self.on_top(self.boxes[-5], int(rng.integers(0, 4)), ((0.1, 0.3), (0.05, 0.25), (0.1, 0.3)),
                    ['books', 'objects'][int(rng.integers(2))])
        for side in rng.permutation(4)[:int(rng.integers(0, 3))]:
            s, seat = 0.45, rng.uniform(0.42, 0.48)
            cx = x + w / 2 if side < 2 else (x - 0.35 if side == 2 else x + w + 0.35)
            cz = z + d / 2 if side >= 2 else (z - 0.35 if side == 0 else z + d + 0.35)
            cx += rng.uniform(-0.1, 0.1) if side < 2 else 0
            cz += rng.uniform(-0.1, 0.1) if side >= 2 else 0
            c = (cx - s / 2, cx + s / 2, cz - s / 2, cz + s / 2)
            if not self._free(c, margin=0.0):
                continue
            self.footprints.append(c)
            self._add(c, seat - 0.05, seat, 'chair')
            self._add((cx - 0.03, cx + 0.03, cz - 0.03, cz + 0.03), 0.0, seat - 0.05, 'chair')  # post
            back = [(c[0], c[1], c[2], c[2] + 0.05), (c[0], c[1], c[3] - 0.05, c[3]),
                    (c[0], c[0] + 0.05, c[2], c[3]), (c[1] - 0.05, c[1], c[2], c[3])][side]
            self._add(back, seat, seat + rng.uniform(0.35, 0.5), 'chair')


def _rotation(yaw, pitch, roll):
    """Camera-to-world rotation (columns = camera axes in world coordinates)."""
    cy, sy, cp, sp = np.cos(yaw), np.sin(yaw), np.cos(pitch), np.sin(pitch)
    cr, sr = np.cos(roll), np.sin(roll)
    Ry = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    Rx = np.array([[1, 0, 0], [0, cp, -sp], [0, sp, cp]])
    Rz = np.array([[cr, -sr, 0], [sr, cr, 0], [0, 0, 1]])
    return Ry @ Rx @ Rz


def _face_styles(rng, box_classes):
    """Per-face tables, face id = 2 * axis + (normal points to +axis): 6 room faces (the 4 walls share
    one style), then 6 faces per box (one style per box). All random draws happen in a few calls."""
    names = ['wall', 'ceiling', 'floor'] + list(box_classes)
    n = len(names)
    pick, random_rgb = rng.random(n), rng.uniform(0.1, 0.95, (n, 3))
    jitter, offset = rng.normal(0, 0.04, (n, 3)), rng.uniform(0, _TEX, (n, 2))
    rows = []
    for i, name in enumerate(names):
        tex, scale, contrast, colours = _SURFACE_STYLE[name]
        base = random_rgb[i] if colours is None else colours[int(pick[i] * len(colours))]
        rows.append((CLS[name], np.clip(np.asarray(base) + jitter[i], 0.02, 1.0), tex, scale, contrast,
                     name == 'window'))
    cols = list(zip(*rows))
    owner = np.array([0, 0, 1, 2, 0, 0] + [3 + m for m in range(n - 3) for _ in range(6)])
    f32 = lambda c: np.array(c, dtype=np.float32)[owner]
    return {'label': np.array(cols[0])[owner], 'albedo': f32(cols[1]), 'tex': np.array(cols[2])[owner],
            'scale': f32(cols[3]), 'contrast': f32(cols[4]), 'offset': f32(offset),
            'emissive': np.array(cols[5])[owner]}


def _matvec(M, v):
    """M (k, 3) times a (3, H, W) field, as plain elementwise products and sums: the bytes then do
    not depend on the BLAS build (make_synthetic promises the same bytes for the same seed)."""
    return np.stack([M[i, 0] * v[0] + M[i, 1] * v[1] + M[i, 2] * v[2] for i in range(len(M))])


def _pick(index, arrays):
    """arrays[index[p], p] for a (3, H, W) stack and an (H, W) index in 0..2 (faster than np.choose)."""
    return np.where(index == 0, arrays[0], np.where(index == 1, arrays[1], arrays[2]))


def _camera_pose(rng, scene):
    """Camera-to-world rotation: usually aimed at a random box (so furniture fills the view), else
    towards the room centre; pitched to the target, slightly rolled."""
    o = scene.cam
    target = np.array([scene.room[0] / 2, rng.uniform(0.5, 1.2), scene.room[2] / 2])
    if scene.boxes and rng.random() < 0.8:
        lo, hi, _ = scene.boxes[int(rng.integers(len(scene.boxes)))]
        if np.hypot(*((lo + hi) / 2 - o)[[0, 2]]) > 0.5:
            target = (lo + hi) / 2
    dx, dy, dz = target - o
    yaw = np.arctan2(-dx, -dz) + rng.uniform(-0.35, 0.35)
    pitch = np.clip(np.arctan2(dy, np.hypot(dx, dz)) + rng.uniform(-0.15, 0.15), -0.7, 0.15)
    return _rotation(yaw, pitch, np.radians(rng.uniform(-5, 5)))


def render_scene(rng, size):
    """Ray-cast one random room. Returns MTAN-layout float32 arrays 'image' (H, W, 3), 'depth'
    (H, W, 1), 'normal' (H, W, 3), 'label' (H, W) (-1 = ignore), and 'face' (H, W) int: the planar face
    each pixel sees (for tests). Cost: one ray-box slab test per box over the pixels of its projected
    bounding rectangle, on (3, H, W) channel-first arrays (reductions over a trailing axis of 3 are
    slow in numpy; elementwise minimum/maximum of the three slabs are not)."""
    H, W = size
    scene = _RoomBuilder(rng).furnish()
    # float32 throughout: twice the speed of float64, and depth is stored as float32 anyway
    room, o = scene.room.astype(np.float32), scene.cam.astype(np.float32)
    R = _camera_pose(rng, scene).astype(np.float32)
    rays, f = _camera_rays(H, W)
    d = _matvec(R, rays)                                              # (3, H, W) world directions
    d[np.abs(d) < 1e-12] = 1e-12
    inv = 1.0 / d

    # room interior: the ray leaves the room box through the face with the smallest exit distance
    e = (np.where(d > 0, room[:, None, None], 0.0) - o[:, None, None]) * inv
    depth = np.minimum(np.minimum(e[0], e[1]), e[2])                  # (H, W): t along d = z-depth
    axis = np.where(depth == e[0], 0, np.where(depth == e[1], 1, 2))
    obj = np.full((H, W), -1)
    rects = _box_pixel_rects(scene.boxes, o, R, f, H, W) if scene.boxes else []
    for m, ((lo, hi, _), rect) in enumerate(zip(scene.boxes, rects)):
        if rect is None:
            continue
        sl = np.s_[rect[0]:rect[1], rect[2]:rect[3]]
        entry = []
        for k in range(3):                                            # slab test, per axis
            a, b = float(lo[k] - o[k]) * inv[k][sl], float(hi[k] - o[k]) * inv[k][sl]
            entry.append(np.minimum(a, b))
            t_out = np.maximum(a, b) if k == 0 else np.minimum(t_out, np.maximum(a, b))
        t_in = np.maximum(np.maximum(entry[0], entry[1]), entry[2])
        zb = depth[sl]                                                # a view: updated in place
        hit = (t_in <= t_out) & (t_in > 1e-3) & (t_in < zb)
        if hit.any():
            t = t_in[hit]
            zb[hit] = t
            obj[sl][hit] = m
            axis[sl][hit] = np.where(t == entry[0][hit], 0, np.where(t == entry[1][hit], 1, 2))

    positive = _pick(axis, d) < 0          # the hit face's normal points along +axis
    face = np.where(obj < 0, 0, 6 + 6 * obj) + 2 * axis + positive
    sign = np.where(positive, np.float32(1), np.float32(-1))
    n_world = np.stack([np.where(axis == k, sign, 0.0) for k in range(3)])   # (3, H, W)
    normal = _matvec(R.T, n_world)                                    # camera frame: R^T n

    styles = _face_styles(rng, [c for _, _, c in scene.boxes])
    point = o[:, None, None] + depth * d                              # (3, H, W) hit points
    image = _shade(rng, point, n_world, face, axis, styles, room)
    label = np.take(styles['label'], face).astype(np.float32)
    depth, normal, label = _add_holes(rng, depth, normal.transpose(1, 2, 0), label, label == CLS['window'])
    return {'image': image.astype(np.float32), 'depth': depth[..., None].astype(np.float32),
            'normal': normal.astype(np.float32), 'label': label, 'face': face}


_CORNERS = np.array([[(i >> k) & 1 for k in range(3)] for i in range(8)], dtype=bool)


def _box_pixel_rects(boxes, o, R, f, H, W):
    """Per box, the pixel rows/cols (v0, v1, u0, u1) covering its projection; the whole image if the
    box straddles the camera plane; None if it is behind the camera or off screen."""
    lo = np.array([b[0] for b in boxes]).reshape(-1, 1, 3)
    hi = np.array([b[1] for b in boxes]).reshape(-1, 1, 3)
    cam = (np.where(_CORNERS, hi, lo) - o) @ R                       # (M, 8, 3) corners, camera frame
    behind = cam[..., 2] > -0.05
    z = np.where(behind, -1.0, -cam[..., 2])
    u = f * cam[..., 0] / z + W / 2 - 0.5
    v = -f * cam[..., 1] / z + H / 2 - 0.5
    v0 = np.maximum(np.floor(v.min(1)) - 1, 0).astype(int).tolist()
    v1 = np.minimum(np.ceil(v.max(1)) + 2, H).astype(int).tolist()
    u0 = np.maximum(np.floor(u.min(1)) - 1, 0).astype(int).tolist()
    u1 = np.minimum(np.ceil(u.max(1)) + 2, W).astype(int).tolist()
    rects = []
    for m, (all_behind, some_behind) in enumerate(zip(behind.all(1).tolist(), behind.any(1).tolist())):
        if all_behind:
            rects.append(None)
        elif some_behind:
            rects.append((0, H, 0, W))
        else:
            rects.append((v0[m], v1[m], u0[m], u1[m]) if v0[m] < v1[m] and u0[m] < u1[m] else None)
    return rects


def _shade(rng, point, n_world, face, axis, styles, room):
    """Albedo x textured surface x (ambient + sun + ceiling lamp with distance falloff) + sensor noise.
    Shading varies with the normal (each box face gets its own brightness) and with distance to the
    lamp, so RGB carries real cues for normals and depth. point, n_world (3, H, W) -> (H, W, 3)."""
    H, W = face.shape
    bank = _texture_bank()
    # texture coordinates: the two world coordinates spanning the hit face's plane
    a, b = _pick((axis + 1) % 3, point), _pick((axis + 2) % 3, point)
    look = lambda key: np.take(styles[key], face, axis=0)           # per-face table -> per pixel
    scale, offset = look('scale'), look('offset')
    ti = np.floor(a * scale + offset[..., 0]).astype(np.int64) % _TEX
    tj = np.floor(b * scale + offset[..., 1]).astype(np.int64) % _TEX
    tex = bank[look('tex'), ti, tj]
    albedo = look('albedo') * (1 + look('contrast') * 2 * (tex - 0.5))[..., None]

    ambient = rng.uniform(0.3, 0.5)
    el, az = np.radians(rng.uniform(35, 75)), rng.uniform(0, 2 * np.pi)
    sun = np.array([np.cos(el) * np.cos(az), np.sin(el), np.cos(el) * np.sin(az)], dtype=np.float32)
    lamp = np.array([room[0] * rng.uniform(0.3, 0.7), room[1] - 0.3, room[2] * rng.uniform(0.3, 0.7)],
                    dtype=np.float32)
    to_lamp = lamp[:, None, None] - point
    dist2 = to_lamp[0] ** 2 + to_lamp[1] ** 2 + to_lamp[2] ** 2
    lamp_cos = np.maximum((n_world * to_lamp).sum(0), 0) / np.sqrt(dist2)
    light = (ambient + (1 - ambient) * 0.8 * np.maximum(_matvec(sun[None], n_world)[0], 0)
             + rng.uniform(0.6, 1.0) * lamp_cos / (1 + 0.25 * dist2))
    light = np.where(look('emissive'), 1.0, light)
    rgb = albedo * light[..., None]
    rgb *= rng.uniform(0.8, 1.1) * (1 + rng.normal(0, 0.03, 3))      # exposure, white balance
    rgb += rng.random((H, W, 3), dtype=np.float32) * 0.04 - 0.02   # sensor noise (uniform: cheap)
    return np.clip(rgb, 0, 1)


def _add_holes(rng, depth, normal, label, is_window):
    """Invalid regions like NYUv2's: elliptic sensor dropouts (depth and normals invalid together, as
    in Eigen & Fergus' normals), unlabelled blobs (label -1), both at once; and, sometimes, no depth
    on the windows (glass)."""
    H, W = depth.shape
    depth, normal, label = depth.copy(), normal.copy(), label.copy()
    rows, cols = np.ogrid[0:H, 0:W]
    for _ in range(int(rng.integers(0, 4))):
        cv, cu = rng.uniform(0, H), rng.uniform(0, W)
        rv, ru = rng.uniform(0.03, 0.1) * H, rng.uniform(0.03, 0.1) * W
        blob = ((rows - cv) / rv) ** 2 + ((cols - cu) / ru) ** 2 <= 1
        kind = int(rng.integers(3))  # 0 sensor, 1 unlabelled, 2 both
        if kind != 1:
            depth[blob], normal[blob] = 0.0, 0.0
        if kind != 0:
            label[blob] = -1
    if rng.random() < 0.3:
        depth[is_window], normal[is_window] = 0.0, 0.0
    return depth, normal, label


LAYOUTS = ('mtan', 'nyud_mt')
# NYUD_MT's folders (data.NYUDMT.FILES) and the extension of their files
NYUD_MT_FOLDERS = {'images': 'jpg', 'segmentation': 'png', 'depth': 'npy', 'normals': 'npy', 'edge': 'npy'}


def _remove_samples(root):
    """Delete the sample files of a synthetic set (either layout: <i>.npy, or NYUD_MT's <id>.<ext> and its
    split lists), nothing else."""
    folders = [(os.path.join(root, split, f), 'npy') for split in ('train', 'val')
               for f in ('image', 'label', 'depth', 'normal')]
    folders += [(os.path.join(root, f), ext) for f, ext in NYUD_MT_FOLDERS.items()]
    for d, ext in folders:
        names = os.listdir(d) if os.path.isdir(d) else []
        for name in [n for n in names if n.endswith('.' + ext) and n[:-len(ext) - 1].isdigit()]:
            os.remove(os.path.join(d, name))
    for split in ('train', 'val'):
        lst = os.path.join(root, 'gt_sets', f'{split}.txt')
        if os.path.isfile(lst):
            os.remove(lst)


def _write_mtan(root, split, i, scene):
    for folder in ('image', 'label', 'depth', 'normal'):
        np.save(os.path.join(root, split, folder, f'{i}.npy'), scene[folder])


def _write_nyud_mt(root, split, i, scene):
    """One scene in NYUD_MT's formats (data.NYUDMT): JPEG image, segmentation PNG of class + 1 (0 = void),
    depth and normals .npy, edges from the label boundaries (data.label_edges: PASCAL-Context's rule); the
    13 classes take the first 13 of NYUD_MT's 40. The id is the scene's index in the split list."""
    from PIL import Image
    id_ = f'{i:05d}'
    Image.fromarray(np.round(scene['image'] * 255).astype(np.uint8)).save(
        os.path.join(root, 'images', id_ + '.jpg'), quality=95)
    Image.fromarray((scene['label'] + 1).astype(np.uint8)).save(os.path.join(root, 'segmentation', id_ + '.png'))
    np.save(os.path.join(root, 'depth', id_ + '.npy'), scene['depth'][..., 0])
    np.save(os.path.join(root, 'normals', id_ + '.npy'), scene['normal'])
    np.save(os.path.join(root, 'edge', id_ + '.npy'), label_edges(scene['label']).astype(np.float32))
    with open(os.path.join(root, 'gt_sets', f'{split}.txt'), 'a') as f:
        f.write(id_ + '\n')


def make_synthetic(root, n_train, n_val, size=(96, 128), seed=0, layout='mtan'):
    """Write n_train + n_val rendered rooms to root/{train,val}/{image,label,depth,normal}/{i}.npy
    (the NYUv2 format), or with layout='nyud_mt' as NYUD_MT (images/, segmentation/, depth/, normals/,
    edge/, gt_sets/: data.NYUDMT reads it; train ids 0..n_train-1, val ids after them). Image i of a split
    depends only on (seed, split, i): the same arguments give the same bytes (on one machine; another CPU's
    libm may differ in last bits). If root already holds a complete set made with the same arguments
    (root/synthetic.json), nothing is rewritten; a set of ours with other arguments, or an interrupted one,
    is replaced. Returns root. Not safe to call from several processes at once on one root (let one rank
    generate, then the others read).
    Speed: ~200 scenes/s at 96x128 on one core (render_scene is the cost; np.save adds a little)."""
    H, W = (int(size[0]), int(size[1]))
    if H < 16 or W < 16 or n_train < 1 or n_val < 1 or seed < 0 or layout not in LAYOUTS:
        raise ValueError(f"make_synthetic: need size >= 16x16, n_train, n_val >= 1, seed >= 0 and a layout of "
                         f"{LAYOUTS}, got size={size}, n_train={n_train}, n_val={n_val}, seed={seed}, layout={layout!r}")
    params = {'format': 'synthetic-v1', 'n_train': int(n_train), 'n_val': int(n_val), 'size': [H, W],
              'seed': int(seed)}
    params.update({} if layout == 'mtan' else {'layout': layout})      # mtan: the marker of earlier sets
    marker = os.path.join(root, 'synthetic.json')
    if os.path.isfile(marker):
        with open(marker) as f:
            if json.load(f) == {**params, 'complete': True}:
                return root
        _remove_samples(root)            # ours, but other arguments or interrupted
    elif os.path.isdir(root) and os.listdir(root):
        raise ValueError(f"make_synthetic: {root!r} is not empty and holds no synthetic.json; refusing to "
                         f"write into it (it may be a real dataset). Pass an empty or new folder.")
    os.makedirs(root, exist_ok=True)
    with open(marker, 'w') as f:   # claims the folder first, so an interrupted run can be redone
        json.dump({**params, 'complete': False}, f)
    folders = ([os.path.join(split, f) for split in ('train', 'val') for f in ('image', 'label', 'depth', 'normal')]
               if layout == 'mtan' else [*NYUD_MT_FOLDERS, 'gt_sets'])
    for folder in folders:
        os.makedirs(os.path.join(root, folder), exist_ok=True)
    write = _write_mtan if layout == 'mtan' else _write_nyud_mt
    for code, (split, n, first) in enumerate((('train', n_train, 0), ('val', n_val, n_train))):
        for i in range(n):
            write(root, split, first + i if layout == 'nyud_mt' else i,
                  render_scene(np.random.default_rng([seed, code, i]), (H, W)))
    with open(marker, 'w') as f:
        json.dump({**params, 'complete': True}, f)
    return root


def main(argv=None):
    parser = argparse.ArgumentParser(description='render the synthetic dataset into OUT_DIR (NYUv2 format, or NYUD_MT)')
    parser.add_argument('out_dir')
    parser.add_argument('--n-train', type=int, default=800)
    parser.add_argument('--n-val', type=int, default=200)
    parser.add_argument('--size', type=parse_size, default=(96, 128), help='HxW')
    parser.add_argument('--seed', type=int, default=0)
    parser.add_argument('--layout', choices=LAYOUTS, default='mtan',
                        help="mtan: MTAN's .npy release (NYUv2); nyud_mt: the NYUD_MT release (data.py's nyud)")
    args = parser.parse_args(argv)
    t0 = time.perf_counter()
    try:
        make_synthetic(args.out_dir, args.n_train, args.n_val, args.size, args.seed, args.layout)
    except ValueError as e:
        parser.error(str(e))
    print(f"wrote {args.n_train} train + {args.n_val} val scenes of {args.size[0]}x{args.size[1]} ({args.layout}) "
          f"to {args.out_dir} in {time.perf_counter() - t0:.1f} s")


if __name__ == '__main__':
    sys.exit(main())
