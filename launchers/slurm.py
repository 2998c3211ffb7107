"""Render (or submit) a SLURM batch script that trains a recipe on N nodes.

    python launchers/slurm.py recipes/llama_70b.toml --nodes 64 --partition gpu --time 48:00:00 > job.sbatch
    python launchers/slurm.py recipes/llama_70b.toml --nodes 64 --partition gpu --submit

    python launchers/slurm.py recipes/tiny.toml --nodes 2 --workers-per-node 2 --partition cpu --submit

The recipe's layout is checked against nodes × GPUs per node (on nodes without GPUs, as on the
last line: nodes × --workers-per-node, and no GPU is requested) before anything is written. The
script is launchers/bigpt.sbatch with its settings filled in: one srun task per node runs
torchrun with a c10d rendezvous on the first node; USR1 before the time limit makes bigpt save
and exit, and the job requeues itself and resumes (TERM, from scancel or a preemption, makes it
save and exit; requeueing is then SLURM's call). The SLURM log is <run_dir>/slurm-<job id>.out
(appended to across requeues).
"""

import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bigpt.cli import add_overwrite, recipe_parser  # noqa: E402
from bigpt.errors import BigptError  # noqa: E402
from bigpt.paths import WRITTEN_BY, check_output_file, check_writable, write_atomically, written_by_bigpt  # noqa: E402
from bigpt.runtime import console  # noqa: E402

TEMPLATE = Path(__file__).resolve().parent / "bigpt.sbatch"
SHUTDOWN_MARGIN_S = 30
"""Time the job keeps after torchrun's shutdown timeout before SLURM's own kill."""
MAX_SIGNAL_SECONDS = 65535  # sbatch --signal=...@SECONDS takes at most this


parser = recipe_parser(__doc__)
parser.add_argument("--nodes", type=int, required=True, help="number of nodes")
per_node = parser.add_mutually_exclusive_group()
per_node.add_argument(
    "--gpus-per-node", type=int, default=8, help="GPUs per node, one torchrun worker each (default 8)"
)
per_node.add_argument(
    "--workers-per-node",
    type=int,
    help="for nodes without GPUs (CPU partitions): torchrun workers per node; no GPUs are requested",
)
parser.add_argument("--partition", help="SLURM partition")
parser.add_argument("--account", help="SLURM account")
parser.add_argument("--time", help="time limit, e.g. 48:00:00 (default: the partition's)")
parser.add_argument("--job-name", help="default: the recipe's name")
parser.add_argument(
    "--signal-seconds",
    type=int,
    default=300,
    help="seconds before the time limit at which bigpt is asked to save and exit (default 300)",
)
parser.add_argument("--port", type=int, default=29500, help="rendezvous port on the first node (default 29500)")
parser.add_argument(
    "--env-bin",
    default=str(Path(sys.executable).parent),
    help="directory holding torchrun on the nodes (default: this Python's, "
    "right when the nodes share this file system)",
)
parser.add_argument("-o", "--out", help="write the script here instead of standard output")
add_overwrite(parser, "an existing script (-o, or <run_dir>/slurm-job.sbatch) that bigpt did not render")
parser.add_argument(
    "--submit",
    action="store_true",
    help="submit with sbatch (the script is kept as <run_dir>/slurm-job.sbatch unless -o)",
)


def parse_args(argv=None):
    """The options, checked."""
    args = parser.parse_args(argv)
    if args.nodes < 1 or args.gpus_per_node < 1 or (args.workers_per_node is not None and args.workers_per_node < 1):
        parser.error("--nodes, --gpus-per-node and --workers-per-node must be 1 or more")
    if not 2 * SHUTDOWN_MARGIN_S <= args.signal_seconds <= MAX_SIGNAL_SECONDS:
        parser.error(
            f"--signal-seconds must be between {2 * SHUTDOWN_MARGIN_S} (bigpt needs time to save) and "
            f"{MAX_SIGNAL_SECONDS} (SLURM's --signal limit), got {args.signal_seconds}"
        )
    if not 1 <= args.port <= 65535:
        parser.error(f"--port must be a TCP port between 1 and 65535, got {args.port}")
    if args.time is not None:
        limit = time_limit_seconds(args.time)
        if limit is None:
            parser.error(
                f"--time {args.time!r} is not a SLURM time limit: write minutes, minutes:seconds, "
                "hours:minutes:seconds, days-hours, days-hours:minutes or days-hours:minutes:seconds "
                "(e.g. 48:00:00 or 2-00:00:00), or UNLIMITED"
            )
        if limit and args.signal_seconds >= limit:
            parser.error(
                f"--signal-seconds {args.signal_seconds} is not shorter than --time {args.time} "
                f"({limit} s): the save would be asked for before the job starts; lower it or raise --time"
            )
    return args


def time_limit_seconds(text: str) -> int | None:
    """Seconds of a SLURM --time value (0 for UNLIMITED/INFINITE); None when it is not one."""
    if text.upper() in ("UNLIMITED", "INFINITE"):
        return 0
    match = re.fullmatch(r"(?:(\d+)-)?(\d+)((?::\d+){0,2})", text.strip())
    if match is None:
        return None
    days, first, rest = match.groups()
    fields = [int(first)] + [int(part) for part in rest.split(":")[1:]]
    if any(value >= 60 for value in fields[1:]) or (days is not None and fields[0] >= 24):
        return None
    units = (3600, 60, 1) if days is not None else {1: (60,), 2: (60, 1), 3: (3600, 60, 1)}[len(fields)]
    seconds = int(days or 0) * 86400 + sum(value * unit for value, unit in zip(fields, units))
    return seconds or None


@dataclass(frozen=True)
class Nodes:
    """The job's nodes: ``workers`` torchrun workers on each, one per GPU, or as many as given on
    nodes without GPUs (``gpus`` False)."""

    count: int
    workers: int
    gpus: bool

    @classmethod
    def from_args(cls, args) -> "Nodes":
        if args.workers_per_node:
            return cls(args.nodes, args.workers_per_node, gpus=False)
        return cls(args.nodes, args.gpus_per_node, gpus=True)

    @property
    def per_node_option(self) -> str:
        return f"--{'gpus' if self.gpus else 'workers'}-per-node {self.workers}"

    def __str__(self) -> str:
        return (
            f"--nodes {self.count} × {self.per_node_option} = {self.count * self.workers} "
            f"{'GPUs' if self.gpus else 'workers'}"
        )


def check_layout(recipe, nodes: Nodes):
    """The layout on these nodes, or a BigptError saying why it cannot be."""
    from bigpt.layout import Layout

    world = nodes.count * nodes.workers
    try:
        layout = Layout.from_recipe(recipe, world)
    except BigptError as err:
        raise BigptError(
            f"{nodes} cannot host {recipe.source}: {str(err).rstrip('.')}; "
            f"`python tools/plan.py {recipe.source} --gpus {world}` lists the layouts "
            f"that can."
        ) from None
    if layout.tp > nodes.workers:
        raise BigptError(
            f"parallel.tensor={layout.tp} in {recipe.where('parallel.tensor')} is more than {nodes.per_node_option}: "
            f"tensor parallelism communicates every layer and must stay inside a node; "
            f"lower parallel.tensor (raise parallel.pipeline instead)."
        )
    return layout


def render(template: str, directives: dict[str, str | None], settings: dict[str, str]) -> str:
    """The template with ``#SBATCH --key=value`` lines and ``NAME=value`` settings replaced;
    directives it does not have are added after its last ``#SBATCH`` line, and those whose
    value is None are removed."""
    lines = template.splitlines()
    for key, value in directives.items():
        line = f"#SBATCH --{key}={_directive_value(value)}"
        found = [i for i, text in enumerate(lines) if text.startswith(f"#SBATCH --{key}=")]
        if value is None:
            lines = [text for i, text in enumerate(lines) if i not in found]
        elif found:
            lines[found[0]] = line
        else:
            last = max(i for i, text in enumerate(lines) if text.startswith("#SBATCH "))
            lines.insert(last + 1, line)
    for name, value in settings.items():
        index = next(i for i, text in enumerate(lines) if text.startswith(f"{name}="))
        lines[index] = f"{name}={value}"
    return "\n".join(lines) + "\n"


def _directive_value(value: str | None) -> str | None:
    """``value`` as sbatch reads it from an ``#SBATCH`` line, which ends at a space unless
    double-quoted (a path with spaces); a newline cannot be written there at all."""
    if value is None or not re.search(r'[\s"\\]', value):
        return value
    if "\n" in value or "\r" in value:
        raise BigptError(f"the path {value!r} holds a line break, which an #SBATCH line cannot; rename it.")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def batch_script(args, recipe, nodes: Nodes) -> str:
    run_dir = Path(recipe.run_dir).resolve()
    directives = {
        "job-name": re.sub(r"\s+", "-", args.job_name or recipe.name),
        "nodes": str(nodes.count),
        "gpus-per-node": str(nodes.workers) if nodes.gpus else None,
        "signal": f"B:USR1@{args.signal_seconds}",
        "output": f"{run_dir}/slurm-%j.out",
        "chdir": str(Path.cwd()),
        **{
            key: value
            for key, value in (("partition", args.partition), ("account", args.account), ("time", args.time))
            if value
        },
    }
    settings = {
        "RECIPE": shlex.quote(str(Path(args.recipe).resolve())),
        "OVERRIDES": "(" + " ".join(shlex.quote(override) for override in args.overrides) + ")",
        "WORKERS_PER_NODE": str(nodes.workers),
        "RDZV_PORT": str(args.port),
        "SHUTDOWN_TIMEOUT": str(args.signal_seconds - SHUTDOWN_MARGIN_S),
        "RUN_PY": shlex.quote(str(REPO / "launchers" / "run.py")),
        "ENV_BIN": shlex.quote(args.env_bin),
    }
    shebang, rest = render(TEMPLATE.read_text(), directives, settings).split("\n", 1)
    return f"{shebang}\n{WRITTEN_BY} (launchers/slurm.py): rendered again, it replaces this file\n{rest}"


def submit(script_path: Path) -> str:
    result = subprocess.run(["sbatch", str(script_path)], capture_output=True, text=True)
    if result.returncode:
        raise BigptError(
            f"sbatch {script_path} failed ({result.returncode}): {result.stderr.strip()}; "
            f"check --partition/--account/--time against `sinfo` and your allocation."
        )
    return result.stdout.strip()


@console.reports_user_errors
def main(argv=None) -> int:
    args = parse_args(argv)
    from bigpt.recipe import load_recipe

    recipe = load_recipe(args.recipe, args.overrides)
    nodes = Nodes.from_args(args)
    check_layout(recipe, nodes)
    if args.submit and shutil.which("sbatch") is None:
        raise BigptError(
            "--submit: sbatch is not on PATH; run this on a SLURM login node, or "
            "render the script without --submit (-o FILE) and submit it there."
        )
    script = batch_script(args, recipe, nodes)
    check_writable(recipe.run_dir, "run_dir")
    path = Path(args.out or Path(recipe.run_dir) / "slurm-job.sbatch")
    if args.out or args.submit:
        check_output_file(
            path, "--out" if args.out else "the script <run_dir>/slurm-job.sbatch", args.overwrite, written_by_bigpt
        )
    os.makedirs(recipe.run_dir, exist_ok=True)  # SLURM does not create the log's directory
    if args.out or args.submit:
        write_atomically(path, script, key="--out" if args.out else "the script <run_dir>/slurm-job.sbatch")
        if args.submit:
            console.say(submit(path))
    else:
        sys.stdout.write(script)
    return 0


if __name__ == "__main__":
    sys.exit(main())
