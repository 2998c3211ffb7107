"""The megatron-core line bigpt ships on (0.19.x) against what bigpt did on 0.16.1, and the fixes
bigpt applies to it (bigpt/runtime/megatron_fixes.py), each shown to be needed.

tests/fixtures/mcore_0_16_1 holds a checkpoint written on 0.16.1 and what 0.16.1 made of it (its
README says how): the line bigpt ships now must resume it as 0.16.1 did (to RECORDED_ELSEWHERE: the
numbers were recorded on another machine), start from its weights at another layout, and export the
same Hugging Face tensors (bit for bit: a conversion moves tensors, it does no arithmetic). Losses
of a run from scratch are not compared with 0.16.1's: bigpt then seeded every pipeline stage alike
(each stage's layers started as copies of the first's), and now seeds them as Megatron-LM does.
"""

import dataclasses
import hashlib
import json
import os
import shutil
import signal

import pytest
from megatron.core.dist_checkpointing.strategies import filesystem_async
from megatron.core.models.gpt.gpt_layer_specs import get_gpt_layer_local_spec
from megatron.core.models.T5.t5_model import T5Model
from megatron.core.optimizer.distrib_optimizer import DistributedOptimizer
from megatron.core.optimizer.optimizer import MegatronOptimizer
from megatron.core.transformer import MLATransformerConfig, TransformerConfig
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from megatron.core.transformer.identity_op import IdentityOp
from megatron.core.transformer.mla_qk_norm_config import QKNormConfigResolver
from megatron.core.transformer.torch_norm import WrappedTorchNorm
from safetensors.numpy import load_file

from bigpt.errors import BigptError
from bigpt.runtime import megatron_fixes
from multirank import REPO, run_bigpt, scalars
from test_fault_tolerance import ranks_of, start, wait_for_step
from test_hf import convert

FIXTURE = REPO / "tests" / "fixtures" / "mcore_0_16_1"
EXPECTED = json.loads((FIXTURE / "expected.json").read_text())
RECIPE = FIXTURE / "recipe.toml"

# Numbers recorded on another machine agree to this relative tolerance, not bit for bit: CPUs differ
# in their floating-point kernels (an AMD EPYC with AVX-512 gives 5.203391075 for a loss recorded
# as 5.203390598, 9e-8 apart). Bit-identical comparisons stay within one environment (a
# resumed run against an uninterrupted one in the same test: tests/test_fault_tolerance.py).
RECORDED_ELSEWHERE = 1e-5


@pytest.fixture
def checkpoints(tmp_path):
    """A run directory whose only checkpoint is the fixture's (so that a resume picks it)."""
    shutil.copytree(FIXTURE / "iter_0000004", tmp_path / "checkpoints" / "iter_0000004")
    return tmp_path / "checkpoints"


@pytest.mark.slow
def test_a_0_16_1_checkpoint_resumes_as_0_16_1_continued_it(checkpoints):
    run_dir = checkpoints.parent
    resumed = run_bigpt(RECIPE, f"run_dir={run_dir}", "checkpoint.load=auto", nproc=2, real_launcher=True)
    assert "resuming from" in resumed.stdout and "(step 4," in resumed.stdout
    assert scalars(run_dir, "train/loss") == pytest.approx(EXPECTED["losses_after_resume"], rel=RECORDED_ELSEWHERE)
    # Quiet: bigpt's own lines, no dependency warnings, no teardown reports (whole processes: torchrun's).
    assert [line for line in resumed.stderr.splitlines() if not line.startswith("bigpt: ")] == []


@pytest.mark.slow
def test_without_the_adam_step_fix_that_resume_fails(checkpoints):
    """megatron-core 0.19's distributed optimizer with torch's AdamW copies every key of the live
    optimizer state from the checkpoint, 'step' included, which it never saved."""
    failed = run_bigpt(
        RECIPE,
        f"run_dir={checkpoints.parent}",
        "checkpoint.load=auto",
        nproc=2,
        check=False,
        fault="without_fix@_keep_torch_adam_step_on_reshardable_load",
    )
    assert failed.returncode != 0 and "KeyError: 'step'" in failed.stderr


@pytest.mark.slow
def test_a_0_16_1_checkpoint_gives_its_weights_at_another_layout(tmp_path):
    run_bigpt(
        RECIPE,
        f"run_dir={tmp_path}",
        "checkpoint.load=none",
        f"init.from_checkpoint={FIXTURE / 'iter_0000004'}",
        "parallel.tensor=1",
        "parallel.pipeline=2",
        "train.train_iters=3",
        "checkpoint.save_interval=0",
        nproc=2,
    )
    assert scalars(tmp_path, "train/loss") == pytest.approx(
        EXPECTED["losses_from_init_at_tp1_pp2"], rel=RECORDED_ELSEWHERE
    )


@pytest.mark.slow
def test_a_0_16_1_checkpoint_exports_the_same_hugging_face_tensors(tmp_path):
    convert("export", str(FIXTURE / "iter_0000004"), str(tmp_path / "hf"))
    tensors = load_file(tmp_path / "hf" / "model.safetensors")
    exported = {
        name: hashlib.sha256(t.tobytes()).hexdigest() + f" {t.dtype} {list(t.shape)}"
        for name, t in sorted(tensors.items())
    }
    assert exported == EXPECTED["hf_export_sha256"]


@pytest.mark.slow
def test_without_the_results_queue_fix_a_signal_to_the_ranks_process_groups_fails_the_save(tmp_path):
    """torchrun and srun signal a rank's whole process group: megatron-core's checkpoint writer
    starts a results Manager process there at the first save, and a preemption signal kills it,
    failing the save that signal asks for. (With the fix: the preemption test in
    test_fault_tolerance.py, which signals the same way.)"""
    job = start(
        tmp_path / "run", checkpoint_dir=tmp_path / "checkpoints", fault="without_fix@_start_checkpoint_results_queue"
    )
    wait_for_step(job, 2)  # saved at steps 1 and 2: the writer's Manager runs
    for rank in ranks_of(job):
        os.killpg(rank.pid, signal.SIGUSR1)
    _, stderr = job.communicate(timeout=120)
    assert "failed (Broken pipe)" in stderr and "(exit 75)" not in stderr


@pytest.mark.parametrize("normalization", ["RMSNorm", "LayerNorm"])
def test_without_the_torch_norm_fix_sequence_parallelism_cannot_build_a_norm(normalization, monkeypatch):
    """The local spec's norms (every CPU run's) under sequence parallelism: refused by megatron-core;
    with the fix, built and marked so that their gradients are summed over the tensor-parallel
    group (the parity test's TP2 + SP layout trains as one rank does)."""
    config = TransformerConfig(
        num_layers=1,
        hidden_size=8,
        num_attention_heads=2,
        tensor_model_parallel_size=2,
        sequence_parallel=True,
        normalization=normalization,
    )
    # megatron-core's own __new__, also where an earlier in-process run of this worker applied the fix
    built = WrappedTorchNorm.__dict__["__new__"].__func__
    monkeypatch.setattr(WrappedTorchNorm, "__new__", staticmethod(getattr(built, "__wrapped__", built)))
    with pytest.raises(AssertionError, match="sequence parallel not supported"):
        WrappedTorchNorm(config, 8)
    megatron_fixes._torch_norms_accept_sequence_parallelism()
    norm = WrappedTorchNorm(config, 8)
    assert [getattr(p, "sequence_parallel", False) for p in norm.parameters()] == [True] * len(list(norm.parameters()))
    assert not any(
        hasattr(p, "sequence_parallel")
        for p in WrappedTorchNorm(
            TransformerConfig(num_layers=1, hidden_size=8, num_attention_heads=2, normalization=normalization), 8
        ).parameters()
    )


def mla_config(**changes) -> MLATransformerConfig:
    """A tiny multi-latent attention layer's config, as bigpt builds it ([model.mla]): latents normalised."""
    fields = dict(num_layers=1, hidden_size=64, num_attention_heads=4, kv_lora_rank=32, qk_head_dim=16)
    fields.update(qk_pos_emb_head_dim=8, v_head_dim=24, qk_layernorm=True, rope_type="rope", normalization="RMSNorm")
    return MLATransformerConfig(**fields | changes)


def unwrapped(monkeypatch, owner, name: str) -> None:
    """megatron-core's own ``owner.name``, also where an earlier run in this worker applied a fix to it."""
    built = owner.__dict__[name]
    monkeypatch.setattr(owner, name, getattr(built, "__wrapped__", built))


def test_without_the_mla_attention_fix_the_local_attention_cannot_build_mla(monkeypatch):
    """Multi-latent attention builds its core attention with k_channels and v_channels, which the
    local attention (every run without Transformer Engine) does not take; with the fix it builds,
    and its output is as wide as the value heads (4 × 24, not hidden_size 64)."""
    from bigpt.runtime.distributed import model_parallel_of_one

    config = mla_config(q_lora_rank=None)
    arguments = dict(layer_number=1, attn_mask_type=AttnMaskType.causal, attention_type="self", k_channels=24)
    with model_parallel_of_one():
        unwrapped(monkeypatch, DotProductAttention, "__init__")
        with pytest.raises(TypeError, match="unexpected keyword argument 'k_channels'"):
            DotProductAttention(config, **arguments, v_channels=24)
        megatron_fixes._local_attention_takes_mla_head_widths()
        attention = DotProductAttention(config, **arguments, v_channels=24)
        assert attention.hidden_size_per_partition == 96 and attention.softmax_scale == pytest.approx(24**-0.5)
        assert DotProductAttention(config, 1, AttnMaskType.causal, "self").hidden_size_per_partition == 64


def test_without_the_q_lora_fix_mla_without_q_lora_cannot_build(monkeypatch):
    """Without q-LoRA megatron-core's MLA refuses the local spec's query norm, and without it demands
    a fused norm+linear for the query projection (Transformer Engine's: a norm DeepSeek-V2-Lite does
    not have); with the fix its queries are the spec's plain linear, and with q-LoRA nothing
    changes."""
    spec = get_gpt_layer_local_spec(multi_latent_attention=True, qk_layernorm=True, normalization="RMSNorm")
    submodules = spec.submodules.self_attention.submodules
    unwrapped(monkeypatch, QKNormConfigResolver, "resolve")
    with pytest.raises(ValueError, match="non-trivial, but `q_lora_rank is None`"):
        QKNormConfigResolver(mla_config(q_lora_rank=None), submodules).resolve()
    without_q_norm = dataclasses.replace(submodules, q_layernorm=IdentityOp)
    demanded = QKNormConfigResolver(mla_config(q_lora_rank=None), without_q_norm).resolve()["linear_q_proj"]
    assert demanded is not submodules.linear_q_proj  # Transformer Engine's fused norm+linear (a stand-in without it)
    with_q_lora = QKNormConfigResolver(mla_config(q_lora_rank=24), submodules).resolve()
    megatron_fixes._mla_without_q_lora_projects_queries_plainly()
    resolved = QKNormConfigResolver(mla_config(q_lora_rank=None), submodules).resolve()
    assert resolved["linear_q_proj"] is submodules.linear_q_proj and resolved["q_layernorm"] is IdentityOp
    assert resolved["kv_layernorm"] is submodules.kv_layernorm
    assert QKNormConfigResolver(mla_config(q_lora_rank=24), submodules).resolve() == with_q_lora


@pytest.mark.parametrize(
    "fix,target",
    [
        ("_keep_torch_adam_step_on_reshardable_load", (DistributedOptimizer, "_set_main_param_and_optimizer_states")),
        ("_start_checkpoint_results_queue", (filesystem_async, "_results_queue")),
        ("_torch_norms_accept_sequence_parallelism", (WrappedTorchNorm, "__new__")),
        (
            "_model_space_optimizer_state_without_flattened_ranges",
            (DistributedOptimizer, "sharded_param_state_fs_model_space"),
        ),
        ("_resume_with_new_lr_bounds", (MegatronOptimizer, "_filter_and_reorder_param_groups")),
        ("_t5_output_layer_saved_once", (T5Model, "sharded_state_dict")),
        ("_local_attention_takes_mla_head_widths", (DotProductAttention, "__init__")),
        ("_mla_without_q_lora_projects_queries_plainly", (QKNormConfigResolver, "_is_fused_norm_linear")),
    ],
)
def test_a_fix_whose_target_moved_stops_bigpt(fix, target, monkeypatch):
    monkeypatch.delattr(*target)
    with pytest.raises(BigptError, match=rf"bigpt's fix for megatron-core .* cannot be applied .*{target[1]}"):
        getattr(megatron_fixes, fix)()
