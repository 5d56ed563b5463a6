"""``vistrain demo``: parse, then ``vistrain.api.demo`` (data written on the spot, a ready config trained on the CPU,
the pills export), then the result lines."""

from __future__ import annotations

import argparse

from vistrain.pipelines._args import console

NAME = "demo"
HELP = "write a demo data set and train its config on the CPU (digits, or pills + export)"
LABEL = "TRAINING"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scenario", choices=["digits", "pills"], default="digits",
                   help="digits: scikit-learn's digits, configs/demo.yaml; pills: generated studio + real pill "
                        "photos, configs/demo_pills.yaml, then the int8 export (default: digits)")
    p.add_argument("--out", help="where the demo images go (default: ./demo_data, pills: ./demo_data/pills)")
    p.add_argument("--config", help="demo config (default: the scenario's configs/demo*.yaml shipped in the package)")
    p.add_argument("overrides", nargs="*", metavar="key.path=value")


def run_demo(args: argparse.Namespace) -> int:
    from vistrain import api
    from vistrain.engine.deploy import budget_line

    console()
    result = api.demo(args.scenario, out=args.out, config=args.config, overrides=args.overrides)
    s = result.run.summary
    print(f"[DONE] run directory: {result.run.path}")
    if args.scenario == "digits":
        print(f"[DONE] demo validation macro_f1={s['mean']['macro_f1']:.4f} accuracy={s['mean']['accuracy']:.4f}")
        return 0
    for entry in (result.export or {}).get("models", []):
        for f in entry.get("files", []):
            agree = "" if f.get("top1_agreement") is None else (
                f", top-1 agreement {f['top1_agreement']:.2%} on {entry['validation']['images']} validation images")
            print(f"[DONE] export: {f['path']} ({f['size_mb']:.1f} MB{agree})")
            if f.get("budget"):
                print(budget_line(f))
    test = s.get("test") or {}
    real = test.get("top1@real", s["mean"].get("top1@real"))
    which = "test" if "top1@real" in test else "validation"
    print(f"[DONE] pills demo: top1@real={'n/a' if real is None else f'{real:.4f}'} on the {which} split "
          f"(chance 1/{result.num_classes} = {1 / result.num_classes:.4f}), validation top1@real="
          f"{s['mean'].get('top1@real', float('nan')):.4f} macro_f1={s['mean']['macro_f1']:.4f} "
          f"in {result.seconds:.0f} s")
    return 0
