"""`vidkd serve` under load: queries/s and latency of an fp32 and an INT4 index, side by side.

    python bench/serve.py --checkpoint runs/quality/models/<student>.pt --manifest videos.jsonl
                          [--quick] [--clients 1,8,32] [--seconds 5] [--rounds 3] [--out runs/bench-serve]
                          [--index FP32_INDEX INT4_INDEX]

Two indexes of the same videos: one built with the fp32 student `--checkpoint`, one with its INT4
version (GPTQ, 4 bits, group 128, symmetric, act-order, as configs/demo.yaml quantizes, calibrated
on frames of the manifest's videos), each by `jobs.index.run_index` under `--out` (an index already
there with the same model is kept, so a second run skips the building). `--index` serves two
existing indexes instead. Each is served as `vidkd serve` serves it (`jobs.serve.start`: one
text-encoder replica, one ingress) on one local Ray instance, one at a time on the same free
127.0.0.1 port, the application deleted between them.

Load: C client threads (C in `--clients`) send GET /search?q=<caption>&k=5 back to back for
`--seconds`, each from its own caption, after a warm-up (every video's first caption, whose top-hit
share is the "R@1 over HTTP" line, and one second at the largest C). queries/s: answers over wall
time; p50/p99 over a level's requests. Rounds alternate the servers' order: absolute numbers are
medians over rounds, "INT4/fp32" the median of each round's ratio (min-max beside it).
"Queries per text forward": a level's queries over the batches the encoder ran, from Ray Serve's
own counters on this node's Prometheus endpoint (exported every second here). CPU per query: the
user + system seconds of each process group (clients, Serve's proxy, the ingress, the encoder, the
rest of Ray) over a level; "cores busy" their sum over its wall time.

INT4 quantizes the student's *vision* tower only (`quantize_visual(student.clip.visual, ...)`): the
text tower, the only one a query runs, is fp32 in both. The bench checks and prints this.
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import socket
import statistics
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

VARIANTS = ("fp32", "int4")
WARM_CLIENTS = 8
METRICS_INTERVAL_MS = "1000"
METRICS_WAIT_S = 6.0
K = 5


@dataclass
class Level:
    """One level (C clients) of one server in one round."""

    clients: int
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float]
    batch_mean: float | None = None  # queries per text forward
    cpu: dict[str, float] = field(default_factory=dict)  # CPU seconds per role during the level

    @property
    def qps(self) -> float:
        return self.requests / self.seconds

    def pct(self, q: float) -> float:
        ordered = sorted(self.latencies_ms)
        return ordered[min(len(ordered) - 1, int(round(q / 100 * (len(ordered) - 1))))] if ordered else float("nan")


@dataclass
class ServerRun:
    variant: str
    round: int
    start_s: float
    load: float
    levels: dict[int, Level] = field(default_factory=dict)
    r1: float = float("nan")


# ------------------------------------------------------------------------------- the students
def calibration_frames(records: list[Any], student: Any, count: int) -> Any:
    """Up to `count` real frames of the manifest's videos, normalised as the vision tower takes them."""
    import numpy as np
    import torch

    from core.video import VideoDecodeError, decode_video, normalize_frames

    frames = []
    for record in records:
        try:
            clip, mask = decode_video(record.path, student.num_frames, student.image_size)
        except (VideoDecodeError, OSError):
            continue
        frames += [clip[i] for i in range(len(mask)) if mask[i]]
        if len(frames) >= count:
            break
    if not frames:
        raise ValueError("no video of the manifest could be decoded for calibration")
    return normalize_frames(torch.from_numpy(np.stack(frames[:count])), student.mean, student.std)


def int4_student(checkpoint: Path, records: list[Any], out: Path) -> Path:
    """The GPTQ INT4 student of `checkpoint` under `out` (kept from an earlier run when there)."""
    from core.config import QuantizeConfig
    from core.quant import quantize_visual, save_quantized
    from core.student import load_student, student_meta
    from jobs.runtime import import_quant_backend

    target = out / f"{checkpoint.stem}-int4"
    if (target / "quantize_config.json").is_file():
        return target
    import_quant_backend()
    student = load_student(checkpoint).eval()
    cfg = QuantizeConfig(bits=4, group_size=128, sym=True, act_order=True, calib_samples=200)
    calib = calibration_frames(records, student, cfg.calib_samples)
    quantize_visual(student.clip.visual, calib, cfg, method="gptq", progress=False)
    save_quantized(student, target, cfg, student_meta(student), method="gptq")
    return target


def text_tower_check(fp32_model: Path, int4_model: Path, captions: list[str]) -> str:
    """Where the INT4 student's quantized linears are, and how far apart the two text embeddings are."""
    import torch

    from core.quant.checkpoint import quantized_module_names
    from core.student import load_student_model
    from jobs.runtime import import_quant_backend

    import_quant_backend()  # gptqmodel's banner, quiet
    fp32, int4 = load_student_model(fp32_model), load_student_model(int4_model)
    names = quantized_module_names(int4)
    outside = [n for n in names if not n.startswith("clip.visual.")]
    with torch.no_grad():
        a, b = fp32.encode_text(captions), int4.encode_text(captions)
    text_params = sum(p.numel() for n, p in int4.named_parameters() if not n.startswith("clip.visual.")
                      and p.dtype == torch.float32)
    return (f"{len(names)} quantized linears, {len(outside)} outside `clip.visual`; the text side holds "
            f"{text_params:,} fp32 parameters in both; text embeddings of {len(captions)} captions, fp32 vs INT4 "
            f"student: max abs difference {float((a - b).abs().max()):.2e}")


# ------------------------------------------------------------------------------- load and metrics
def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


CPU_GROUPS = (("proxy", "ray::ProxyActor"), ("ingress", "ray::ServeReplica:vidkd-search:SearchApi"),
              ("text encoder", "ray::ServeReplica:vidkd-search:text-"))


def cpu_seconds() -> dict[str, dict[int, float]]:
    """CPU seconds (user + system) so far of this process (the clients, and Ray's driver) and of
    every process of the Ray instance it started, by role, per pid."""
    import psutil

    me = psutil.Process()
    found: dict[str, dict[int, float]] = {"clients (this process)": {me.pid: sum(me.cpu_times()[:2])}}
    for process in me.children(recursive=True):
        try:
            title = " ".join(process.cmdline())
            seconds = sum(process.cpu_times()[:2])
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
        group = next((name for name, prefix in CPU_GROUPS if title.startswith(prefix)), "rest of Ray")
        found.setdefault(group, {})[process.pid] = seconds
    return found


def cpu_used(before: dict, after: dict) -> dict[str, float]:
    """CPU seconds of each role between two snapshots (a process new since `before` counts whole)."""
    return {group: sum(t - before.get(group, {}).get(pid, 0.0) for pid, t in pids.items())
            for group, pids in after.items()}


def run_clients(urls: list[str], clients: int, seconds: float | None = None, count: int | None = None
                ) -> tuple[list[float], int, float, list[bytes]]:
    """`clients` threads sending `urls` back to back (each from its own offset) for `seconds`, or
    `count` requests in all; (latencies ms, errors, wall seconds, bodies when `count` is given)."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    bodies: list[Any] = [None] * (count or 0)
    barrier = threading.Barrier(clients + 1)
    deadline = [0.0]
    next_item = iter(range(count or 0))
    lock = threading.Lock()

    def client(i: int) -> None:
        j = i * max(1, len(urls) // clients)
        barrier.wait()
        while True:
            if count is not None:
                with lock:
                    item = next(next_item, None)
                if item is None:
                    return
                url = urls[item % len(urls)]
            else:
                if time.perf_counter() >= deadline[0]:
                    return
                url = urls[j % len(urls)]
                j += 1
            start = time.perf_counter()
            try:
                with urllib.request.urlopen(url, timeout=60) as response:
                    body = response.read()
                latencies[i].append((time.perf_counter() - start) * 1000)
                if count is not None:
                    bodies[item] = body
            except (urllib.error.URLError, OSError):
                errors[i] += 1

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    start = time.perf_counter()
    deadline[0] = start + (seconds or 0)
    barrier.wait()
    for thread in threads:
        thread.join()
    return [ms for per in latencies for ms in per], sum(errors), time.perf_counter() - start, bodies


METRIC = re.compile(r"^ray_serve_(deployment_request_counter_total|batches_processed_total)\{(.*)\} (\S+)$")


class ServeMetrics:
    """Ray Serve's counters of one deployment, from this node's Prometheus endpoint: the requests its
    replicas answered and the batches they ran. (Counters, not Serve's histograms, whose exported
    sums are bucket midpoints here: 10 batches of 1 query read as a sum of 5.)"""

    def __init__(self) -> None:
        import ray

        node = next(n for n in ray.nodes() if n["Alive"])
        self.url = f"http://{node['NodeManagerAddress']}:{node['MetricsExportPort']}/metrics"

    def read(self, deployment: str) -> dict[tuple[str, str], float]:
        """{(counter, labels): value} of `deployment`'s series."""
        try:
            with urllib.request.urlopen(self.url, timeout=5) as response:
                text = response.read().decode()
        except (urllib.error.URLError, OSError):
            return {}
        found = {}
        for line in text.splitlines():
            match = METRIC.match(line)
            if match and f'deployment="{deployment}"' in match.group(2):
                found[match.group(1, 2)] = float(match.group(3))
        return found

    @staticmethod
    def delta(before: dict, after: dict, counter: str) -> float:
        """A counter's growth between two reads (series new since `before` count whole; the series of
        replicas gone since do not count)."""
        return sum(v - before.get(key, 0.0) for key, v in after.items() if key[0] == counter)

    def synced(self, deployment: str, baseline: dict, answered: int) -> dict | None:
        """A read that counts the `answered` requests since `baseline` (the export lags by up to its
        interval), or None when none does in time."""
        deadline = time.monotonic() + METRICS_WAIT_S
        while True:
            now = self.read(deployment)
            if self.delta(baseline, now, "deployment_request_counter_total") >= answered:
                return now
            if time.monotonic() > deadline:
                return None
            time.sleep(0.2)


# ------------------------------------------------------------------------------- one server
def serve_one(variant: str, index_dir: Path, port: int, captions: list[tuple[str, str]], first: list[tuple[str, str]],
              levels: tuple[int, ...], seconds: float, rnd: int, metrics: ServeMetrics) -> ServerRun:
    import json

    from ray import serve

    from jobs import serve as server

    load = os.getloadavg()[0]
    indexes = server.ServedIndex.from_dirs([index_dir])
    deployment = f"text-{indexes[0].name}"
    baseline = metrics.read(deployment)  # this server's replica is new: its series are not there yet
    started = time.perf_counter()
    base = server.start(indexes, "127.0.0.1", port)
    with urllib.request.urlopen(base + "healthz", timeout=60) as response:
        response.read()
    run = ServerRun(variant, rnd, time.perf_counter() - started, load)

    def urls(pairs: list[tuple[str, str]]) -> list[str]:
        return [f"{base}search?{urllib.parse.urlencode({'q': q, 'k': K})}" for q, _ in pairs]

    try:
        # Warm-up, and the answers checked: the first caption of each video should find it.
        _, _, _, bodies = run_clients(urls(first), WARM_CLIENTS, count=len(first))
        top = [json.loads(b)["hits"][0]["video_id"] if b else None for b in bodies]
        run.r1 = sum(t == vid for t, (_, vid) in zip(top, first)) / len(first)
        all_urls = urls(captions)
        answered = sum(b is not None for b in bodies) + len(run_clients(all_urls, max(levels), seconds=1.0)[0])
        previous = metrics.synced(deployment, baseline, answered)
        for clients in levels:
            cpu_before = cpu_seconds()
            latencies, errors, wall, _ = run_clients(all_urls, clients, seconds=seconds)
            level = Level(clients, len(latencies), errors, wall, latencies, cpu=cpu_used(cpu_before, cpu_seconds()))
            answered += len(latencies)
            now = metrics.synced(deployment, baseline, answered)
            if previous is not None and now is not None:
                batches = metrics.delta(previous, now, "batches_processed_total")
                level.batch_mean = len(latencies) / batches if batches else None
            previous = now
            run.levels[clients] = level
    finally:
        serve.delete(server.APP_NAME)
    return run


# ------------------------------------------------------------------------------- report
def _median(values: list[float]) -> float:
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else float("nan")


def _fmt(value: float | None, spec: str = ".1f") -> str:
    return "n/a" if value is None or value != value else format(value, spec)


def format_report(runs: list[ServerRun], levels: tuple[int, ...]) -> str:
    by = {(r.variant, r.round): r for r in runs}
    rounds = sorted({r.round for r in runs})
    lines = ["| clients | server | queries/s | p50 ms | p99 ms | queries per text forward | errors |",
             "|---|---|---|---|---|---|---|"]
    for clients in levels:
        for variant in VARIANTS:
            got = [by[variant, r].levels[clients] for r in rounds]
            lines.append(f"| {clients} | {variant} | {_median([g.qps for g in got]):.1f} | "
                         f"{_median([g.pct(50) for g in got]):.1f} | {_median([g.pct(99) for g in got]):.1f} | "
                         f"{_fmt(_median([g.batch_mean for g in got]))} | {sum(g.errors for g in got)} |")
    lines += ["", "| clients | queries/s INT4/fp32 (min-max) | p50 INT4/fp32 (min-max) | p99 INT4/fp32 (min-max) |",
              "|---|---|---|---|"]
    for clients in levels:
        cells = []
        for stat in (lambda g: g.qps, lambda g: g.pct(50), lambda g: g.pct(99)):
            ratios = [stat(by["int4", r].levels[clients]) / stat(by["fp32", r].levels[clients]) for r in rounds]
            cells.append(f"{_median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")
        lines.append(f"| {clients} | " + " | ".join(cells) + " |")
    groups = list(dict.fromkeys(["clients (this process)", *(name for name, _ in CPU_GROUPS), "rest of Ray"]))
    lines += ["", "CPU ms per query, by process (both servers, median over rounds), and CPU cores busy in all:", "",
              "| clients | " + " | ".join(groups) + " | cores busy |", "|---|" + "---|" * (len(groups) + 1)]
    for clients in levels:
        got = [r.levels[clients] for r in runs]
        cells = [_median([1000 * g.cpu.get(group, 0.0) / g.requests for g in got if g.requests]) for group in groups]
        busy = _median([sum(g.cpu.values()) / g.seconds for g in got])
        lines.append(f"| {clients} | " + " | ".join(f"{c:.2f}" for c in cells) + f" | {busy:.2f} |")
    lines += ["", "Per server: time from `serve.run` to the first /healthz answer (median over rounds), "
              "R@1 over HTTP (first caption of each video), 1-min load average when each round began:"]
    for variant in VARIANTS:
        got = [by[variant, r] for r in rounds]
        lines.append(f"- {variant}: start {_median([g.start_s for g in got]):.1f} s, R@1 {got[0].r1:.3f}, "
                     f"load {', '.join(f'{g.load:.1f}' for g in got)}")
    return "\n".join(lines)


def machine(num_cpus: int) -> str:
    import ray
    import torch

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    return (f"{platform.machine()}, {os.cpu_count()} CPUs, Ray instance of {num_cpus} CPUs; torch {torch.__version__}, "
            f"ray {ray.__version__}, Python {platform.python_version()}; load average {load}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help="the fp32 student (.pt): its INT4 version is made here")
    parser.add_argument("--manifest", type=Path, required=True,
                        help="the videos indexed; their captions are the queries")
    parser.add_argument("--index", nargs=2, type=Path, metavar=("FP32_INDEX", "INT4_INDEX"),
                        help="serve these two indexes instead of building them")
    parser.add_argument("--out", type=Path, default=Path("runs/bench-serve"), help="the INT4 student and both indexes")
    parser.add_argument("--clients", default="1,8,32", help="concurrent clients, comma-separated")
    parser.add_argument("--seconds", type=float, default=5.0, help="timed seconds per level")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each serving both indexes")
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray instance")
    parser.add_argument("--quick", action="store_true", help="smoke test: 2 rounds of 2 s per level")
    args = parser.parse_args()
    if args.index is None and args.checkpoint is None:
        parser.error("give --checkpoint (to build both indexes) or --index FP32_INDEX INT4_INDEX")
    rounds, seconds = (2, 2.0) if args.quick else (args.rounds, args.seconds)
    levels = tuple(int(c) for c in args.clients.split(","))
    # Before Ray starts (the workers of the local instance inherit it): metrics reach the endpoint
    # within a second, so a level's batches can be read right after it.
    os.environ.setdefault("RAY_metrics_report_interval_ms", METRICS_INTERVAL_MS)

    from core.config import load_config
    from core.datasets import read_manifest
    from jobs.runtime import init_ray

    began = time.perf_counter()
    print(f"Machine: {machine(args.num_cpus)}", flush=True)
    records = read_manifest(args.manifest)
    captions = [(c, r.video_id) for r in records for c in r.captions]
    first = [(r.captions[0], r.video_id) for r in records if r.captions]
    cfg = load_config(None, [f"ray.num_cpus={args.num_cpus}", f"output_dir={args.out.resolve()}"])
    init_ray(cfg.ray)
    if args.index:
        indexes = dict(zip(VARIANTS, args.index))
    else:
        from jobs.index import run_index

        args.out.mkdir(parents=True, exist_ok=True)
        int4_dir = int4_student(args.checkpoint, records, args.out)
        models = {"fp32": args.checkpoint, "int4": int4_dir}
        indexes = {}
        for variant, model in models.items():
            result = run_index(cfg, str(model), args.manifest, args.out / f"index-{variant}")
            indexes[variant] = result.index_dir
        print(f"indexes ready after {time.perf_counter() - began:.0f} s", flush=True)
    from core.index import read_meta

    students = {v: Path(d) / read_meta(Path(d)).model_path for v, d in indexes.items()}
    check = text_tower_check(students["fp32"], students["int4"], [c for c, _ in captions[:32]])

    metrics = ServeMetrics()
    port = free_port()  # one port for all: Serve's proxy keeps the port of its first start
    runs = []
    for rnd in range(rounds):
        for variant in (VARIANTS if rnd % 2 == 0 else VARIANTS[::-1]):
            runs.append(serve_one(variant, Path(indexes[variant]), port, captions, first, levels, seconds, rnd,
                                  metrics))
            print(f"round {rnd + 1}/{rounds} {variant}: done after {time.perf_counter() - began:.0f} s", flush=True)

    load = ", ".join(f"{v:.1f}" for v in os.getloadavg())
    print(f"\n{len(records)} videos, {len(captions)} captions as queries (k={K}); "
          f"{rounds} round{'s' if rounds != 1 else ''} alternating the servers, {seconds:g} s per level after a "
          f"warm-up; load average at the end {load}; {time.perf_counter() - began:.0f} s in all\n")
    print(f"fp32 index: {indexes['fp32']}\nINT4 index: {indexes['int4']}\nText tower: {check}\n")
    print(format_report(runs, levels))


if __name__ == "__main__":
    main()
