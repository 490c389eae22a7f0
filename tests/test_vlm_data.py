"""VLM samples: image + caption or prompt/answer rows laid out as the VLM generates, padded per batch,
the loss on the answer only, long rows cut on the answer side and counted, through the shared stream."""

from __future__ import annotations

import json
import pickle

import pytest
import torch
import torch.nn.functional as F

from connectors import ConnectorConfig, VisionLanguageModel
from tests.helpers import vlm_reference as R
from tests.helpers.shards import ONE_PASS, write_tar
from tests.helpers.vlm_data import layout_for, pixel_builder, png
from training.data import ShardLoader, shard_dataset
from training.data.vlm import PixelImages, VLMBuilder
from training.demo.decoders import word_tokenizer
from training.demo.shapes import make_sample
from training.tasks.vlm import model_inputs
from vision_tower import ImageProcessor

WORDS = [
    "a red circle",
    "a small blue square on a noisy background",
    "caption",
    "what colour",
    "red",
    "USER: ASSISTANT:",
]
PROCESSOR = ImageProcessor(image_size=16)


def image_bytes(i: int) -> bytes:
    return png(make_sample("train", i, image_size=16).image)


def raw(key: str, i: int, **members) -> dict:
    sample = {"__key__": key, "__url__": "mem.tar", "png": image_bytes(i)}
    for ext, value in members.items():
        sample[ext] = value if isinstance(value, bytes) else json.dumps(value).encode()
    return sample


def test_rows_put_image_and_prompt_in_the_prefix_and_the_answer_with_eos_in_the_suffix():
    tok = word_tokenizer(WORDS)
    v = tok.get_vocab()
    img, bos, eos, pad = v["<image>"], v["<bos>"], v["<eos>"], v["<pad>"]
    b = pixel_builder(tok)
    items = [
        b.build(raw("cap", 0, txt=b"a red circle")),
        b.build(raw("qa", 1, json={"prompt": "what colour", "answer": "red"})),
        b.build(raw("llava", 2, json={"prompt": "USER: <image> what colour ASSISTANT:", "answer": "red"})),
    ]
    # by hand: PaliGemma layout (placeholders, bos, prompt, newline) or <image> expanded in place
    prefixes = [
        [img] * 4 + [bos, v["caption"]],
        [img] * 4 + [bos, v["what"], v["colour"]],
        [bos, v["USER:"]] + [img] * 4 + [v["what"], v["colour"], v["ASSISTANT:"]],
    ]
    suffixes = [[v["a"], v["red"], v["circle"], eos], [v["red"], eos], [v["red"], eos]]
    batch = b.collate(items)
    width = max(len(p) + len(s) for p, s in zip(prefixes, suffixes))
    assert batch["input_ids"].shape == (3, width)
    for row, (p, s) in enumerate(zip(prefixes, suffixes)):
        n = len(p) + len(s)
        assert batch["input_ids"][row].tolist() == p + s + [pad] * (width - n)
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert batch["token_type_ids"][row, :n].tolist() == [0] * len(p) + [1] * len(s)
        assert batch["labels"][row].tolist() == [-100] * len(p) + s + [-100] * (width - n)
    expected = torch.cat([PROCESSOR(make_sample("train", i, image_size=16).image) for i in range(3)])
    torch.testing.assert_close(batch["pixel_values"], expected, rtol=0, atol=0)  # (3, 3, 16, 16)
    assert batch["answer"] == ["a red circle", "red", "red"]
    assert batch["prompt"] == ["caption", "what colour", "USER: <image> what colour ASSISTANT:"]
    # the builder travels to DataLoader workers
    again = pickle.loads(pickle.dumps(b)).build(raw("cap", 0, txt=b"a red circle"))
    assert again.input_ids == items[0].input_ids


def test_a_causal_model_reads_a_prompt_without_image_token_as_llava_does():
    """bos, placeholders, prompt (as LlavaProcessor lays out "<image>" + prompt), not PaliGemma's order."""
    tok = word_tokenizer(WORDS)
    v = tok.get_vocab()
    img, bos, eos = v["<image>"], v["<bos>"], v["<eos>"]
    b = pixel_builder(tok)
    b.causal = True
    cap = b.build(raw("cap", 0, txt=b"a red circle"))
    qa = b.build(raw("qa", 1, json={"prompt": "what colour", "answer": "red"}))
    llava = b.build(raw("llava", 2, json={"prompt": "USER: <image> what colour ASSISTANT:", "answer": "red"}))
    assert cap.input_ids == [bos] + [img] * 4 + [v["caption"], v["a"], v["red"], v["circle"], eos]
    assert qa.input_ids == [bos] + [img] * 4 + [v["what"], v["colour"], v["red"], eos]
    assert llava.input_ids == [bos, v["USER:"]] + [img] * 4 + [v["what"], v["colour"], v["ASSISTANT:"]] + [
        v["red"],
        eos,
    ]  # a prompt holding <image> is laid out where it says, as before


def test_image_tokens_follow_the_layouts_crop_and_its_grid():
    tok = word_tokenizer(WORDS)
    b = pixel_builder(tok, connector=ConnectorConfig("linear", 8, 16))  # one token per patch
    small = b.build(raw("a", 0, txt=b"red"))
    assert small.input_ids.count(tok.convert_tokens_to_ids("<image>")) == 16  # 4x4 grid
    with pytest.raises(ValueError, match="counts tokens of 16x16 crops; the processor makes 24x24 images"):
        PixelImages(ImageProcessor(image_size=24), b.layout, patch_size=4)
    b.layout = layout_for(ConnectorConfig("linear", 8, 16), 24, 4)
    b.images = PixelImages(ImageProcessor(image_size=24), b.layout, patch_size=4)
    big = b.build(raw("b", 0, txt=b"red"))
    assert big.grid == (6, 6) and big.input_ids.count(tok.convert_tokens_to_ids("<image>")) == 36
    with pytest.raises(ValueError, match="different token grids"):
        b.collate([small, big])


def long_shard(tmp_path):
    members = []
    for i, answer in enumerate(["red", "a red circle " * 4, "a small blue square on a noisy background"]):
        members += [(f"k{i}.png", image_bytes(i)), (f"k{i}.txt", answer.strip().encode())]
    members += [
        ("k3.png", image_bytes(3)),
        ("k3.json", json.dumps({"prompt": "what " * 30, "answer": "red"}).encode()),
    ]
    return write_tar(tmp_path / "long.tar", members)


@pytest.mark.parametrize("num_workers", [0, 1])
def test_long_rows_are_cut_on_the_answer_side_and_counted(tmp_path, num_workers):
    tok = word_tokenizer(WORDS)
    v = tok.get_vocab()
    b = pixel_builder(tok, max_length=12)  # 4 image tokens + bos + "caption" leave 6 for the answer
    dataset = shard_dataset(long_shard(tmp_path), b, batch_size=8, **ONE_PASS)
    loader = ShardLoader(dataset, num_workers=num_workers)
    (batch,) = list(loader)
    assert batch["__key__"] == ["k0", "k1", "k2"]
    assert loader.skip_counts == {"too_long": 1}  # k3: its prompt alone is 30 words
    assert loader.samples_seen == 3 and loader.truncated_captions == 2
    prefix = 6
    cut = [v[w] for w in ("a red circle " * 2).split()]  # the first 6 answer tokens, no eos
    assert batch["input_ids"][1].tolist() == [v["<image>"]] * 4 + [v["<bos>"], v["caption"]] + cut
    assert batch["labels"][1, prefix:].tolist() == cut
    assert batch["input_ids"][0, prefix:].tolist()[:2] == [v["red"], v["<eos>"]]  # short: whole, with eos
    assert batch["answer"][1] == ("a red circle " * 4).strip()  # the reference stays whole


def test_a_caption_of_megabytes_is_cut_before_the_tokenizer_reads_it():
    tok = word_tokenizer(WORDS)
    v = tok.get_vocab()
    read: list[int] = []  # the length of every text the tokenizer is given

    class Recording(type(tok)):
        def __call__(self, text, *args, **kwargs):
            read.append(len(text))
            return super().__call__(text, *args, **kwargs)

    tok.__class__ = Recording
    b = pixel_builder(tok, max_length=12)  # 6 answer tokens after the image and the prompt
    huge = "a red circle " * 200_000  # 2.6 MB
    item = b.build(raw("huge", 0, txt=huge.encode()))
    assert item.input_ids[6:] == [v[w] for w in ("a red circle " * 2).split()] and item.truncated
    assert max(read) < 10_000, read  # not the 2.6 MB: 2 x (6 + 1) x the longest word ("background")
    assert item.text == huge.strip()  # the reference stays whole


def test_the_loss_is_the_answer_tokens_cross_entropy():
    """The VLM's loss on a collated batch equals cross-entropy over the answer tokens alone, by hand."""
    tok = R.tokenizer()
    tower = R.tower()
    vlm = VisionLanguageModel(tower, "pixel_shuffle", R.decoder("gemma"), tokenizer=tok).eval()
    b = VLMBuilder(
        tok,
        image_token_id=vlm.image_token_id,
        layout=vlm.layout,
        images=PixelImages(ImageProcessor(image_size=32), vlm.layout, patch_size=8),
        max_length=64,
        caption_prompt="caption en",
    )
    batch = b.collate(
        [
            b.build(raw("a", 0, txt=b"a photo of the cat")),
            b.build(raw("b", 1, json={"prompt": "what is this", "answer": "dog"})),
        ]
    )
    with torch.no_grad():
        out = vlm(**model_inputs(batch))
        logits = out.logits.float()
    # by hand: the answer words and eos follow the prompt's newline; each is predicted one position earlier
    eos = tok.eos_token_id
    answers = [
        tok("a photo of the cat", add_special_tokens=False)["input_ids"] + [eos],
        tok("dog", add_special_tokens=False)["input_ids"] + [eos],
    ]
    losses = []
    for row, answer in enumerate(answers):
        ids = batch["input_ids"][row].tolist()
        start = next(i for i in range(len(ids)) if ids[i : i + len(answer)] == answer)
        for j, token in enumerate(answer):
            losses.append(F.cross_entropy(logits[row, start + j - 1], torch.tensor(token)))
    torch.testing.assert_close(out.loss, torch.stack(losses).mean(), rtol=1e-5, atol=1e-6)


def test_special_tokens_written_in_text_are_text(tmp_path):
    """A caption or prompt that spells `<image>` or `<eos>` is ordinary text: it adds no image placeholder
    and does not end the answer early (the sentencepiece tokenizer of the demo's decoder parses them
    as special tokens unless told not to)."""
    from training.tokenizer_train import train_decoder_tokenizer

    tok = train_decoder_tokenizer(["a red circle on a blue square", *WORDS] * 10, tmp_path / "tok")
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    img, eos = tok.convert_tokens_to_ids("<image>"), tok.eos_token_id
    assert (
        tok("a <eos> b <image>", add_special_tokens=False)["input_ids"].count(eos) == 1
    )  # parsed by default
    b = pixel_builder(tok, max_length=80)
    item = b.build(
        raw("k", 0, json={"prompt": "USER: <image> say <eos> ASSISTANT:", "answer": "a <image> <eos> b"})
    )
    ids = item.input_ids
    assert ids.count(img) == 4  # the prompt's one placeholder, expanded; none from the answer's text
    assert ids.count(eos) == 1 and ids[-1] == eos  # only the answer's own end


def test_special_tokens_a_word_level_vocabulary_holds_are_unknown_words_in_text():
    """The word-level tokenizer of the demo's decoder holds `<image>` and `<eos>` as words of its own
    vocabulary, so it reads them as those tokens even when told not to parse special tokens: written in
    a prompt or an answer they become its unknown word, and the image placeholders and eos come by id."""
    tok = word_tokenizer(WORDS)
    v, unk = tok.get_vocab(), tok.unk_token_id
    img, eos, bos = v["<image>"], v["<eos>"], v["<bos>"]
    b = pixel_builder(tok, max_length=80)
    item = b.build(
        raw("k", 0, json={"prompt": "USER: <eos> <image> <bos> ASSISTANT:", "answer": "a <image> <eos> red"})
    )
    prefix = [bos, v["USER:"], unk, *[img] * 4, unk, v["ASSISTANT:"]]
    assert item.input_ids == [*prefix, v["a"], unk, unk, v["red"], eos]
    assert item.num_prefix == len(prefix)


def test_a_special_token_spelled_in_text_without_an_unknown_token_is_a_skipped_sample():
    """Without an unknown token the text `<eos>` has no reading as text: that sample is skipped and counted
    (not the run's error), and it never becomes an early eos."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from training.data.shards import SkipSample

    words = ["<pad>", "<bos>", "<eos>", "caption", "a", "red", "<image>"]
    inner = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}))
    inner.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=inner,
        pad_token="<pad>",
        bos_token="<bos>",
        eos_token="<eos>",
        additional_special_tokens=["<image>"],
    )
    b = pixel_builder(tok)
    assert b.build(raw("k", 0, txt=b"a red")).input_ids[-3:] == [4, 5, 2]
    with pytest.raises(
        SkipSample, match=r"bad_caption: the text 'a <eos> red' spells the special token\(s\) \['<eos>'\]"
    ):
        b.build(raw("k", 0, txt=b"a <eos> red"))


def test_a_prompt_with_two_image_tokens_is_a_skipped_sample():
    from training.data.shards import SkipSample

    b = pixel_builder(word_tokenizer(WORDS))
    with pytest.raises(SkipSample, match="bad_caption: prompt holds '<image>' more than once"):
        b.build(raw("k", 0, json={"prompt": "<image> and <image>", "answer": "red"}))


def test_eval_names_why_no_held_out_sample_was_usable(tmp_path):
    from training.eval.vlm import read_eval_items

    tok = word_tokenizer(WORDS)
    shard = long_shard(tmp_path)  # 4 samples: their image and prompt take 6 tokens or more
    with pytest.raises(ValueError, match=r"every sample was skipped \(4 too_long\)"):
        read_eval_items(pixel_builder(tok, max_length=5), str(shard), limit=8)
    empty = write_tar(tmp_path / "empty.tar", [])
    with pytest.raises(ValueError, match="the shards hold no samples"):
        read_eval_items(pixel_builder(tok), str(empty), limit=8)


def test_a_newline_piece_listed_among_the_special_tokens_stays_text(tmp_path):
    """The demo's Gemma-layout tokenizer lists its newline piece among the additional special tokens, marked
    not special: it is text (PaliGemma's prompt layout and transformers' processor write it), never the
    unknown token that a special token spelled in text becomes."""
    from connectors.inputs import text_ids
    from training.tokenizer_train import train_decoder_tokenizer

    tok = train_decoder_tokenizer(["a red circle", "a blue square", "a green star"] * 20, tmp_path)
    newline = tok.convert_tokens_to_ids("\n")
    assert newline in tok.all_special_ids and newline != tok.unk_token_id  # the case this test is about
    ids = text_ids(tok, "a red\n")
    assert ids == tok("a red\n", add_special_tokens=False)["input_ids"] and ids[-1] == newline


# ----------------------------------------------------------------------------- tiled image layouts
TILE, PATCH = 32, 8  # a 32 px tower in 8 px patches, one token per patch: 16 tokens per crop
LINEAR = ConnectorConfig("linear", 8, 16)
ANYRES_SIZES = [(24, 60), (64, 40), (90, 90)]  # (height, width): wide, tall, above 2x2 tiles


def anyres_builder(tok, **options) -> VLMBuilder:
    layout = layout_for(LINEAR, TILE, PATCH, "anyres")
    processor = ImageProcessor(image_size=TILE, backend="torchvision")
    return VLMBuilder(
        tok,
        image_token_id=tok.convert_tokens_to_ids("<image>"),
        layout=layout,
        images=PixelImages(processor, layout, patch_size=PATCH),
        caption_prompt="caption",
        **{"max_length": 400, **options},
    )


def noise_png(size, seed) -> bytes:
    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    return png(Image.fromarray(torch.randint(0, 256, (*size, 3), generator=g, dtype=torch.uint8).numpy()))


def transformers_anyres(blob: bytes) -> tuple[int, torch.Tensor]:
    """LlavaNextProcessor's placeholders for one image and its crops ``(crops, 3, 32, 32)``: LLaVA-NeXT 1.6's
    grids of 32 px tiles, torchvision backend."""
    from tests.helpers import anyres_reference as AR
    from vision_tower import load_image

    pins = [[r * TILE, c * TILE] for r, c in ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))]
    reference = AR.llava_next_processor("torchvision", TILE, PATCH, pins)
    out = reference(images=load_image(blob), text=AR.IMAGE, return_tensors="pt")
    count = int((out["input_ids"] == reference.tokenizer.convert_tokens_to_ids(AR.IMAGE)).sum())
    return count, out["pixel_values"][0]


def test_anyres_rows_hold_each_images_tokens_and_the_batch_every_crop_as_llava_next_makes_them(tmp_path):
    tok = word_tokenizer(WORDS)
    v = tok.get_vocab()
    b = anyres_builder(tok)
    blobs = [noise_png(size, i) for i, size in enumerate(ANYRES_SIZES)]
    items = [
        b.build({"__key__": f"k{i}", "__url__": "mem.tar", "png": blob, "txt": b"red"})
        for i, blob in enumerate(blobs)
    ]
    reference = [transformers_anyres(blob) for blob in blobs]
    counts = [count for count, _ in reference]
    assert len(set(counts)) == 3 and min(counts) > 16  # each size its own count, more than one crop's
    for item, count in zip(items, counts, strict=True):
        # the real tokens: placeholders, bos, "caption", then "red" and eos; nothing cut
        assert item.input_ids == [v["<image>"]] * count + [v["<bos>"], v["caption"], v["red"], v["<eos>"]]
        assert not item.truncated
    batch = b.collate(items)
    assert batch["image_sizes"].tolist() == [list(s) for s in ANYRES_SIZES]
    expected = torch.cat([pixels for _, pixels in reference])  # (sum of crops, 3, 32, 32), images in order
    assert batch["pixel_values"].shape == expected.shape and expected.shape[0] > 3
    assert torch.equal(batch["pixel_values"], expected)
    assert model_inputs(batch)["image_sizes"] is batch["image_sizes"]  # the training step passes them on
    # a sample of several images (a JSON source's record): each image its own size and count, in order
    for name, blob in zip(("a.png", "b.png"), blobs):
        (tmp_path / name).write_bytes(blob)
    record = {"images": ["a.png", "b.png"], "prompt": "what colour", "answer": "red"}
    sample = {"__key__": "two", "__url__": "x.jsonl", "__folder__": str(tmp_path), "json": json.dumps(record)}
    two = b.build(sample)
    assert two.image_sizes == ANYRES_SIZES[:2]
    assert two.input_ids.count(v["<image>"]) == counts[0] + counts[1]
    assert torch.equal(two.images, torch.cat([reference[0][1], reference[1][1]]))


def test_samples_over_max_image_tokens_or_max_length_are_skipped_and_counted(tmp_path):
    tok = word_tokenizer(WORDS)
    blobs = [noise_png(size, i) for i, size in enumerate(ANYRES_SIZES)]
    counts = [transformers_anyres(blob)[0] for blob in blobs]
    members = []
    for i, blob in enumerate(blobs):
        members += [(f"k{i}.png", blob), (f"k{i}.txt", b"a red circle")]
    shard = write_tar(tmp_path / "sizes.tar", members)

    def one_pass(b):
        loader = ShardLoader(shard_dataset(shard, b, batch_size=8, **ONE_PASS), num_workers=0)
        return list(loader), loader

    limit = sorted(counts)[1]  # the middle count: one sample takes more
    (batch,), loader = one_pass(anyres_builder(tok, max_image_tokens=limit))
    kept = [f"k{i}" for i, n in enumerate(counts) if n <= limit]
    assert batch["__key__"] == kept and loader.skip_counts == {"too_many_image_tokens": 1}
    assert batch["image_sizes"].tolist() == [list(ANYRES_SIZES[int(k[1])]) for k in kept]
    # data.max_length counts each row's own image tokens: the fewest fit whole (+ bos, "caption", 3 words and
    # eos), the middle count's row is cut on the answer side, the most are skipped (image and prompt too long)
    small, middle, large = sorted(counts)
    (batch,), loader = one_pass(anyres_builder(tok, max_length=middle + 4))
    assert small + 6 <= middle + 4 < large + 2
    assert loader.skip_counts == {"too_long": 1} and loader.truncated_captions == 1
    rows = dict(zip(batch["__key__"], batch["attention_mask"].sum(-1).tolist()))
    assert rows == {f"k{counts.index(small)}": small + 6, f"k{counts.index(middle)}": middle + 4}
