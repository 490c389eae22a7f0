"""Zero-shot accuracy and retrieval recall on hand-built cases with known answers."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from training.evaluate import (
    DEFAULT_TEMPLATES,
    class_embeddings,
    load_templates,
    recall_at_k,
    retrieval,
    sigmoid_scores,
    topk_hits,
    zero_shot,
)
from training.shapes import make_shapes

COLOR_WORDS = ("red", "green", "blue")


class ColorModel(torch.nn.Module):
    """Image embedding = normalised mean RGB; text embedding = one-hot of the colour word in it."""

    def __init__(self) -> None:
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor([2.0]))
        self.logit_bias = torch.nn.Parameter(torch.tensor([-1.0]))

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        assert not torch.is_grad_enabled() and not self.training
        return F.normalize(pixel_values.mean(dim=(2, 3)), dim=-1)  # (B, 3)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.normalize(F.one_hot(input_ids[:, 0], 3).float(), dim=-1)  # (B, 3)


def color_tokenize(texts: list[str]) -> torch.Tensor:
    """Token 0 is the index of the colour word in the text: (B, 2)."""
    ids = [[next(i for i, w in enumerate(COLOR_WORDS) if w in t), 0] for t in texts]
    return torch.tensor(ids)


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None] / 255  # (1, 3, H, W)


def pil_decode(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


RGB = {"red": (250, 10, 10), "green": (10, 250, 10), "blue": (10, 10, 250)}


@pytest.fixture()
def color_folder(tmp_path) -> Path:
    """3 classes x 4 images; two of the red folder's images are actually green: top-1 is 10/12."""
    for name in COLOR_WORDS:
        (tmp_path / name).mkdir()
        for i in range(4):
            actual = "green" if name == "red" and i < 2 else name
            Image.new("RGB", (6, 6), RGB[actual]).save(tmp_path / name / f"{i}.png")
    (tmp_path / "blue" / "notes.txt").write_text("not an image")
    return tmp_path


def test_zero_shot_known_accuracy(color_folder):
    model = ColorModel().train()
    result = zero_shot(
        model,
        color_folder,
        templates=["a photo of {}", "a {} thing"],
        image_transform=to_tensor,
        tokenize=color_tokenize,
        batch_size=5,
        decode_image=pil_decode,
    )
    assert result == {"top1": 10 / 12, "top5": 1.0, "n": 12, "n_classes": 3, "skipped": 0}
    assert model.training  # restored


def test_zero_shot_counts_unreadable_images_and_checks_names(color_folder):
    (color_folder / "red" / "broken.png").write_bytes(b"not a png")
    result = zero_shot(
        ColorModel(),
        color_folder,
        image_transform=to_tensor,
        tokenize=color_tokenize,
        decode_image=pil_decode,
    )
    assert result["n"] == 12 and result["skipped"] == 1
    with pytest.raises(ValueError, match="2 class names for 3 class folders"):
        zero_shot(
            ColorModel(),
            color_folder,
            ["red", "green"],
            image_transform=to_tensor,
            tokenize=color_tokenize,
            decode_image=pil_decode,
        )
    with pytest.raises(ValueError, match="contain"):
        zero_shot(
            ColorModel(),
            color_folder,
            templates=["no placeholder"],
            image_transform=to_tensor,
            tokenize=color_tokenize,
            decode_image=pil_decode,
        )


def test_zero_shot_uses_classes_json_of_make_shapes(tmp_path):
    summary = make_shapes(tmp_path, n_train=4, n_val=4, shard_size=4, image_size=16, zeroshot_per_class=1)
    seen: list[str] = []

    def tokenize(texts: list[str]) -> torch.Tensor:
        seen.extend(texts)
        return torch.tensor([[hash(t) % 3, 0] for t in texts])

    result = zero_shot(
        ColorModel(), summary.zeroshot, image_transform=to_tensor, tokenize=tokenize, decode_image=pil_decode
    )
    assert result["n"] == 24 and result["n_classes"] == 24 and 0 <= result["top1"] <= result["top5"] <= 1
    assert "a photo of a red circle" in seen and len(seen) == 24 * len(summary.templates)


def test_class_embeddings_average_templates():
    table = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.6, 0.8, 0.0], [0.0, 0.0, 1.0]])

    class Model:
        def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
            return table[ids[:, 0]]

    def tokenize(texts: list[str]) -> torch.Tensor:
        index = {"a x": 0, "the x": 1, "a y": 2, "the y": 3}
        return torch.tensor([[index[t]] for t in texts])

    emb = class_embeddings(
        Model(), ["x", "y"], ["a {}", "the {}"], tokenize, device=torch.device("cpu"), batch_size=3
    )
    want = F.normalize(torch.tensor([[0.5, 0.5, 0.0], [0.3, 0.4, 0.5]]), dim=-1)
    torch.testing.assert_close(emb, want)


def test_sigmoid_scores_and_topk():
    model = ColorModel()
    img = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    txt = torch.tensor([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
    scores = sigmoid_scores(model, img, txt)
    want = torch.sigmoid(torch.tensor([[1.0, 0.6, 0.0], [0.0, 0.8, 1.0]]) * np.exp(2.0) - 1.0)
    torch.testing.assert_close(scores, want)
    assert topk_hits(scores, torch.tensor([1, 1]), (1, 2, 5)) == {1: 0, 2: 2, 5: 2}


# ----------------------------------------------------------------------------- recall


def test_recall_identity_and_permutation():
    n = 20
    eye = torch.eye(n)
    assert set(recall_at_k(eye, eye).values()) == {1.0}
    perm = torch.arange(n)
    perm[5:] = torch.roll(perm[5:], 1)  # 5 fixed points, 15 moved
    result = recall_at_k(eye, eye[perm], chunk=7)
    # a moved pair scores 0 and ties with 18 other zeros behind one 1: missed for every k <= 19
    assert result == {f"{d}_r{k}": 0.25 for d in ("i2t", "t2i") for k in (1, 5, 10)}


def test_recall_known_ranks():
    # sims[i, j] = <img_i, txt_j>; with img = I, txt_j is column j of sims
    sims = torch.tensor(
        [[0.1, 0.9, 0.8, 0.0], [0.2, 0.5, 0.3, 0.4], [0.0, 0.0, 0.85, 0.9], [0.3, 0.0, 0.0, 0.2]]
    )
    result = recall_at_k(torch.eye(4), sims.T.contiguous(), ks=(1, 2, 3))
    # i2t ranks (1-based): row0 3, row1 1, row2 2, row3 2; t2i ranks: col0 3, col1 2, col2 1, col3 3
    assert result == {
        "i2t_r1": 0.25,
        "i2t_r2": 0.75,
        "i2t_r3": 1.0,
        "t2i_r1": 0.25,
        "t2i_r2": 0.5,
        "t2i_r3": 1.0,
    }


def test_recall_ties_count_against_the_query():
    same = torch.ones(5, 4)
    assert recall_at_k(same, same, ks=(1, 4, 5)) == {
        "i2t_r1": 0.0,
        "i2t_r4": 0.0,
        "i2t_r5": 1.0,
        "t2i_r1": 0.0,
        "t2i_r4": 0.0,
        "t2i_r5": 1.0,
    }


def test_recall_groups_and_brute_force():
    gen = torch.Generator().manual_seed(0)
    img = torch.randint(-2, 3, (30, 4), generator=gen).float()  # small integers: many ties
    txt = torch.randint(-2, 3, (30, 4), generator=gen).float()
    groups = torch.randint(0, 12, (30,), generator=gen)
    got = recall_at_k(img, txt, ks=(1, 3, 10), img_groups=groups, txt_groups=groups, chunk=4)
    sims = img @ txt.T
    for name, s in (("i2t", sims), ("t2i", sims.T)):
        for k in (1, 3, 10):
            hits = 0
            for q in range(30):
                pos = groups == groups[q]
                best = s[q][pos].max()
                hits += int(((s[q] >= best) & ~pos).sum() < k)
            assert got[f"{name}_r{k}"] == hits / 30


def test_recall_needs_pairs():
    with pytest.raises(ValueError, match="3 images and 4 texts"):
        recall_at_k(torch.eye(3), torch.eye(4))


# ----------------------------------------------------------------------------- retrieval


class OneHotModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.zeros(1))
        self.logit_bias = torch.nn.Parameter(torch.zeros(1))

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return F.normalize(pixel_values.flatten(1), dim=-1)  # (B, 8)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.one_hot(input_ids[:, 0], 8).float()  # (B, 8)


def test_retrieval_over_batches_matches_identical_captions():
    # 8 pairs; pairs 6 and 7 have the same caption and the same image
    targets = torch.tensor([0, 1, 2, 3, 4, 5, 6, 6])
    pixels = F.one_hot(targets, 8).float().view(8, 8, 1, 1)  # (N, 8, 1, 1)
    ids = torch.stack([targets, torch.zeros(8, dtype=torch.long)], dim=1)  # (N, 2)
    batches = [{"pixel_values": pixels[i : i + 3], "input_ids": ids[i : i + 3]} for i in range(0, 8, 3)]
    grouped = retrieval(OneHotModel(), batches, ks=(1,))
    assert grouped == {"i2t_r1": 1.0, "t2i_r1": 1.0, "n": 8}
    strict = retrieval(OneHotModel(), batches, ks=(1,), match_identical_captions=False)
    assert strict == {"i2t_r1": 0.75, "t2i_r1": 0.75, "n": 8}
    assert retrieval(OneHotModel(), batches, ks=(1,), max_samples=4)["n"] == 4


def test_retrieval_over_shards(tmp_path):
    summary = make_shapes(tmp_path, n_train=4, n_val=10, shard_size=4, image_size=16, zeroshot_per_class=1)

    def text_tf(text: str) -> torch.Tensor:
        return torch.tensor([len(text) % 8, 0])  # (2,)

    def image_tf(image: Image.Image) -> torch.Tensor:
        red = np.asarray(image.resize((2, 4)), dtype=np.float32)[..., 0]  # (4, 2)
        return torch.from_numpy(red).reshape(8, 1, 1)  # 8 "channels" for the one-hot model

    result = retrieval(
        OneHotModel(), summary.val, image_transform=image_tf, text_transform=text_tf, batch_size=4
    )
    assert result["n"] == 10 and result["skipped"] == 0 and result["skip_counts"] == {}
    assert all(0 <= result[f"{d}_r{k}"] <= 1 for d in ("i2t", "t2i") for k in (1, 5, 10))
    assert result["i2t_r10"] == 1.0  # 10 items: everything is in the top 10


def test_templates(tmp_path):
    assert all("{}" in t for t in DEFAULT_TEMPLATES)
    (tmp_path / "t.txt").write_text("a {}\n\nthe {}\n")
    (tmp_path / "t.json").write_text(json.dumps({"templates": ["x {}"]}))
    assert load_templates(tmp_path / "t.txt") == ["a {}", "the {}"]
    assert load_templates(tmp_path / "t.json") == ["x {}"]


def test_with_the_tiny_siglip_and_its_image_processor(tmp_path):
    """The real pieces fit together: default decoder, ImageProcessor, SiglipModel."""
    from training.data import TokenizeOne
    from vision_tower import ImageProcessor, SiglipModel

    torch.manual_seed(0)
    model = SiglipModel.from_preset("tiny")
    processor = ImageProcessor(image_size=32)

    def tokenize(texts: list[str]) -> torch.Tensor:  # bytes as ids, padded with 1 (the tiny preset's pad)
        ids = torch.ones(len(texts), 16, dtype=torch.long)
        for row, text in enumerate(texts):
            data = list(text.encode())[:15]
            ids[row, : len(data)] = torch.tensor(data)
        return ids  # (B, 16)

    summary = make_shapes(tmp_path, n_train=4, n_val=12, shard_size=5, image_size=40, zeroshot_per_class=1)
    zs = zero_shot(model, summary.zeroshot, image_transform=processor, tokenize=tokenize, batch_size=10)
    assert zs["n"] == 24 and zs["n_classes"] == 24 and zs["top1"] <= zs["top5"]
    rt = retrieval(
        model, summary.val, image_transform=processor, text_transform=TokenizeOne(tokenize), batch_size=5
    )
    assert rt["n"] == 12 and rt["skipped"] == 0
