"""Why the audit cannot tell a JPEG copy of a pills studio render from an untouched render (issue 18 item 1).

    PYTHONPATH=src python benchmarks/audit_pills_siblings.py [--work DIR] [--copies 40] [--sigma 0 1 2.5]
        [--motion 150]

``write_pills`` renders each studio object three times from the same sprite: the same light, the pill placed
on whole pixels within +-2 px of the centre, turned by up to 6 degrees, on a flat background; nothing else
(no sensor noise) changes between the views. This script measures, on the demo's pills at full resolution
(128 px), how far apart untouched studio renders are from their nearest sibling, and how far a JPEG re-encode
(quality 70-90, as the tests plant) is from its source, with the distance the audit's pixel evidence uses
(1 - the normalised correlation of the colour pixels, each channel minus its mean), after an optional Gaussian
blur of ``--sigma`` px that removes most of the JPEG noise. Every pair within a class is compared (no candidate
search can miss one). Printed per sigma: the copies' distances, the quantiles of each untouched render's nearest
sibling distance, and how many untouched renders have a sibling closer than the median / farthest copy. When
that count is a sizeable share, no distance threshold and no rule relative to the neighbours separates the copies
from the untouched renders: the renders are near duplicates of each other by their pixels.

``--motion N`` asks the other question a rule could use: is the copy's geometry the source's? OpenCV's ECC
registration (``findTransformECC``, Euclidean: a shift and a rotation) is fitted between the three renders of N
studio objects (every pair) and between each JPEG copy and its source. A copy moves by nothing; a sibling by its
placement. Printed: the quantiles of the fitted shift and angle for both, and how many sibling pairs move less than
every copy's 99th percentile (a rule "same geometry" would call those copies too: false pairs).
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))


def vectors(images: list[np.ndarray], sigma: float) -> np.ndarray:
    """[N, D] unit vectors: each image blurred, each colour channel minus its mean."""
    import cv2

    out = []
    for img in images:
        x = cv2.GaussianBlur(img, (0, 0), sigma) if sigma > 0 else img
        x = x - x.mean(axis=(0, 1))
        out.append((x / max(float(np.linalg.norm(x)), 1e-9)).ravel())
    return np.stack(out)


def motion(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """(shift in px, |angle| in degrees) of the Euclidean ECC registration of ``b`` onto ``a`` (grey levels)."""
    import cv2

    grey = [cv2.cvtColor(x.astype(np.uint8), cv2.COLOR_RGB2GRAY).astype(np.float32) for x in (a, b)]
    warp = np.eye(2, 3, dtype=np.float32)
    criteria = (cv2.TERM_CRITERIA_EPS | cv2.TERM_CRITERIA_COUNT, 50, 1e-5)
    try:
        _, warp = cv2.findTransformECC(grey[0], grey[1], warp, cv2.MOTION_EUCLIDEAN, criteria, None, 5)
    except cv2.error:  # no convergence: a large motion, never a copy
        return float("inf"), float("inf")
    return float(np.hypot(warp[0, 2], warp[1, 2])), abs(float(np.degrees(np.arctan2(warp[1, 0], warp[0, 0]))))


def print_motion(work: Path, objects: int, pairs: list[tuple[np.ndarray, np.ndarray]]) -> None:
    """``--motion``: the fitted geometry of sibling renders against that of JPEG copies."""
    views: dict[str, list[np.ndarray]] = {}
    for f in sorted((work / "studio").glob("*/*.png")):
        views.setdefault(f"{f.parent.name}/{f.stem.rsplit('_', 1)[0]}", []).append(
            np.asarray(Image.open(f).convert("RGB"), np.float32))
    siblings = np.array([motion(v[i], v[j]) for v in list(views.values())[:objects]
                         for i in range(len(v)) for j in range(i + 1, len(v))])
    copies = np.array([motion(a, b) for a, b in pairs])
    q = [0.0, 0.01, 0.5, 0.99, 1.0]
    for name, m in (("sibling renders", siblings), ("JPEG copies", copies)):
        print(f"{name} ({len(m)} pairs): shift px at {q}: {np.round(np.quantile(m[:, 0], q), 3).tolist()}; "
              f"angle deg: {np.round(np.quantile(m[:, 1], q), 3).tolist()}")
    shift, angle = np.quantile(copies[:, 0], 0.99), np.quantile(copies[:, 1], 0.99)
    still = int(((siblings[:, 0] <= shift) & (siblings[:, 1] <= angle)).sum())
    print(f"sibling pairs moving no more than 99% of the copies (shift <= {shift:.3f} px, angle <= {angle:.3f} deg): "
          f"{still} of {len(siblings)} ({still / len(siblings):.1%})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=None, help="where the pills are written (default: temporary)")
    parser.add_argument("--copies", type=int, default=40, help="studio renders re-encoded as JPEG")
    parser.add_argument("--sigma", type=float, nargs="+", default=[0.0, 1.0, 2.5])
    parser.add_argument("--motion", type=int, default=0, metavar="N",
                        help="also fit the geometry (ECC) between the renders of N studio objects and of each copy")
    args = parser.parse_args()
    from vistrain.data.synthetic_pills import write_pills

    work = args.work or Path(tempfile.mkdtemp(prefix="pills_siblings_"))
    if not (work / "class_map.json").exists():
        write_pills(work)
    classes = sorted(p for p in (work / "studio").iterdir() if p.is_dir())
    files = {c.name: sorted(c.glob("*.png")) for c in classes}
    pixels = {c: [np.asarray(Image.open(f).convert("RGB"), np.float32) for f in fs] for c, fs in files.items()}
    rng = np.random.default_rng(0)
    names = sorted(pixels)
    picks = [(names[int(rng.integers(len(names)))], None) for _ in range(args.copies)]
    picks = [(c, int(rng.integers(len(pixels[c])))) for c, _ in picks]
    copies = []
    for c, i in picks:
        buf = io.BytesIO()
        Image.fromarray(pixels[c][i].astype(np.uint8)).save(buf, format="JPEG", quality=int(rng.integers(70, 91)))
        copies.append(np.asarray(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), np.float32))
    if args.motion:
        print_motion(work, args.motion, [(pixels[c][i], cp) for (c, i), cp in zip(picks, copies)])
    total = sum(len(v) for v in pixels.values())
    print(f"{total} studio renders in {len(names)} classes ({work}); {len(copies)} JPEG copies")
    for sigma in args.sigma:
        nearest = []
        for c in names:
            v = vectors(pixels[c], sigma)
            d = 1.0 - v @ v.T
            np.fill_diagonal(d, np.inf)
            nearest.append(d.min(axis=1))
        nearest_all = np.concatenate(nearest)
        copy_d = np.array([1.0 - float(vectors([pixels[c][i]], sigma)[0] @ vectors([cp], sigma)[0])
                           for (c, i), cp in zip(picks, copies)])
        q = np.quantile(nearest_all, [0.01, 0.05, 0.25, 0.5])
        below_med = int((nearest_all <= np.median(copy_d)).sum())
        below_max = int((nearest_all <= copy_d.max()).sum())
        print(f"sigma {sigma:g}: JPEG copy to its source: median {np.median(copy_d):.2e}, max {copy_d.max():.2e}; "
              f"untouched render to its nearest sibling: 1% {q[0]:.2e}, 5% {q[1]:.2e}, 25% {q[2]:.2e}, "
              f"median {q[3]:.2e}; untouched renders with a sibling closer than the median copy: "
              f"{below_med}/{total} ({below_med / total:.1%}), than the farthest copy: {below_max}/{total} "
              f"({below_max / total:.1%})")


if __name__ == "__main__":
    main()
