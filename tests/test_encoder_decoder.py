"""The encoder-decoder family (model.family = "encoder_decoder", bigpt/families/encoder_decoder.py):
T5's function computed on megatron-core's T5Model (against transformers with the same weights), what
megatron-core needs for it, its keys checked on paper, its counts."""

import json
import tomllib

import numpy
import pytest
import torch
from megatron.core.models.T5 import t5_spec
from megatron.core.transformer.dot_product_attention import DotProductAttention
from megatron.core.transformer.enums import AttnMaskType
from torch.utils.flop_counter import FlopCounterMode
from transformers import T5Config, T5ForConditionalGeneration

from bigpt.errors import BigptError
from bigpt.families.encoder_decoder import RelativeBiasAttention, attention_masks, forward_step
from bigpt.flops import (
    decoder_seq_length,
    encoder_decoder_flops_per_sample,
    num_parameters,
    recompute_flops_per_step,
)
from bigpt.hf.config import check_recipe_matches
from bigpt.layout import Layout
from bigpt.recipe import load_recipe, padded_vocab_size, recipe_to_toml
from multirank import MOCK_RECIPE, REPO, run_bigpt, scalars
from test_reshard import reshard
from test_training_path import world_of_one

T5_RECIPE = REPO / "tests" / "recipes" / "mock_t5.toml"
LONGER = ["model.seq_length=128"]
"""Runs at 128 encoder tokens: 26 decoder positions, which sequence parallelism splits over TP=2."""
V1_1 = ["model.activation='geglu'", "model.tie_embeddings=false"]
"""T5 v1.1's differences from the recipe's v1.0: gated GELU (tanh), untied output layer."""


def build_t5(*overrides: str):
    """The one-rank chunk bigpt builds for the tiny T5 recipe (call inside world_of_one)."""
    from bigpt.model import build_model_chunks
    from bigpt.runtime.seeding import seed_everything

    recipe = load_recipe(T5_RECIPE, list(overrides))
    seed_everything(recipe.train.seed)
    chunks, _ = build_model_chunks(recipe, Layout.from_recipe(recipe, 1))
    return recipe, chunks[0]


def hf_t5_of(recipe) -> T5ForConditionalGeneration:
    m = recipe.model
    config = T5Config(
        vocab_size=m.vocab_size,
        d_model=m.hidden_size,
        d_kv=m.kv_channels,
        d_ff=m.ffn_hidden_size,
        num_layers=m.encoder_decoder.encoder_depth(m.num_layers),
        num_decoder_layers=m.num_layers,
        num_heads=m.num_attention_heads,
        relative_attention_num_buckets=m.encoder_decoder.relative_attention_num_buckets,
        relative_attention_max_distance=m.encoder_decoder.relative_attention_max_distance,
        dropout_rate=0.0,
        layer_norm_epsilon=m.norm_epsilon,
        feed_forward_proj="relu" if m.activation == "relu" else "gated-gelu",
        tie_word_embeddings=m.tie_embeddings,
    )
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(config).eval()
    with torch.no_grad():  # transformers starts norms at 1: make them count
        for name, parameter in model.named_parameters():
            if "layer_norm" in name:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model


def t5_weights_as_megatron(hf: T5ForConditionalGeneration, recipe, vocab_rows: int) -> dict:
    """T5ForConditionalGeneration's weights under megatron-core's names: q, k, v interleaved per head
    (k, v for cross-attention), [wi_0; wi_1] the gated MLP's input, one relative bias table per stack."""
    m, state = recipe.model, hf.state_dict()
    heads, hidden = m.num_attention_heads, m.hidden_size

    def per_head(*matrices):
        return torch.stack([w.view(heads, -1, hidden) for w in matrices], 1).reshape(-1, hidden)

    def padded(tensor):
        return torch.cat([tensor, tensor.new_zeros(vocab_rows - tensor.shape[0], *tensor.shape[1:])])

    ours = {"embedding.word_embeddings.weight": padded(state["shared.weight"])}
    if not m.tie_embeddings:
        ours["output_layer.weight"] = padded(state["lm_head.weight"])
    stacks = {"encoder": m.encoder_decoder.encoder_depth(m.num_layers), "decoder": m.num_layers}
    for stack, layers in stacks.items():
        bias = f"{stack}.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
        ours[f"{stack}_relative_pos_emb.relative_attention_bias.weight"] = state[bias]
        ours[f"{stack}.final_layernorm.weight"] = state[f"{stack}.final_layer_norm.weight"]
        for i in range(layers):
            ours_, theirs = f"{stack}.layers.{i}.", f"{stack}.block.{i}.layer."
            attention = theirs + "0.SelfAttention."
            ours[ours_ + "input_layernorm.weight"] = state[theirs + "0.layer_norm.weight"]
            ours[ours_ + "self_attention.linear_qkv.weight"] = per_head(
                *(state[f"{attention}{x}.weight"] for x in "qkv")
            )
            ours[ours_ + "self_attention.linear_proj.weight"] = state[attention + "o.weight"]
            mlp = theirs + ("2" if stack == "decoder" else "1")
            if stack == "decoder":
                cross = theirs + "1.EncDecAttention."
                ours[ours_ + "pre_cross_attn_layernorm.weight"] = state[theirs + "1.layer_norm.weight"]
                ours[ours_ + "cross_attention.linear_q.weight"] = state[cross + "q.weight"]
                ours[ours_ + "cross_attention.linear_kv.weight"] = per_head(
                    state[cross + "k.weight"], state[cross + "v.weight"]
                )
                ours[ours_ + "cross_attention.linear_proj.weight"] = state[cross + "o.weight"]
            ours[ours_ + "pre_mlp_layernorm.weight"] = state[mlp + ".layer_norm.weight"]
            dense = mlp + ".DenseReluDense."
            gated = m.activation == "geglu"
            fc1 = (
                torch.cat([state[dense + "wi_0.weight"], state[dense + "wi_1.weight"]])
                if gated
                else state[dense + "wi.weight"]
            )
            ours[ours_ + "mlp.linear_fc1.weight"] = fc1
            ours[ours_ + "mlp.linear_fc2.weight"] = state[dense + "wo.weight"]
    return {name: tensor.clone() for name, tensor in ours.items()}


@pytest.fixture(scope="module")
def logits_against_transformers():
    """{version: (bigpt's decoder logits, transformers')} for padded encoder inputs, the weights of
    one T5ForConditionalGeneration loaded into both: v1.0 (ReLU, tied: the output scaled by
    d_model**-0.5) and v1.1 (gated tanh-GELU, untied), d_kv × heads ≠ d_model."""
    found = {}
    with world_of_one():
        for version, overrides in (("v1.0", []), ("v1.1", V1_1)):
            recipe, chunk = build_t5(*overrides)
            hf = hf_t5_of(recipe)
            weights = t5_weights_as_megatron(hf, recipe, chunk.vocab_size)
            missing, unexpected = chunk.load_state_dict(weights, strict=False)
            # the untied output layer is one module under two names (lm_head.output_layer, output_layer)
            assert not unexpected and all(n.endswith("_extra_state") or n.startswith("lm_head.") for n in missing)
            generator = torch.Generator().manual_seed(1)
            encoder = torch.randint(1, recipe.model.vocab_size, (2, 40), generator=generator)  # beyond max distance
            decoder = torch.randint(0, recipe.model.vocab_size, (2, 12), generator=generator)
            enc_mask = torch.ones(2, 40, dtype=torch.long)
            enc_mask[1, 30:] = 0
            with torch.no_grad():
                masks = attention_masks(chunk, enc_mask, torch.ones(2, 12, dtype=torch.long))
                ours = chunk.eval()(encoder, decoder, *masks)[..., : recipe.model.vocab_size]
                theirs = hf(input_ids=encoder, attention_mask=enc_mask, decoder_input_ids=decoder).logits
            found[version] = (ours, theirs)
    return found


@pytest.mark.parametrize("version", ["v1.0", "v1.1"])
def test_the_encoder_decoder_computes_t5(logits_against_transformers, version):
    ours, theirs = logits_against_transformers[version]
    assert (ours - theirs).abs().max() <= 1e-5 * theirs.abs().max()


def test_megatron_cores_local_attention_refuses_a_bias_which_ours_adds():
    """T5's relative position bias: megatron-core's local attention asserts it gets none;
    RelativeBiasAttention adds it to the scores (softmax(q·kᵀ + bias)·v with T5's softmax_scale 1)."""
    with world_of_one():
        recipe, chunk = build_t5()
        config = chunk.config
        arguments = dict(
            config=config,
            layer_number=1,
            attn_mask_type=AttnMaskType.arbitrary,
            attention_type="self",
            softmax_scale=config.softmax_scale,  # as SelfAttention passes it: 1, T5's
        )
        generator = torch.Generator().manual_seed(0)
        heads, head = config.num_attention_heads, config.kv_channels
        q, k, v = (torch.randn(6, 2, heads, head, generator=generator) for _ in range(3))  # [s, b, heads, head]
        bias = torch.randn(1, heads, 6, 6, generator=generator)
        with pytest.raises(AssertionError, match="Attention bias is not supported"):
            DotProductAttention(**arguments)(q, k, v, None, attention_bias=bias)
        ours = RelativeBiasAttention(**arguments)(q, k, v, None, attention_bias=bias)
    scores = torch.einsum("sbhd,tbhd->bhst", q, k) + bias
    expected = torch.einsum("bhst,tbhd->sbhd", scores.softmax(-1), v).reshape(6, 2, heads * head)
    torch.testing.assert_close(ours, expected)


def test_megatron_cores_t5_block_specs_drop_the_final_norms_which_ours_keep():
    """Without Transformer Engine megatron-core's T5 block specs name no final norm (TENorm is None),
    and a block without one skips it silently; the family builds from the layer specs."""
    assert t5_spec.get_t5_encoder_with_local_block_spec(2).layer_norm is None
    with world_of_one():
        _, chunk = build_t5()
    assert chunk.encoder.final_layernorm is not None and chunk.decoder.final_layernorm is not None


def test_the_loss_is_the_decoders_on_its_target_tokens_and_padding_is_not_read():
    """The forward step's loss: cross entropy summed over loss_mask tokens, with their count; the
    encoder's padding (by enc_mask, not by id) changes nothing, nor does a later decoder token."""
    with world_of_one():
        recipe, chunk = build_t5()
        chunk.eval()
        generator = torch.Generator().manual_seed(2)
        batch = {
            "text_enc": torch.randint(1, 512, (2, 16), generator=generator),
            "text_dec": torch.randint(1, 512, (2, 8), generator=generator),
            "labels": torch.randint(1, 512, (2, 8), generator=generator),
            "loss_mask": torch.tensor([[1] * 8, [1] * 5 + [0] * 3]),
            "enc_mask": torch.tensor([[1] * 16, [1] * 12 + [0] * 4]),
            "dec_mask": torch.tensor([[1] * 8, [1] * 5 + [0] * 3]),
        }
        batch["text_enc"][:, 0] = 0  # a token of id 0 (T5's pad id) where enc_mask says token: read
        with torch.no_grad():
            output, loss_of = forward_step(iter([batch]), chunk)
            loss, count, _ = loss_of(output)
            logits = chunk(
                batch["text_enc"], batch["text_dec"], *attention_masks(chunk, batch["enc_mask"], batch["dec_mask"])
            )
            changed = {key: value.clone() for key, value in batch.items()}
            changed["text_enc"][1, 12:] = 7  # under padding
            changed["text_dec"][:, 6] = 7  # after position 5
            again = chunk(
                changed["text_enc"], changed["text_dec"], *attention_masks(chunk, batch["enc_mask"], batch["dec_mask"])
            )
            batch["text_enc"][:, 0] = 7
            other = chunk(
                batch["text_enc"], batch["text_dec"], *attention_masks(chunk, batch["enc_mask"], batch["dec_mask"])
            )
    entropy = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch["labels"].flatten(), reduction="none")
    assert count == 13
    torch.testing.assert_close(loss, (entropy * batch["loss_mask"].flatten()).sum())
    torch.testing.assert_close(again[:, :6], logits[:, :6])
    assert not torch.allclose(other, logits)


def test_transformer_engine_t5_takes_the_masks_megatron_lm_gives_it():
    """On GPUs the attention masks are Transformer Engine's padding masks: what Megatron-LM's
    pretrain_t5.py passes (megatron-core's config_attention_mask for Transformer Engine >= 1.10, of
    the masks inverted: True where a key is padding), checked here where that attention cannot run."""
    from types import SimpleNamespace

    from megatron.core.datasets.t5_dataset import T5MaskedWordPieceDataset

    enc_mask, dec_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1]]), torch.tensor([[1, 1, 0], [1, 1, 1]])
    enc_tokens, dec_tokens = torch.ones_like(enc_mask), torch.zeros_like(dec_mask)  # decoder start 0: a token
    theirs = T5MaskedWordPieceDataset.config_attention_mask(
        enc_tokens, dec_tokens, enc_mask < 0.5, dec_mask < 0.5, use_local=False, test_te_version="2.17.0"
    )
    ours = attention_masks(SimpleNamespace(cross_attention_masks_as_pairs=True), enc_mask, dec_mask)
    assert torch.equal(ours[0], theirs[0]) and ours[1] is None is theirs[1]
    assert all(torch.equal(a, b) for a, b in zip(ours[2], theirs[2], strict=True))


@pytest.mark.gpu
def test_transformer_engine_t5_computes_the_local_one():
    """Transformer Engine's T5 layers (its attention taking the relative bias itself, its masks as
    (queries', keys') padding pairs) against the local ones with the same weights. Written without a
    GPU at hand: not yet run."""
    pytest.importorskip("transformer_engine.pytorch")
    fused_norms = {  # Transformer Engine fuses these norms into the next linear
        ".input_layernorm.weight": ".self_attention.linear_qkv.layer_norm_weight",
        ".pre_mlp_layernorm.weight": ".mlp.linear_fc1.layer_norm_weight",
    }
    with world_of_one():
        _, local = build_t5('precision.transformer_engine="off"')
        _, fused = build_t5('precision.transformer_engine="on"')
        weights = {}
        for name, tensor in local.state_dict().items():
            for old, new in fused_norms.items():
                name = name.replace(old, new)
            weights[name] = tensor
        missing, unexpected = fused.load_state_dict(weights, strict=False)
        assert not unexpected and all(name.endswith("_extra_state") for name in missing), (missing, unexpected)
        encoder = torch.randint(3, 512, (2, 40), device="cuda")
        decoder = torch.randint(3, 512, (2, 12), device="cuda")
        enc_mask = torch.ones(2, 40, dtype=torch.long, device="cuda")
        enc_mask[1, 30:] = 0
        dec_mask = torch.ones(2, 12, dtype=torch.long, device="cuda")
        with torch.no_grad():
            ours = local.eval()(encoder, decoder, *attention_masks(local, enc_mask, dec_mask))
            theirs = fused.eval()(encoder, decoder, *attention_masks(fused, enc_mask, dec_mask))
    assert (ours - theirs).abs().max() <= 1e-4 * ours.abs().max()


@pytest.mark.parametrize(
    "overrides,words",
    [
        (["model.position_embedding='rope'"], "bigpt's encoder-decoder is T5's"),
        (["model.num_query_groups=2"], "cross-attention has no grouped-query form"),
        (["model.attention_window=16"], 'model.attention_window=16 with model.family = "encoder_decoder"'),
        (["model.qk_layernorm=true"], "T5 layers have no query/key norms"),
        (["model.max_position_embeddings=128"], "relative positions have no position table"),
        (["model.encoder_decoder.relative_attention_max_distance=4"], "which must lie beyond the exact ones"),
        (["model.family='decoder'", "model.position_embedding='rope'"], "model.encoder_decoder.encoder_layers, "),
        (["eval.tasks=[{name='t', path='t.jsonl'}]"], "which an encoder-decoder does not compute"),
    ],
)
def test_what_the_encoder_decoder_does_not_offer_is_refused_on_paper(overrides, words):
    with pytest.raises(BigptError, match=words):
        load_recipe(T5_RECIPE, overrides)


def test_relative_positions_are_the_encoder_decoders_alone():
    with pytest.raises(BigptError, match="model.position_embedding = 'relative' set while model.family='decoder'"):
        load_recipe(MOCK_RECIPE, ["model.position_embedding='relative'"])


@pytest.mark.parametrize("parallel", ["parallel.pipeline=2", "parallel.context=2"])
def test_pipeline_and_context_parallelism_are_refused_on_paper(parallel):
    recipe = load_recipe(T5_RECIPE, [parallel])
    with pytest.raises(BigptError, match=f'{parallel} with model.family = "encoder_decoder": megatron-core 0.19\'s'):
        Layout.from_recipe(recipe, 2)


def test_sequence_parallelism_needs_a_decoder_length_that_splits_over_tp():
    """Sequence parallelism splits the decoder's sequences too: 64 encoder tokens make 13 decoder positions."""
    split = ["parallel.tensor=2", "parallel.sequence_parallel=true"]
    with pytest.raises(BigptError, match=r"the decoder's length 13 .* is not divisible by parallel.tensor=2"):
        Layout.from_recipe(load_recipe(T5_RECIPE, split), 2)
    Layout.from_recipe(load_recipe(T5_RECIPE, [*split, *LONGER]), 2)  # 26


def test_weights_of_another_encoder_decoder_are_refused():
    """[model.encoder_decoder] decides what the weights compute: a checkpoint saved with the same
    table loads (its encoder_layers default resolved), one with other buckets does not."""
    saved = tomllib.loads(recipe_to_toml(load_recipe(T5_RECIPE)))["model"]
    assert check_recipe_matches(load_recipe(T5_RECIPE).model, saved, "ckpt", key="checkpoint.load") == []
    del saved["encoder_decoder"]["encoder_layers"]  # None, written by a recipe that left it out
    same = load_recipe(T5_RECIPE, ["model.num_layers=3"])
    assert check_recipe_matches(same.model, {**saved, "num_layers": 3}, "ckpt", key="checkpoint.load") == []
    other = load_recipe(T5_RECIPE, ["model.encoder_decoder.relative_attention_max_distance=40"])
    with pytest.raises(
        BigptError, match=r"model.encoder_decoder = .*'relative_attention_max_distance': 40.* \(the checkpoint"
    ):
        check_recipe_matches(other.model, saved | {"num_layers": 2}, "ckpt", key="checkpoint.load")


def test_logits_of_an_encoder_decoder_are_its_decoders():
    """bigpt.logits (tools/logits.py) runs the family's own forward: the decoder's logits given the
    encoder's tokens, after T5's decoder start token alone unless decoder tokens are given."""
    from bigpt.families.encoder_decoder import logits as family_logits
    from bigpt.logits import compute_logits

    generator = torch.Generator().manual_seed(0)
    tokens = torch.randint(3, 512, (2, 16), generator=generator)
    decoder = torch.randint(3, 512, (1, 5), generator=generator)
    with world_of_one():
        recipe, chunk = build_t5()  # the weights compute_logits builds: random, of train.seed
        with torch.no_grad():
            start_token = torch.zeros(1, 1, dtype=torch.long)  # one sequence at a time, as compute_logits
            start = torch.cat([chunk.eval()(row, start_token, None, None, None) for row in tokens.split(1)])
            given = family_logits(chunk, tokens[:1], decoder)
            expected = chunk(tokens[:1], decoder, None, None, None)
        logits = compute_logits(recipe, Layout.from_recipe(recipe, 1), tokens)
    assert logits.shape == (2, 1, recipe.model.vocab_size)
    assert torch.equal(logits, start[..., : recipe.model.vocab_size])
    assert given.shape == (1, 5, chunk.vocab_size) and torch.equal(given, expected)


def test_t5_base_counts_as_the_released_model():
    """recipes/t5_base.toml against transformers' count of T5ForConditionalGeneration with
    t5-base's config (222,903,552: the tied output layer counted once)."""
    t5_base = T5Config(
        vocab_size=32128, d_model=768, d_ff=3072, d_kv=64, num_layers=12, num_heads=12, feed_forward_proj="relu"
    )
    with torch.device("meta"):
        released = T5ForConditionalGeneration(t5_base).num_parameters()
    assert released == 222_903_552
    assert num_parameters(load_recipe(REPO / "recipes" / "t5_base.toml").model) == released


@pytest.mark.parametrize("overrides", [[], V1_1], ids=["v1.0", "v1.1"])
def test_the_count_is_what_megatron_core_builds(overrides):
    with world_of_one():
        recipe, chunk = build_t5(*overrides)
        built = sum(parameter.numel() for parameter in chunk.parameters())
    assert num_parameters(recipe.model, chunk.vocab_size) == built


def test_the_flop_count_is_what_the_forward_multiplies():
    """encoder_decoder_flops_per_sample / 3 is the forward's matmul FLOPs as torch counts them, but
    for the decoder's self-attention scores, which the count halves for the causal mask (as it does
    for a decoder) and the forward computes whole."""
    decoder_tokens = 10
    with world_of_one():
        recipe, chunk = build_t5(*V1_1)
        m = recipe.model
        encoder = torch.randint(1, m.vocab_size, (1, m.seq_length))
        decoder = torch.randint(1, m.vocab_size, (1, decoder_tokens))
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            chunk.eval()(encoder, decoder, None, None, None)
    query = m.num_attention_heads * m.kv_channels
    masked_half = m.num_layers * 2 * 2 * (decoder_tokens / 2) * query * decoder_tokens
    counted = encoder_decoder_flops_per_sample(m, chunk.vocab_size, decoder_tokens) / 3
    assert counted + masked_half == counter.get_total_flops()


def test_recomputed_mlps_are_counted_at_each_stacks_length():
    """recompute.modules = ["mlp"]: every MLP's forward again, as torch counts it in the forward."""
    recipe = load_recipe(T5_RECIPE, ['recompute.granularity="selective"', 'recompute.modules=["mlp"]'])
    layout = Layout.from_recipe(recipe, 1)
    with world_of_one():
        _, chunk = build_t5()
        encoder = torch.randint(1, 512, (1, recipe.model.seq_length))
        decoder = torch.randint(1, 512, (1, decoder_seq_length(recipe)))
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            chunk.eval()(encoder, decoder, None, None, None)
    mlps = sum(sum(ops.values()) for name, ops in counter.get_flop_counts().items() if name.endswith(".mlp"))
    assert recompute_flops_per_step(recipe, layout) == mlps * layout.global_batch_size


def test_full_recomputation_reruns_the_forward_of_both_stacks():
    """recompute.granularity = "full": every layer's forward again, which is the whole forward
    (torch's count, above) but for the output layer."""
    recipe = load_recipe(T5_RECIPE, ['recompute.granularity="full"', "recompute.num_layers=1"])
    layout = Layout.from_recipe(recipe, 1)
    m, vocab = recipe.model, padded_vocab_size(recipe.model, 1)
    decoder = decoder_seq_length(recipe)
    forward = encoder_decoder_flops_per_sample(m, vocab, decoder) / 3 - decoder * 2 * vocab * m.hidden_size
    assert recompute_flops_per_step(recipe, layout) == pytest.approx(forward * layout.global_batch_size)


@pytest.mark.parametrize(
    "recompute",
    [
        {"recompute_granularity": "full", "recompute_method": "uniform", "recompute_num_layers": 1},
        {"recompute_granularity": "selective", "recompute_modules": ["core_attn"]},
    ],
    ids=["full", "core_attn"],
)
def test_recomputation_gives_t5s_gradients_only_with_the_relative_bias_fix(recompute):
    """megatron-core recomputes with the relative position bias taken from outside its checkpoint:
    each recomputed piece's backward runs back through the bias's graph. With megatron_fixes' table
    lookup the gradients are those without recomputation; with megatron-core's own the second
    backward fails."""
    import dataclasses

    from bigpt.families.encoder_decoder import ENCODER_DECODER

    def gradients(chunk):
        tokens = torch.randint(1, 512, (2, 16), generator=torch.Generator().manual_seed(0))
        chunk(tokens, tokens[:, :8], None, None, None, lm_labels=tokens[:, :8]).sum().backward()
        return {name: parameter.grad for name, parameter in chunk.named_parameters()}

    with world_of_one():
        recipe, plain = build_t5()
        config = dataclasses.replace(plain.config, **recompute)
        specs = ENCODER_DECODER.layer_spec(recipe, config, False, None)

        def recomputing():
            chunk = ENCODER_DECODER.build_chunk(recipe, Layout.from_recipe(recipe, 1), config, specs, None)
            chunk.load_state_dict(plain.state_dict())
            return chunk.train()

        expected = gradients(plain.train())
        fixed = gradients(recomputing())
        unfixed = recomputing()
        for table in (unfixed.encoder_relative_pos_emb, unfixed.decoder_relative_pos_emb):
            table.relative_attention_bias.__class__ = torch.nn.Embedding  # megatron-core's lookup
        with pytest.raises(RuntimeError, match="backward through the graph a second time"):
            gradients(unfixed)
    assert fixed.keys() == expected.keys()
    for name, gradient in expected.items():
        torch.testing.assert_close(fixed[name], gradient, msg=name)


def test_the_relative_bias_fix_stops_bigpt_when_its_target_moved(monkeypatch):
    from megatron.core.models.common.embeddings.relative_pos_embedding import RelativePositionEmbedding

    from bigpt.runtime import megatron_fixes

    monkeypatch.delattr(RelativePositionEmbedding, "_compute_bias")
    with pytest.raises(BigptError, match=r"bigpt's fix for megatron-core .* cannot be applied .*_compute_bias"):
        megatron_fixes._relative_bias_survives_recomputation()


# ------------------------------------------------------------ layouts against one rank, resume, reshard
PARITY_STEPS = 3


@pytest.fixture(scope="module")
def t5_start(tmp_path_factory):
    """A one-rank T5 checkpoint after 2 steps, and the one-rank run from it (saving every step): the
    weights every layout starts from (layouts initialise differently) and its losses."""
    root = tmp_path_factory.mktemp("t5")
    run_bigpt(T5_RECIPE, f"run_dir={root / 'init'}", *LONGER, "train.train_iters=2", "schedule.warmup_iters=1")
    checkpoint = root / "init" / "checkpoints" / "iter_0000002"
    run_bigpt(T5_RECIPE, *_from(checkpoint, root / "reference"), "checkpoint.save_interval=1", "checkpoint.keep_last=0")
    return root, checkpoint, scalars(root / "reference", "train/loss")


def _from(checkpoint, run_dir):
    return [f"run_dir={run_dir}", *LONGER, f"init.from_checkpoint={checkpoint}", f"train.train_iters={PARITY_STEPS}"]


@pytest.mark.slow
def test_t5_at_dp2_trains_as_one_rank(t5_start):
    """(TP=2 against one rank: the resharded checkpoint's run below, from the same step.)"""
    root, checkpoint, reference = t5_start
    run_bigpt(T5_RECIPE, *_from(checkpoint, root / "dp2"), nproc=2)
    assert scalars(root / "dp2", "train/loss") == pytest.approx(reference, rel=1e-5)


@pytest.mark.slow
def test_t5_resumes_bit_identically(t5_start, tmp_path):
    root, _, reference = t5_start
    resumed = run_bigpt(
        T5_RECIPE,
        f"run_dir={tmp_path}",
        *LONGER,
        f"checkpoint.load={root / 'reference' / 'checkpoints' / 'iter_0000001'}",
        f"train.train_iters={PARITY_STEPS}",
    )
    assert "resuming from" in resumed.stdout
    assert scalars(tmp_path, "train/loss") == reference[1:]


@pytest.mark.slow
def test_a_t5_checkpoint_resharded_to_tp2_continues_the_loss(t5_start, tmp_path):
    """tools/reshard.py: the one-rank checkpoint of step 1 (model, optimizer, data position) written
    at TP=2, resumed there with sequence parallelism: steps 2 and 3 as the one-rank run's. Sequence
    parallelism splits both stacks' sequences (the encoder's 128 tokens, the decoder's 26) and
    gathers them for the relative position bias of the full length."""
    root, _, reference = t5_start
    written = reshard(root / "reference" / "checkpoints" / "iter_0000001", tmp_path / "tp2", "parallel.tensor=2")
    assert "(step 1, 8 samples consumed" in written.stdout
    run_bigpt(
        T5_RECIPE,
        f"run_dir={tmp_path / 'resumed'}",
        *LONGER,
        f"checkpoint.load={tmp_path / 'tp2'}",
        f"train.train_iters={PARITY_STEPS}",
        "parallel.tensor=2",
        "parallel.sequence_parallel=true",
        nproc=2,
    )
    assert scalars(tmp_path / "resumed", "train/loss") == pytest.approx(reference[1:], rel=1e-5)


@pytest.mark.slow
def test_t5_trains_on_preprocessed_text(tmp_path):
    """A real-data run: text preprocessed into sentences (tools/preprocess_data.py --split-sentences)
    with a tokenizer that has T5's pad, EOS and sentinels, corrupted into spans and learned (the loss
    falls), validated on its held-out split."""
    from tokenizers import AddedToken, Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace

    from bigpt.data.preprocess import preprocess

    words = [f"w{i}" for i in range(40)]
    vocab = ["<pad>", "</s>", "<unk>", ".", *words]  # T5's specials first
    tokenizer = Tokenizer(WordLevel({piece: i for i, piece in enumerate(vocab)}, unk_token="<unk>"))
    tokenizer.pre_tokenizer = Whitespace()
    tokenizer.add_special_tokens([AddedToken(f"<extra_id_{n}>", special=True) for n in reversed(range(8))])
    tokenizer.save(str(tmp_path / "tokenizer.json"))
    rng = numpy.random.default_rng(0)
    sentences = [" ".join(words[start : start + 6]) + " ." for start in range(0, 34, 3)]  # a grammar of 12
    documents = [" ".join(rng.choice(sentences, size=6)) for _ in range(200)]
    (tmp_path / "corpus.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in documents))
    preprocess(tmp_path / "corpus.jsonl", str(tmp_path / "corpus"), tmp_path / "tokenizer.json", sentences=True)
    run_bigpt(
        T5_RECIPE,
        f"run_dir={tmp_path / 'run'}",
        "model.vocab_size=64",
        "model.seq_length=32",
        "data.source='indexed'",
        f"data.tokenizer='{tmp_path / 'tokenizer.json'}'",
        f"data.blend=[{{path='{tmp_path / 'corpus'}'}}]",
        "data.split='95,5,0'",
        "optimizer.lr=1e-2",
        "train.train_iters=8",
        "eval.interval=8",
        "eval.iters=1",
    )
    losses = scalars(tmp_path / "run", "train/loss")
    assert len(losses) == 8 and losses[-1] < 0.95 * losses[0]
    assert len(scalars(tmp_path / "run", "valid/loss")) == 1
