"""Worker memory over 5 000 thumbnails: does a long-running worker stay bounded?

    python bench/worker_memory.py [--quick] [--images N]

One worker (`-Q normal -c 2`, the project's settings, so `worker_max_memory_per_child` as
configured, but with `worker_max_tasks_per_child` off: recycling every 1 000 tasks would hide a
leak, and the point is what one pool process does over thousands of images) makes the
thumbnails of N uploaded 4000x3000 JPEGs (the originals go through Django storage and the task
reads them back, as in production). A sampler reads the resident memory of the worker's main
process and of each pool process every 0.2 s.

Reported: the idle worker (the baseline), the pool processes' peak, their memory once the first
10 % of the images are done and at the end (growth between the two is what a leak would show),
the main process at the end, and how many pool processes `worker_max_memory_per_child` replaced
(none is the hoped-for answer: memory stays far below the limit without it).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import threading
import time
from pathlib import Path

# Run as a script, sys.path[0] is bench/, whose modules would shadow the standard library's.
sys.path[0] = str(Path(__file__).resolve().parent.parent)

from bench.common import Environment, Worker, emit, positive_int, table  # noqa: E402

MB = 2**20


class Sampler(threading.Thread):
    """Resident memory of a worker's main process and of its pool processes, sampled."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        super().__init__(daemon=True)
        import psutil

        self.main = psutil.Process(pid)
        self.interval = interval
        self.children_seen: set[int] = set()
        self.peak_child = 0.0
        self.stopping = threading.Event()

    def snapshot(self) -> tuple[float, list[float]]:
        """(main process MB, [pool process MB, ...]) now."""
        import psutil

        children = []
        for child in self.main.children(recursive=True):
            try:
                children.append(child.memory_info().rss / MB)
                self.children_seen.add(child.pid)
            except psutil.NoSuchProcess:  # replaced between the listing and the read
                continue
        return self.main.memory_info().rss / MB, children

    def run(self) -> None:
        while not self.stopping.wait(self.interval):
            _, children = self.snapshot()
            self.peak_child = max([self.peak_child, *children])


def store_images(count: int, photos: list[str]) -> list[int]:
    """`count` Image rows over a few stored originals (each image gets its own thumbnails)."""
    from django.core.files.base import ContentFile
    from django.core.files.storage import default_storage

    from thumbnails.models import Image

    names = [default_storage.save(f"originals/bench-{i}.jpg", ContentFile(Path(p).read_bytes())) for i, p in
             enumerate(photos)]  # fmt: skip
    rows = [Image(original=names[i % len(names)], format="JPEG", width=4000, height=3000) for i in range(count)]
    Image.objects.bulk_create(rows, batch_size=1000)
    return list(Image.objects.order_by("pk").values_list("pk", flat=True))


def done_count() -> int:
    from thumbnails.models import Image

    return Image.objects.filter(status=Image.Status.DONE).count()


def run(*, images: int, quick: bool) -> dict:
    from bench.thumbnails import make_photos

    with Environment() as env:
        env.django()
        from django.conf import settings

        from config.celery import app
        from thumbnails.models import Image

        photos = make_photos(Path(tempfile.mkdtemp(prefix="bench-photos-")), 4)
        ids = store_images(images, photos)
        limit_mb = (settings.CELERY_WORKER_MAX_MEMORY_PER_CHILD or 0) / 1024
        worker = Worker(queues="normal", concurrency=2, extra_env={"CELERY_WORKER_MAX_TASKS_PER_CHILD": "0"}).start()
        try:
            time.sleep(1)
            sampler = Sampler(worker.process.pid)
            idle_main, idle_children = sampler.snapshot()
            sampler.start()
            started = time.perf_counter()
            with app.producer_or_acquire() as producer:
                for pk in ids:
                    app.send_task("thumbnails.generate", args=[pk], producer=producer)
            early = None
            deadline = started + max(600, images)  # at least 1 image/s, or something is wrong
            while (done := done_count()) < images:
                if early is None and done >= images // 10:
                    early = sampler.snapshot()[1]
                if Image.objects.filter(status=Image.Status.FAILED).exists():
                    raise RuntimeError(Image.objects.filter(status=Image.Status.FAILED).first().error)
                if time.perf_counter() > deadline:
                    raise RuntimeError(f"{done} of {images} images done before the deadline")
                time.sleep(0.5)
            elapsed = time.perf_counter() - started
            time.sleep(0.5)
            final_main, final_children = sampler.snapshot()
            sampler.stopping.set()
            sampler.join()
        finally:
            worker.stop()
    replaced = max(0, len(sampler.children_seen) - 2)
    avg = lambda values: sum(values) / len(values) if values else float("nan")  # noqa: E731
    rows = [
        ["measure", "MB"],
        ["idle worker: main process", f"{idle_main:.0f}"],
        ["idle worker: each pool process (baseline)", f"{avg(idle_children):.0f}"],
        [f"pool process after {images // 10} images (10 %)", f"{avg(early or final_children):.0f}"],
        [f"pool process after {images} images", f"{avg(final_children):.0f}"],
        ["pool process peak", f"{sampler.peak_child:.0f}"],
        [f"main process after {images} images", f"{final_main:.0f}"],
        ["worker_max_memory_per_child", f"{limit_mb:.0f}"],
    ]
    print(f"Worker memory, {images} 4000x3000 JPEGs to {settings.THUMBNAIL_SIZES} px, one worker with 2 processes"
          + (" (quick)" if quick else ""))  # fmt: skip
    print(table(rows))
    print(f"{images / elapsed:.1f} images/s; pool processes replaced by worker_max_memory_per_child: {replaced}")
    emit("worker memory", f"pool process RSS after {images} images", avg(final_children), avg(idle_children), "MB",
         f"bounded (< {limit_mb:.0f} MB limit)", better="lower")  # fmt: skip
    emit("worker memory", "pool process peak RSS", sampler.peak_child, None, "MB", f"< {limit_mb:.0f} MB")
    emit("worker memory", f"main process RSS after {images} images", final_main, idle_main, "MB", "", better="lower")
    return {"final_children": final_children, "peak_child": sampler.peak_child, "replaced": replaced}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a short run for CI")
    parser.add_argument("--images", type=positive_int, help="how many images (default 5000, quick 200)")
    options = parser.parse_args(argv)
    run(images=options.images or (200 if options.quick else 5000), quick=options.quick)
    return 0


if __name__ == "__main__":
    sys.exit(main())
