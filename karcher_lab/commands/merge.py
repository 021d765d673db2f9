"""`karcher-lab merge CONFIG.yml OUT_DIR`: run a mergekit-style recipe into a checkpoint directory."""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator


class Terminated(BaseException):
    """Raised in the main thread when the process receives SIGTERM (``kill``, ``timeout``, schedulers),
    so that the merge unwinds as for Ctrl-C: the partial output directory is removed."""


@contextmanager
def sigterm_unwinds() -> Iterator[None]:
    """While the block runs, SIGTERM raises :class:`Terminated` instead of killing the process (only in
    the main thread, the one Python delivers signals to)."""

    def handler(signum, frame):
        raise Terminated()

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def run(args: argparse.Namespace) -> int:
    from karcher_lab.errors import KarcherLabError
    from karcher_lab.pipeline import run_recipe
    from karcher_lab.recipe import load_recipe

    recipe = load_recipe(Path(args.config))
    try:
        with sigterm_unwinds():
            stats = run_recipe(
                recipe, args.out, device=args.device, seed=args.seed, overwrite=args.overwrite,
                out_shard_size=args.out_shard_size, progress=True, relative_to=Path(args.config).resolve().parent,
                allow_crimes=args.allow_crimes, check_finite=args.check_finite,
            )
    except KeyboardInterrupt:
        print(f"karcher-lab merge: interrupted; nothing was written to {args.out}", file=sys.stderr)
        return 130
    except Terminated:
        print(f"karcher-lab merge: terminated (SIGTERM); nothing was written to {args.out}", file=sys.stderr)
        return 143
    except OSError as exc:
        if isinstance(exc, KarcherLabError):
            raise
        raise KarcherLabError(f"{exc.strerror or exc}{f': {exc.filename}' if exc.filename else ''}") from exc
    for warning in stats.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    device_peak = f", {_size(stats.peak_device_bytes)} on the GPU" if stats.peak_device_bytes is not None else ""
    print(
        f"merged {stats.tensors} tensors with {recipe.merge_method} into {stats.out} in {stats.seconds:.1f} s\n"
        f"read {_size(stats.bytes_read)}, wrote {_size(stats.bytes_written)} in {len(stats.files)} files; "
        f"peak memory {_size(stats.peak_rss_bytes)} (RSS){device_peak}"
    )
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "merge",
        help="merge checkpoints as a mergekit YAML recipe says",
        description="Merge the models of a recipe (mergekit's YAML schema) into OUT_DIR, streaming tensor by "
        "tensor and writing atomically (OUT_DIR appears only when complete).",
    )
    p.add_argument("config", metavar="CONFIG.yml", help="the merge recipe (mergekit YAML schema)")
    p.add_argument("out", metavar="OUT_DIR", help="output checkpoint directory (must not exist unless --overwrite)")
    p.add_argument("--device", default="cpu", help="where the per-tensor math runs: cpu (default) or cuda")
    p.add_argument("--out-shard-size", default="5GB", help="largest output shard, e.g. 5GB, 500MB, 2GiB (default 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists (only once the merge succeeded)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of randomized methods (dare, della, arcee_fusion); default: the recipe's seed, else 0")
    p.add_argument("--allow-crimes", action="store_true",
                   help="merge models of different architectures (model_type / architectures), as mergekit's --allow-crimes")
    p.add_argument("--check-finite", action="store_true",
                   help="read every input once before merging and stop at the first NaN/Inf, naming the model and tensor "
                   "(costs one extra read of all inputs; without it a NaN is found when its tensor is merged, and nothing "
                   "is written either way)")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    p.set_defaults(func=run)
