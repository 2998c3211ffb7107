"""Reshard a checkpoint offline, on CPUs: write one that resumes exactly at another layout.

    python tools/reshard.py runs/big/checkpoints runs/big/checkpoints_tp4 parallel.tensor=4 parallel.pipeline=2

IN is a checkpoint (an iter_* directory, or a run's checkpoint directory: its newest intact one),
in any checkpoint.optimizer_format; OUT, a new checkpoint directory, gets it at the layout IN's
recipe takes with the parallel.* overrides: model, optimizer, scheduler, step and data position,
in checkpoint.optimizer_format (an override, else the default). Resume from it with
checkpoint.load = OUT (or checkpoint.dir = OUT) at that TP/PP/VPP/CP and any data-parallel size.
The work runs megatron-core on TP x PP x CP gloo processes of this machine (x parallel.data when
given); a checkpoint saved "dp_reshardable" at another layout first goes through a copy at its own
layout (in a hidden .OUT.bigpt-partial beside OUT, removed at the end). Nothing is written to OUT
unless it all succeeds, and an OUT that exists is refused.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bigpt.cli import Parser  # noqa: E402
from bigpt.runtime import console  # noqa: E402
from bigpt.runtime.process import skip_torch_compile_without_gpu  # noqa: E402

skip_torch_compile_without_gpu()


parser = Parser(__doc__)
parser.add_argument("input", metavar="IN", help="a checkpoint, or a directory of them (its newest intact one)")
parser.add_argument("out", metavar="OUT", help="the checkpoint directory to write (must not exist)")
parser.add_argument(
    "overrides",
    nargs="*",
    metavar="table.key=value",
    help="the layout to write and its format, e.g. parallel.tensor=2 parallel.pipeline=4 "
    "checkpoint.optimizer_format=dp_reshardable",
)


@console.reports_user_errors
def main(argv=None) -> int:
    args = parser.parse_args(argv)
    console.quiet_dependencies()
    from bigpt.train.reshard import reshard

    console.say(reshard(Path(args.input), Path(args.out), args.overrides))
    return 0


if __name__ == "__main__":
    sys.exit(main())
