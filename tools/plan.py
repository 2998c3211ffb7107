"""Plan a recipe on N GPUs before launching it: parameters, memory per GPU, step time, compute
budget against the compute-optimal token count (Chinchilla's 20 tokens per parameter, or with
--law FIT.json the allocation and predicted loss of a law fitted by tools/ladder.py fit), and the
valid layouts that fit, ranked.

    python tools/plan.py recipes/llama_70b.toml --gpus 512 --gpu h100-80gb

Everything is computed on paper (no GPU needed). Memory is the most loaded GPU's: weights,
gradients, optimizer state (sharded over data parallel by the distributed optimizer) and the
activations held at the peak of the 1F1B / interleaved schedule under the recipe's recompute and
sequence/context parallelism; see bigpt/memory.py for what the estimate leaves out (hence
--headroom). Step time runs the model's FLOPs and those recompute re-runs at --mfu of the peak (FP8's
for an FP8 recipe) while the GPUs are busy, plus the pipeline bubble. The
checkpoint line gives the bytes of one save and of its busiest rank, the save time at --fs-gbps,
and warns when synchronous saves every checkpoint.save_interval steps take over 3% of the time.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bigpt.cli import recipe_parser  # noqa: E402
from bigpt.flops import GPUS  # noqa: E402
from bigpt.runtime import console  # noqa: E402

parser = recipe_parser(__doc__, example="train.micro_batch_size=2")
parser.add_argument("--gpus", type=int, required=True, help="number of GPUs to plan for")
parser.add_argument("--gpu", default="h100-80gb", help=f"GPU model: {', '.join(GPUS)} (default h100-80gb)")
parser.add_argument(
    "--gpus-per-node", type=int, default=8, help="GPUs per node; tensor parallelism stays inside a node (default 8)"
)
parser.add_argument(
    "--mfu",
    type=float,
    default=0.4,
    help="share of the peak the GPUs reach while busy, on the model's FLOPs and the recomputed ones "
    "(the FP8 peak for an FP8 recipe; default 0.4)",
)
parser.add_argument(
    "--headroom",
    type=float,
    default=0.1,
    help="fraction of GPU memory kept free for what the estimate leaves out "
    "(CUDA context, NCCL, fragmentation; default 0.1)",
)
parser.add_argument(
    "--fs-gbps",
    type=float,
    default=5.0,
    help="aggregate write bandwidth of the filesystem holding checkpoint.dir, in GB/s: "
    "the save time and its share of training time (default 5)",
)
parser.add_argument("--top", type=int, default=10, help="layouts to list (default 10)")
parser.add_argument(
    "--law",
    metavar="FIT.json",
    help="a scaling law fitted by tools/ladder.py fit: its compute-optimal N and D for the recipe's budget and "
    "the recipe's predicted final loss replace Chinchilla's 20 tokens per parameter",
)


def parse_args(argv=None):
    """The options, checked."""
    args = parser.parse_args(argv)
    if not 0 < args.mfu <= 1:
        parser.error("--mfu must be in (0, 1]")
    if not 0 <= args.headroom < 1:
        parser.error("--headroom must be in [0, 1)")
    if not args.fs_gbps > 0:
        parser.error("--fs-gbps must be positive")
    if args.gpus_per_node < 1 or args.top < 1:
        parser.error("--gpus-per-node and --top must be 1 or more")
    return args


@console.reports_user_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    from bigpt.plan import make_plan, report
    from bigpt.recipe import load_recipe
    from bigpt.scaling import load_law

    law = load_law(args.law) if args.law else None
    recipe = load_recipe(args.recipe, args.overrides)
    plan = make_plan(
        recipe,
        args.gpus,
        args.gpu,
        mfu=args.mfu,
        headroom=args.headroom,
        gpus_per_node=args.gpus_per_node,
        fs_bytes_per_second=args.fs_gbps * 1e9,
        law=law,
    )
    console.say(report(plan, args.top))
    return 0


if __name__ == "__main__":
    sys.exit(main())
