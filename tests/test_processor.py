"""ImageProcessor parity with transformers' SiglipImageProcessor (both backends), and safe image loading."""

from __future__ import annotations

import dataclasses
import io
import json
import struct
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.helpers.photos import make_photo, shipped_photo
from vision_tower import images as images_module
from vision_tower.images import ImageLoadError, load_image, to_rgb
from vision_tower.processor import ImageProcessor

transformers = pytest.importorskip("transformers")
SiglipImageProcessorPil = getattr(transformers, "SiglipImageProcessorPil", None)

EXACT = 0.0  # both backends are matched bit for bit
BACKENDS = ["pil", "torchvision"]


SIZES = [(333, 517), (224, 224), (17, 1031), (1000, 751), (31, 40), (480, 640)]


def reference_class(backend: str):
    """transformers' processor of ``backend``: SiglipImageProcessorPil, or the torchvision
    SiglipImageProcessor."""
    if backend == "pil":
        if SiglipImageProcessorPil is None:
            pytest.skip("this transformers has no SiglipImageProcessorPil")
        return SiglipImageProcessorPil
    pytest.importorskip("torchvision")
    if getattr(transformers.SiglipImageProcessor, "backend", None) is None:
        pytest.skip("this transformers has no torchvision-backend SiglipImageProcessor")
    return transformers.SiglipImageProcessor


@pytest.fixture(params=BACKENDS)
def backend(request) -> str:
    return request.param


@pytest.fixture
def reference(backend):
    return reference_class(backend)()


def _ref(processor, images, **kwargs) -> torch.Tensor:
    return processor(images, return_tensors="pt", **kwargs)["pixel_values"]


def _max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


@pytest.mark.parametrize("size", SIZES, ids=[f"{h}x{w}" for h, w in SIZES])
def test_photos_equal_reference(backend, reference, size):
    photo = make_photo(*size, seed=sum(size))
    ours = ImageProcessor(backend=backend)(photo)
    assert ours.shape == (1, 3, 224, 224) and ours.dtype == torch.float32
    assert _max_diff(ours, _ref(reference, photo)) <= EXACT


@pytest.mark.parametrize("image_size", [224, 384])
def test_real_photograph_equals_reference(backend, image_size):
    path = shipped_photo()
    if path is None:
        pytest.skip("needs matplotlib's sample photograph")
    reference = reference_class(backend)(size={"height": image_size, "width": image_size})
    photo = Image.open(path)
    variants = [photo, photo.convert("L"), _in_mode(photo, "RGBA"), photo.convert("CMYK")]
    ours = ImageProcessor(image_size=image_size, backend=backend)(variants)
    expected = torch.cat([_ref(reference, v) for v in variants])
    assert _max_diff(ours, expected) <= EXACT
    # a file path: transformers' torchvision backend decodes it with torchvision.io, we with Pillow
    assert (
        _max_diff(
            ImageProcessor(image_size=image_size, backend=backend)(str(path)), _ref(reference, str(path))
        )
        <= EXACT
    )


@pytest.mark.parametrize("image_size", [384, 448, (256, 320)])
def test_other_resolutions_equal_reference(backend, image_size):
    height, width = (image_size, image_size) if isinstance(image_size, int) else image_size
    reference = reference_class(backend)(size={"height": height, "width": width})
    photos = [make_photo(333, 517, seed=1), make_photo(600, 401, seed=2, quality=None)]
    ours = ImageProcessor(image_size=image_size, backend=backend)(photos)
    assert ours.shape == (2, 3, height, width)
    assert _max_diff(ours, _ref(reference, photos)) <= EXACT


def test_the_two_backends_differ_and_the_default_is_what_auto_image_processor_gives(tmp_path):
    """transformers 5's default resizes with torchvision, not Pillow: 1-2 levels apart on a few pixels.
    ImageProcessor() follows AutoImageProcessor of the installed transformers, bit for bit."""
    photos = [make_photo(h, w, seed=h) for h, w in SIZES]
    pil = torch.cat([ImageProcessor(backend="pil")(p) for p in photos])
    tv = torch.cat([ImageProcessor(backend="torchvision")(p) for p in photos])
    diff = (pil - tv).abs()
    assert 2 / 255 - 1e-6 < diff.max().item() <= 4 / 255 + 1e-6  # one or two 8-bit levels
    assert (diff > 1e-6).double().mean().item() < 0.01  # on few values (the rest: float rounding, ~3e-8)
    ImageProcessor().save_pretrained(tmp_path)
    auto = transformers.AutoImageProcessor.from_pretrained(tmp_path)
    ours = ImageProcessor.from_pretrained(tmp_path)
    assert ours.backend == getattr(auto, "backend", "pil") == ImageProcessor().backend
    assert _max_diff(torch.cat([ours(p) for p in photos]), torch.cat([_ref(auto, p) for p in photos])) == 0
    pil_auto = transformers.AutoImageProcessor.from_pretrained(tmp_path, backend="pil")
    assert _max_diff(pil, torch.cat([_ref(pil_auto, p) for p in photos])) == 0


def test_torch_float_resize_path_equals_torchvision_without_avx2(monkeypatch):
    """On CPUs without AVX2, torchvision resizes bilinear in float32 and rounds; so do we."""
    pytest.importorskip("torchvision")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "DEFAULT")
    monkeypatch.setattr("platform.machine", lambda: "x86_64")
    reference = reference_class("torchvision")(resample=2)
    photos = [make_photo(333, 517, seed=5), make_photo(17, 1031, seed=6)]
    ours = ImageProcessor(resample="bilinear", backend="torchvision")(photos)
    assert _max_diff(ours, _ref(reference, photos)) == 0


MODES = ["RGB", "RGBA", "LA", "L", "1", "P", "P+transparency", "PA", "CMYK", "YCbCr", "I", "F", "RGBX", "LAB"]


def _in_mode(photo: Image.Image, mode: str) -> Image.Image:
    if mode in ("RGBA", "LA", "PA"):
        rgba = photo.convert("RGBA")
        alpha = np.tile(np.linspace(0, 255, photo.size[0]).astype(np.uint8), (photo.size[1], 1))
        rgba.putalpha(Image.fromarray(alpha))
        return rgba.convert(mode) if mode != "PA" else rgba.convert("P").convert("PA")
    if mode == "P+transparency":
        palette = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=64)
        palette.info["transparency"] = 3
        return palette
    if mode in ("I", "F"):
        return photo.convert("L").convert(mode)
    return photo.convert(mode)


@pytest.mark.parametrize("mode", MODES)
def test_modes_equal_reference(backend, reference, mode):
    image = _in_mode(make_photo(123, 201, seed=7), mode)
    ours = ImageProcessor(backend=backend)(image)
    assert _max_diff(ours, _ref(reference, image)) <= EXACT


def test_alpha_is_composited_onto_white():
    clear = Image.new("RGBA", (8, 8), (10, 200, 30, 0))
    assert np.asarray(to_rgb(clear)).min() == 255
    assert np.asarray(load_image(clear)).min() == 255


def test_sixteen_bit_gray_is_scaled_not_clipped():
    """Deliberate difference: transformers (Pillow's convert) clips I;16 at 255, nearly all white."""
    ramp = np.linspace(0, 65535, 64 * 48).reshape(48, 64).astype(np.uint16)
    wide = Image.fromarray(ramp)
    assert wide.mode == "I;16"
    eight = Image.fromarray(np.round(ramp / 257.0).astype(np.uint8), mode="L")
    np.testing.assert_array_equal(np.asarray(to_rgb(wide)), np.asarray(eight.convert("RGB")))
    torch.testing.assert_close(ImageProcessor()(wide), ImageProcessor()(eight), rtol=0, atol=0)
    buffer = io.BytesIO()
    wide.save(buffer, "PNG")
    assert np.asarray(load_image(buffer.getvalue())).mean() == pytest.approx(
        np.asarray(eight).mean(), abs=0.5
    )


def test_premultiplied_la_mode_is_accepted():
    image = Image.new("LA", (10, 6), (90, 128)).convert("La")
    assert load_image(image).mode == "RGB"


def test_inputs_paths_bytes_arrays_tensors(backend, reference, tmp_path):
    photo = make_photo(333, 517, seed=3)
    path = tmp_path / "photo.png"
    photo.save(path)
    array = np.array(photo.convert("RGB"))  # (H, W, 3) uint8, writable
    inputs = [photo, str(path), path, path.read_bytes(), array, torch.from_numpy(array).permute(2, 0, 1)]
    out = ImageProcessor(backend=backend)(inputs)
    assert out.shape == (len(inputs), 3, 224, 224)
    expected = _ref(reference, photo)
    for row in out:
        assert _max_diff(row[None], expected) <= EXACT
    assert _max_diff(ImageProcessor(backend=backend)(str(path)), _ref(reference, str(path))) <= EXACT


def test_arrays_with_one_and_four_channels_equal_reference(backend, reference):
    """Each backend composites alpha of arrays its own way (float64 rounded / float32 truncated)."""
    rgba = np.array(_in_mode(make_photo(90, 150, seed=5), "RGBA"))  # (H, W, 4), writable
    gray = np.asarray(make_photo(90, 150, seed=6).convert("L"))  # (H, W)
    processor = ImageProcessor(backend=backend)
    for array in (rgba, gray[:, :, None]):
        ours = processor(array)
        assert _max_diff(ours, _ref(reference, array, input_data_format="channels_last")) <= EXACT
    torch.testing.assert_close(processor(gray), processor(gray[:, :, None]), rtol=0, atol=0)
    chw = torch.from_numpy(rgba).permute(2, 0, 1)  # (4, H, W)
    torch.testing.assert_close(processor(chw), processor(rgba), rtol=0, atol=0)


def test_exif_orientation_follows_transformers(backend, reference, tmp_path):
    photo = make_photo(120, 200, seed=9, quality=None)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = tmp_path / "rotated.jpg"
    photo.save(path, "JPEG", quality=92, exif=exif.tobytes())
    by_path = ImageProcessor(backend=backend)(str(path))  # files: orientation applied, as transformers
    assert _max_diff(by_path, _ref(reference, str(path))) <= EXACT
    opened = Image.open(path)  # in-memory images: left as they are, as transformers' processors
    assert _max_diff(ImageProcessor(backend=backend)(opened), _ref(reference, opened)) <= EXACT
    assert load_image(path).size == (120, 200)
    assert load_image(path, exif_transpose=False).size == (200, 120)


def test_input_errors():
    with pytest.raises(TypeError, match="must be uint8"):
        ImageProcessor()(np.zeros((8, 8, 3), dtype=np.float32))
    with pytest.raises(TypeError, match="must be uint8"):
        ImageProcessor()(torch.zeros(3, 8, 8))
    with pytest.raises(ValueError, match=r"\(H, W, C\) with C in 1, 3, 4"):
        ImageProcessor()(np.zeros((8, 8, 2), dtype=np.uint8))
    with pytest.raises(TypeError, match="unsupported image type int"):
        ImageProcessor()(3)
    with pytest.raises(ValueError, match="no images"):
        ImageProcessor()([])
    with pytest.raises(ValueError, match="different sizes"):
        ImageProcessor(do_resize=False)([make_photo(10, 12), make_photo(12, 10)])
    with pytest.raises(ValueError, match="unknown resample 'cubic'"):
        ImageProcessor(resample="cubic")
    with pytest.raises(ValueError, match="mean needs 3 values"):
        ImageProcessor(mean=(0.5, 0.5))


# ---------------------------------------------------------------------------- config files
def test_save_pretrained_loads_in_transformers(tmp_path):
    ours = ImageProcessor(
        image_size=(256, 320), mean=(0.48, 0.46, 0.41), std=(0.27, 0.26, 0.28), resample="bilinear"
    )
    ours.save_pretrained(tmp_path)
    photo = make_photo(333, 517, seed=11)
    classes = [transformers.SiglipImageProcessor, transformers.AutoImageProcessor]
    classes += [SiglipImageProcessorPil] if SiglipImageProcessorPil else []
    for cls in classes:
        loaded = cls.from_pretrained(tmp_path)
        assert (loaded.size["height"], loaded.size["width"]) == (256, 320)
        assert tuple(loaded.image_mean) == ours.mean and tuple(loaded.image_std) == ours.std
        assert int(loaded.resample) == 2 and loaded.rescale_factor == ours.rescale_factor
        assert loaded.do_resize and loaded.do_rescale and loaded.do_normalize and loaded.do_convert_rgb
    if SiglipImageProcessorPil:
        expected = _ref(SiglipImageProcessorPil.from_pretrained(tmp_path), photo)
        assert _max_diff(dataclasses.replace(ours, backend="pil")(photo), expected) <= EXACT
    assert ImageProcessor.from_pretrained(tmp_path) == ours


def test_from_transformers_saved_config(tmp_path):
    transformers.SiglipImageProcessor(size={"height": 384, "width": 384}).save_pretrained(tmp_path)
    loaded = ImageProcessor.from_pretrained(tmp_path)
    assert loaded == ImageProcessor(image_size=384)
    assert ImageProcessor.from_pretrained(tmp_path / "preprocessor_config.json") == loaded
    assert ImageProcessor.from_pretrained(tmp_path, image_size=448).size == (448, 448)
    assert loaded.with_image_size(448) == ImageProcessor(image_size=448)


def test_from_hub_style_config(tmp_path):
    """As in google/siglip-* repos: processor_class and image_processor_type, no do_convert_rgb."""
    config = {
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5, 0.5, 0.5],
        "image_processor_type": "SiglipImageProcessor",
        "image_std": [0.5, 0.5, 0.5],
        "processor_class": "SiglipProcessor",
        "resample": 3,
        "rescale_factor": 0.00392156862745098,
        "size": {"height": 224, "width": 224},
    }
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    assert ImageProcessor.from_pretrained(tmp_path) == ImageProcessor()


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"size": {"shortest_edge": 224}}, "not a fixed"),
        ({"do_center_crop": True, "crop_size": {"height": 224, "width": 224}}, "do_center_crop"),
        ({"image_processor_type": "Siglip2ImageProcessor", "max_num_patches": 256}, "NaFlex"),
    ],
)
def test_unsupported_configs_are_refused(tmp_path, change, message):
    config = {**ImageProcessor().to_dict(), **change}
    config["size"] = change.get("size", config["size"])
    (tmp_path / "preprocessor_config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message):
        ImageProcessor.from_pretrained(tmp_path)


def test_hub_repo_id_from_offline_cache(tmp_path, monkeypatch):
    import huggingface_hub.constants

    repo = tmp_path / "models--org--tiny-siglip"
    ImageProcessor(image_size=384).save_pretrained(repo / "snapshots" / ("0" * 40))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    assert ImageProcessor.from_pretrained("org/tiny-siglip", cache_dir=tmp_path).size == (384, 384)


def test_from_pretrained_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no preprocessor_config.json"):
        ImageProcessor.from_pretrained(tmp_path)
    ImageProcessor().save_pretrained(tmp_path)
    with pytest.raises(TypeError, match="unknown ImageProcessor option"):
        ImageProcessor.from_pretrained(tmp_path, imagesize=448)


# ---------------------------------------------------------------------------- safe loading
def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width x height`` pixels, with almost no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\0"))
        + chunk(b"IEND", b"")
    )


def _no_warnings(func, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            func(*args, **kwargs)
        finally:
            assert not caught, [str(w.message) for w in caught]


@pytest.mark.parametrize("side", [10_000, 100_000])  # 1e8 pixels: Pillow would only warn; 1e10: Pillow errors
def test_decompression_bomb_header_is_an_error(tmp_path, side):
    path = tmp_path / "bomb.png"
    path.write_bytes(_png_header(side, side))
    with pytest.raises(ImageLoadError, match="decompression bomb") as info:
        _no_warnings(load_image, path)
    assert str(path) in str(info.value) and info.value.source == repr(str(path))
    with pytest.raises(ImageLoadError, match="decompression bomb"):
        _no_warnings(ImageProcessor(), str(path))


def test_pixel_limit_is_configurable(tmp_path, monkeypatch):
    photo = make_photo(100, 150, seed=1)
    path = tmp_path / "photo.png"
    photo.save(path)
    with pytest.raises(ImageLoadError, match="150x100 = 15000 pixels exceeds the limit of 10000"):
        load_image(path, max_pixels=10_000)
    with pytest.raises(ImageLoadError, match="exceeds the limit"):
        ImageProcessor(max_pixels=10_000)([photo])
    with pytest.raises(ImageLoadError, match="exceeds the limit"):
        ImageProcessor(max_pixels=10_000)(np.asarray(photo))
    monkeypatch.setattr(images_module, "MAX_IMAGE_PIXELS", 10_000)
    with pytest.raises(ImageLoadError, match="exceeds the limit of 10000"):
        load_image(path)
    assert load_image(path, max_pixels=None).size == (150, 100)


def test_truncated_and_garbage_files(tmp_path):
    buffer = io.BytesIO()
    make_photo(200, 300, seed=2, quality=None).save(buffer, "JPEG", quality=90)
    truncated = tmp_path / "truncated.jpg"
    truncated.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match="truncated") as info:
        load_image(truncated)
    assert "truncated.jpg" in str(info.value)
    garbage = tmp_path / "garbage.jpg"
    garbage.write_bytes(b"this is not an image" * 10)
    with pytest.raises(ImageLoadError, match="garbage.jpg.*not a recognised image format"):
        ImageProcessor()([str(garbage)])
    with pytest.raises(ImageLoadError, match="not a recognised image format"):
        load_image(b"\x00" * 64)
    with pytest.raises(ImageLoadError, match="no such file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageLoadError, match="not a regular file"):
        load_image(tmp_path)
    with pytest.raises(ImageLoadError, match="URLs are not fetched"):
        load_image("https://example.com/cat.jpg")
    assert issubclass(ImageLoadError, ValueError)


def test_load_image_sources(tmp_path):
    photo = make_photo(40, 60, seed=4)
    path = tmp_path / "photo.webp"
    photo.save(path, "WEBP", lossless=True)
    expected = np.asarray(photo.convert("RGB"))
    for source in (path, str(path), path.read_bytes(), io.BytesIO(path.read_bytes()), Image.open(path)):
        loaded = load_image(source)
        assert loaded.mode == "RGB" and loaded.size == (60, 40)
        np.testing.assert_array_equal(np.asarray(loaded), expected)


def test_multi_frame_gif_uses_first_frame(tmp_path):
    frames = [Image.new("P", (16, 16), i * 40) for i in range(3)]
    path = Path(tmp_path) / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    assert load_image(path).mode == "RGB"
    assert ImageProcessor()(str(path)).shape == (1, 3, 224, 224)
