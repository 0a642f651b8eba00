"""A deterministic synthetic abdominal CT phantom.

Anatomy is described in millimetres in RAS+ world coordinates (x to the patient's right,
y anterior, z superior) centred on the body, so that scans of any orientation and spacing
can be "acquired" from one subject by resampling through their affines. Subjects differ
by body size, organ position, size and shape, and a smooth random deformation, which makes
inter-patient registration a genuine problem.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage

# Organ ids of the 13-organ scheme (BTCV order) and of the extra tissues the phantom draws.
ORGANS = {
    "spleen": 1,
    "right_kidney": 2,
    "left_kidney": 3,
    "gallbladder": 4,
    "esophagus": 5,
    "liver": 6,
    "stomach": 7,
    "aorta": 8,
    "ivc": 9,
    "portal_splenic_vein": 10,
    "pancreas": 11,
    "right_adrenal": 12,
    "left_adrenal": 13,
}
TISSUES = {
    "subcutaneous_fat": 20,
    "muscle": 21,
    "visceral_fat": 22,
    "bowel": 23,
    "bone": 24,
    "marrow": 25,
    "lung": 26,
    "spinal_canal": 27,
    "duodenum": 28,
    "colon": 29,
    "liver_tumour": 30,
    "pancreas_tumour": 31,
    "kidney_tumour": 32,
    "hepatic_vessel": 33,
    "colon_tumour": 34,
}
TISSUE_IDS = {**ORGANS, **TISSUES}

# Mean portal-venous HU of each tissue.
HU = {
    "air": -1000.0,
    "spleen": 50,
    "right_kidney": 150,
    "left_kidney": 150,
    "gallbladder": 10,
    "esophagus": 40,
    "liver": 60,
    "stomach": 30,
    "aorta": 180,
    "ivc": 130,
    "portal_splenic_vein": 160,
    "pancreas": 100,
    "right_adrenal": 25,
    "left_adrenal": 25,
    "subcutaneous_fat": -100,
    "muscle": 50,
    "visceral_fat": -90,
    "bowel": 25,
    "bone": 900,
    "marrow": 300,
    "lung": -850,
    "spinal_canal": 15,
    "duodenum": 35,
    "colon": -350,
    "liver_tumour": 20,
    "pancreas_tumour": 45,
    "kidney_tumour": 70,
    "hepatic_vessel": 170,
    "colon_tumour": 55,
}


@dataclass(frozen=True)
class Preset:
    """Grid of the Learn2Reg-like scans: spacing (mm, isotropic) and shape."""

    spacing: float
    shape: tuple[int, int, int]

    @property
    def scale(self) -> float:
        """Anatomy scale so the body fills the field of view as it does at full size (384 mm wide)."""
        return min(1.0, self.spacing * self.shape[0] / 384.0)


PRESETS = {
    "full": Preset(2.0, (192, 160, 256)),
    "small": Preset(4.0, (96, 80, 128)),
    "demo": Preset(4.0, (72, 60, 96)),
    "tiny": Preset(6.0, (48, 40, 64)),
}


@dataclass
class Ellipsoid:
    name: str
    center: np.ndarray
    radii: np.ndarray
    angle: float = 0.0  # rotation about the superior axis, radians
    roughness: float = 0.15  # amplitude of the smooth shape noise, in units of the implicit function


@dataclass
class Tube:
    name: str
    points: np.ndarray  # (K, 3) polyline, mm
    radius: float
    roughness: float = 0.0


@dataclass
class Subject:
    """One synthetic patient: an ordered list of shapes (later ones overwrite earlier ones)."""

    seed: int
    scale: float
    body_radii: tuple[float, float]
    fat_thickness: float
    shapes: list = field(default_factory=list)
    deformation_mm: float = 8.0


def _rot_z(angle: float) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    return np.array([[c, -s, 0.0], [s, c, 0.0], [0.0, 0.0, 1.0]])


def sample_subject(seed: int, scale: float = 1.0, tumours: tuple[str, ...] = ()) -> Subject:
    """Draw a subject's anatomy. ``tumours`` adds lesions (``liver``, ``pancreas``, ``kidney``, ``colon``)."""
    rng = np.random.default_rng(seed)

    def jitter(sd: float) -> np.ndarray:
        return rng.normal(0.0, sd, 3)

    def vary(r, sd=0.1) -> np.ndarray:
        return np.asarray(r, float) * (1.0 + rng.normal(0.0, sd, 3))

    shift = np.array([rng.normal(0, 6), rng.normal(0, 6), rng.normal(0, 15)])  # whole viscera block
    body = (160.0 * (1 + rng.normal(0, 0.06)), 115.0 * (1 + rng.normal(0, 0.06)))
    subj = Subject(seed, scale, body, fat_thickness=float(rng.uniform(12, 35)))

    def ell(name, c, r, angle=0.0, rough=0.15, sd_pos=8.0, sd_size=0.1):
        subj.shapes.append(
            Ellipsoid(
                name,
                np.asarray(c, float) + shift + jitter(sd_pos),
                vary(r, sd_size),
                angle + rng.normal(0, 0.15),
                rough,
            )
        )

    def tube(name, pts, radius, sd_pos=5.0):
        pts = np.asarray(pts, float) + shift + jitter(sd_pos)
        subj.shapes.append(Tube(name, pts, radius * (1 + rng.normal(0, 0.1))))

    # Background tissues inside the abdomen.
    ell("bowel", (0, 30, -60), (110, 70, 90), rough=0.25, sd_pos=10)
    tube(
        "colon",
        [(95, 20, -140), (100, 15, -30), (80, 60, 10), (-80, 60, 10), (-100, 15, -30), (-90, 10, -140)],
        22,
    )
    ell("lung", (80, -20, 210), (70, 75, 90), rough=0.1)
    ell("lung", (-80, -20, 210), (70, 75, 90), rough=0.1)
    # Organs (x: patient right is +x in RAS).
    ell("liver", (65, 0, 100), (75, 70, 65), angle=0.3, rough=0.2)
    ell("spleen", (-95, -40, 90), (30, 45, 55), angle=-0.4)
    ell("stomach", (-55, 25, 85), (50, 40, 50), angle=0.3, rough=0.2)
    ell("gallbladder", (50, 45, 40), (17, 17, 35), angle=0.4)
    ell("right_kidney", (70, -55, 10), (28, 25, 55), angle=-0.35, rough=0.08)
    ell("left_kidney", (-70, -55, 25), (28, 25, 55), angle=0.35, rough=0.08)
    ell("right_adrenal", (45, -50, 75), (8, 12, 18), rough=0.1, sd_pos=5)
    ell("left_adrenal", (-45, -45, 70), (8, 12, 18), rough=0.1, sd_pos=5)
    tube("duodenum", [(10, 40, 70), (40, 20, 50), (35, 15, 25), (-10, 15, 20)], 12)
    tube("pancreas", [(15, 22, 42), (-20, 25, 50), (-60, 10, 58), (-85, -15, 65)], 12)
    tube("portal_splenic_vein", [(45, 5, 70), (15, 10, 58), (-25, 12, 60), (-75, -25, 72)], 6)
    tube("esophagus", [(5, 5, 250), (0, 8, 150), (-30, 22, 115)], 10)
    tube("aorta", [(-20, -15, 250), (-15, -5, 100), (-12, 0, -100)], 12)
    tube("ivc", [(25, 5, 250), (25, -5, 100), (20, -5, -100)], 13)
    if "liver" in tumours:
        ell(
            "liver_tumour",
            (65, 0, 100) + np.array([rng.uniform(-30, 30), rng.uniform(-20, 20), rng.uniform(-20, 20)]),
            (18, 18, 18),
            rough=0.1,
            sd_pos=0,
        )
    if "pancreas" in tumours:
        ell("pancreas_tumour", (-25, 25, 50), (12, 12, 12), rough=0.1, sd_pos=4)
    if "kidney" in tumours:
        side = rng.choice([1.0, -1.0])
        ell("kidney_tumour", (side * 70, -55, 10 + 20 * rng.uniform()), (15, 15, 15), rough=0.1, sd_pos=4)
    if "colon" in tumours:
        ell("colon_tumour", (-95, 15, -60), (15, 15, 15), rough=0.1, sd_pos=5)
    if "vessels" in tumours:
        for k in range(3):
            a = rng.uniform(0, 2 * np.pi)
            tube(
                "hepatic_vessel",
                [(45, 5, 75), (65 + 45 * np.cos(a), 40 * np.sin(a), 100 + 15 * k)],
                4,
                sd_pos=2,
            )
    return subj


def _smooth_fields(
    rng: np.random.Generator, n: int, shape: tuple[int, int, int], coarse=(6, 5, 8)
) -> np.ndarray:
    """``n`` smooth random fields (unit std) on ``shape``: cubic upsampling of a coarse lattice, then trilinear."""
    out = np.empty((n, *shape), np.float32)
    for k in range(n):
        lattice = rng.normal(0.0, 1.0, coarse)
        mid = ndimage.zoom(lattice, [4.0] * 3, order=3, mode="nearest")
        t = torch.from_numpy(np.ascontiguousarray(mid, dtype=np.float32))[None, None]
        out[k] = F.interpolate(t, size=shape, mode="trilinear", align_corners=True)[0, 0].numpy()
    return out


def grid_affine(spacing: float, shape: tuple[int, int, int]) -> np.ndarray:
    """RAS affine of the canonical (Learn2Reg-like) grid: RAS axes, centred on the body."""
    aff = np.diag([spacing, spacing, spacing, 1.0])
    aff[:3, 3] = -(np.asarray(shape) - 1) / 2.0 * spacing
    return aff


def _segment_distance(p: np.ndarray, a: np.ndarray, b: np.ndarray) -> np.ndarray:
    ab = b - a
    t = np.clip(((p - a) @ ab) / float(ab @ ab), 0.0, 1.0)
    closest = a + t[..., None] * ab
    return np.linalg.norm(p - closest, axis=-1)


def _index_box(
    lo: np.ndarray, hi: np.ndarray, aff: np.ndarray, scale: float, shape
) -> tuple[slice, ...] | None:
    """Voxel slices of the canonical (axis-aligned) grid covering a full-scale world box, or None if outside."""
    out = []
    for i in range(3):
        a = (lo[i] * scale - aff[i, 3]) / aff[i, i]
        b = (hi[i] * scale - aff[i, 3]) / aff[i, i]
        start, stop = max(0, int(np.floor(min(a, b)))), min(shape[i], int(np.ceil(max(a, b))) + 1)
        if start >= stop:
            return None
        out.append(slice(start, stop))
    return tuple(out)


def render(subject: Subject, preset: Preset) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rasterise a subject on the canonical grid: (tissue ids uint8, noiseless HU float32, RAS affine)."""
    rng = np.random.default_rng(subject.seed + 7919)
    shape = preset.shape
    s = subject.scale
    aff = grid_affine(preset.spacing, shape)
    axes = [aff[i, 3] + aff[i, i] * np.arange(shape[i], dtype=np.float32) for i in range(3)]
    fields = _smooth_fields(rng, 6, shape)
    disp = fields[:3] * (subject.deformation_mm * s)
    noise = fields[3:]
    # Deformed world coordinates, in units of the full-size anatomy (so shapes can be drawn at scale 1).
    ys = [
        ((np.broadcast_to(axes[i].reshape([-1 if j == i else 1 for j in range(3)]), shape) + disp[i]) / s)
        for i in range(3)
    ]
    pts = np.stack(ys, axis=-1)  # (X, Y, Z, 3), mm at full scale
    tissue = np.zeros(shape, np.uint8)

    # Body: elliptic cylinder, subcutaneous fat, muscle wall, visceral fat inside.
    ax, ay = subject.body_radii
    r_body = (pts[..., 0] / ax) ** 2 + (pts[..., 1] / ay) ** 2 + 0.03 * noise[0]
    tissue[r_body < 1.0] = TISSUE_IDS["subcutaneous_fat"]
    f = subject.fat_thickness
    r_muscle = (pts[..., 0] / (ax - f)) ** 2 + (pts[..., 1] / (ay - f)) ** 2
    tissue[r_muscle < 1.0] = TISSUE_IDS["muscle"]
    r_visc = (pts[..., 0] / (ax - f - 12)) ** 2 + (pts[..., 1] / (ay - f - 12)) ** 2
    tissue[r_visc < 1.0] = TISSUE_IDS["visceral_fat"]
    # Spine: vertebral body (cortex and marrow), canal, paraspinal muscles.
    y_spine = -ay + f + 55
    d_vert = np.hypot(pts[..., 0], pts[..., 1] - y_spine)
    d_canal = np.hypot(pts[..., 0], pts[..., 1] - (y_spine - 30))
    inside = r_body < 1.0
    tissue[inside & (np.hypot(pts[..., 0] / 2.2, pts[..., 1] - (y_spine - 45)) < 25)] = TISSUE_IDS["muscle"]
    tissue[inside & (d_vert < 22)] = TISSUE_IDS["bone"]
    tissue[inside & (d_vert < 18)] = TISSUE_IDS["marrow"]
    tissue[inside & (d_canal < 14)] = TISSUE_IDS["bone"]
    tissue[inside & (d_canal < 9)] = TISSUE_IDS["spinal_canal"]

    margin = 4.0 * subject.deformation_mm  # the smooth fields stay within about 4 std
    for k, shp in enumerate(subject.shapes):
        if isinstance(shp, Ellipsoid):
            lo, hi = shp.center - shp.radii.max() * 1.3, shp.center + shp.radii.max() * 1.3
        else:
            lo, hi = shp.points.min(0) - shp.radius, shp.points.max(0) + shp.radius
        box = _index_box(lo - margin, hi + margin, aff, s, shape)
        if box is None:
            continue
        p = pts[box]
        if isinstance(shp, Ellipsoid):
            local = (p - shp.center) @ _rot_z(shp.angle)  # coordinates in the ellipsoid's frame
            mask = np.sum((local / shp.radii) ** 2, axis=-1) + shp.roughness * noise[k % 3][box] < 1.0
        else:
            dist = np.full(p.shape[:3], np.inf, np.float32)
            for a, b in zip(shp.points[:-1], shp.points[1:], strict=True):
                dist = np.minimum(dist, _segment_distance(p, a, b))
            mask = dist < shp.radius
        tissue[box][mask & inside[box]] = TISSUE_IDS[shp.name]

    names = {v: k for k, v in TISSUE_IDS.items()}
    lut = np.full(256, HU["air"], np.float32)
    for tid, name in names.items():
        lut[tid] = HU[name]
    hu = lut[tissue]
    # Smooth texture inside organs (+-10 HU), then the scanner's point-spread function.
    hu += 10.0 * noise[1] * (tissue > 0)
    hu = ndimage.gaussian_filter(hu, 0.6).astype(np.float32)
    return tissue, hu, aff


def resample_to(
    volume: np.ndarray, src_affine: np.ndarray, dst_affine: np.ndarray, dst_shape, order: int, cval: float
) -> np.ndarray:
    """Resample ``volume`` from its grid to another grid of the same world space (linear or nearest)."""
    src = torch.from_numpy(np.ascontiguousarray(volume, np.float32))[None, None]
    m = np.linalg.inv(src_affine) @ dst_affine  # dst voxel -> src voxel
    idx = [torch.arange(n, dtype=torch.float32) for n in dst_shape]
    gi, gj, gk = torch.meshgrid(*idx, indexing="ij")
    mt = torch.from_numpy(m.astype(np.float32))
    coords = [mt[r, 0] * gi + mt[r, 1] * gj + mt[r, 2] * gk + mt[r, 3] for r in range(3)]
    size = volume.shape
    # grid_sample wants (x, y, z) = (last, middle, first) axes, normalised with align_corners=True.
    grid = torch.stack(
        [
            2 * coords[2] / (size[2] - 1) - 1,
            2 * coords[1] / (size[1] - 1) - 1,
            2 * coords[0] / (size[0] - 1) - 1,
        ],
        -1,
    )
    shifted = src - cval  # so that padding with zeros means padding with ``cval``
    out = F.grid_sample(
        shifted,
        grid[None],
        mode="nearest" if order == 0 else "bilinear",
        padding_mode="zeros",
        align_corners=True,
    )
    return (out[0, 0] + cval).numpy()


def acquire(
    tissue: np.ndarray,
    hu: np.ndarray,
    src_affine: np.ndarray,
    dst_affine: np.ndarray,
    dst_shape,
    seed: int,
    noise_hu: float = 12.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Simulate a scan on another grid: resampled HU plus noise (int16) and the tissue map (uint8)."""
    rng = np.random.default_rng(seed)
    img = resample_to(hu, src_affine, dst_affine, dst_shape, order=1, cval=HU["air"])
    lab = resample_to(tissue.astype(np.float32), src_affine, dst_affine, dst_shape, order=0, cval=0).astype(
        np.uint8
    )
    img = img + rng.normal(0.0, noise_hu, img.shape).astype(np.float32)
    return np.clip(np.rint(img), -1024, 3071).astype(np.int16), lab
