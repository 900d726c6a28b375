"""Exact search against faiss HNSW on a video index: where does an approximate index pay?

    .venv/bin/python bench/ann.py [--dim 256] [--sizes 1000 10000 100000 300000] [--queries 200]

For each collection size: one query at a time (as `vidkd search` and the server ask), the exact
cosine search of `core.index.VideoIndex` (a float32 matrix product and a partial sort) against
`core.index.AnnIndex` (faiss HNSW, inner product on the normalised embeddings), side by side on
the same queries: per-query latency p50/p99, the ratio, HNSW's build time and its recall@10
against the exact top 10. The embeddings are synthetic (nothing is downloaded): a mixture of 1000
Gaussian clusters on the unit sphere, queries drawn near random members, which is closer to a
collection of driving clips (many near-duplicates) than isotropic noise and harder than it for
recall at small k. `index.exact_below` is chosen from this table (docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from core.index import AnnIndex, VideoIndex, normalise


def collection(n: int, dim: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = normalise(rng.standard_normal((1000, dim)))
    members = centers[rng.integers(0, len(centers), n)] + 0.35 * rng.standard_normal((n, dim)) / np.sqrt(dim) * 4
    return normalise(members)


def timed(fn, queries: np.ndarray) -> tuple[list[float], list[list[int]]]:
    times, results = [], []
    for q in queries:
        start = time.perf_counter()
        results.append(fn(q))
        times.append(time.perf_counter() - start)
    return times, results


def run(sizes: list[int], dim: int, n_queries: int, k: int = 10) -> list[dict]:
    rows = []
    for n in sizes:
        emb = collection(n, dim)
        rng = np.random.default_rng(1)
        queries = normalise(emb[rng.integers(0, n, n_queries)] + 0.5 * rng.standard_normal((n_queries, dim)) / np.sqrt(dim))
        ids = [f"v{i}" for i in range(n)]
        exact = VideoIndex(None, None, ids, ids, emb)  # type: ignore[arg-type]
        start = time.perf_counter()
        ann = AnnIndex.build(emb)
        build_s = time.perf_counter() - start
        exact_t, exact_hits = timed(lambda q: [h.video_id for h in exact.search(q, k)], queries)
        ann_t, ann_hits = timed(lambda q: [ids[i] for i in ann.search(q, k)[0]], queries)
        recall = float(np.mean([len(set(a) & set(e)) / k for a, e in zip(ann_hits, exact_hits)]))
        p = lambda t, q: 1e3 * float(np.percentile(t, q))  # noqa: E731
        rows.append({"n": n, "exact_p50": p(exact_t, 50), "exact_p99": p(exact_t, 99), "ann_p50": p(ann_t, 50),
                     "ann_p99": p(ann_t, 99), "build_s": build_s, "recall": recall})
        print(f"{n}: exact {rows[-1]['exact_p50']:.3f} ms, hnsw {rows[-1]['ann_p50']:.3f} ms, recall {recall:.3f}",
              flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000, 300000])
    parser.add_argument("--queries", type=int, default=200)
    args = parser.parse_args()
    rows = run(args.sizes, args.dim, args.queries)
    print(f"\n{args.dim}-d embeddings, {args.queries} queries one at a time, k 10; load average "
          f"{os.getloadavg()[0]:.1f}\n")
    print("| videos | exact p50 / p99 (ms) | HNSW p50 / p99 (ms) | exact / HNSW (p50) | HNSW recall@10 | HNSW build (s) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['n']:,} | {r['exact_p50']:.3f} / {r['exact_p99']:.3f} | {r['ann_p50']:.3f} / {r['ann_p99']:.3f} | "
              f"{r['exact_p50'] / r['ann_p50']:.1f}x | {r['recall']:.3f} | {r['build_s']:.1f} |")


if __name__ == "__main__":
    main()
