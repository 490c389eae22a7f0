"""Connector registry, token counts, grid refusals, and parity with the transformers projectors."""

from __future__ import annotations

import pytest
import torch
from einops import rearrange
from torch import nn
from torch.testing import assert_close

from connectors import Connector, ConnectorConfig, build_connector, list_connectors
from tests.helpers.hf_reference import randomize_

TOL = dict(atol=1e-6, rtol=1e-6)
V, T = 32, 48  # tower width, decoder width


def _features(b=2, grid=(4, 4), dim=V, seed=0):
    return torch.randn(b, grid[0] * grid[1], dim, generator=torch.Generator().manual_seed(seed))


def _copy(dst: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy named tensors into ``dst`` strictly (every parameter, nothing else)."""
    dst.load_state_dict(tensors, strict=True)


# ---------------------------------------------------------------------------- registry
def test_registry_lists_every_connector_and_refuses_unknown_names_and_options():
    assert {"linear", "mlp", "mlp2x_gelu", "pixel_shuffle", "avg_pool", "patch_merger", "resampler"} <= set(
        list_connectors()
    )
    with pytest.raises(KeyError) as err:
        build_connector("qformer", V, T)
    assert "qformer" in str(err.value) and "pixel_shuffle" in str(err.value) and "resampler" in str(err.value)
    with pytest.raises(TypeError, match=r"unknown option\(s\) \['factr'\].*'factor'"):
        build_connector("pixel_shuffle", V, T, factr=2)
    with pytest.raises(ValueError, match="mlp2x_gelu"):
        build_connector("mlp2x_gelu", V, T, depth=3)


def test_alias_and_config_round_trip():
    c = build_connector("mlp2x_gelu", V, T)
    assert c.name == "mlp" and c.options["depth"] == 2 and c.options["act"] == "gelu"
    kinds = [type(m).__name__ for m in c.mlp]
    assert kinds == ["Linear", "GELU", "Linear"]
    again = ConnectorConfig.from_dict(c.config.to_dict()).build()
    again.load_state_dict(c.state_dict())
    x = _features()
    assert_close(again(x, (4, 4)), c(x, (4, 4)), atol=0, rtol=0)
    with pytest.raises(ValueError, match="unknown key"):
        ConnectorConfig.from_dict({**c.config.to_dict(), "kind": "mlp"})


# ---------------------------------------------------------------------------- token counts and refusals
@pytest.mark.parametrize(
    "name, options, grid, tokens",
    [
        ("linear", {}, (27, 27), 729),
        ("mlp2x_gelu", {}, (4, 6), 24),
        ("pixel_shuffle", {"factor": 2}, (32, 32), 256),
        ("pixel_shuffle", {"factor": 3}, (27, 27), 81),
        ("avg_pool", {"tokens_per_side": 4}, (64, 64), 16),
        ("patch_merger", {}, (4, 6), 6),
        ("resampler", {"num_queries": 5, "num_heads": 4}, (3, 7), 5),
    ],
)
def test_num_tokens_matches_the_output(name, options, grid, tokens):
    c = build_connector(name, V, T, **options)
    assert c.num_tokens(grid) == tokens
    if grid[0] * grid[1] <= 64:
        assert c(_features(grid=grid), grid).shape == (2, tokens, T)


@pytest.mark.parametrize(
    "name, options, grid, numbers",
    [
        ("pixel_shuffle", {"factor": 2}, (27, 27), ["27x27", "by 2"]),  # so400m/14 at 384 px
        ("patch_merger", {}, (4, 5), ["4x5", "by 2"]),
        ("avg_pool", {"tokens_per_side": 16}, (27, 27), ["27x27", "16x16"]),
    ],
)
def test_grids_a_connector_cannot_take_are_refused_with_the_numbers(name, options, grid, numbers):
    c = build_connector(name, V, T, **options)
    for call in (lambda: c.num_tokens(grid), lambda: c(_features(grid=grid), grid)):
        with pytest.raises(ValueError) as err:
            call()
        assert all(n in str(err.value) for n in numbers), str(err.value)


def test_features_that_do_not_fit_the_grid_or_width_are_refused():
    c = build_connector("linear", V, T)
    with pytest.raises(ValueError, match=r"\(B, 4\*4=16, 32\).*\(2, 15, 32\)"):
        c(torch.zeros(2, 15, V), (4, 4))
    with pytest.raises(ValueError, match="32"):
        c(torch.zeros(2, 16, 7), (4, 4))


# ---------------------------------------------------------------------------- parity with transformers
def test_linear_equals_paligemma_projector():
    from transformers import PaliGemmaConfig
    from transformers.models.paligemma.modeling_paligemma import PaliGemmaMultiModalProjector

    cfg = PaliGemmaConfig(
        vision_config=dict(hidden_size=V), text_config=dict(hidden_size=T), projection_dim=T
    )
    ref = randomize_(PaliGemmaMultiModalProjector(cfg), seed=1)
    ours = build_connector("linear", V, T)
    _copy(ours, {"proj.weight": ref.linear.weight, "proj.bias": ref.linear.bias})
    x = _features()
    assert_close(ours(x, (4, 4)), ref(x), **TOL)


def test_mlp2x_gelu_equals_llava_projector():
    from transformers import LlavaConfig
    from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

    cfg = LlavaConfig(
        vision_config=dict(model_type="siglip_vision_model", hidden_size=V),
        text_config=dict(model_type="llama", hidden_size=T, num_attention_heads=4, num_key_value_heads=4),
        vision_feature_layer=-2,
    )
    ref = randomize_(LlavaMultiModalProjector(cfg), seed=2)
    ours = build_connector("mlp2x_gelu", V, T)
    _copy(
        ours,
        {
            "mlp.0.weight": ref.linear_1.weight,
            "mlp.0.bias": ref.linear_1.bias,
            "mlp.2.weight": ref.linear_2.weight,
            "mlp.2.bias": ref.linear_2.bias,
        },
    )
    x = _features()
    assert_close(ours(x, (4, 4)), ref(x), **TOL)


@pytest.mark.parametrize("factor, side", [(2, 4), (3, 6)])
def test_pixel_shuffle_equals_idefics3_connector(factor, side):
    from transformers import Idefics3Config
    from transformers.models.idefics3.modeling_idefics3 import Idefics3Connector

    cfg = Idefics3Config(
        vision_config=dict(hidden_size=V),
        text_config=dict(model_type="llama", hidden_size=T, num_attention_heads=4, num_key_value_heads=4),
        scale_factor=factor,
    )
    ref = randomize_(Idefics3Connector(cfg), seed=3)
    ours = build_connector("pixel_shuffle", V, T, factor=factor)
    _copy(ours, {"proj.0.weight": ref.modality_projection.proj.weight})
    x = _features(grid=(side, side))
    assert_close(ours(x, (side, side)), ref(x), **TOL)


def test_pixel_shuffle_on_a_rectangular_grid_merges_each_block_of_neighbours():
    """Idefics3 only takes square grids: check a 4x6 grid against explicit indexing."""
    ours = build_connector("pixel_shuffle", V, T, factor=2)
    x = _features(grid=(4, 6))
    grid = x.view(2, 4, 6, V)
    blocks = [
        torch.cat([grid[:, 2 * r + i, 2 * c + j] for i in range(2) for j in range(2)], dim=-1)
        for r in range(2)
        for c in range(3)
    ]
    expected = ours.proj(torch.stack(blocks, dim=1))  # (B, 6, 4V) -> (B, 6, T)
    assert_close(ours(x, (4, 6)), expected, **TOL)


def test_avg_pool_equals_gemma3_projector():
    from transformers import Gemma3Config
    from transformers.models.gemma3.modeling_gemma3 import Gemma3MultiModalProjector

    cfg = Gemma3Config(
        vision_config=dict(hidden_size=V, image_size=64, patch_size=8, layer_norm_eps=1e-6),
        text_config=dict(hidden_size=T),
        mm_tokens_per_image=4,
    )
    ref = randomize_(Gemma3MultiModalProjector(cfg), seed=4)
    ours = build_connector("avg_pool", V, T, tokens_per_side=2)
    _copy(ours, {"norm.weight": ref.mm_soft_emb_norm.weight, "proj.weight": ref.mm_input_projection_weight.T})
    x = _features(grid=(8, 8))
    assert_close(ours(x, (8, 8)), ref(x), **TOL)


def test_patch_merger_equals_qwen2_vl_merger():
    """Qwen2-VL's tower emits each 2x2 block of neighbours consecutively; ours emits rows: reorder for it."""
    from transformers.models.qwen2_vl.modeling_qwen2_vl import PatchMerger

    ref = randomize_(PatchMerger(dim=T, context_dim=V, spatial_merge_size=2), seed=5)
    ours = build_connector("patch_merger", V, T)
    _copy(
        ours,
        {
            "norm.weight": ref.ln_q.weight,
            "norm.bias": ref.ln_q.bias,
            "mlp.0.weight": ref.mlp[0].weight,
            "mlp.0.bias": ref.mlp[0].bias,
            "mlp.2.weight": ref.mlp[2].weight,
            "mlp.2.bias": ref.mlp[2].bias,
        },
    )
    x = _features(b=1, grid=(4, 6))
    qwen_order = rearrange(x[0], "(h i w j) d -> (h w i j) d", h=2, i=2, w=3, j=2)
    assert_close(ours(x, (4, 6))[0], ref(qwen_order), **TOL)


def test_resampler_equals_a_reference_built_on_multihead_attention():
    ours = randomize_(build_connector("resampler", V, T, num_queries=5, num_heads=4, depth=2), seed=6)
    x = _features(grid=(3, 5))

    def reference(x):
        kv = nn.functional.layer_norm(
            x @ ours.kv_proj.weight.T, (T,), ours.norm_kv.weight, ours.norm_kv.bias, 1e-6
        )
        q = ours.queries.expand(x.shape[0], -1, -1)
        for layer in ours.layers:
            mha = nn.MultiheadAttention(T, 4, batch_first=True)
            a = layer.attn
            mha.in_proj_weight.data = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight])
            mha.in_proj_bias.data = torch.cat([a.q_proj.bias, a.k_proj.bias, a.v_proj.bias])
            mha.out_proj.weight.data, mha.out_proj.bias.data = a.o_proj.weight, a.o_proj.bias
            q = q + mha(layer.norm_q(q), kv, kv, need_weights=False)[0]
            q = q + layer.fc2(nn.functional.gelu(layer.fc1(layer.norm_mlp(q))))
        return ours.norm_out(q)

    assert_close(ours(x, (3, 5)), reference(x), atol=2e-6, rtol=2e-6)
    assert ours.no_decay == ("queries",)


def test_connectors_are_trainable_end_to_end():
    for name, options in [
        ("pixel_shuffle", {}),
        ("avg_pool", {"tokens_per_side": 2}),
        ("resampler", {"num_heads": 4}),
    ]:
        c = build_connector(name, V, T, **options)
        assert isinstance(c, Connector)
        c(_features(), (4, 4)).square().mean().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in c.parameters()), name


@pytest.mark.parametrize(
    "name, options, problem",
    [
        ("linear", {"bias": "no"}, "bias='no': expected bool"),
        ("mlp", {"depth": 2.0}, "depth=2.0: expected int"),
        ("avg_pool", {"tokens_per_side": True}, "tokens_per_side=True: expected int"),
    ],
)
def test_an_option_of_the_wrong_type_is_refused(name, options, problem):
    with pytest.raises(ValueError, match=problem):  # a config's mistake: one line on the command line
        build_connector(name, 16, 16, **options)


def test_options_of_the_right_type_are_taken():
    assert build_connector("linear", 16, 8, bias=False).proj.bias is None
    assert build_connector("avg_pool", 16, 8, tokens_per_side=2, eps=1).norm.eps == 1  # an int is a float


@pytest.mark.parametrize(
    "options, problem",
    [
        ({"num_hidden_layer": 4}, r"unknown option\(s\) \['num_hidden_layer'\] for a gemma config"),
        ({"num_attention_heads": 3}, "num_attention_heads 3 is not a multiple of num_key_value_heads 2"),
    ],
)
def test_decoder_preset_options_are_checked(options, problem):
    from connectors.decoder_presets import decoder_config
    from tests.helpers import vlm_reference as R

    with pytest.raises(ValueError, match=problem):
        decoder_config("tiny_gemma", R.tokenizer(), **options)
    assert decoder_config("tiny_gemma", R.tokenizer(), num_hidden_layers=1).num_hidden_layers == 1
