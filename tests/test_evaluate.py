"""Zero-shot accuracy and retrieval recall on hand-built cases with known answers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from tests.helpers.shards import pil_decode
from training.demo.shapes import CLASSES, make_sample, make_shapes
from training.eval.common import sigmoid_scores
from training.eval.retrieval import recall_at_k, retrieval
from training.eval.zero_shot import DEFAULT_TEMPLATES, class_embeddings, load_templates, topk_hits, zero_shot

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


def zero_shot_pngs(model, folder, *args, **options) -> dict:
    """``zero_shot`` on the PNG folders of these tests: decoded by PIL, pixels as they are."""
    return zero_shot(model, folder, *args, image_transform=to_tensor, decode_image=pil_decode, **options)


def to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1)[None] / 255  # (1, 3, H, W)


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
    result = zero_shot_pngs(
        model,
        color_folder,
        templates=["a photo of {}", "a {} thing"],
        tokenize=color_tokenize,
        batch_size=5,
    )
    # 3 classes: no top-5 (it would be 1 by construction); no truncation report from this tokenizer
    assert result == {"top1": 10 / 12, "n": 12, "n_classes": 3, "skipped": 0}
    assert model.training  # restored


LEVELS = (0, 20, 50, 90, 140, 200, 250)  # grey level of each of 7 classes' images


class GreyModel(torch.nn.Module):
    """Grey level v and class j sit on a quarter circle at angles v and LEVELS[j] (scaled): the
    classes rank by |v - LEVELS[j]|, with no ties for the levels used below."""

    def __init__(self) -> None:
        super().__init__()
        self.logit_scale = torch.nn.Parameter(torch.tensor([1.0]))
        self.logit_bias = torch.nn.Parameter(torch.tensor([0.0]))

    @staticmethod
    def _arc(level: torch.Tensor) -> torch.Tensor:
        angle = level / 255 * (torch.pi / 2)
        return torch.stack([angle.cos(), angle.sin()], dim=-1)  # (B, 2)

    def encode_image(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self._arc(pixel_values.mean(dim=(1, 2, 3)) * 255)

    def encode_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self._arc(torch.tensor(LEVELS, dtype=torch.float32)[input_ids[:, 0]])


def grey_tokenize(texts: list[str]) -> torch.Tensor:
    """Token 0 is the class index written in the text ("... c3 ..."): (B, 1)."""
    return torch.tensor([[int(t.split("c")[-1][0])] for t in texts])


def test_zero_shot_top1_and_top5_on_a_known_ranking(tmp_path):
    """7 classes x 2 images at their own level, plus one odd image in four classes, placed so that its
    class ranks 2nd (c2 at 75), 4th (c3 at 200), 6th (c1 at 250) and 7th (c0 at 250)."""
    odd = {"c2": 75, "c3": 200, "c1": 250, "c0": 250}
    for j, level in enumerate(LEVELS):
        folder = tmp_path / f"c{j}"
        folder.mkdir()
        for i in range(2):
            Image.new("RGB", (4, 4), (level,) * 3).save(folder / f"{i}.png")
        if folder.name in odd:
            Image.new("RGB", (4, 4), (odd[folder.name],) * 3).save(folder / "odd.png")
    result = zero_shot_pngs(
        GreyModel(),
        tmp_path,
        templates=["a photo of {}", "{} again"],
        tokenize=grey_tokenize,
    )
    # top-1: the 14 own-level images; top-5: those and the odd ones ranked 2nd and 4th
    assert result == {"top1": 14 / 18, "top5": 16 / 18, "n": 18, "n_classes": 7, "skipped": 0}


def test_zero_shot_counts_unreadable_images_and_checks_names(color_folder):
    (color_folder / "red" / "broken.png").write_bytes(b"not a png")
    result = zero_shot_pngs(
        ColorModel(),
        color_folder,
        tokenize=color_tokenize,
    )
    assert result["n"] == 12 and result["skipped"] == 1
    with pytest.raises(ValueError, match="2 class names for 3 class folders"):
        zero_shot_pngs(
            ColorModel(),
            color_folder,
            ["red", "green"],
            tokenize=color_tokenize,
        )
    with pytest.raises(ValueError, match=r"must hold exactly one \{\} for the class name \(it has none\)"):
        zero_shot_pngs(
            ColorModel(),
            color_folder,
            templates=["no placeholder"],
            tokenize=color_tokenize,
        )


def test_zero_shot_refuses_one_class_and_classes_without_images(color_folder, tmp_path):
    options = {"tokenize": color_tokenize}
    (color_folder / "dark_red").mkdir()  # a name the test's tokenizer reads: only the refusal can stop it
    (color_folder / "dark_red" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"class folder\(s\) without images .*\['dark_red'\]"):
        zero_shot_pngs(ColorModel(), color_folder, **options)
    (tmp_path / "one" / "red").mkdir(parents=True)
    Image.new("RGB", (6, 6), RGB["red"]).save(tmp_path / "one" / "red" / "0.png")
    with pytest.raises(
        ValueError, match=r"1 class folder\(s\) \['red'\]; zero-shot classification needs at least two"
    ):
        zero_shot_pngs(ColorModel(), tmp_path / "one", **options)


def test_classes_whose_prompts_tokenize_alike_are_an_error(color_folder):
    def cut_tokenize(texts: list[str]) -> torch.Tensor:  # every prompt cut before the class name
        return torch.zeros(len(texts), 2, dtype=torch.long)

    cut_tokenize.is_truncated = lambda text: True
    options = {"templates": ["a {}"]}
    with pytest.raises(
        ValueError, match=r"classes \['blue', 'green', 'red'\] get identical token ids .* cut at"
    ):
        zero_shot_pngs(ColorModel(), color_folder, tokenize=cut_tokenize, **options)
    with pytest.raises(ValueError, match=r"\['blue', 'green'\] .* maps their names to the same ids"):
        zero_shot_pngs(
            ColorModel(),
            color_folder,
            tokenize=lambda t: color_tokenize([x.replace("blue", "green") for x in t]),
            **options,
        )


def test_zero_shot_counts_and_names_cut_prompts(color_folder, caplog):
    def tokenize(texts: list[str]) -> torch.Tensor:
        return color_tokenize(texts)

    tokenize.is_truncated = lambda text: text.startswith("a long")  # one of the two templates
    with caplog.at_level("WARNING", logger="training.eval.prompts"):
        result = zero_shot_pngs(
            ColorModel(),
            color_folder,
            templates=["a {}", "a long {} template"],
            tokenize=tokenize,
        )
    assert result["truncated_prompts"] == 3 and result["top1"] == 10 / 12
    assert (
        "3 of 6 prompts" in caplog.text and "template 'a long {} template' with class 'blue'" in caplog.text
    )


def test_zero_shot_uses_classes_json_of_make_shapes(tmp_path):
    summary = make_shapes(tmp_path, n_train=4, n_val=4, shard_size=4, image_size=16, zeroshot_per_class=1)
    seen: list[str] = []

    def tokenize(texts: list[str]) -> torch.Tensor:  # token 0 drives ColorModel; the rest keep classes apart
        seen.extend(texts)
        classes = [next(i for i, c in enumerate(CLASSES) if t.endswith(c)) for t in texts]
        return torch.tensor([[c % 3, c] for c in classes])

    result = zero_shot_pngs(ColorModel(), summary.zeroshot, tokenize=tokenize)
    assert result["n"] == 24 and result["n_classes"] == 24 and "top5" in result  # more than 5 classes
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
    n = 30
    summary = make_shapes(tmp_path, n_train=4, n_val=n, shard_size=7, image_size=16, zeroshot_per_class=1)

    def text_tf(text: str) -> torch.Tensor:
        return torch.tensor([len(text) % 8, 0])  # (2,)

    def image_tf(image: Image.Image) -> torch.Tensor:
        red = np.asarray(image.resize((2, 4)), dtype=np.float32)[..., 0]  # (4, 2)
        return torch.from_numpy(red).reshape(8, 1, 1)  # 8 "channels" for the one-hot model

    result = retrieval(
        OneHotModel(), summary.val, image_transform=image_tf, text_transform=text_tf, batch_size=4
    )
    assert result["n"] == n and result["skipped"] == 0 and result["skip_counts"] == {}
    # by hand: the same samples, embedded here, ranked by a plain loop (ties count against the query)
    samples = [make_sample("val", i, image_size=16) for i in range(n)]
    img = F.normalize(torch.stack([image_tf(s.image).flatten() for s in samples]), dim=-1)  # (n, 8)
    ids = torch.stack([text_tf(s.caption) for s in samples])  # (n, 2)
    txt = F.one_hot(ids[:, 0], 8).float()  # (n, 8)
    same = (ids[:, None, :] == ids[None, :, :]).all(-1)  # (n, n): identical captions also match
    want = {}
    for name, sims in (("i2t", img @ txt.T), ("t2i", txt @ img.T)):
        for k in (1, 5, 10):
            hits = sum(int(((sims[q] >= sims[q][same[q]].max()) & ~same[q]).sum() < k) for q in range(n))
            want[f"{name}_r{k}"] = hits / n
    assert {k: result[k] for k in want} == want
    assert 0 < want["i2t_r1"] < want["i2t_r10"] < 1, want  # neither 0 nor 1 by construction


def test_templates(tmp_path):
    assert all("{}" in t for t in DEFAULT_TEMPLATES)
    (tmp_path / "t.txt").write_text("a {}\n\nthe {}\n")
    (tmp_path / "t.json").write_text(json.dumps({"templates": ["x {}"]}))
    (tmp_path / "l.json").write_text(json.dumps(["x {0}", "{{literal}} {}"]))
    assert load_templates(tmp_path / "t.txt") == ["a {}", "the {}"]
    assert load_templates(tmp_path / "t.json") == ["x {}"]
    assert load_templates(tmp_path / "l.json") == ["x {0}", "{{literal}} {}"]


@pytest.mark.parametrize(
    "name,content,match",
    [
        ("named.txt", "a {}\na {x}\n", r"template 'a \{x\}' must hold exactly one \{\} .*it has \{x\}"),
        ("two.txt", "a {}{}\n", r"template 'a \{\}\{\}' must hold exactly one \{\} .*it has \{\}, \{\}"),
        ("empty.txt", "\n  \n", r"no templates"),
        ("string.json", json.dumps("a photo of a {}"), r"expected a JSON list of templates .* got a str"),
        ("broken.json", '["a {}",\n "b {}"', r"invalid JSON at line 2"),
        ("brace.txt", "a {\n", r"template 'a \{' has unbalanced braces"),
    ],
)
def test_bad_templates_files_are_refused_with_the_file_named(tmp_path, name, content, match):
    (tmp_path / name).write_text(content)
    with pytest.raises(ValueError, match=match) as info:
        load_templates(tmp_path / name)
    assert str(info.value).startswith(str(tmp_path / name))


def test_with_the_tiny_siglip_and_its_image_processor(tmp_path):
    """The real pieces fit together: default decoder, ImageProcessor, SiglipModel."""
    from training.data import TokenizeOne
    from vision_tower import ImageProcessor, SiglipModel

    torch.manual_seed(0)
    model = SiglipModel.from_preset("tiny")
    processor = ImageProcessor(image_size=32)

    def tokenize(texts: list[str]) -> torch.Tensor:  # the last 15 bytes as ids, padded with 1 (the pad)
        ids = torch.ones(len(texts), 16, dtype=torch.long)
        for row, text in enumerate(texts):
            data = list(text.encode())[-15:]
            ids[row, : len(data)] = torch.tensor(data)
        return ids  # (B, 16)

    summary = make_shapes(tmp_path, n_train=4, n_val=12, shard_size=5, image_size=40, zeroshot_per_class=1)
    zs = zero_shot(model, summary.zeroshot, image_transform=processor, tokenize=tokenize, batch_size=10)
    assert zs["n"] == 24 and zs["n_classes"] == 24
    # by hand: the first template alone ranks the same as none; here all of the shapes' templates, averaged
    with torch.no_grad():
        text = torch.stack(
            [
                F.normalize(
                    model.encode_text(tokenize([t.format(c) for t in summary.templates])).mean(0), dim=0
                )
                for c in CLASSES
            ]
        )  # (24, D)
        files = sorted(Path(summary.zeroshot).glob("*/*.png"))
        folders = sorted(p.name for p in Path(summary.zeroshot).iterdir())
        pixels = torch.cat([processor([Image.open(f).convert("RGB")]) for f in files])
        best = (model.encode_image(pixels) @ text.T).argmax(dim=1)  # (24,)
    labels = [CLASSES.index(f.parent.name.replace("_", " ")) for f in files]
    assert folders == [c.replace(" ", "_") for c in sorted(CLASSES, key=lambda c: c.replace(" ", "_"))]
    assert zs["top1"] == sum(int(b == lab) for b, lab in zip(best.tolist(), labels)) / 24
    rt = retrieval(
        model, summary.val, image_transform=processor, text_transform=TokenizeOne(tokenize), batch_size=5
    )
    assert rt["n"] == 12 and rt["skipped"] == 0
