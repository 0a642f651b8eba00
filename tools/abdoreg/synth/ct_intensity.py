"""Intensities of a synthesised scan: a contrast phase and per-tissue HU, then the scanner's blur, bias and noise.

Two modes (SynthSeg's lesson: a network that has seen any contrast generalises to real ones):
``ct`` draws a phase (non-contrast, arterial, portal-venous), a contrast strength and each tissue's
mean around typical CT values (``ct_intensity.json``); ``random`` gives every tissue a mean drawn
uniformly over the networks' CT windows. Inner structure that real organs show is drawn in both:
kidney cortex and medulla, stomach wall, content and gas (anterior: the patient lies supine),
bowel loops with content and gas, mottled stool, liver vessels.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage

from .body import ALL_TISSUES
from .noise import fields

PAD_HU = -1024.0  # outside the field of view


@lru_cache(maxsize=1)
def intensity_table() -> dict:
    return json.loads(Path(__file__).with_name("ct_intensity.json").read_text())


@dataclass(frozen=True)
class Look:
    """One scan's intensity draw."""

    mode: str  # "ct" or "random"
    phase: str | None  # the contrast phase in "ct" mode
    mean: dict[str, float]  # tissue (or inner class) -> mean HU
    texture: dict[str, float]  # tissue -> amplitude of its smooth texture (HU)
    stomach_content: str  # "stomach_fluid", "stomach_food" or "oral_contrast"
    bowel_contrast: bool  # positive oral contrast in the small bowel
    stomach_gas: float  # fraction of the stomach's lumen that holds gas
    colon_gas: float  # threshold of the colon's gas field (lower: more gas)


def draw_look(rng: np.random.Generator, mode: str) -> Look:
    table = intensity_table()
    tissues = table["tissues"]
    if mode == "ct":
        k = int(rng.choice(len(table["phases"]), p=table["phase_probabilities"]))
        scale = rng.uniform(*table["enhancement_scale"])
        mean, texture = {}, {}
        for name, t in tissues.items():
            nc, value = t["hu"][0], t["hu"][k]
            m = nc + scale * (value - nc) + rng.normal(0.0, t["sd"])
            mean[name] = float(m)
            texture[name] = float(t["texture"] + 0.1 * abs(m - nc))  # enhancing organs look less uniform
        phase = table["phases"][k]
    elif mode == "random":
        lo, hi = table["random_hu"]
        mean = {name: float(rng.uniform(lo, hi)) for name in tissues}
        texture = {name: float(rng.uniform(*table["random_texture"])) for name in tissues}
        phase = None
    else:
        raise ValueError(f"unknown intensity mode {mode!r}; choose ct, random or mixed")
    content = str(rng.choice(["stomach_fluid", "stomach_food", "oral_contrast"], p=[0.5, 0.3, 0.2]))
    return Look(
        mode,
        phase,
        mean,
        texture,
        content,
        bool(rng.random() < 0.25),
        float(rng.uniform(0.0, 0.4)),
        float(rng.uniform(-0.3, 0.9)),
    )


def _box(mask: np.ndarray, pad: int = 1) -> tuple[slice, ...] | None:
    idx = (
        np.nonzero(mask.any(axis=(1, 2)))[0],
        np.nonzero(mask.any(axis=(0, 2)))[0],
        np.nonzero(mask.any(axis=(0, 1)))[0],
    )
    if any(len(i) == 0 for i in idx):
        return None
    return tuple(
        slice(max(0, i.min() - pad), min(n, i.max() + 1 + pad)) for i, n in zip(idx, mask.shape, strict=True)
    )


def _wall(mask: np.ndarray, spacing, wall_mm: float) -> np.ndarray:
    """The outer ``wall_mm`` of a mask (nothing when the grid is too coarse to show a wall)."""
    it = int(round(wall_mm / min(spacing)))
    if it < 1 or min(spacing) > 1.5 * wall_mm:
        return np.zeros_like(mask)
    return mask & ~ndimage.binary_erosion(mask, iterations=it)


def render_intensities(
    tissue: np.ndarray,
    axes,
    look: Look,
    rng: np.random.Generator,
    liver_vessels: np.ndarray | None = None,
) -> np.ndarray:
    """Noiseless HU of a tissue map (before the scanner's effects)."""
    spacing = [abs(float(a[1] - a[0])) if len(a) > 1 else 1.0 for a in axes]
    names = {v: k for k, v in ALL_TISSUES.items()}
    lut = np.full(256, look.mean["air"], np.float32)
    tex = np.zeros(256, np.float32)
    for tid, name in names.items():
        lut[tid] = look.mean[name]
        tex[tid] = look.texture[name]
    hu = lut[tissue]
    texture = fields(rng, 1, tissue.shape, spacing, 20.0)[0]
    hu += tex[tissue] * texture
    T = ALL_TISSUES
    m = look.mean
    # kidneys: medulla inside a 4-8 mm cortex
    cortex_mm = rng.uniform(4.0, 8.0)
    for organ in (T["right_kidney"], T["left_kidney"]):
        box = _box(tissue == organ, 2)
        if box is None:
            continue
        mask = tissue[box] == organ
        inner = mask & (ndimage.distance_transform_edt(mask, sampling=spacing) > cortex_mm)
        hu[box][inner] = m["kidney_medulla"] + look.texture["kidney_medulla"] * texture[box][inner]
    # stomach: wall, content, gas on top (anterior)
    box = _box(tissue == T["stomach"], 1)
    if box is not None:
        mask = tissue[box] == T["stomach"]
        lumen = mask & ~_wall(mask, spacing, rng.uniform(3.0, 5.0))
        sub = hu[box]
        sub[lumen] = m[look.stomach_content] + look.texture[look.stomach_content] * texture[box][lumen]
        if lumen.any() and look.stomach_gas > 0:
            y = np.broadcast_to(np.asarray(axes[1], np.float32)[box[1]][None, :, None], lumen.shape)
            level = np.quantile(y[lumen], 1.0 - look.stomach_gas)
            sub[lumen & (y > level)] = m["gas"]
        hu[box] = sub
    # small bowel: loops (thin walls between two interleaved lumens), content, gas pockets
    bowel = np.isin(tissue, (T["bowel"], T["duodenum"]))
    box = _box(bowel, 1)
    if box is not None:
        shape = tuple(s.stop - s.start for s in box)
        loops, gas = fields(rng, 2, shape, spacing, 18.0)
        mask = bowel[box]
        lumen = mask & (np.abs(loops) > 0.25) if min(spacing) <= 3.0 else mask
        content = "oral_contrast" if look.bowel_contrast else "bowel_content"
        sub = hu[box]
        sub[lumen] = m[content] + look.texture[content] * loops[lumen]
        sub[lumen & (gas > 1.4)] = m["gas"]
        hu[box] = sub
    # colon: wall, mottled stool and gas
    box = _box(tissue == T["colon"], 1)
    if box is not None:
        shape = tuple(s.stop - s.start for s in box)
        gas_field, mottle = fields(rng, 2, shape, spacing, 12.0)
        mask = tissue[box] == T["colon"]
        lumen = mask & ~_wall(mask, spacing, 3.0)
        sub = hu[box]
        sub[lumen] = m["colon_stool"] + look.texture["colon_stool"] * mottle[lumen]
        sub[lumen & (gas_field > look.colon_gas)] = m["gas"]
        hu[box] = sub
    # vessels inside the liver (labelled liver): brighter than the parenchyma after contrast, darker before
    if liver_vessels is not None and liver_vessels.any():
        sel = liver_vessels & (tissue == T["liver"])
        hu[sel] = m["liver_vessel"] + look.texture["liver_vessel"] * texture[sel]
    return hu


def _noise_gain(sigma: float) -> float:
    """Standard deviation of unit white noise after a Gaussian filter of ``sigma`` voxels (per axis)."""
    if sigma <= 0:
        return 1.0
    delta = np.zeros((int(8 * sigma) + 3,) * 3, np.float32)
    delta[(delta.shape[0] // 2,) * 3] = 1.0
    return float(np.sqrt((ndimage.gaussian_filter(delta, sigma) ** 2).sum()))


def scanner(hu: np.ndarray, spacing, look: Look, rng: np.random.Generator) -> np.ndarray:
    """Point-spread function and slice thickness (Gaussian blur), a smooth bias, correlated noise."""
    table = intensity_table()
    psf = rng.uniform(*table["psf_mm"])
    thickness = rng.uniform(*table["slice_thickness_mm"])
    sigma_mm = (psf, psf, max(psf, thickness / 2.355))
    out = ndimage.gaussian_filter(hu, [s / sp for s, sp in zip(sigma_mm, spacing, strict=True)])
    bias = fields(rng, 1, hu.shape, spacing, 250.0)[0]
    out += rng.uniform(0.0, table["bias_hu"][look.mode]) * bias
    sd = rng.uniform(*table["noise_sd"])
    corr = rng.uniform(0.3, 0.8)
    white = rng.standard_normal(hu.shape, dtype=np.float32)
    out += (sd / _noise_gain(corr)) * ndimage.gaussian_filter(white, corr)
    return out.astype(np.float32)
