"""Input-pipeline throughput: decoded, preprocessed images per second, per core.

Runs the trainer's own training input (``pipeline.train_dataset``: read, shuffle, decode, the
preprocessing ops, batch) on an image folder and times it on a tf.data thread pool of a given
size, with inter-op and intra-op parallelism of one, so that ``--threads 1`` is what one core
delivers. Compare the figure with the train step's images/s (``python -m
flexvision.benchmark``): when the cores left to the input (all cores on a CPU host, the host
cores per accelerator otherwise) times images/s/core is below the step's images/s, the input is
the bottleneck.

Method (the same as flexvision.benchmark's): ``--warmup`` batches are drawn first (file cache,
autotuning), then ``--repeats`` timed runs of whole batches, each at least ``--min_time``
seconds; the median run is reported with the min and max. Per core = images per CPU-second of
the process during that run (all its threads: reading, decoding, ops, batching, the numpy
hand-off), which also says how many cores the pipeline kept busy.

    python -m flexvision.data.benchmark                       # sample JPEGs, i1k train ops, 224
    python -m flexvision.data.benchmark --data_dir /content/photos --threads 1,2 --json out.json

Without ``--data_dir`` it writes ``--num_images`` JPEGs (random crops of up to 375x500 from
scikit-learn's two sample photos, ImageNet's typical size) to a temporary folder.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from typing import Any

import ml_collections
import tensorflow as tf

from flexvision.data import image_folder, pipeline

I1K_TRAIN_PP = "decode|inception_crop(224)|flip_lr|value_range(-1, 1)|onehot(1000)"


def _timed_runs(iterator, batch_size: int, repeats: int, min_time: float
                ) -> list[tuple[float, float]]:
    """(images per wall second, images per CPU second of this process) of ``repeats`` runs of
    whole batches, each lasting at least ``min_time`` wall seconds."""
    runs = []
    for _ in range(repeats):
        images, start, cpu_start = 0, time.perf_counter(), time.process_time()
        while True:
            next(iterator)
            images += batch_size
            elapsed = time.perf_counter() - start
            if elapsed >= min_time:
                break
        runs.append((images / elapsed, images / max(time.process_time() - cpu_start, 1e-9)))
    return runs


def measure(data_dir: str, *, pp: str = I1K_TRAIN_PP, split: str = "train", batch_size: int = 64,
            threads: int = 1, warmup: int = 3, repeats: int = 3, min_time: float = 2.0
            ) -> dict[str, Any]:
    """Throughput of the training input on ``threads`` tf.data threads.

    Returns images/s (median of the runs, with min and max), the CPU cores the process kept
    busy meanwhile (CPU seconds / wall seconds, all threads) and images per CPU-second of the
    median-speed run: the per-core figure, which a loaded machine disturbs less than images/s.
    """
    config = ml_collections.ConfigDict(dict(name=image_folder.NAME, data_dir=data_dir,
                                            split=split, pp=pp, batch_size=batch_size,
                                            shuffle_buffer=1024))
    options = tf.data.Options()
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
    dataset = pipeline.train_dataset(config, seed=0).with_options(options)
    iterator = dataset.as_numpy_iterator()  # what the trainer iterates
    for _ in range(warmup):
        next(iterator)
    runs = sorted(_timed_runs(iterator, batch_size, repeats, min_time))
    rate, per_cpu_second = runs[len(runs) // 2]
    return {"pp": pp, "batch_size": batch_size, "threads": threads,
            "images_per_second": rate, "min": runs[0][0], "max": runs[-1][0],
            "cores_busy": rate / per_cpu_second,
            "images_per_second_per_core": per_cpu_second,
            "ms_per_image_per_core": 1000.0 / per_cpu_second,
            "num_images": pipeline.num_examples(pipeline.get_builder(image_folder.NAME, data_dir),
                                                split)}


def make_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m flexvision.data.benchmark", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data_dir", default=None,
                        help="image folder (ROOT/<class>/*.jpg); default: sample JPEGs")
    parser.add_argument("--split", default="train")
    parser.add_argument("--num_images", type=int, default=256,
                        help="sample JPEGs to write when --data_dir is not given")
    parser.add_argument("--pp", default=I1K_TRAIN_PP, help="training preprocessing ops")
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--threads", default="1",
                        help="comma-separated tf.data thread-pool sizes to measure, e.g. 1,2")
    parser.add_argument("--warmup", type=int, default=3, help="batches drawn before timing")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--min_time", type=float, default=2.0, help="seconds per timed run")
    parser.add_argument("--json", default=None, help="write the results here")
    return parser


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    args = make_parser().parse_args(argv)
    try:
        threads = [int(t) for t in args.threads.split(",") if t.strip()]
    except ValueError:
        raise SystemExit(f"--threads must be comma-separated ints, got {args.threads!r}") from None
    if not threads or min(threads) < 1:
        raise SystemExit(f"--threads must be positive ints, got {args.threads!r}")
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir
        if data_dir is None:
            data_dir = os.path.join(tmp, "sample_jpegs")
            image_folder.write_sample_folder(data_dir, per_class=max(1, args.num_images // 2))
        results = [measure(data_dir, pp=args.pp, split=args.split, batch_size=args.batch_size,
                           threads=n, warmup=args.warmup, repeats=args.repeats,
                           min_time=args.min_time) for n in threads]
    machine = f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"
    print(f"input pipeline on {machine}: {results[0]['pp']!r}, batch {args.batch_size}, "
          f"{results[0]['num_images']} images in {args.data_dir or 'sample JPEGs'}")
    for row in results:
        print(f"  {row['threads']} thread(s): {row['images_per_second']:.1f} images/s "
              f"[{row['min']:.1f}-{row['max']:.1f}] on {row['cores_busy']:.2f} busy cores = "
              f"{row['images_per_second_per_core']:.1f} images/s per core "
              f"({row['ms_per_image_per_core']:.2f} ms of CPU per image)")
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump({"machine": machine, "results": results}, f, indent=2)
    return results


if __name__ == "__main__":
    main()
