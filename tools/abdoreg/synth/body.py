"""The body drawn around real organs: wall, fat, spine, muscles, ribs, lungs, heart, bowel, table.

Real label maps hold the 13 organs and nothing else; a CT also shows everything around them. The
tissues here are placed relative to the organs on the output grid (canonical RAS axes, millimetres):
the spine behind the aorta, the abdominal cavity as the smallest egg-shaped section per slice that
holds the organs plus a random visceral margin, the muscle wall and subcutaneous fat around it, the
lungs above the diaphragm (the organs' upper surface), the bowel, colon and visceral fat as a random
label field (smoothed noise plus location priors, argmax). Tissue ids are the phantom's
(``phantom.TISSUE_IDS``) plus ``EXTRA_TISSUES``; organ voxels keep their organ id.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .noise import fields
from .phantom import TISSUE_IDS, _segment_distance

# Tissues the phantom does not draw (never labelled in any cohort: their native id is 0).
EXTRA_TISSUES = {
    "table": 40,
    "heart": 41,
    "disc": 42,
    "artery": 43,  # unlabelled arteries (iliac)
    "rib": 44,
    "vein": 45,  # unlabelled veins (iliac)
}
ALL_TISSUES = {**TISSUE_IDS, **EXTRA_TISSUES}
T = ALL_TISSUES


def _grid(axes):
    xs, ys, zs = (np.asarray(a, np.float32) for a in axes)
    return xs[:, None, None], ys[None, :, None], zs[None, None, :]


def _per_slice_fit(z_idx: np.ndarray, values: np.ndarray, weights: np.ndarray, nz: int, default: float):
    """A straight line through per-slice values (slices with weight > 0), one outlier pass, held constant
    beyond the slices measured; ``default`` everywhere when no slice was measured."""
    ok = weights > 0
    if ok.sum() < 2:
        return np.full(nz, values[ok][0] if ok.any() else default, np.float32)
    z, v, w = z_idx[ok].astype(float), values[ok], np.sqrt(weights[ok])
    coef = np.polyfit(z, v, 1, w=w)
    res = np.abs(np.polyval(coef, z) - v)
    keep = res <= max(10.0, 2.5 * np.median(res))
    if keep.sum() >= 2:
        coef = np.polyfit(z[keep], v[keep], 1, w=w[keep])
    coef[0] = np.clip(coef[0], -0.35, 0.35)  # a spine leans little over a slice
    zz = np.clip(np.arange(nz, dtype=float), z.min(), z.max())
    return np.polyval(coef, zz).astype(np.float32)


def spine_line(labels: np.ndarray, axes, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per-slice centre (x, y) of the vertebral bodies: behind and right of the descending aorta.

    The aorta's posterior edge per slice sets the spine's front (the ascending aorta and the arch lie
    anterior in chest slices, so only aorta voxels within 25 mm of the posterior edge count); without an
    aorta, the inferior vena cava; without either, the canonical position.
    """
    xs, ys, _ = axes
    nz = labels.shape[2]
    gap = rng.uniform(0.0, 6.0)
    for organ, dx, fallback_gap in ((8, rng.uniform(10, 20), gap), (9, -rng.uniform(18, 26), gap + 4)):
        i, j, k = np.nonzero(labels == organ)
        if len(k) < 10:
            continue
        y = ys[j]
        y_post = np.full(nz, np.inf, np.float32)
        np.minimum.at(y_post, k, y)
        near = y <= y_post[k] + 25.0
        cnt = np.bincount(k[near], minlength=nz).astype(np.float32)
        x_sum = np.bincount(k[near], weights=xs[i[near]], minlength=nz)
        x_mean = np.where(cnt > 0, x_sum / np.maximum(cnt, 1), 0.0)
        y_post = np.where(np.isfinite(y_post), y_post, 0.0)
        zk = np.arange(nz)
        sx = _per_slice_fit(zk, x_mean + dx, cnt, nz, -5.0)
        front = _per_slice_fit(zk, y_post - fallback_gap, cnt, nz, -20.0)
        return sx, front
    return np.full(nz, -5.0, np.float32), np.full(nz, -20.0 - gap, np.float32)


def _smooth_profile(values: np.ndarray, valid: np.ndarray, spacing_z: float, floor: float) -> np.ndarray:
    """Per-slice radius scale: running max and Gaussian smoothing over ~20 mm, never below the raw value
    or ``floor``, constant beyond the slices that hold organs."""
    z = np.arange(len(values))
    if not valid.any():
        return np.full(len(values), floor, np.float32)
    filled = np.interp(z, z[valid], values[valid])
    win = max(1, int(round(40.0 / spacing_z)))
    out = ndimage.maximum_filter1d(filled, win, mode="nearest")
    out = ndimage.gaussian_filter1d(out, max(0.5, 15.0 / spacing_z), mode="nearest")
    out = np.maximum(np.maximum(out, filled), floor)
    return ndimage.gaussian_filter1d(out, max(0.5, 5.0 / spacing_z), mode="nearest").astype(np.float32)


def _egg(x, y, cx, cy, radii):
    """Normalised radius of an egg-shaped section with four half-axes (right, left, anterior, posterior; RAS +x
    is the patient's right): < 1 inside."""
    rr, rl, ra, rp = radii
    rx = np.where(x > cx, rr, rl)
    ry = np.where(y > cy, ra, rp)
    return np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)


def draw_body(labels: np.ndarray, axes, rng: np.random.Generator) -> np.ndarray:
    """Tissue ids on the grid of ``labels`` (organ ids 1..13, canonical RAS axes ``axes`` in mm)."""
    shape = labels.shape
    xs, ys, zs = (np.asarray(a, np.float32) for a in axes)
    X, Y, Z = _grid(axes)
    sz = float(abs(zs[1] - zs[0])) if len(zs) > 1 else 2.0
    organ = labels > 0
    tissue = np.zeros(shape, np.uint8)

    # Spine and cavity centre per slice.
    sx, front = spine_line(labels, axes, rng)
    rvx, rvy = rng.uniform(19, 24), rng.uniform(14, 18)
    sy = front - rvy

    # The cavity: per slice, an egg (right, left, anterior, posterior half-axes) around the organ voxels, its axes
    # in the proportions of their extent, smoothed along z; chest and pelvis nearly as wide as the abdomen.
    i, j, k = np.nonzero(organ)
    nz = shape[2]
    cy = np.full(nz, float(ys[j].min() + ys[j].max()) / 2 if len(j) else 0.0, np.float32)
    u, v = xs[i] - sx[k], ys[j] - cy[k]
    ext = np.zeros((4, nz), np.float32)
    for row, value in enumerate((u, -u, v, -v)):
        np.maximum.at(ext[row], k, np.maximum(value, 0.0))
    ext = np.maximum(ext, 20.0)
    rxk = np.where(u > 0, ext[0][k], ext[1][k])
    ryk = np.where(v > 0, ext[2][k], ext[3][k])
    lam = np.zeros(nz, np.float32)
    np.maximum.at(lam, k, np.sqrt((u / rxk) ** 2 + (v / ryk) ** 2))
    has = np.bincount(k, minlength=nz) > 0
    ext = ext * np.maximum(lam, 1.0)
    ext[3] = np.maximum(ext[3], cy - (sy - rvy) + 5.0)  # the retroperitoneum reaches the spine
    q = rng.uniform(0.85, 0.95)
    radii = [_smooth_profile(e, has, sz, q * float(e[has].max()) if has.any() else 120.0) for e in ext]
    fat = rng.uniform(5, 45)  # subcutaneous fat, mm (the patient's habitus)
    margin = rng.uniform(0.0, 8.0) + 0.15 * fat  # visceral fat beyond the outermost organ
    wall = rng.uniform(8, 15)  # muscle wall
    shp = (1, 1, -1)
    radii = [(r + margin).reshape(shp) for r in radii]
    cxs, cys = sx.reshape(shp), cy.reshape(shp)
    cav = _egg(X, Y, cxs, cys, radii)
    dist_c = np.sqrt((X - cxs) ** 2 + (Y - cys) ** 2)
    depth = dist_c * (1.0 - 1.0 / np.maximum(cav, 1e-3))  # mm outside the cavity's boundary (radial)
    spacing = [abs(float(a[1] - a[0])) if len(a) > 1 else 1.0 for a in (xs, ys, zs)]
    fat_mod = fields(rng, 1, shape, spacing, 100.0)[0]
    fat_here = fat * np.clip(1.0 + 0.3 * fat_mod, 0.4, 1.8)
    back = (
        cys - (sy.reshape(shp) - 75.0)
    ) + 0.6 * fat  # the posterior body wall lies behind the back muscles
    outer = [r + wall + fat_here for r in radii[:3]] + [np.maximum(radii[3] + wall + fat, back)]
    outline = _egg(X, Y, cxs, cys, outer)
    body = outline < 1.0
    tissue[body] = T["subcutaneous_fat"]
    tissue[body & (depth <= wall)] = T["muscle"]
    skin = body & (outline > 1.0 - 2.5 / np.maximum(outer[0], 1.0))
    tissue[skin] = T["muscle"]
    cavity = depth <= 0.0
    tissue[cavity] = T["visceral_fat"]

    _lungs_and_heart(tissue, labels, cavity, axes, sx, sy, cy, rng)
    _bowel_mixture(tissue, labels, cavity, depth, axes, sy, rng)
    _spine_and_muscles(tissue, labels, body, axes, sx, sy, rvx, rvy, rng)
    _ribs(tissue, labels, body, depth, wall, axes, sx, sy, cy, radii, rng)
    _iliac_vessels(tissue, labels, cavity, axes, rng)
    _table(tissue, body, axes, sx, rng)
    tissue[organ] = labels[organ]
    _portal_vein(tissue, labels, cavity, axes, rng)
    return tissue


def _portal_vein(tissue, labels, cavity, axes, rng) -> None:
    """Maps without the portal and splenic vein (FLARE22 annotates none): draw one where it runs, from the splenic
    hilum along the back of the pancreas to the confluence behind its neck, then up and right to the liver's hilum.
    It gets the vein's id, so it is labelled wherever a cohort annotates that vein (maps without it never feed
    such a cohort, see ``realmaps.MapPools``)."""
    if (labels == 10).any() or not all((labels == o).any() for o in (1, 6, 11)):
        return
    xs, ys, zs = (np.asarray(a, np.float32) for a in axes)

    def world(mask):
        i, j, k = np.nonzero(mask)
        return np.stack([xs[i], ys[j], zs[k]], 1)

    pancreas, spleen, liver = world(labels == 11), world(labels == 1), world(labels == 6)
    order = np.argsort(pancreas[:, 0])  # from the tail (patient's left, -x) to the head
    bins = np.array_split(pancreas[order], 4)
    path = [spleen[np.argmin(((spleen - bins[0].mean(0)) ** 2).sum(1))]]
    for b in bins[:3]:  # behind the tail, the body and the neck
        c = b.mean(0)
        path.append(np.array([c[0], b[:, 1].min() - rng.uniform(2.0, 6.0), c[2]]))
    confluence = path[-1]
    hilum = liver[np.argmin(((liver - (confluence + [30.0, 10.0, 40.0])) ** 2).sum(1))]
    path.append(hilum)
    splenic = _tube_mask(labels.shape, (xs, ys, zs), np.stack(path[:-1]), rng.uniform(3.5, 5.0))
    portal = _tube_mask(labels.shape, (xs, ys, zs), np.stack(path[-2:]), rng.uniform(5.0, 7.0))
    free = cavity & (labels == 0)
    tissue[(splenic | portal) & free] = 10


def _lungs_and_heart(tissue, labels, cavity, axes, sx, sy, cy, rng) -> None:
    """Lungs above the diaphragm (a smooth surface over the liver, spleen and stomach), heart and mediastinum."""
    xs, ys, zs = axes
    X, Y, Z = _grid(axes)
    upper = np.isin(labels, (1, 6, 7))
    if not upper.any():
        return
    nz = labels.shape[2]
    top_idx = nz - 1 - np.argmax(upper[:, :, ::-1], axis=2)
    has = upper.any(axis=2)
    top = np.where(has, zs[top_idx], 0.0).astype(np.float32)
    sxy = abs(float(xs[1] - xs[0])) if len(xs) > 1 else 2.0
    sigma, size = 15.0 / sxy, max(1, int(10 / sxy))
    # the organs' upper surface; where no organ lies below, spread from them (grey dilation, normalised convolution)
    near = ndimage.binary_dilation(has, np.ones((size, size), bool))
    spread = np.where(near, ndimage.grey_dilation(np.where(has, top, -1e4), size=size), 0.0)
    weight = ndimage.gaussian_filter(near.astype(np.float32), sigma)
    dome = ndimage.gaussian_filter(spread.astype(np.float32), sigma)
    surface = np.where(weight > 0.05, dome / np.maximum(weight, 1e-6), float(np.mean(top[has])))
    surface = np.where(has, top, surface) + rng.uniform(3.0, 6.0)  # the diaphragm lies on the organs
    above = Z > surface[:, :, None]
    thorax = cavity & above
    mid = sx.reshape(1, 1, -1)
    mediastinum = thorax & (np.abs(X - mid) < rng.uniform(30, 45)) & (Y > sy.reshape(1, 1, -1))
    tissue[thorax] = T["lung"]
    tissue[mediastinum] = T["visceral_fat"]
    # The heart rests on the diaphragm's centre, left and anterior.
    centre_x = float(np.median(sx)) - rng.uniform(15, 35)
    centre_y = float(np.median(cy)) + rng.uniform(5, 30)
    ix = int(np.clip(np.searchsorted(xs, centre_x), 0, len(xs) - 1))
    iy = int(np.clip(np.searchsorted(ys, centre_y), 0, len(ys) - 1))
    rz = rng.uniform(50, 60)
    centre_z = float(surface[ix, iy]) + 0.8 * rz
    heart = thorax & (
        ((X - centre_x) / rng.uniform(55, 65)) ** 2
        + ((Y - centre_y) / rng.uniform(45, 55)) ** 2
        + ((Z - centre_z) / rz) ** 2
        < 1.0
    )
    tissue[heart] = T["heart"]


def _bowel_mixture(tissue, labels, cavity, depth, axes, sy, rng) -> None:
    """Visceral fat, small bowel and colon in the abdominal cavity below the diaphragm: argmax of smoothed
    noise plus priors (colon along the cavity's wall and anterior, small bowel central and low, fat behind
    by the kidneys and spine)."""
    free = cavity & (tissue == T["visceral_fat"]) & (labels == 0)
    if not free.any():
        return
    xs, ys, zs = (np.asarray(a, np.float32) for a in axes)
    spacing = [abs(float(a[1] - a[0])) if len(a) > 1 else 1.0 for a in (xs, ys, zs)]
    zk = np.nonzero(labels.any(axis=(0, 1)))[0]
    pan = np.nonzero(labels == 11)[2]
    z_mid = float(zs[pan].mean()) if len(pan) else float(np.median(zs[zk])) if len(zk) else 0.0
    liver = np.nonzero(labels == 6)[2]
    z_liver = float(zs[liver].mean()) if len(liver) else z_mid + 40.0
    noise = fields(rng, 3, labels.shape, spacing, 40.0)
    i, j, k = np.nonzero(free)
    y, z, inside = ys[j], zs[k], -depth[i, j, k]  # mm inside the cavity wall
    y_spine = sy[k]

    def step(v):  # a smooth step over ~15 mm: no straight edges between the priors
        return 1.0 / (1.0 + np.exp(-v / 8.0))

    colon = np.exp(-(((inside - 30.0) / 25.0) ** 2)) * step(z_liver - 10.0 - z) * step(y - y_spine - 10.0)
    bowel = step(z_mid + 20.0 - z) * step(inside - 30.0) * step(y - y_spine - 15.0)
    fat = 0.2 + 0.8 * step(y_spine + 30.0 - y) + 0.5 * step(z - z_liver)
    w = rng.uniform(1.4, 2.2), rng.uniform(1.2, 2.0), rng.uniform(0.8, 1.4)
    score = np.stack(
        [
            w[2] * fat + 0.8 * noise[0][i, j, k],
            w[1] * bowel + 0.8 * noise[1][i, j, k],
            w[0] * colon + 0.8 * noise[2][i, j, k],
        ]
    )
    ids = np.array([T["visceral_fat"], T["bowel"], T["colon"]], np.uint8)
    tissue[i, j, k] = ids[np.argmax(score, axis=0)]


def _spine_and_muscles(tissue, labels, body, axes, sx, sy, rvx, rvy, rng) -> None:
    """Vertebral bodies (cortex, marrow, discs), canal and posterior elements, back muscles and psoas."""
    X, Y, Z = _grid(axes)
    zs = np.asarray(axes[2], np.float32)
    shp = (1, 1, -1)
    cx, cy = sx.reshape(shp), sy.reshape(shp)
    # back muscles (erector spinae) either side of the spinous processes
    rc = rng.uniform(7, 10)
    canal_y = cy - rvy - rc - rng.uniform(1, 3)
    para_dx, para_dy = rng.uniform(28, 36), rng.uniform(12, 20)
    para_r = rng.uniform(22, 30), rng.uniform(20, 27)
    for side in (-1.0, 1.0):
        m = ((X - cx - side * para_dx) / para_r[0]) ** 2 + ((Y - canal_y + para_dy) / para_r[1]) ** 2 < 1.0
        tissue[m & body] = T["muscle"]
    # psoas: from the kidneys' upper poles downward, growing
    kid = np.nonzero(np.isin(labels, (2, 3)))
    z_top = (float(zs[kid[2]].max()) if len(kid[2]) else float(np.median(zs))) - rng.uniform(0, 30)
    r_max = rng.uniform(16, 26)
    r_ps = (np.clip((z_top - Z) / 150.0, 0.0, 1.0) * r_max + 3.0) * (z_top > Z)
    for side in (-1.0, 1.0):
        m = ((X - cx - side * (rvx + 0.9 * r_ps)) ** 2 + (Y - cy - 3.0) ** 2) < r_ps**2
        tissue[m & body] = T["muscle"]
    # vertebral bodies and discs
    period, disc_h, phase = rng.uniform(30, 36), rng.uniform(6, 10), rng.uniform(0, 36)
    disc = ((Z - phase) % period) < disc_h
    vb = ((X - cx) / rvx) ** 2 + ((Y - cy) / rvy) ** 2
    cortex = 1.0 - 2.0 * 2.5 / (rvx + rvy)  # ~2.5 mm cortex
    tissue[body & (vb < 1.0)] = T["bone"]
    tissue[body & (vb < cortex) & ~disc] = T["marrow"]
    tissue[body & (vb < 1.02) & disc] = T["disc"]
    # canal, arch, spinous and transverse processes
    dc = np.sqrt((X - cx) ** 2 + (Y - canal_y) ** 2)
    arch = (dc < rc + 5.0) & (Y < canal_y + 0.3 * rc)
    spinous = (np.abs(X - cx) < 3.0) & (Y < canal_y) & (Y > canal_y - rc - rng.uniform(20, 30))
    level = ((Z - phase) % period) - disc_h
    transverse = (
        (np.abs(Y - canal_y - 2.0) < 3.0) & (np.abs(X - cx) < rvx + 18.0) & (level > 4) & (level < 12)
    )
    tissue[body & ~disc & (arch | spinous | transverse)] = T["bone"]
    tissue[body & (dc < rc)] = T["spinal_canal"]


def _ribs(tissue, labels, body, depth, wall, axes, sx, sy, cy, radii, rng) -> None:
    """Ribs in the wall beside and behind the liver and spleen, sloping down anteriorly."""
    X, Y, Z = _grid(axes)
    zs = np.asarray(axes[2], np.float32)
    upper = np.nonzero(np.isin(labels, (1, 6)))
    if not len(upper[2]):
        return
    z_bottom = float(zs[upper[2]].min()) + rng.uniform(20, 60)  # the lowest ribs end beside the kidneys
    shp = (1, 1, -1)
    cx, cys = sx.reshape(shp), cy.reshape(shp)
    period, thick, slope, phase = (
        rng.uniform(30, 40),
        rng.uniform(6, 9),
        rng.uniform(0.3, 0.7),
        rng.uniform(0, 40),
    )
    zp = Z + slope * (Y - sy.reshape(shp))
    band = ((zp - phase) % period) < thick
    in_wall = (depth > -2.0) & (depth < wall + 2.0)
    not_front = ~((np.abs(X - cx) < 0.35 * np.minimum(radii[0], radii[1])) & (Y > cys))
    ribs = body & band & in_wall & not_front & (zp > z_bottom)
    tissue[ribs & (labels == 0)] = T["rib"]


def _tube_mask(shape, axes, points: np.ndarray, radius: float) -> np.ndarray:
    """Voxels within ``radius`` mm of a polyline, computed in its bounding box only."""
    xs, ys, zs = axes
    lo, hi = points.min(0) - radius, points.max(0) + radius
    sl = []
    for a, l_, h in zip((xs, ys, zs), lo, hi, strict=True):
        idx = np.nonzero((a >= l_) & (a <= h))[0]
        if not len(idx):
            return np.zeros(shape, bool)
        sl.append(slice(idx.min(), idx.max() + 1))
    sub = np.stack(np.meshgrid(xs[sl[0]], ys[sl[1]], zs[sl[2]], indexing="ij"), -1)
    dist = np.full(sub.shape[:3], np.inf, np.float32)
    for a, b in zip(points[:-1], points[1:], strict=True):
        dist = np.minimum(dist, _segment_distance(sub, a, b))
    out = np.zeros(shape, bool)
    out[tuple(sl)] = dist < radius
    return out


def _iliac_vessels(tissue, labels, cavity, axes, rng) -> None:
    """Common iliac arteries and veins below the aortic and caval ends (unlabelled), where the map ends them."""
    xs, ys, zs = (np.asarray(a, np.float32) for a in axes)
    for organ, name, side_shift in ((8, "artery", 0.0), (9, "vein", -8.0)):
        i, j, k = np.nonzero(labels == organ)
        if len(k) < 10 or k.min() <= 2:
            continue
        low = k <= k.min() + 1
        end = np.array([xs[i[low]].mean(), ys[j[low]].mean(), zs[k.min()]], float)
        radius = rng.uniform(5, 7)
        for side in (-1.0, 1.0):
            spread = rng.uniform(45, 65)
            pts = np.array(
                [
                    end,
                    end + [side * spread + side_shift, side_shift - 10.0, -120.0],
                    end + [side * (spread + 25), 10.0, -200.0],
                ]
            )
            m = _tube_mask(labels.shape, (xs, ys, zs), pts, radius) & cavity & (labels == 0)
            tissue[m] = T[name]


def _table(tissue, body, axes, sx, rng) -> None:
    """The scanner table under the patient (posterior, -y), slightly curved."""
    X, Y, _ = _grid(axes)
    ys = np.asarray(axes[1], np.float32)
    rows = np.nonzero(body.any(axis=(0, 2)))[0]
    if not len(rows):
        return
    y_back = float(ys[rows.min()])
    top = y_back - rng.uniform(0, 25)
    thick, half_width, curve = rng.uniform(8, 25), rng.uniform(180, 240), rng.uniform(0, 0.003)
    cx = float(np.median(sx))
    surface = top + curve * (X - cx) ** 2
    table = (Y < surface) & (Y > surface - thick) & (np.abs(X - cx) < half_width)
    tissue[np.broadcast_to(table, tissue.shape) & (tissue == 0)] = T["table"]
