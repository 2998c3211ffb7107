"""Recipe → megatron-core ``TransformerConfig`` → the model family's chunk(s) (``bigpt.families``).

One chunk per virtual pipeline stage on this rank (one chunk without interleaving). What every
family shares is decided here: precision, parallel degrees, fusions and whether Transformer
Engine's fused layers are used (when it loads on a GPU; megatron-core's local spec otherwise). The
family adds its layers' config fields, their spec and the model class.
"""

import functools
import importlib.util
import warnings

import torch
import torch.nn.functional as F
from megatron.core.transformer import MegatronModule, TransformerConfig
from megatron.core.utils import init_method_normal

from bigpt.errors import BigptError
from bigpt.families import family_of, rope
from bigpt.families.decoder import NORMS
from bigpt.layout import Layout
from bigpt.recipe import Recipe
from bigpt.runtime import console
from bigpt.runtime.device import on_gpu

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU in its tanh approximation (Hugging Face's gelu_new, T5 v1.1's gated-gelu)."""
    return F.gelu(x, approximate="tanh")


_ACTIVATIONS = {
    "swiglu": (F.silu, True),
    "gelu": (F.gelu, False),
    "relu": (F.relu, False),
    "geglu": (gelu_tanh, True),
}


TE_INSTALL = 'pip install --no-build-isolation "transformer-engine[pytorch]>=2.17,<2.18"'
"""Transformer Engine's torch extension compiles against the torch already installed, which pip's
build isolation would hide from it (then it builds against another torch, or fails)."""


@functools.cache
def transformer_engine_problem() -> str | None:
    """Why Transformer Engine's layers cannot run here, or None when they can; decided once. Any
    failure to load counts, not only ImportError: a missing shared library is an OSError, an
    extension built against another torch a RuntimeError."""
    if not on_gpu():
        return "no CUDA GPU is visible"
    if importlib.util.find_spec("transformer_engine") is None:
        return "transformer_engine is not installed"
    try:
        import transformer_engine.pytorch  # noqa: F401
    except Exception as error:
        return (
            f"transformer_engine is installed but does not load ({type(error).__name__}: {error}); "
            f"reinstall it against this torch with `{TE_INSTALL}`"
        )
    return None


def _require_transformer_engine(recipe: Recipe, problem: str | None, where: str) -> None:
    """FP8, or transformer_engine = "on", means Transformer Engine or a refusal: never a run in
    plain precision that exits 0 as if it had been what the recipe asked for."""
    precision = recipe.precision
    wants = [
        f"precision.{key} = {value!r}"
        for key, value, asks in (
            ("fp8", precision.fp8, precision.fp8 != "none"),
            ("transformer_engine", precision.transformer_engine, precision.transformer_engine == "on"),
        )
        if asks
    ]
    if wants and problem:
        raise BigptError(
            f"{' and '.join(wants)} needs Transformer Engine on a CUDA GPU, which {where} ({problem}); install "
            f'`bigpt[gpu]` on a GPU machine (`{TE_INSTALL}`), or set precision.fp8 = "none" and '
            'precision.transformer_engine = "auto".'
        )
    if recipe.parallel.context > 1 and problem:  # megatron-core's own attention asserts context = 1
        raise BigptError(
            f"parallel.context = {recipe.parallel.context} needs Transformer Engine on a CUDA GPU (megatron-core's "
            f"context-parallel attention is Transformer Engine's), which {where}; install `bigpt[gpu]` on a GPU "
            "machine, or set parallel.context = 1."
        )


def check_transformer_engine_installed(recipe: Recipe) -> None:
    """On paper (--dry-run): what needs Transformer Engine finds it installed (no device is probed)."""
    installed = importlib.util.find_spec("transformer_engine") is not None
    _require_transformer_engine(recipe, None if installed else "no transformer_engine package", "is not installed here")


def use_transformer_engine(recipe: Recipe) -> bool:
    """Decide once, at init (the recipe was validated on paper before any device was probed)."""
    problem = transformer_engine_problem()
    _require_transformer_engine(recipe, problem, "this machine does not have")
    wanted = recipe.precision.transformer_engine != "off"
    if problem and wanted and on_gpu() and importlib.util.find_spec("transformer_engine") is not None:
        console.warn(f"{problem}. Running with megatron-core's local layers meanwhile.")
    return problem is None and wanted


def _window_size(window: int | None, seq_length: int) -> tuple[int, int] | None:
    """megatron-core's (left, right) sliding window: the window - 1 tokens before, none after. A
    window no shorter than the sequence masks nothing, so full attention (any kernel, any context
    parallelism) computes the same."""
    return (window - 1, 0) if window and window < seq_length else None


APEX_EXTENSIONS = {
    # megatron-core's own ColumnParallelLinear (GPTModel's output layer, with or without Transformer
    # Engine) raises without it; Transformer Engine does not ship it.
    "gradient_accumulation_fusion": ("fused_weight_gradient_mlp_cuda",),
    # the local spec's fused causal softmax in bf16/fp16 (Transformer Engine's attention ignores the flag)
    "masked_softmax_fusion": ("scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda"),
    # apex's FusedLayerNorm (the local spec's norm when apex imports); torch's norm refuses the flag
    "persist_layer_norm": ("apex",),
}
"""The fusion flags whose kernels are Apex's CUDA extensions, and those extensions. Apex is not on
PyPI and bigpt never installs it: each flag is set only where its extensions import (Megatron-
Bridge likewise turns gradient_accumulation_fusion off without fused_weight_gradient_mlp_cuda).
With Transformer Engine and no Apex its layers lose their fused weight-gradient accumulation too:
the flag is one for the whole model."""


@functools.cache
def importable(module: str) -> bool:
    try:
        importlib.import_module(module)
    except Exception:  # an extension present but built for another torch fails to load: absent too
        return False
    return True


def fusions(recipe: Recipe, *, use_te: bool, gpu: bool) -> dict[str, bool]:
    """megatron-core's fusion flags for this recipe: CUDA kernels, so all off on CPU; those of Apex
    only where Apex's extensions import; RoPE's (Transformer Engine's kernel) only with its layers."""
    m = recipe.model
    flags = {
        "gradient_accumulation_fusion": True,
        "masked_softmax_fusion": not _window_size(m.attention_window, m.seq_length),  # its kernel ignores the window
        # megatron-core fuses a bias with gelu and with swiglu (fusions/fused_bias_*.py), not with
        # relu; a non-gated gelu without a bias has nothing to fuse (TransformerConfig refuses both).
        "bias_activation_fusion": m.activation == "swiglu" or (m.activation == "gelu" and m.add_bias_linear),
        "bias_dropout_fusion": True,
        # Transformer Engine's fused RoPE cannot apply YaRN's attention factor (megatron-core warns
        # at every call and runs its own).
        # MLA's fused RoPE is YaRN's alone, a Triton kernel; its unfused one is exact.
        "apply_rope_fusion": use_te
        and m.position_embedding == "rope"
        and m.rope_scaling != "yarn"
        and not m.mla.enabled(),
        "persist_layer_norm": True,
    }
    return {
        flag: gpu and wanted and all(importable(module) for module in APEX_EXTENSIONS.get(flag, ()))
        for flag, wanted in flags.items()
    }


def transformer_config(recipe: Recipe, layout: Layout, *, use_te: bool, gpu: bool) -> TransformerConfig:
    """The config bigpt's model chunks share. ``use_te`` and ``gpu`` are decided by the caller
    (use_transformer_engine, on_gpu), so the GPU config can be built, and checked, on a CPU."""
    m, p, prec, rc = recipe.model, recipe.parallel, recipe.precision, recipe.recompute
    activation, gated = _ACTIVATIONS[m.activation]
    dtype = DTYPES[prec.dtype]
    extra = {}
    if not m.scaled_output_init:
        extra["output_layer_init_method"] = init_method_normal(m.init_std)
    if prec.fp8 != "none":
        extra.update(
            fp8="hybrid",
            fp8_recipe=prec.fp8,
            fp8_amax_history_len=prec.fp8_amax_history_len,
            fp8_amax_compute_algo=prec.fp8_amax_compute_algo,
        )
        if prec.fp8_bf16_first_layers or prec.fp8_bf16_last_layers:
            extra.update(
                first_last_layers_bf16=True,
                num_layers_at_start_in_bf16=prec.fp8_bf16_first_layers,
                num_layers_at_end_in_bf16=prec.fp8_bf16_last_layers,
            )
    if rc.granularity == "full":
        extra.update(recompute_method=rc.method, recompute_num_layers=rc.num_layers)
    elif rc.granularity == "selective":
        extra.update(recompute_modules=list(rc.modules))
    extra.update(family_of(m).config_fields(recipe, layout, use_te))
    extra.update(rope.config_fields(m))
    return rope.config_class(m)(
        num_layers=m.num_layers,
        hidden_size=m.hidden_size,
        ffn_hidden_size=m.ffn_hidden_size,
        num_attention_heads=m.num_attention_heads,
        num_query_groups=m.num_query_groups,
        kv_channels=m.kv_channels,
        gated_linear_unit=gated,
        activation_func=activation,
        normalization=NORMS[m.normalization],
        layernorm_epsilon=m.norm_epsilon,
        add_bias_linear=m.add_bias_linear,
        add_qkv_bias=m.add_qkv_bias,
        qk_layernorm=m.qk_layernorm or m.mla.enabled(),  # with MLA: its latents' norms
        window_size=_window_size(m.attention_window, m.seq_length),
        hidden_dropout=m.hidden_dropout,
        attention_dropout=m.attention_dropout,
        init_method_std=m.init_std,
        tensor_model_parallel_size=layout.tp,
        pipeline_model_parallel_size=layout.pp,
        virtual_pipeline_model_parallel_size=layout.vpp if layout.vpp > 1 else None,
        context_parallel_size=layout.cp,
        sequence_parallel=layout.sequence_parallel,
        num_layers_in_first_pipeline_stage=p.first_stage_layers,
        num_layers_in_last_pipeline_stage=p.last_stage_layers,
        params_dtype=dtype,
        pipeline_dtype=dtype,
        bf16=prec.dtype == "bf16",
        fp16=prec.dtype == "fp16",
        recompute_granularity=None if rc.granularity == "none" else rc.granularity,
        # The loss is a token sum; gradients are divided by the global token count at the end of
        # the step, so every layout averages over exactly the same tokens.
        calculate_per_token_loss=True,
        # On CPU: build full weights with the CPU RNG then split them, and keep pipeline outputs
        # (their deallocation trick relies on CUDA storage semantics).
        use_cpu_initialization=not gpu,
        deallocate_pipeline_outputs=gpu,
        # Batched p2p between the same two ranks can pair same-shaped messages crosswise: at PP=2
        # with interleaving, a forward activation with a backward gradient (Megatron-LM refuses
        # that layout unless p2p overlap is on). So interleaved schedules on GPUs overlap unbatched
        # p2p, as Megatron-LM runs them (batch_p2p_comm = not overlap_p2p_comm); the others batch
        # it. On CPUs unbatched: gloo matches a batch by order alone, and unbatched megatron-core
        # sends the two directions over two different groups.
        overlap_p2p_comm=gpu and layout.vpp > 1,
        batch_p2p_comm=gpu and layout.vpp == 1,
        **fusions(recipe, use_te=use_te, gpu=gpu),
        **extra,
    )


def check_gpu_transformer_config(recipe: Recipe, layout: Layout) -> None:
    """On paper (--dry-run): the config a GPU run builds passes megatron-core's own checks, which
    otherwise first run on the GPU. Its local-layers variant: Transformer Engine's adds only its
    RoPE kernel, which does not import where there is no GPU."""
    try:
        with warnings.catch_warnings():  # refusals only: a real start says its warnings itself
            warnings.simplefilter("ignore")
            transformer_config(recipe, layout, use_te=False, gpu=True)
    except (ValueError, AssertionError) as error:
        raise BigptError(
            f"megatron-core's TransformerConfig refuses the model {recipe.source or 'the recipe'} describes, as "
            f"built for a GPU: {error}. Change the [model] / [parallel] / [precision] keys it names; bigpt "
            "should have refused this itself, so please report it too."
        ) from error


def build_model_chunks(recipe: Recipe, layout: Layout) -> tuple[list[MegatronModule], TransformerConfig]:
    """The chunks this rank holds of the recipe's model family, in virtual-stage order, and their
    shared config."""
    use_te = use_transformer_engine(recipe)
    console.note(
        f"transformer layers: {'Transformer Engine' if use_te else 'megatron-core local spec (no Transformer Engine)'}"
    )
    config = transformer_config(recipe, layout, use_te=use_te, gpu=on_gpu())
    family = family_of(recipe.model)
    chunks = []
    for vp_stage in range(layout.vpp):
        vp = vp_stage if layout.vpp > 1 else None
        chunks.append(family.build_chunk(recipe, layout, config, family.layer_spec(recipe, config, use_te, vp), vp))
    return chunks, config
