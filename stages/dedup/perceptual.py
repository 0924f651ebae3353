"""Perceptual near-copies: pHash distances as dot products, and the witnesses (fine hash, hue)
that confirm a pair."""

from __future__ import annotations

import numpy as np


def phash_vectors(phashes: np.ndarray) -> np.ndarray:
    """64-bit hashes as ±1/8 vectors: dot product = 1 - 2·hamming/64."""
    bits = (phashes.astype(np.int64).view(np.uint64)[:, None] >> np.arange(64, dtype=np.uint64)) & np.uint64(1)
    return (bits.astype(np.float32) * 2 - 1) / 8.0


def hue_histogram(thumb: np.ndarray, bins: int = 12) -> np.ndarray | None:
    """Saturation-weighted hue histogram of an (n, 3) uint8 thumbnail, normalised to sum 1; None
    when the thumbnail has (almost) no colour."""
    rgb = thumb.astype(np.float32) / 255.0
    top, low = rgb.max(1), rgb.min(1)
    chroma = top - low
    weight = np.where(top > 0.1, chroma, 0.0)
    if weight.sum() < 0.05 * len(rgb):  # grey: no hue to compare
        return None
    r, g, b = rgb.T
    safe = np.maximum(chroma, 1e-6)
    hue = np.select([top == r, top == g], [((g - b) / safe) % 6, (b - r) / safe + 2], (r - g) / safe + 4) / 6
    # soft, circular binning: a hue splits between its two nearest bin centres, and red (hue ~0 and
    # ~1) is one colour; hard bins flipped pure red and pure blue between bins on JPEG noise
    pos = hue * bins - 0.5
    low = np.floor(pos)
    frac = pos - low
    low = low.astype(int) % bins
    hist = np.bincount(low, weights=weight * (1 - frac), minlength=bins) + np.bincount(
        (low + 1) % bins, weights=weight * frac, minlength=bins
    )
    return hist / hist.sum()


def witnessed(a: np.ndarray, b: np.ndarray, max_fine: int | None, max_colour: float | None) -> bool:
    """Does the second witness confirm a pHash match? Two fingerprints (see embed.fingerprint):
    the 256-bit pHashes within `max_fine` bits and, when both images have colour, their hue
    histograms within `max_colour` (L1, 0-2): a greyscale, faded or re-saturated copy keeps its
    hues; a red and a blue version of one logo do not."""
    if max_fine is not None and int(np.unpackbits(a[:32] ^ b[:32]).sum()) > max_fine:
        return False
    if max_colour is None:
        return True
    ha, hb = (hue_histogram(x[32:].reshape(-1, 3)) for x in (a, b))
    return ha is None or hb is None or float(np.abs(ha - hb).sum()) <= max_colour
