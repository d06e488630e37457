"""Convert OpenVLA checkpoints between the HF (PyTorch) format and ours (orbax + JSON).

  python scripts/convert.py to-jax HF_DIR OUT_DIR [--scanned]
  python scripts/convert.py to-hf JAX_DIR OUT_DIR [--dtype bfloat16|float32] [--max-shard-size 5GB]
      [--source-hf-dir HF_DIR]

Only safetensors are read (pickled .bin/.pt checkpoints are refused). Outputs appear under OUT_DIR
only when complete. `to-hf` also writes the processor configs the original's `AutoProcessor` reads
and carries the other files (remote code `*.py`, README, ...) of the HF directory `to-jax` read, or
of `--source-hf-dir`.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    a = sub.add_parser("to-jax", help="HF OpenVLA directory -> orbax params + config/statistics/tokenizer")
    a.add_argument("src", help="HF checkpoint directory (config.json + safetensors) or a .safetensors file's directory")
    a.add_argument("out", help="output directory (must not exist or be empty)")
    a.add_argument("--scanned", action="store_true", help="stack decoder/ViT layers for nn.scan models")
    b = sub.add_parser("to-hf", help="converted directory -> HF OpenVLA directory")
    b.add_argument("src", help="directory written by `to-jax` (or by training)")
    b.add_argument("out", help="output directory (must not exist or be empty)")
    b.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    b.add_argument("--max-shard-size", default="5GB", help="e.g. 5GB, 500MB, 2GiB")
    b.add_argument(
        "--source-hf-dir",
        "--source_hf_dir",
        dest="source_hf_dir",
        default=None,
        help="HF directory whose other files (remote code, README) the export carries "
        "(default: the one `to-jax` read, recorded in SRC/source.json)",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    from openvla_jax.checkpoints.converted import convert_to_hf, convert_to_jax

    start = time.time()
    try:
        if args.command == "to-jax":
            out = convert_to_jax(args.src, args.out, scanned=args.scanned)
        else:
            out = convert_to_hf(
                args.src,
                args.out,
                dtype=args.dtype,
                max_shard_size=args.max_shard_size,
                source_hf_dir=args.source_hf_dir,
            )
    except (ValueError, FileNotFoundError, FileExistsError) as e:  # bad input: say what, no traceback
        print(f"convert.py {args.command}: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {out} in {time.time() - start:.1f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
