"""Reshard a checkpoint offline (``tools/reshard.py``): whatever format it was saved in, write one
that resumes at another TP/PP/VPP/CP layout, on CPU processes (gloo), before the run that needs it.

A stage is a torchrun job of this module (``python -m bigpt.train.reshard RECIPE LOAD ROOT``) that
builds the recipe's model, optimizer and scheduler at the recipe's layout, loads ``LOAD`` with
``load_checkpoint`` and saves under ``ROOT`` with ``CheckpointWriter``, exactly as training does:
so step, samples consumed (the data position, which is global: any DP and micro-batch count
continues the same sample stream), scheduler and optimizer state carry over. A checkpoint whose
format cannot load at the new layout ("dp_reshardable" across TP/PP/VPP) first goes through a
stage at its own layout that saves it in a format that loads anywhere. Every stage runs at the
fewest data-parallel ranks its layout allows (1, or what the expert-parallel groups need: megatron-core
takes them from a pipeline stage's ranks) unless parallel.data says otherwise: both formats load at
any data-parallel size, so more processes would only cost memory.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from bigpt.errors import EXIT_USER_ERROR, BigptError
from bigpt.runtime import console

REPO = Path(__file__).resolve().parent.parent.parent
ALLOWED = ("parallel.", "checkpoint.optimizer_format")
"""Overrides a reshard takes: the layout to write, and the format to write it in."""
IN_PLACE_FORMAT = "fully_reshardable"
"""Of the intermediate stage: loads at any layout, and at data parallel 1 its save gathers nothing."""


def reshard(source: Path, out: Path, overrides: list[str]) -> str:
    """Write ``out`` (a checkpoint directory: ``iter_N`` and ``latest``) from the checkpoint
    ``source`` at the layout its recipe takes with ``overrides``; all checks come before any work,
    and ``out`` appears whole or not at all. Returns a line saying what was written."""
    from bigpt.checkpoint import store
    from bigpt.checkpoint.state import DP_ONLY_FORMAT, MODEL_PARALLEL, layout_overrides
    from bigpt.layout import Layout
    from bigpt.paths import check_writable, partial_dir
    from bigpt.recipe import CheckpointConfig

    checkpoint = store.checkpoint_at(source, "IN", alternatives="for instance a run's checkpoint.dir")
    marker, saved_recipe = store.read_marker(checkpoint), checkpoint / "recipe.toml"
    if "layout" not in marker or not saved_recipe.is_file():
        raise BigptError(
            f"IN = {checkpoint} holds weights only (no recipe.toml and no optimizer state: an import "
            "from Hugging Face); weights load at any layout as they are, with init.from_checkpoint."
        )
    for text in overrides:
        if not text.partition("=")[0].strip().startswith(ALLOWED):
            raise BigptError(
                f"override {text!r}: tools/reshard.py changes only the layout (parallel.*) and "
                "checkpoint.optimizer_format; the rest of the recipe is the checkpoint's. Pass other "
                "changes to the run that resumes from OUT."
            )
    default_format = CheckpointConfig().optimizer_format
    target = _at_fewest_ranks(saved_recipe, [f"checkpoint.optimizer_format={default_format}", *overrides])
    layout = Layout.from_recipe(target)  # on paper: the degrees fit the model and the batch
    if os.path.exists(out):
        raise BigptError(
            f"OUT = {out} exists; tools/reshard.py writes a new directory only. Name another, or move that one away."
        )
    check_writable(out, "OUT")

    saved = marker["layout"]
    ours = {"tp": layout.tp, "pp": layout.pp, "vpp": layout.vpp, "cp": layout.cp}
    if layout.ep * layout.etp > 1:
        ours.update(ep=layout.ep, etp=layout.etp)
    work = partial_dir(out)
    shutil.rmtree(work, ignore_errors=True)  # a leftover of a reshard that was killed
    work.mkdir(parents=True)
    try:
        if marker.get("optimizer_format") == DP_ONLY_FORMAT and any(
            saved.get(key, 1) != ours.get(key, 1) for key in MODEL_PARALLEL
        ):
            at_saved_layout = _at_fewest_ranks(
                saved_recipe, [*layout_overrides(saved).split(), f"checkpoint.optimizer_format={IN_PLACE_FORMAT}"]
            )
            checkpoint = _run_stage(at_saved_layout, checkpoint, work / "stage", f"loading {checkpoint}")
        _run_stage(target, checkpoint, work / "out", f"writing {out}")
        os.replace(work / "out", out)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    written = store.latest_in(out)
    return (
        f"wrote {written} (step {marker['iteration']}, {marker['consumed_samples']} samples consumed, "
        f'checkpoint.optimizer_format = "{target.checkpoint.optimizer_format}"); resume it with '
        f"checkpoint.load={out} {layout_overrides(ours)} "
        f"(any data-parallel size{' the expert groups divide' if layout.ep > 1 else ''})"
    )


def _at_fewest_ranks(recipe_file: Path, overrides: list[str]):
    """The recipe with ``overrides``, at ``fewest_data_parallel`` ranks unless they name parallel.data."""
    from bigpt.layout import fewest_data_parallel
    from bigpt.recipe import load_recipe

    if any(text.partition("=")[0].strip() == "parallel.data" for text in overrides):
        return load_recipe(recipe_file, overrides)
    dp = fewest_data_parallel(load_recipe(recipe_file, [*overrides, "parallel.data=1"]))
    return load_recipe(recipe_file, [*overrides, f"parallel.data={dp}"])


def _run_stage(recipe, load: Path, root: Path, what: str) -> Path:
    """One torchrun job at ``recipe``'s layout: ``load`` in, a checkpoint under ``root`` out (returned)."""
    from bigpt.checkpoint import store
    from bigpt.layout import Layout
    from bigpt.recipe import recipe_to_toml

    recipe_file = root.with_name(root.name + ".toml")
    recipe_file.write_text(recipe_to_toml(recipe))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")])))
    env.setdefault("OMP_NUM_THREADS", "1")  # torchrun's default for several processes, without its warning
    env["CUDA_VISIBLE_DEVICES"] = ""  # CPU processes (gloo) even on a GPU machine: no GPU hours
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={Layout.from_recipe(recipe).world_size}",
        "-m",
        "bigpt.train.reshard",
        str(recipe_file),
        str(load),
        str(root),
    ]
    code = subprocess.run(command, env=env, cwd=REPO).returncode
    if code:
        raise BigptError(
            f"{what} failed (torchrun exit {code}; the ranks' output above says why); nothing was written."
        )
    written = store.latest_in(root)
    assert written is not None, f"{what} exited 0 without a checkpoint in {root}"
    return written


def _stage(recipe_file: str, load: str, root: str) -> int:
    """Every rank of a stage (``_run_stage``)."""
    from dataclasses import replace

    from bigpt.checkpoint import CheckpointWriter, load_checkpoint
    from bigpt.layout import Layout
    from bigpt.recipe import load_recipe
    from bigpt.runtime.distributed import destroy_distributed, init_distributed
    from bigpt.train.checkpointing import checkpointed
    from bigpt.train.main import build_model_and_optimizer
    from bigpt.train.trainer import Trainer

    try:
        recipe = load_recipe(recipe_file)
        layout = Layout.from_recipe(recipe, int(os.environ.get("WORLD_SIZE", "1")))
        init_distributed(layout)
        try:
            # megatron-core's local layers on CPU: the parameters and checkpoint keys of Transformer Engine's,
            # without the FP8 scaling history (which a resume then starts afresh).
            on_cpu = replace(recipe, precision=replace(recipe.precision, fp8="none", transformer_engine="auto"))
            model, optimizer, scheduler = build_model_and_optimizer(on_cpu, layout, initial_weights=False)
            training = checkpointed(Trainer(recipe, layout, model, optimizer, scheduler, batches=None, callbacks=[]))
            load_checkpoint(training, Path(load))
            CheckpointWriter(Path(root), asynchronous=False).save(training)
        finally:
            destroy_distributed()
    except BigptError as err:
        console.rank_error(str(err))
        return EXIT_USER_ERROR
    return 0


if __name__ == "__main__":
    from bigpt.runtime.process import exit_without_final_gc, skip_torch_compile_without_gpu

    skip_torch_compile_without_gpu()
    console.quiet_dependencies()
    exit_without_final_gc(_stage(*sys.argv[1:]))
