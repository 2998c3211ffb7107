"""bigpt: a Megatron-Core 3D-parallel pretraining trainer driven by TOML recipes.

Imports go one way, down these layers (a module may import its own layer's, if no cycle forms;
tests/test_imports.py holds the table):

1. ``errors``, ``paths``: the user-facing error and path checks every layer shares.
2. ``recipe``: the TOML recipe, its keys and checks.
3. ``layout``, ``flops``, ``memory``, ``plan``, ``model``: what a recipe means (parallel layout,
   cost, memory, the megatron-core model), without processes.
4. ``runtime``: the process: distributed groups, console, signals, seeding, megatron-core fixes.
5. ``data``, ``checkpoint``, then ``hf`` (which writes checkpoints).
6. ``train``, ``curate``: the two pipelines.
7. ``dryrun``, ``logits``: the entry points' own modules; above them ``launchers/`` and ``tools/``.
"""

__version__ = "0.1.0"
