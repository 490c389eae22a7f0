"""The towers under torch.compile: one graph at every image size and feature layer (fullgraph), the
compiled-only fast paths equal to the plain ones, bf16 features close to fp32 on a real photograph,
and `vision-tower extract --compile`."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors import safe_open
from torch.testing import assert_close

from tests.helpers.hf_reference import hf_vision
from training.losses import sigmoid_loss
from vision_tower import ImageProcessor, SiglipModel, TextTower, VisionTower, get_preset, load_image
from vision_tower.cli import main
from vision_tower.layers import MATMUL_ATTENTION_MAX_TOKENS, attention, gelu_tanh


def _traced(module, backend="eager", graphs: list | None = None):
    """``module`` compiled with fullgraph=True: a graph break anywhere raises. The ``eager`` backend runs
    the traced graph op by op, so this checks tracing (and the compile-only code paths) without codegen;
    the traced graphs are appended to ``graphs``."""
    torch._dynamo.reset()
    if graphs is not None:

        def backend(gm, example_inputs):
            graphs.append(gm)
            return gm.forward

    return torch.compile(module, fullgraph=True, backend=backend)


def _calls(graphs: list, fn) -> int:
    """How many nodes of the traced graphs call ``fn``."""
    return sum(node.target is fn for gm in graphs for node in gm.graph.nodes)


@pytest.fixture(scope="module")
def tower():
    torch.manual_seed(0)
    return VisionTower.from_preset("tiny").eval()  # 32 px, patch 8, 2 blocks, with head


@pytest.mark.parametrize("feature_layer", [-1, -2, 0, 1])
@pytest.mark.parametrize("size", [(32, 32), (48, 40)])
def test_tower_is_one_graph_at_any_size_and_layer(tower, feature_layer, size):
    tower.feature_layer = feature_layer
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    interpolate = size != (32, 32)
    with torch.no_grad():
        expected = tower(x, interpolate_pos_encoding=interpolate, output_hidden_states=True)
        got = _traced(tower)(x, interpolate_pos_encoding=interpolate, output_hidden_states=True)
    assert got.grid == expected.grid == (size[0] // 8, size[1] // 8)
    assert_close(got.patch_features, expected.patch_features, atol=1e-5, rtol=1e-5)
    assert_close(got.pooled, expected.pooled, atol=1e-5, rtol=1e-5)
    assert len(got.hidden_states) == len(expected.hidden_states) == 3


def test_text_tower_with_mask_is_one_graph():
    torch.manual_seed(0)
    text = TextTower(get_preset("tiny").text).eval()
    ids = torch.randint(0, text.config.vocab_size, (3, text.config.max_position_embeddings))
    mask = torch.ones_like(ids)
    mask[1, 5:] = 0
    with torch.no_grad():
        for dtype in (torch.float32, torch.bfloat16):  # bf16 inference takes the matmul attention path
            text.to(dtype)
            expected, got = text(ids, mask), _traced(text)(ids, mask)
            tol = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=0.05, rtol=0.05)
            assert_close(got.pooled.float(), expected.pooled.float(), **tol)


@pytest.mark.parametrize("n", [5, 64])
def test_matmul_attention_equals_sdpa(n):
    """The compiled low-precision path (run here op by op) against F.scaled_dot_product_attention in fp32,
    with a key mask; odd head width."""
    g = torch.Generator().manual_seed(n)
    q, k, v = (torch.randn(2, 3, n, 12, generator=g) for _ in range(3))
    mask = torch.rand(2, 1, 1, n, generator=g) > 0.3
    mask[..., 0] = True
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    graphs = []
    with torch.no_grad():
        got = _traced(attention, graphs=graphs)(q.bfloat16(), k.bfloat16(), v.bfloat16(), mask)
    assert n <= MATMUL_ATTENTION_MAX_TOKENS and _calls(graphs, F.scaled_dot_product_attention) == 0
    assert got.dtype == torch.bfloat16
    assert_close(got.float(), expected, atol=0.03, rtol=0.03)
    # fp32, training and long sequences keep PyTorch's fused kernel
    for args, grad in (((q, k, v), False), ((q.bfloat16(), k.bfloat16(), v.bfloat16()), True)):
        graphs = []
        with torch.set_grad_enabled(grad):
            _traced(attention, graphs=graphs)(*args, mask)
        assert _calls(graphs, F.scaled_dot_product_attention) == 1


def test_compiled_gelu_equals_the_tanh_approximation():
    x = torch.linspace(-8, 8, 2001, dtype=torch.float64)
    expected = F.gelu(x, approximate="tanh")
    graphs = []
    got = _traced(gelu_tanh, graphs=graphs)(x.float())
    assert _calls(graphs, torch.sigmoid) == 1 and _calls(graphs, F.gelu) == 0  # the compiled form ran
    assert_close(got.double(), expected, atol=1e-6, rtol=1e-6)


def test_training_step_is_one_graph_forward_and_backward():
    """The SigLIP forward with the sigmoid loss, through AOT autograd (what inductor trains), with
    activation checkpointing on: loss and every gradient equal to eager."""
    torch.manual_seed(0)
    model = SiglipModel(get_preset("tiny")).train()
    model.vision.set_gradient_checkpointing(True)
    pixels = torch.randn(4, 3, 32, 32)
    ids = torch.randint(0, model.config.text.vocab_size, (4, model.config.text.max_position_embeddings))

    def loss_fn(img, txt, t, b):
        return sigmoid_loss(img.float(), txt.float(), t, b)

    def grads(fn):
        model.zero_grad()
        loss = fn(pixels, ids, loss_fn=loss_fn).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    loss, expected = grads(model)
    got_loss, got = grads(_traced(model, "aot_eager"))
    assert_close(got_loss, loss, atol=1e-5, rtol=1e-5)
    for name, g in expected.items():
        assert_close(got[name], g, atol=1e-5, rtol=1e-4, msg=lambda m, n=name: f"{n}: {m}")


def _photo() -> Path:
    spec = importlib.util.find_spec("matplotlib")
    path = (
        None if spec is None else Path(spec.origin).parent / "mpl-data" / "sample_data" / "grace_hopper.jpg"
    )
    if path is None or not path.exists():
        pytest.skip("matplotlib's sample photograph is not installed")
    return path


def test_bf16_patch_features_stay_close_to_fp32_on_a_photograph():
    """B/16 at 224 px on a real photograph: every token's bf16 feature of the final layer and of layer -2
    has cosine >= 0.999 with its fp32 feature, eager and on the compiled code paths."""
    torch.manual_seed(0)
    tower = VisionTower.from_preset("b16_224", use_head=False).eval()
    pixels = ImageProcessor(image_size=224)([load_image(_photo())])  # (1, 3, 224, 224)

    def final_and_second_last(run, x):
        out = run(x, output_hidden_states=True)
        return out.patch_features[0].float(), out.hidden_states[-2][0].float()  # (196, 768) each

    with torch.inference_mode():
        fp32 = final_and_second_last(tower, pixels)
        tower.to(torch.bfloat16)
        eager = final_and_second_last(tower, pixels.bfloat16())
        graphs = []
        compiled = final_and_second_last(_traced(tower, graphs=graphs), pixels.bfloat16())
    assert _calls(graphs, F.scaled_dot_product_attention) == 0 and _calls(graphs, torch.sigmoid) == 12
    for name, feats in (("eager", eager), ("compiled", compiled)):
        for layer, got, ref in zip((-1, -2), feats, fp32):
            cos = F.cosine_similarity(got, ref, dim=-1)  # (196,)
            assert cos.min() >= 0.999, (name, layer, cos.min().item(), cos.argmin().item())


def test_extract_compile_equals_eager_with_a_padded_last_batch(tmp_path, capsys):
    """Real inductor code: 3 images in batches of 2 (the last one padded to 2), fp32, equal to eager."""
    from PIL import Image

    hf_vision(seed=51, num_hidden_layers=2).save_pretrained(tmp_path / "m")
    (tmp_path / "imgs").mkdir()
    for i in range(3):
        Image.new("RGB", (33 + 5 * i, 30), (40 * i, 90, 200 - 30 * i)).save(tmp_path / "imgs" / f"{i}.png")
    feats = {}
    for flag in ("--compile", "--no-compile"):
        out = tmp_path / f"{flag}.safetensors"
        args = [
            "extract",
            "--model",
            str(tmp_path / "m"),
            "--images",
            str(tmp_path / "imgs"),
            "--out",
            str(out),
        ]
        assert main([*args, "--batch-size", "2", "--dtype", "float32", "--quiet", flag]) == 0
        lines = capsys.readouterr().out.splitlines()
        assert lines[1] == f"compile: {'on' if flag == '--compile' else 'off'} (requested)"
        with safe_open(out, "pt") as f:
            feats[flag] = (f.get_tensor("patch_features"), f.get_tensor("pooled"), f.metadata()["compiled"])
    (pf, pooled, meta), (pf_eager, pooled_eager, meta_eager) = feats["--compile"], feats["--no-compile"]
    assert meta == "true" and meta_eager == "false" and pf.shape == (3, 16, 48)
    assert_close(pf, pf_eager, atol=1e-5, rtol=1e-5)
    assert_close(pooled, pooled_eager, atol=1e-5, rtol=1e-5)
