"""The configs bigpt builds for a GPU, built on a CPU and validated by megatron-core's own checks.

For each shipped recipe at its intended world size (and a few recipe variants a user can write):
the exact ``TransformerConfig`` (its ``__post_init__`` refuses what a GPU run would meet at
init), ``DistributedDataParallelConfig`` and ``OptimizerConfig`` bigpt builds on a GPU, with
Transformer Engine assumed installed, as the ``gpu`` extra makes it. Two of megatron-core's checks
import Transformer Engine to see it is there (its fused RoPE kernel, its version): the fixture
``transformer_engine_assumed`` stands in for those two, nothing else. What needs Apex (never
installed by bigpt) is enabled only where Apex's extensions import, judged by megatron-core's own
probes. Also here: a Transformer Engine that is installed but does not load.
"""

import importlib.abc
import importlib.util
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from megatron.core.models.common.embeddings import rope_utils
from megatron.core.models.gpt import gpt_layer_specs
from megatron.core.tensor_parallel import layers as tensor_parallel_layers
from megatron.core.transformer import transformer_config as mcore_transformer_config

from bigpt import model as bigpt_model
from bigpt.errors import BigptError
from bigpt.layout import Layout
from bigpt.model import TE_INSTALL, transformer_config, use_transformer_engine
from bigpt.recipe import load_recipe
from bigpt.train.optim import ddp_config_for, layer_wise, optimizer_config, wire_model_config
from test_recipes import RECIPES, ROOT, intended_world_size

TINY = ROOT / "recipes/tiny.toml"
# What a user can write on top of a shipped recipe that changes which fusions apply.
VARIANTS = {
    "relu_with_biases": ["model.activation=relu", "model.add_bias_linear=true"],
    "gelu": ["model.activation=gelu"],
    "gelu_with_biases": ["model.activation=gelu", "model.add_bias_linear=true"],
    "learned_positions": ['model.position_embedding="learned"'],
    "fp8_delayed": ['precision.dtype="bf16"', 'precision.fp8="delayed"'],
    "fp8_tensorwise_bf16_ends": [
        'precision.dtype="bf16"',
        'precision.fp8="tensorwise"',
        "precision.fp8_bf16_first_layers=1",
        "precision.fp8_bf16_last_layers=1",
    ],
    "interleaved_overlapped": [
        "parallel.virtual_pipeline=2",
        "parallel.distributed_optimizer=true",
        "parallel.overlap_grad_reduce=true",
        "parallel.overlap_param_gather=true",
    ],
}
CASES = [pytest.param(path, [], id=str(path.relative_to(ROOT / "recipes"))) for path in RECIPES] + [
    pytest.param(TINY, overrides, id=f"tiny+{name}") for name, overrides in VARIANTS.items()
]


def _load(path, overrides):
    recipe = load_recipe(path, overrides)
    return recipe, Layout.from_recipe(recipe, intended_world_size(path))


@pytest.fixture
def transformer_engine_assumed(monkeypatch):
    """Transformer Engine 2.17 (the gpu extra) as megatron-core's config checks look for it."""
    monkeypatch.setattr(rope_utils, "fused_apply_rotary_pos_emb", lambda *args, **kwargs: None)
    monkeypatch.setattr(mcore_transformer_config, "is_te_min_version", lambda *args, **kwargs: True)


def _apex_extensions_import(*modules: str) -> bool:
    return all(importlib.util.find_spec(module) is not None for module in modules)


@pytest.mark.parametrize("use_te", [True, False], ids=["transformer_engine", "local_spec"])
@pytest.mark.parametrize("path, overrides", CASES)
def test_the_gpu_configs_pass_megatron_cores_checks(path, overrides, use_te, transformer_engine_assumed):
    recipe, layout = _load(path, overrides)
    config = transformer_config(recipe, layout, use_te=use_te, gpu=True)  # __post_init__ validates

    # Apex's kernels only where megatron-core would find them (it raises or fails at the first step
    # otherwise): gradient accumulation fusion in its ColumnParallelLinear (GPTModel's output layer,
    # Transformer Engine or not), the local spec's fused softmax, apex's persistent layer norm.
    assert not config.gradient_accumulation_fusion or tensor_parallel_layers._grad_accum_fusion_available
    assert not config.masked_softmax_fusion or _apex_extensions_import(
        "scaled_masked_softmax_cuda", "scaled_upper_triang_masked_softmax_cuda"
    )
    assert not config.persist_layer_norm or gpt_layer_specs.HAVE_APEX
    # The fusions that need no Apex are what a GPU run gets.
    assert config.bias_dropout_fusion
    # Transformer Engine's fused RoPE cannot apply YaRN's attention factor (bigpt/families/rope.py)
    rope = recipe.model.position_embedding == "rope" and recipe.model.rope_scaling != "yarn"
    assert config.apply_rope_fusion == (use_te and rope)
    # megatron-core's MLP fuses a bias into F.gelu (gated or with a bias) and into a gated F.silu only
    gelu, silu = config.activation_func is torch.nn.functional.gelu, config.activation_func is torch.nn.functional.silu
    fusable = (gelu and (config.gated_linear_unit or config.add_bias_linear)) or (silu and config.gated_linear_unit)
    assert config.bias_activation_fusion == fusable
    assert not config.use_cpu_initialization and config.deallocate_pipeline_outputs
    # interleaved schedules overlap unbatched p2p (tests/test_training_path.py), the others batch it
    assert config.batch_p2p_comm == (layout.vpp == 1) and config.overlap_p2p_comm == (layout.vpp > 1)

    ddp = ddp_config_for(recipe)  # __post_init__ validates
    # As Megatron-LM: pipeline stages align their parameter all-gathers only under interleaving.
    interleaved = config.virtual_pipeline_model_parallel_size is not None
    assert ddp.align_param_gather == (ddp.overlap_param_gather and interleaved)
    assert ddp.use_distributed_optimizer == recipe.parallel.distributed_optimizer

    optimizer = optimizer_config(recipe)  # __post_init__ validates
    assert (optimizer.bf16, optimizer.fp16, optimizer.params_dtype) == (config.bf16, config.fp16, config.params_dtype)
    assert optimizer.use_distributed_optimizer + optimizer.use_layer_wise_distributed_optimizer == int(
        ddp.use_distributed_optimizer
    )
    assert optimizer.use_layer_wise_distributed_optimizer == layer_wise(recipe)
    assert optimizer.overlap_param_gather == ddp.overlap_param_gather
    # On a GPU megatron-core's "adam" is Transformer Engine's FusedAdam, AdamW when
    # decoupled_weight_decay (adam_w_mode); its precision-aware mode is not what bigpt offers.
    assert optimizer.decoupled_weight_decay and not optimizer.use_precision_aware_optimizer


def test_the_fusions_are_off_on_a_cpu():
    recipe, layout = _load(TINY, [])
    config = transformer_config(recipe, layout, use_te=False, gpu=False)
    assert not any(getattr(config, flag) for flag in bigpt_model.fusions(recipe, use_te=False, gpu=False))
    assert config.use_cpu_initialization and not config.batch_p2p_comm


def test_apex_fusions_are_on_where_apex_imports(monkeypatch):
    monkeypatch.setattr(bigpt_model, "importable", lambda module: True)
    recipe, layout = _load(TINY, [])
    config = transformer_config(recipe, layout, use_te=False, gpu=True)
    assert config.gradient_accumulation_fusion and config.masked_softmax_fusion and config.persist_layer_norm
    window = transformer_config(*_load(TINY, ["model.attention_window=64"]), use_te=False, gpu=True)
    assert not window.masked_softmax_fusion  # its kernel ignores the window


def test_fp8_recipe_keys_reach_megatron_core(transformer_engine_assumed):
    delayed = transformer_config(*_load(TINY, VARIANTS["fp8_delayed"]), use_te=True, gpu=True)
    # production defaults (Transformer Engine's and Megatron-Bridge's), not megatron-core's single step
    assert (delayed.fp8_amax_history_len, delayed.fp8_amax_compute_algo) == (1024, "max")
    assert not delayed.first_last_layers_bf16
    tensorwise = transformer_config(*_load(TINY, VARIANTS["fp8_tensorwise_bf16_ends"]), use_te=True, gpu=True)
    assert tensorwise.first_last_layers_bf16
    assert (tensorwise.num_layers_at_start_in_bf16, tensorwise.num_layers_at_end_in_bf16) == (1, 1)


def test_the_dry_run_puts_the_gpu_config_through_megatron_cores_checks(monkeypatch, tmp_path):
    """Whatever megatron-core's TransformerConfig refuses that bigpt's checks let through is
    refused on paper, not on the GPU: here, as if bigpt still asked for bias + relu fusion."""
    from bigpt.dryrun import describe

    recipe = load_recipe(ROOT / "tests/recipes/mock_tiny.toml", [*VARIANTS["relu_with_biases"], f"run_dir={tmp_path}"])
    layout = Layout.from_recipe(recipe, 1)
    assert "data plan" in describe(recipe, layout)
    monkeypatch.setattr(bigpt_model, "fusions", lambda recipe, **_: {"bias_activation_fusion": True})
    with pytest.raises(BigptError, match="megatron-core's TransformerConfig refuses the model .*mock_tiny.toml"):
        describe(recipe, layout)


@pytest.mark.parametrize("interleaved", [True, False])
def test_param_gather_is_started_by_the_schedule_only_when_aligned(interleaved):
    overrides = VARIANTS["interleaved_overlapped"][1:]
    recipe, layout = _load(TINY, overrides + [f"parallel.virtual_pipeline={2 if interleaved else 1}"])
    config = transformer_config(recipe, layout, use_te=False, gpu=False)
    ddp = ddp_config_for(recipe)
    chunks = [
        SimpleNamespace(ddp_config=ddp, no_sync=object(), start_grad_sync=object(), start_param_sync=object())
        for _ in range(layout.vpp)
    ]
    wire_model_config(config, chunks, SimpleNamespace(scale_loss=None))
    if interleaved:
        assert config.param_sync_func == [chunk.start_param_sync for chunk in chunks]
    else:  # DDP's forward pre-hooks start them; the schedule starting them too dispatches twice
        assert config.param_sync_func is None


# ---------------------------------------------------------------- a Transformer Engine that does not load
class _BrokenTransformerEngine(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """transformer_engine installed, failing to load as a damaged install does."""

    def __init__(self, error: Exception):
        self.error = error

    def find_spec(self, name, path=None, target=None):
        return importlib.util.spec_from_loader(name, self) if name == "transformer_engine" else None

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        raise self.error


@pytest.fixture
def broken_transformer_engine(monkeypatch, request):
    error = request.param
    monkeypatch.setattr(sys, "meta_path", [_BrokenTransformerEngine(error), *sys.meta_path])
    for name in [name for name in sys.modules if name.split(".")[0] == "transformer_engine"]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setattr(bigpt_model, "on_gpu", lambda: True)
    bigpt_model.transformer_engine_problem.cache_clear()
    yield error
    bigpt_model.transformer_engine_problem.cache_clear()


BROKEN = [
    OSError("libcudnn.so.9: cannot open shared object file: No such file or directory"),
    RuntimeError("transformer_engine_torch was built against torch 2.9, this is torch " + torch.__version__),
    ImportError("No module named 'transformer_engine_torch'"),
]


@pytest.mark.parametrize("broken_transformer_engine", BROKEN, indirect=True, ids=lambda e: type(e).__name__)
def test_a_transformer_engine_that_does_not_load_is_refused_saying_why(broken_transformer_engine):
    recipe = load_recipe(TINY, ['precision.transformer_engine="on"'])
    with pytest.raises(BigptError) as refusal:
        use_transformer_engine(recipe)
    message = str(refusal.value)
    assert "precision.transformer_engine = 'on' needs Transformer Engine" in message
    assert f"{type(broken_transformer_engine).__name__}: {broken_transformer_engine}" in message
    assert TE_INSTALL in message


@pytest.mark.parametrize("broken_transformer_engine", BROKEN[:1], indirect=True, ids=lambda e: type(e).__name__)
def test_a_transformer_engine_that_does_not_load_is_a_warning_where_it_is_optional(broken_transformer_engine, capsys):
    assert use_transformer_engine(load_recipe(TINY)) is False
    warning = capsys.readouterr().err
    assert "warning: transformer_engine is installed but does not load (OSError: libcudnn.so.9" in warning
    assert "--no-build-isolation" in warning and "local layers" in warning


def test_the_transformer_engine_install_line_is_the_gpu_extra_everywhere():
    """The command the refusal prints, README's and scripts/setup.sh's: one requirement, the gpu
    extra's, always without build isolation (its torch extension compiles against this torch)."""
    requirement = TE_INSTALL.split("--no-build-isolation ")[1].strip('"')
    assert f'gpu = ["{requirement}"]' in (ROOT / "pyproject.toml").read_text()
    for where in ("README.md", "scripts/setup.sh"):
        assert f'--no-build-isolation "{requirement}"' in (ROOT / where).read_text(), where


# ---------------------------------------------------------------- bench/gpu, what a CPU can check
def test_the_gpu_benchmark_refuses_an_unknown_argument_before_installing_anything(tmp_path):
    result = subprocess.run(
        ["bash", str(ROOT / "bench/gpu/run.sh"), "--out", str(tmp_path), "--stpes", "5"],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "unknown argument '--stpes'" in result.stderr and "usage:" in result.stderr
    assert not any(tmp_path.iterdir())


def test_the_gpu_benchmark_plans_on_paper(capsys):
    spec = importlib.util.spec_from_file_location("gpu_throughput", ROOT / "bench/gpu/throughput.py")
    throughput = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(throughput)
    assert throughput.main(["--dry-run"]) == 0
    plan = capsys.readouterr().out
    assert "1 GPU(s) = TP 1 x PP 1 (VPP 1) x CP 1 x DP 1; 65,536 tokens/step" in plan
    assert "planner     peak memory" in plan
