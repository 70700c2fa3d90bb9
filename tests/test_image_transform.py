"""Tests of image loading and the image transform, with a PyTorch reference for parity.

The reference is torchvision's pipeline for PIL images, written out in torch because
torchvision is not a dependency. There `Resize(int)` on a PIL image calls Pillow's resize
with the output size computed below. The centre crop and `Normalize` then run on a float32
tensor.
A second reference resizes the tensor with `F.interpolate(antialias=True)` (torchvision's
tensor path). It does not round the resized pixels to uint8 as Pillow does, so it is
only expected to agree within about one grey level.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from edgemm.errors import ConfigError, InputError
from edgemm.runtime.image import ImageTransform, load_image
from edgemm.runtime.spec import ImageSpec

torch = pytest.importorskip("torch", reason="the parity reference needs torch (the host extra)")

SPEC = ImageSpec(resize=256, crop=224, resample="bilinear", mean=(127.0, 127.0, 127.0), std=(128.0, 128.0, 128.0))
IMAGENET_SPEC = ImageSpec(
    resize=160, crop=144, resample="bicubic", mean=(123.675, 116.28, 103.53), std=(58.395, 57.12, 57.375)
)


def _resized_size(width: int, height: int, size: int) -> tuple[int, int]:
    if width <= height:
        return size, int(size * height / width)
    return int(size * width / height), size


def _crop_and_normalize(tensor, spec: ImageSpec) -> np.ndarray:
    height, width = tensor.shape[1:]
    top = int(round((height - spec.crop) / 2.0))
    left = int(round((width - spec.crop) / 2.0))
    cropped = tensor[:, top : top + spec.crop, left : left + spec.crop]
    mean = torch.tensor(spec.mean, dtype=torch.float32).view(3, 1, 1)
    std = torch.tensor(spec.std, dtype=torch.float32).view(3, 1, 1)
    return ((cropped - mean) / std).numpy()


def _reference_pil(path: Path, spec: ImageSpec) -> np.ndarray:
    resample = {"bilinear": Image.Resampling.BILINEAR, "bicubic": Image.Resampling.BICUBIC}[spec.resample]
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    rgb = rgb.resize(_resized_size(*rgb.size, spec.resize), resample=resample)
    tensor = torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float()
    return _crop_and_normalize(tensor, spec)


def _reference_interpolate(path: Path, spec: ImageSpec) -> np.ndarray:
    with Image.open(path) as image:
        rgb = image.convert("RGB")
    tensor = torch.from_numpy(np.array(rgb)).permute(2, 0, 1).float()[None]
    width, height = _resized_size(rgb.width, rgb.height, spec.resize)
    resized = torch.nn.functional.interpolate(
        tensor, size=(height, width), mode=spec.resample, antialias=True, align_corners=False
    )
    return _crop_and_normalize(resized[0], spec)


def _sample(folder: Path, count: int) -> list[Path]:
    paths = sorted((folder / "images").iterdir())
    step = max(1, len(paths) // count)
    return paths[::step][:count]


def _grayscale(folder: Path) -> list[Path]:
    found = []
    for path in sorted((folder / "images").iterdir()):
        with Image.open(path) as image:
            if image.mode == "L":
                found.append(path)
    return found


def _needs_draft(path: Path, spec: ImageSpec) -> bool:
    with Image.open(path) as image:
        return min(image.size) >= 4 * spec.resize


@pytest.mark.parametrize("spec", [SPEC, IMAGENET_SPEC], ids=["edgemm-default", "imagenet-bicubic"])
def test_parity_with_reference_flickr(flickr_dir, spec):
    transform = ImageTransform(spec, use_draft=False)
    paths = _sample(flickr_dir, 24)
    batch = transform(paths)

    assert batch.shape == (len(paths), 3, spec.crop, spec.crop)
    assert batch.dtype == np.float32
    for row, path in zip(batch, paths):
        np.testing.assert_allclose(row, _reference_pil(path, spec), rtol=0, atol=1e-5, err_msg=str(path))


def test_parity_with_reference_imagenet_with_grayscale(imagenet_dir):
    grey = _grayscale(imagenet_dir)
    assert len(grey) >= 5
    paths = grey + _sample(imagenet_dir, 24)
    exact = ImageTransform(SPEC, use_draft=False)
    drafted = ImageTransform(SPEC)

    for path in paths:
        expected = _reference_pil(path, SPEC)
        np.testing.assert_allclose(exact.transform_one(path), expected, rtol=0, atol=1e-5, err_msg=str(path))
        if not _needs_draft(path, SPEC):
            np.testing.assert_allclose(drafted.transform_one(path), expected, rtol=0, atol=1e-5, err_msg=str(path))


def test_close_to_tensor_interpolate_reference(imagenet_dir):
    transform = ImageTransform(SPEC, use_draft=False)
    one_grey_level = 1.0 / min(SPEC.std)

    for path in _sample(imagenet_dir, 12):
        difference = np.abs(transform.transform_one(path) - _reference_interpolate(path, SPEC))
        assert difference.max() <= 1.05 * one_grey_level, path
        assert difference.mean() <= 0.5 * one_grey_level, path


def test_draft_only_for_large_jpegs(imagenet_dir):
    large = [path for path in sorted((imagenet_dir / "images").iterdir()) if _needs_draft(path, SPEC)]
    assert large, "expected some ImageNet samples with a shorter side of 1024 px or more"
    exact = ImageTransform(SPEC, use_draft=False)
    drafted = ImageTransform(SPEC)

    for path in large:
        with Image.open(path) as image:
            full_size = image.size
        decoded = load_image(path, min_shorter_side=SPEC.resize)
        assert decoded.size[0] < full_size[0]
        assert min(decoded.size) >= 2 * SPEC.resize
        difference = np.abs(drafted.transform_one(path) - exact.transform_one(path))
        assert difference.mean() < 0.02, path


def test_draft_skipped_for_small_image(tmp_path):
    path = tmp_path / "small.jpg"
    Image.new("RGB", (1000, 800), (10, 20, 30)).save(path)

    assert load_image(path, min_shorter_side=256).size == (1000, 800)
    assert load_image(path, min_shorter_side=200).size == (500, 400)
    assert load_image(path, min_shorter_side=100).size == (250, 200)


def _rgba_with_transparent_corner() -> Image.Image:
    image = Image.new("RGBA", (8, 6), (200, 10, 10, 255))
    image.putpixel((0, 0), (0, 0, 0, 0))
    return image


def _mode_cases() -> dict[str, tuple[Image.Image, tuple[int, int, int]]]:
    """Images of every mode, each with the RGB value expected at pixel (1, 1)."""
    palette = Image.new("P", (8, 6), 1)
    palette.putpalette([0, 0, 0, 30, 60, 90] + [0] * 762)
    transparent_palette = palette.copy()
    transparent_palette.info["transparency"] = 1
    cmyk = Image.new("CMYK", (8, 6), (0, 255, 255, 0))
    sixteen = Image.fromarray(np.full((6, 8), 32896, dtype=np.uint16))
    return {
        "L": (Image.new("L", (8, 6), 77), (77, 77, 77)),
        "1": (Image.new("1", (8, 6), 1), (255, 255, 255)),
        "LA": (Image.new("LA", (8, 6), (40, 0)), (255, 255, 255)),
        "P": (palette, (30, 60, 90)),
        "P with transparency": (transparent_palette, (255, 255, 255)),
        "PA": (Image.new("PA", (8, 6), (1, 255)), (0, 0, 0)),
        "RGBA": (_rgba_with_transparent_corner(), (200, 10, 10)),
        "CMYK": (cmyk, (255, 0, 0)),
        "I;16": (sixteen, (128, 128, 128)),
        "I": (Image.new("I", (8, 6), 65535), (255, 255, 255)),
        "F 0-1": (Image.new("F", (8, 6), 0.5), (128, 128, 128)),
        "F 0-255": (Image.new("F", (8, 6), 100.0), (100, 100, 100)),
    }


@pytest.mark.parametrize("mode", list(_mode_cases()))
def test_any_mode_converts_to_rgb(mode):
    image, expected = _mode_cases()[mode]
    rgb = load_image(image)

    assert rgb.mode == "RGB"
    assert rgb.size == (8, 6)
    assert rgb.getpixel((1, 1)) == expected


def test_transparent_pixels_become_white():
    rgb = load_image(_rgba_with_transparent_corner())

    assert rgb.getpixel((0, 0)) == (255, 255, 255)
    assert rgb.getpixel((1, 0)) == (200, 10, 10)


def test_sixteen_bit_png_file_scaled(tmp_path):
    path = tmp_path / "depth.png"
    values = np.array([[0, 257, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(path)

    rgb = load_image(path)
    assert [rgb.getpixel((x, 0))[0] for x in range(3)] == [0, 1, 255]


def test_sources_path_bytes_pil_array_agree(tmp_path):
    pixels = np.random.default_rng(0).integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    path = tmp_path / "noise.png"
    Image.fromarray(pixels).save(path)

    for source in (path, str(path), path.read_bytes(), Image.open(path), pixels):
        np.testing.assert_array_equal(np.asarray(load_image(source)), pixels)


# The 4-channel case has alpha 90: 90 * 90/255 + 255 * (1 - 90/255) = 197 on white.
@pytest.mark.parametrize("shape, expected", [((20, 30), 90), ((20, 30, 1), 90), ((20, 30, 4), 197)])
def test_array_grey_and_alpha(shape, expected):
    array = np.full(shape, 90, dtype=np.uint8)
    rgb = load_image(array)

    assert rgb.size == (30, 20)
    assert rgb.getpixel((0, 0)) == (expected, expected, expected)


@pytest.mark.parametrize(
    "array, message",
    [
        (np.zeros((4, 4, 3), dtype=np.float32), "must be uint8, got float32"),
        (np.zeros((3, 4, 4, 2), dtype=np.uint8), "shape (3, 4, 4, 2)"),
        (np.zeros((4, 4, 2), dtype=np.uint8), "shape (4, 4, 2)"),
    ],
)
def test_invalid_arrays_rejected(array, message):
    with pytest.raises(InputError) as caught:
        load_image(array)
    assert message in str(caught.value)


def test_exif_orientation_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    image = Image.new("RGB", (40, 20), (255, 0, 0))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    image.save(path, exif=exif)

    assert load_image(path).size == (20, 40)


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match="Image file .*absent.jpg not found"):
        load_image(tmp_path / "absent.jpg")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.jpg"
    path.write_bytes(b"")

    with pytest.raises(InputError, match=r"empty.jpg is empty \(0 bytes\)"):
        load_image(path)
    with pytest.raises(InputError, match="bytes are empty"):
        load_image(b"")


def test_not_an_image(tmp_path):
    path = tmp_path / "notes.jpg"
    path.write_text("this is text, not a JPEG")

    with pytest.raises(InputError, match="notes.jpg is not an image file"):
        load_image(path)


def test_truncated_jpeg(tmp_path):
    buffer = io.BytesIO()
    noise = np.random.default_rng(1).integers(0, 256, size=(200, 200, 3), dtype=np.uint8)
    Image.fromarray(noise).save(buffer, format="JPEG")
    path = tmp_path / "cut.jpg"
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])

    with pytest.raises(InputError, match="cut.jpg could not be decoded.*truncated"):
        load_image(path)


def test_huge_image_rejected_from_header(tmp_path):
    path = tmp_path / "huge.png"
    Image.new("1", (20_000, 20_000)).save(path, optimize=True)
    assert path.stat().st_size < 200_000
    limit_before = Image.MAX_IMAGE_PIXELS

    with pytest.raises(InputError, match="huge.png is too large.*400000000 pixels"):
        load_image(path)
    assert Image.MAX_IMAGE_PIXELS == limit_before


def test_pixel_limit_is_ours_and_settable(tmp_path):
    path = tmp_path / "wide.png"
    Image.new("1", (12_000, 9_000)).save(path, optimize=True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with pytest.raises(InputError, match="12000 x 9000 = 108,000,000 pixels, above the limit of 100,000,000"):
            load_image(path)
    small = tmp_path / "small.png"
    Image.new("RGB", (40, 30)).save(small)
    with pytest.raises(InputError, match="above the limit of 1,000"):
        load_image(small, max_pixels=1000)
    assert load_image(small, max_pixels=None).size == (40, 30)


def test_batch_error_names_position(tmp_path):
    good = tmp_path / "good.png"
    Image.new("RGB", (300, 300)).save(good)
    transform = ImageTransform(SPEC)

    with pytest.raises(InputError, match="position 1 of the batch: Image file .*bad.png not found"):
        transform([good, tmp_path / "bad.png"])
    with pytest.raises(InputError, match="batch of images is empty"):
        transform([])


def test_small_and_extreme_aspect_images():
    transform = ImageTransform(SPEC)

    assert transform(np.zeros((10, 10, 3), dtype=np.uint8)).shape == (1, 3, 224, 224)
    assert transform(np.zeros((5, 2000, 3), dtype=np.uint8)).shape == (1, 3, 224, 224)
    assert transform(np.zeros((2, 5, 10, 3), dtype=np.uint8)).shape == (2, 3, 224, 224)


@pytest.mark.parametrize(
    "spec, message",
    [
        (ImageSpec(resample="magic"), "resample 'magic'"),
        (ImageSpec(resize=100, crop=224), "crop 224 is larger than resize 100"),
        (ImageSpec(std=(1.0, 0.0, 1.0)), "contains 0"),
        (ImageSpec(layout="NHWC"), "layout NHWC"),
    ],
)
def test_invalid_spec_rejected(spec, message):
    with pytest.raises(ConfigError, match=message):
        ImageTransform(spec)
