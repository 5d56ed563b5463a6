"""How fast is an exact Market-1501-sized re-id evaluation? (reid_evaluate against a strong-baseline-style reference)

    python benchmarks/bench_reid_eval.py [--queries 3368] [--gallery 15913] [--dim 2048] [--ids 750]
                                         [--cameras 6] [--distractors 2798] [--repeats 3] [--ref-queries 400]
                                         [--device cuda|cpu|none] [--json PATH]

Generates a random problem with a fixed seed: each identity has a random centre on the unit sphere and its images are
the centre plus noise (so mAP is neither 0 nor 1); ``--distractors`` gallery items get person id 0 and pure-noise
features; features are L2-normalised, as with ``feat_norm``. Then times, in one process:

  reid_evaluate   vistrain's chunked evaluation (float32 GEMM per block, value sort + binary search), median of
                  ``--repeats`` runs
  torch path      ``reid_evaluate(..., device=--device)`` (default: cuda when available, else cpu; ``none`` skips it):
                  the full stable ranking with torch on that device, features already resident there (as after a
                  forward pass). One warm-up run (CUDA context, cuBLAS handle, allocator pool), then the median of
                  ``--repeats``, with ``torch.cuda.synchronize()`` before each clock reading; on a GPU also timed from
                  numpy features (host-to-device copy included) and the peak GPU memory.
  reference       what the reid-strong-baseline evaluation does: a full float64 distance matrix, ``np.argsort`` of
                  every row, a boolean match matrix and a Python loop over queries. Run on the first
                  ``--ref-queries`` queries and extrapolated linearly to all of them (0 skips it; -1 runs all).

Prints wall and CPU seconds, metrics and the ratios, with the CPU count and load average (wall times on a shared,
busy machine mean little; CPU seconds and the ratio measured in one run say more); ``--json PATH`` also writes the
figures there (what ``benchmarks/gpu_check.sh`` collects).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from vistrain.metrics.retrieval import reid_cmc_map_detailed, reid_evaluate


def make_problem(n_q: int, n_g: int, dim: int, n_ids: int, n_cams: int, n_distractors: int, seed: int = 0
                 ) -> tuple[np.ndarray, ...]:
    """(q_feats [Q, D], g_feats [G, D], q_pids [Q], g_pids [G], q_cams [Q], g_cams [G]); float32 unit features."""
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_ids, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    # Every identity gets at least one query and one gallery image, the rest are spread at random.
    q_pids = np.concatenate([np.arange(1, n_ids + 1), rng.integers(1, n_ids + 1, n_q - n_ids)])
    n_gal_ids = n_g - n_distractors
    g_pids = np.concatenate([np.arange(1, n_ids + 1), rng.integers(1, n_ids + 1, n_gal_ids - n_ids),
                             np.zeros(n_distractors, np.int64)])
    q_cams, g_cams = rng.integers(0, n_cams, n_q), rng.integers(0, n_cams, n_g)
    # Per-coordinate noise: the noise vector's norm is ~3.3 x a centre's. In 2048-d random directions are nearly
    # orthogonal, so it takes that much noise to bring mAP down to ~0.7 (1.6 gives a perfect 1.0, 4.0 about 0.25).
    noise = 3.3 / np.sqrt(dim)

    def feats(pids: np.ndarray) -> np.ndarray:
        x = rng.standard_normal((len(pids), dim), dtype=np.float32) * np.float32(noise)
        real = pids > 0
        x[real] += centres[pids[real] - 1]  # distractors (id 0) are pure noise
        return x / np.linalg.norm(x, axis=1, keepdims=True)

    return feats(q_pids), feats(g_pids), q_pids, g_pids, q_cams, g_cams


def reference_eval(q: np.ndarray, g: np.ndarray, q_pids: np.ndarray, g_pids: np.ndarray, q_cams: np.ndarray,
                   g_cams: np.ndarray, max_rank: int = 50) -> tuple[float, float, float]:
    """Strong-baseline style: full float64 squared-euclidean distmat, full argsort, per-query loop.

    Returns (mAP, rank1, CPU-seconds spent on the distance matrix).
    """
    c = time.process_time()
    q64, g64 = q.astype(np.float64), g.astype(np.float64)
    distmat = (q64**2).sum(1)[:, None] + (g64**2).sum(1)[None, :] - 2 * q64 @ g64.T
    dist_cpu = time.process_time() - c
    indices = np.argsort(distmat, axis=1)
    matches = (g_pids[indices] == q_pids[:, None]).astype(np.int32)
    aps, cmcs = [], []
    for i in range(len(q)):
        order = indices[i]
        remove = (g_pids[order] == q_pids[i]) & (g_cams[order] == q_cams[i])
        hits = matches[i][~remove]
        if not hits.any():
            continue
        cmc = hits.cumsum()
        cmc[cmc > 1] = 1
        cmcs.append(cmc[:max_rank])
        precision = hits.cumsum() / (np.arange(len(hits)) + 1.0)
        aps.append((precision * hits).sum() / hits.sum())
    return float(np.mean(aps)), float(np.mean([c[0] for c in cmcs])), dist_cpu


def time_torch_path(q: np.ndarray | torch.Tensor, g: np.ndarray | torch.Tensor, ids: tuple[np.ndarray, ...],
                    dev: torch.device, budget_mb: float, repeats: int) -> tuple[list[float], dict]:
    """Wall seconds of ``repeats`` runs of ``reid_evaluate(..., device=dev)`` after one warm-up, and the result."""

    def sync() -> None:  # kernels run asynchronously: read the clock only once the device is idle
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)

    res = reid_evaluate(q, g, *ids, memory_budget_mb=budget_mb, device=dev)  # warm-up
    times = []
    for _ in range(repeats):
        sync()
        t = time.perf_counter()
        res = reid_evaluate(q, g, *ids, memory_budget_mb=budget_mb, device=dev)
        sync()
        times.append(time.perf_counter() - t)
    return times, res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--queries", type=int, default=3368)
    ap.add_argument("--gallery", type=int, default=15913)
    ap.add_argument("--dim", type=int, default=2048)
    ap.add_argument("--ids", type=int, default=750)
    ap.add_argument("--cameras", type=int, default=6)
    ap.add_argument("--distractors", type=int, default=2798)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--budget-mb", type=float, default=512)
    ap.add_argument("--ref-queries", type=int, default=400, help="queries for the reference (0: skip, -1: all)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="device of the torch path (cuda, cuda:1, cpu; none: skip it); default cuda when available")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures to this file")
    args = ap.parse_args()
    report: dict = {"settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}}
    try:
        run(args, report)
    finally:
        if args.json is not None:
            args.json.write_text(json.dumps(report, indent=2) + "\n")


def run(args: argparse.Namespace, report: dict) -> None:
    """The measurements, printed and added to ``report`` as they come (a failure later keeps the earlier ones)."""

    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    print(f"cpus available: {cpus}  torch threads: {torch.get_num_threads()}  "
          f"load average: {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}")
    report["machine"] = {"cpus": cpus, "torch_threads": torch.get_num_threads(), "load_avg": list(load)}
    t0 = time.perf_counter()
    q, g, qp, gp, qc, gc = make_problem(args.queries, args.gallery, args.dim, args.ids, args.cameras,
                                        args.distractors)
    print(f"problem: {len(q)} queries x {len(g)} gallery, {args.dim}-d, {args.ids} ids, {args.cameras} cameras, "
          f"{args.distractors} distractors (generated in {time.perf_counter() - t0:.1f} s)")

    times, cpu_times, res = [], [], {}
    for _ in range(args.repeats):
        t, c = time.perf_counter(), time.process_time()
        res = reid_evaluate(q, g, qp, gp, qc, gc, memory_budget_mb=args.budget_mb)
        times.append(time.perf_counter() - t)
        cpu_times.append(time.process_time() - c)
    ours = statistics.median(times)
    print(f"reid_evaluate: {ours:.2f} s wall (median of {args.repeats}: {', '.join(f'{x:.2f}' for x in times)}); "
          f"{statistics.median(cpu_times):.2f} CPU-seconds over all threads (on an idle machine wall time is about "
          f"this divided by the {cpus} cores)")
    print("  " + "  ".join(f"{k}={v:.4f}" if isinstance(v, float) else f"{k}={v}" for k, v in res.items()))
    report["numpy_path"] = {"wall_s": ours, "wall_s_each": times, "cpu_s": statistics.median(cpu_times),
                            "metrics": res}

    if args.device != "none":
        dev = torch.device(args.device)
        ids = (qp, gp, qc, gc)
        qt, gt = torch.from_numpy(q).to(dev), torch.from_numpy(g).to(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        times_t, res_t = time_torch_path(qt, gt, ids, dev, args.budget_mb, args.repeats)
        mine = statistics.median(times_t)
        name = torch.cuda.get_device_name(dev) if dev.type == "cuda" else f"{torch.get_num_threads()} CPU threads"
        print(f"torch path on {dev} ({name}): {mine:.3f} s wall (median of {args.repeats} after a warm-up: "
              f"{', '.join(f'{x:.3f}' for x in times_t)}); {ours / mine:.2f}x the numpy CPU path's speed")
        diff = max(abs(res_t[k] - res[k]) for k in res)
        print(f"  largest difference from the numpy path over all metrics: {diff:.2e}")
        report["torch_path"] = {"device": str(dev), "name": name, "wall_s": mine, "wall_s_each": times_t,
                                "speedup_vs_numpy_path": ours / mine, "max_metric_diff_vs_numpy_path": diff}
        if dev.type == "cuda":
            peak = torch.cuda.max_memory_allocated(dev) / 2**20
            times_h, _ = time_torch_path(q, g, ids, dev, args.budget_mb, args.repeats)
            print(f"  from numpy features (host-to-device copy included): {statistics.median(times_h):.3f} s; "
                  f"peak GPU memory {peak:.0f} MiB (features {(qt.numel() + gt.numel()) * 4 / 2**20:.0f} MiB)")
            report["torch_path"].update(wall_s_from_numpy=statistics.median(times_h), peak_gpu_MiB=peak)

    n_ref = len(q) if args.ref_queries < 0 else min(args.ref_queries, len(q))
    if n_ref == 0:
        return
    sub = slice(0, n_ref)
    t, c = time.perf_counter(), time.process_time()
    ref_map, ref_r1, ref_dist_cpu = reference_eval(q[sub], g, qp[sub], gp, qc[sub], gc)
    ref_time = (time.perf_counter() - t) * len(q) / n_ref
    ref_cpu = (time.process_time() - c) * len(q) / n_ref
    # The same subset through vistrain, from the same float64 distances (ranks can differ only at near-ties).
    q64, g64 = q[sub].astype(np.float64), g.astype(np.float64)
    dist = (q64**2).sum(1)[:, None] + (g64**2).sum(1)[None, :] - 2 * q64 @ g64.T
    mine = reid_cmc_map_detailed(dist, qp[sub], gp, qc[sub], gc)
    print(f"reference (strong-baseline style) on {n_ref} queries: mAP={ref_map:.4f} rank1={ref_r1:.4f}; "
          f"vistrain on the same float64 distmat: mAP={mine.mAP:.4f} rank1={mine.rank(1):.4f}")
    scale = "" if n_ref == len(q) else f" (extrapolated from {n_ref} queries)"
    print(f"reference: {ref_time:.1f} s wall, {ref_cpu:.1f} CPU-seconds for all {len(q)} queries{scale}; "
          f"speed-up {ref_time / ours:.1f}x (wall), {ref_cpu / statistics.median(cpu_times):.1f}x (CPU)")
    ref_rank_cpu = ref_cpu - ref_dist_cpu * len(q) / n_ref
    print(f"reference ranking alone (argsort + loop, without the distance matrix): {ref_rank_cpu:.1f} CPU-seconds")
    report["reference"] = {"queries": n_ref, "mAP": ref_map, "rank1": ref_r1, "vistrain_mAP_same_distmat": mine.mAP,
                           "vistrain_rank1_same_distmat": mine.rank(1), "wall_s_all_queries": ref_time,
                           "cpu_s_all_queries": ref_cpu, "speedup_wall": ref_time / ours,
                           "speedup_cpu": ref_cpu / statistics.median(cpu_times)}


if __name__ == "__main__":
    main()
