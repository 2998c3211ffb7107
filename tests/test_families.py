"""The model-family spec (bigpt/families): one object per kind of model, chosen by model.family, and
the parts of bigpt that ask it instead of naming a model class."""

import typing

import pytest

from bigpt.errors import BigptError
from bigpt.families import FAMILIES, family_of
from bigpt.hf.config import FAMILIES as HF_FAMILIES
from bigpt.hf.config import hf_from_model
from bigpt.recipe import ModelConfig, load_recipe
from multirank import MOCK_RECIPE
from test_moe import MOE_RECIPE


def test_every_model_family_a_recipe_can_name_has_a_spec():
    choices = typing.get_args(typing.get_type_hints(ModelConfig)["family"])
    assert set(choices) == set(FAMILIES)
    for name, family in FAMILIES.items():
        assert family.name == name


@pytest.mark.parametrize("recipe,family", [(MOCK_RECIPE, "decoder"), (MOE_RECIPE, "moe_decoder")])
def test_a_recipe_chooses_its_family_with_one_key(recipe, family):
    assert family_of(load_recipe(recipe).model) is FAMILIES[family]


def test_hugging_face_forms_belong_to_their_family_and_the_others_are_refused_by_name():
    assert {name for family in FAMILIES.values() for name in family.hf_model_types} == set(HF_FAMILIES) | {
        "bert",
        "roberta",
        "t5",
        "mt5",
    }
    assert set(FAMILIES["decoder"].hf_model_types) == {"llama", "mistral", "qwen2", "qwen3"}
    assert set(FAMILIES["moe_decoder"].hf_model_types) == {"mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v3"}
    assert FAMILIES["encoder"].hf_model_types == ("bert", "roberta")
    assert FAMILIES["encoder_decoder"].hf_model_types == ("t5", "mt5")
    assert hf_from_model(load_recipe(MOE_RECIPE).model, "bf16", None)["architectures"] == ["MixtralForCausalLM"]
    with pytest.raises(
        BigptError,
        match=r"num_groups = 2.* fits none .* 'moe_decoder' \(MixtralForCausalLM cannot have model.moe.num_groups",
    ):
        hf_from_model(load_recipe(MOE_RECIPE, ["model.moe.num_groups=2", "model.moe.group_topk=1"]).model, "bf16", None)
