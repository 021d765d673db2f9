"""`karcher-lab lora-merge ADAPTER... --method geomerge --out DIR`: merge PEFT LoRA adapters.

    karcher-lab lora-merge A B C --out merged/                         # geomerge, equal weights
    karcher-lab lora-merge A B C --out merged/ --workers 8             # modules merged in 8 processes
    karcher-lab lora-merge A B C --out merged/ --device cuda           # geomerge's batched solve on the GPU
    karcher-lab lora-merge A B --method knots_ties --param density=0.5 --weights 2 1 --out merged/
    karcher-lab lora-merge A B --fold-into BASE --out model/           # a full checkpoint, W + ΔW
    karcher-lab lora-merge --list                                       # the LoRA methods and parameters
"""
from __future__ import annotations

import argparse


def _parse_params(items: list[str]) -> dict:
    import yaml

    from karcher_lab.errors import ParameterError

    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ParameterError(f"--param {item!r} is not KEY=VALUE")
        params[key] = yaml.safe_load(value)
    return params


def _list() -> int:
    from karcher_lab.methods.lora import get_lora_method, list_lora_methods

    for name in list_lora_methods():
        m = get_lora_method(name)
        print(f"{name:<16} {m.summary} [rank: {m.rank}]")
        for p in m.params:
            print(f"{'':<18}{p.name} ({p.kind.__name__}, default {p.default!r}): {p.doc}")
    return 0


def run(args: argparse.Namespace) -> int:
    from karcher_lab.errors import ParameterError
    from karcher_lab.pipeline.lora import merge_lora

    if args.list:
        return _list()
    if not args.adapters or args.out is None:
        raise ParameterError("give the adapters to merge and --out DIR (or --list for the methods)")
    result = merge_lora(args.adapters, args.method, weights=args.weights, out=args.out, base=args.fold_into,
                        overwrite=args.overwrite, workers=args.workers, device=args.device,
                        **_parse_params(args.param))
    ranks = sorted(set(result.ranks.values()))
    what = f"folded into {args.fold_into} as a full checkpoint" if args.fold_into else "as a PEFT adapter"
    print(f"merged {len(result.adapters)} adapters ({len(result.factors)} modules) with {args.method} "
          f"{what}: {result.out}\nmerged rank{'s' if len(ranks) > 1 else ''}: {', '.join(map(str, ranks))}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser(
        "lora-merge",
        help="merge PEFT LoRA adapters (geomerge, KnOTS, TA, TIES, peft's combinations)",
        description="Merge PEFT LoRA adapters module by module into a PEFT adapter at --out, or fold the merged "
        "update into a base checkpoint (--fold-into) and write a full model. Output is atomic: --out appears "
        "only when complete.",
    )
    p.add_argument("adapters", nargs="*", metavar="ADAPTER", help="PEFT adapter directories (adapter_config.json)")
    p.add_argument("--method", default="geomerge", help="LoRA merge method (default geomerge; --list shows all)")
    p.add_argument("--out", help="output directory (must not exist unless --overwrite)")
    p.add_argument("--weights", nargs="+", type=float, help="one weight per adapter (default 1/N each)")
    p.add_argument("--fold-into", metavar="BASE", help="base checkpoint to fold the merged update into")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                   help="a method parameter, e.g. density=0.5 (repeatable)")
    p.add_argument("--workers", type=int, default=1,
                   help="processes that merge modules in parallel (default 1; e.g. the number of cores for geomerge)")
    p.add_argument("--device", help="where geomerge's batched solver runs: cpu (default) or cuda (the whole batch on "
                   "the GPU); other methods run on the CPU")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it exists (only once the merge succeeded)")
    p.add_argument("--list", action="store_true", help="list the LoRA merge methods and their parameters")
    p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show tracebacks on errors")
    p.set_defaults(func=run)


