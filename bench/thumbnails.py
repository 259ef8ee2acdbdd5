"""Thumbnail speed and memory: our processing against naive Pillow and pyvips, in one run.

    python bench/thumbnails.py [--quick] [--sizes 128,256,512] [--seconds N]

Each method runs in a child process of its own (so its peak RSS is its own) over the same
4000x3000 photo-like JPEGs, making every size of each one, single-threaded:

- ours:   thumbnails.processing.make_thumbnails (JPEG draft decoding, sizes chained largest first)
- naive:  Pillow, open and decode the original again for every size, resize, save
- pyvips: libvips' shrink-on-load thumbnail for the largest size, the smaller ones from it
          (pyvips[binary]; VIPS_CONCURRENCY=1 so every method uses one core)

Targets (issue 9): ours at least 8x naive, within 10 % of the best of Pillow-draft and pyvips,
peak RSS at most 64 MB per process.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Run as a script, sys.path[0] is bench/, where this very file would shadow the `thumbnails` package.
if sys.path and Path(sys.path[0] or ".").resolve() == ROOT / "bench":
    sys.path[0] = str(ROOT)
elif str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

WIDTH, HEIGHT = 4000, 3000
DEFAULT_SIZES = (128, 256, 512)
PHOTOS = 3
MAX_PIXELS = 50_000_000
METHODS = ("ours", "naive", "pyvips")
TARGET_SPEEDUP = 8.0
TARGET_NEAR_BEST = 0.90
TARGET_PEAK_MB = 64.0


# --- the methods ----------------------------------------------------------------------------


def method_ours(sizes):
    from thumbnails.processing import make_thumbnails

    def run(data: bytes) -> int:
        return len(make_thumbnails(data, sizes, max_pixels=MAX_PIXELS))

    return run


def method_naive(sizes):
    from PIL import Image

    def run(data: bytes) -> int:
        for size in sizes:
            with Image.open(io.BytesIO(data)) as image:
                image = image.convert("RGB")
                image.thumbnail((size, size), Image.Resampling.LANCZOS, reducing_gap=None)
                image.save(io.BytesIO(), format="JPEG", quality=85)
        return len(sizes)

    return run


def method_pyvips(sizes):
    import pyvips

    pyvips.cache_set_max(0)  # every image is new; no cheating through libvips' operation cache
    ordered = sorted(sizes, reverse=True)

    def run(data: bytes) -> int:
        current = pyvips.Image.thumbnail_buffer(data, ordered[0], size="down").copy_memory()
        for size in ordered:
            if max(current.width, current.height) > size:
                current = current.thumbnail_image(size, size="down").copy_memory()
            current.jpegsave_buffer(Q=85, keep="none")
        return len(ordered)

    return run


# --- child process: one method, its own peak memory -----------------------------------------


def peak_rss_kb() -> int:
    """This process's peak resident set size, KiB. VmHWM belongs to this process image alone;
    Linux carries ru_maxrss over from the parent across fork and exec."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss


def child(method: str, files: list[str], sizes: list[int], seconds: float, min_images: int) -> dict:
    factory = {"ours": method_ours, "naive": method_naive, "pyvips": method_pyvips}[method]
    run = factory(sizes)
    photos = [Path(f).read_bytes() for f in files]
    run(photos[0])  # warm-up: imports, lazy initialisation
    baseline_kb = peak_rss_kb()
    done = 0
    started = time.perf_counter()
    while done < min_images or time.perf_counter() - started < seconds:
        run(photos[done % len(photos)])
        done += 1
    elapsed = time.perf_counter() - started
    peak_kb = peak_rss_kb()
    return {"method": method, "images": done, "seconds": elapsed, "peak_kb": peak_kb, "baseline_kb": baseline_kb}


def run_child(method: str, files: list[str], sizes: list[int], seconds: float, min_images: int) -> dict:
    env = {**os.environ, "VIPS_CONCURRENCY": "1", "OMP_NUM_THREADS": "1"}
    args = [sys.executable, str(Path(__file__).resolve()), "--child", method, "--files", ",".join(files)]
    args += ["--sizes", ",".join(map(str, sizes)), "--seconds", str(seconds), "--min-images", str(min_images)]
    proc = subprocess.run(args, capture_output=True, text=True, env=env, cwd=ROOT, check=False)
    if proc.returncode != 0:
        return {"method": method, "error": (proc.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --- the photos -----------------------------------------------------------------------------


def make_photos(directory: Path, count: int) -> list[str]:
    """Photo-like 4000x3000 JPEGs: smooth colour fields with fine grain (no flat areas that
    would make decoding unrealistically cheap)."""
    from PIL import Image

    files = []
    for index in range(count):
        channels = [Image.effect_noise((40, 30), 90 + 10 * index).resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC)]
        channels += [Image.effect_noise((32, 24), 70).resize((WIDTH, HEIGHT), Image.Resampling.BICUBIC)]
        channels += [Image.linear_gradient("L").resize((WIDTH, HEIGHT)).rotate(90 * index, expand=False)]
        base = Image.merge("RGB", channels)
        grain = Image.effect_noise((WIDTH, HEIGHT), 18).convert("RGB")
        photo = Image.blend(base, grain, 0.12)
        path = directory / f"photo-{index}.jpg"
        photo.save(path, format="JPEG", quality=90)
        files.append(str(path))
    return files


def pyvips_status() -> str | None:
    """None when pyvips with a libvips is importable, else why not."""
    try:
        import pyvips

        pyvips.version(0)
    except Exception as exc:  # noqa: BLE001 - any failure means "not available here"; reported as such
        return f"{type(exc).__name__}: {exc}"
    return None


# --- report ---------------------------------------------------------------------------------


def report(results: list[dict], sizes: list[int], quick: bool) -> list[str]:
    ok = [r for r in results if "error" not in r]
    for r in ok:
        r["rate"] = r["images"] / r["seconds"]
    by = {r["method"]: r for r in ok}
    naive = by.get("naive", {}).get("rate")
    best = max((r["rate"] for r in ok if r["method"] in ("ours", "pyvips")), default=None)
    lines = [
        f"thumbnails: {WIDTH}x{HEIGHT} JPEG -> sizes {','.join(map(str, sizes))}, one core per method"
        + (" (quick)" if quick else ""),
        f"{'method':<8} {'images':>6} {'img/s':>8} {'ms/img':>8} {'peak MB':>8} {'+MB':>6}"
        f" {'x naive':>8} {'vs best':>8}",
    ]
    for r in results:
        if "error" in r:
            lines.append(f"{r['method']:<8} not run: {r['error']}")
            continue
        peak = r["peak_kb"] / 1024
        grown = (r["peak_kb"] - r["baseline_kb"]) / 1024
        x_naive = f"{r['rate'] / naive:.1f}x" if naive else "-"
        vs_best = f"{r['rate'] / best:.0%}" if best and r["method"] != "naive" else "-"
        lines.append(
            f"{r['method']:<8} {r['images']:>6} {r['rate']:>8.2f} {1000 / r['rate']:>8.1f} {peak:>8.1f} {grown:>6.1f}"
            f" {x_naive:>8} {vs_best:>8}"
        )
    ours = by.get("ours")
    if ours and naive and best:
        speedup = ours["rate"] / naive
        near = ours["rate"] / best
        peak = ours["peak_kb"] / 1024
        lines.append(
            f"targets: >= {TARGET_SPEEDUP:.0f}x naive: {speedup:.1f}x"
            f" {'ok' if speedup >= TARGET_SPEEDUP else 'MISSED'};"
            f" within 10 % of best: {near:.0%} {'ok' if near >= TARGET_NEAR_BEST else 'MISSED'};"
            f" peak <= {TARGET_PEAK_MB:.0f} MB: {peak:.1f} MB {'ok' if peak <= TARGET_PEAK_MB else 'MISSED'}"
        )
        if "pyvips" in by and by["pyvips"]["rate"] > ours["rate"] / TARGET_NEAR_BEST:
            lines.append("note: pyvips is clearly faster here; consider switching processing to it")
        from bench.common import emit

        emit("thumbnails", "images/s vs naive Pillow", ours["rate"], naive, "img/s", ">= 8x")
        if "pyvips" in by:
            emit("thumbnails", "images/s vs pyvips", ours["rate"], by["pyvips"]["rate"], "img/s", ">= 0.9x")
        emit("thumbnails", "peak RSS per process", peak, by["naive"]["peak_kb"] / 1024, "MB", "<= 64 MB",
             better="lower")  # fmt: skip
    return lines


def run(*, quick: bool = False, sizes: list[int] | None = None, seconds: float | None = None) -> list[dict]:
    """Runs every method once; returns one result per method (with "error" when it could not run)."""
    sizes = sorted(sizes or DEFAULT_SIZES)
    seconds = seconds if seconds is not None else (2.0 if quick else 10.0)
    min_images = 2 if quick else 5
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-thumbnails-") as tmp:
        count = 2 if quick else PHOTOS
        make = [sys.executable, str(Path(__file__).resolve()), "--make-photos", tmp, "--count", str(count)]
        subprocess.run(make, check=True, cwd=ROOT)  # in a child: the parent's RSS stays small
        files = [str(Path(tmp) / f"photo-{index}.jpg") for index in range(count)]
        for method in METHODS:
            if method == "pyvips" and (why := pyvips_status()):
                results.append(
                    {"method": "pyvips", "error": f"pyvips unavailable ({why}); pip install 'pyvips[binary]'"}
                )
                continue
            results.append(run_child(method, files, sizes, seconds, min_images))
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run (well under 20 s)")
    parser.add_argument("--sizes", default=",".join(map(str, DEFAULT_SIZES)), help="comma list of sizes")
    parser.add_argument("--seconds", type=float, default=None, help="time per method (default 2 quick, 10 full)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON too")
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    parser.add_argument("--make-photos", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=PHOTOS, help=argparse.SUPPRESS)
    parser.add_argument("--files", help=argparse.SUPPRESS)
    parser.add_argument("--min-images", type=int, default=2, help=argparse.SUPPRESS)
    options = parser.parse_args(argv)
    sizes = [int(s) for s in options.sizes.split(",") if s.strip()]
    if options.make_photos:
        make_photos(Path(options.make_photos), options.count)
        return 0
    if options.child:
        result = child(options.child, options.files.split(","), sizes, options.seconds or 2.0, options.min_images)
        print(json.dumps(result))
        return 0
    started = time.perf_counter()
    results = run(quick=options.quick, sizes=sizes, seconds=options.seconds)
    for line in report(results, sorted(sizes), options.quick):
        print(line)
    print(f"(ran in {time.perf_counter() - started:.1f} s)")
    if options.json:
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
