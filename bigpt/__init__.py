"""bigpt: a Megatron-Core 3D-parallel pretraining trainer driven by TOML recipes.

Imports go one way, down these layers (a module may import its own layer's, if no cycle forms;
tests/test_imports.py holds the table):

1. ``errors``, ``paths``, ``numbers``, ``cli``: the user-facing error, path checks and file
   writes, counts as people read them, the command-line convention; every layer shares them.
2. ``recipe``: the TOML recipe, its keys and checks.
3. ``layout``, ``flops``, ``memory``, ``plan``: what a recipe means on paper (parallel layout,
   cost, memory).
4. ``runtime``: the process: device, distributed groups, console, signals, seeding,
   megatron-core fixes.
5. ``model``, ``data``, ``checkpoint``, then ``hf`` (which writes checkpoints): the megatron-core
   model and what feeds and saves it.
6. ``train``, ``curate``: the two pipelines.
7. ``dryrun``, ``logits``: the entry points' own modules; above them ``launchers/`` and ``tools/``.
"""

__version__ = "0.1.0"
