"""Hugging Face directories (Llama, Mistral, Qwen2/2.5, Qwen3; Mixtral, Qwen2-MoE, Qwen3-MoE; the
encoders BERT and RoBERTa; the encoder-decoders T5 and mT5) in and out of bigpt checkpoints
(continual pretraining).

    python tools/convert_hf.py import data/hf/Meta-Llama-3-8B checkpoints/llama3-8b
    python tools/convert_hf.py export runs/llama3-8b-legal/checkpoints/iter_0005000 hf/llama3-8b-legal

import reads config.json, model.safetensors (or the shards named by model.safetensors.index.json;
pickle files are never loaded) and the tokenizer files, and writes a bigpt checkpoint that loads
at any TP/PP/VPP (start a run from it with init.from_checkpoint = OUT, or skip this step with
init.from_hf = HF_DIR), with OUT/model.toml, the [model] table to put in the recipe (an MoE model's
[model.moe] inline). An MoE checkpoint loads at any expert-parallel size too.

export writes a checkpoint of any layout as a directory transformers' from_pretrained loads:
safetensors shards, config.json (of the family the run started from), the tokenizer files of
those weights, and a README.md saying where it all came from (and warning when no tokenizer was found).
"""

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bigpt.cli import Parser, add_overwrite  # noqa: E402
from bigpt.errors import BigptError  # noqa: E402
from bigpt.runtime import console  # noqa: E402

DTYPES = ("float32", "bfloat16", "float16")
MIN_SHARD_BYTES = 2**10  # below, every tensor is a file of its own anyway
MAX_SHARD_BYTES = 2**50  # a pebibyte: any model in one file; beyond, a typo (and past float's exact integers)


parser = Parser(__doc__)
commands = parser.add_subparsers(dest="command", required=True)
to_bigpt = commands.add_parser("import", help="Hugging Face directory -> bigpt checkpoint")
to_bigpt.add_argument("hf_dir", help="directory with config.json and *.safetensors")
to_bigpt.add_argument("out", help="checkpoint directory to write (replaced if an earlier import wrote it)")
add_overwrite(to_bigpt, "an OUT that an earlier import did not write (deleting what is there)")
to_hf = commands.add_parser("export", help="bigpt checkpoint -> Hugging Face directory")
to_hf.add_argument(
    "checkpoint",
    help="an iter_* directory of a run (or a run's checkpoint directory: its newest "
    "intact checkpoint), or an imported checkpoint",
)
to_hf.add_argument("out", help="Hugging Face directory to write (replaced if an earlier export wrote it)")
add_overwrite(to_hf, "an OUT that an earlier export did not write (deleting what is there)")
to_hf.add_argument(
    "--hf-files",
    default=None,
    help="take config.json extras and tokenizer files from this directory (default: those "
    "of the weights the checkpoint's run started from)",
)
to_hf.add_argument("--dtype", choices=DTYPES, default=None, help="tensor dtype (default: as stored)")
to_hf.add_argument(
    "--max-shard-gb",
    type=float,
    default=5.0,
    help="largest safetensors shard, in GiB, above 0 (a tensor larger than that gets a shard of its own)",
)


@console.reports_user_errors
def main(argv=None) -> int:
    args = parser.parse_args(argv)
    console.quiet_dependencies()
    if args.command == "export" and not (
        math.isfinite(args.max_shard_gb) and MIN_SHARD_BYTES <= args.max_shard_gb * 2**30 <= MAX_SHARD_BYTES
    ):
        raise BigptError(
            f"--max-shard-gb {args.max_shard_gb}: the largest safetensors shard must be a size in GiB "
            f"from 1 KiB ({MIN_SHARD_BYTES / 2**30:.7f}) to 1 PiB ({MAX_SHARD_BYTES // 2**30}); Hugging "
            "Face's default is 5. A tensor larger than the size gets a shard of its own."
        )
    from bigpt.paths import check_writable

    check_writable(Path(args.out).resolve().parent, "the directory of OUT")
    if args.command == "import":
        from bigpt.hf.files import inspect_hf

        inspect_hf(Path(args.hf_dir))  # a bad directory fails fast, before megatron-core is loaded
    import torch

    from bigpt.hf.convert import export_hf, import_hf
    from bigpt.runtime.distributed import process_group_of_one

    with process_group_of_one():
        if args.command == "import":
            model = import_hf(Path(args.hf_dir), Path(args.out), args.overwrite)
            console.say(
                f"wrote {args.out}: {model['num_layers']} layers, hidden {model['hidden_size']}, vocab "
                f'{model["vocab_size"]}; start a run from it with init.from_checkpoint = "{args.out}" '
                f"and the [model] table in {Path(args.out) / 'model.toml'}"
            )
        else:
            dtype = getattr(torch, args.dtype) if args.dtype else None
            note = export_hf(
                Path(args.checkpoint),
                Path(args.out),
                hf_files=args.hf_files and Path(args.hf_files),
                dtype=dtype,
                max_shard_bytes=int(args.max_shard_gb * 2**30),
                overwrite=args.overwrite,
            )
            warning = note.startswith("WARNING")
            console.say(f"wrote {args.out}" + ("" if warning else f"; {note}"))
            if warning:
                console.note(note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
