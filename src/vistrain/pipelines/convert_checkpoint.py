"""``vistrain convert-checkpoint IN OUT [--trust] [--ema]``: parse, then ``vistrain.convert_checkpoint``."""

from __future__ import annotations

import argparse

from vistrain.pipelines._args import console

NAME = "convert-checkpoint"
HELP = "write a checkpoint's weights (timm train.py, vistrain or a state dict) as .safetensors"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("src", metavar="IN", help="checkpoint file (.pth, .pth.tar, .bin, .safetensors)")
    p.add_argument("dst", metavar="OUT", help="the .safetensors file to write")
    p.add_argument("--trust", action="store_true",
                   help="read a file the safe unpickler refuses (timm train.py's, holding an argparse.Namespace) "
                        "with the full unpickler: only for a file you trust, it can run code")
    p.add_argument("--ema", action="store_true", help="the EMA weights (timm's state_dict_ema) instead of state_dict")
    p.add_argument("--force", action="store_true", help="replace OUT when it exists")


def run_convert_checkpoint(args: argparse.Namespace) -> int:
    import vistrain

    console()
    out = vistrain.convert_checkpoint(args.src, args.dst, trust=args.trust, ema=args.ema,
                                       force=args.force)
    print(f"[DONE] weights written to {out}")
    return 0
