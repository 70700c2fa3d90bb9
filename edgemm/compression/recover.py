"""Recover a pruned model's accuracy by knowledge distillation from the unpruned model.

The student (pruned) learns to reproduce the teacher (unpruned) on image-text pairs:

- fusion classifiers: KL divergence between temperature-softened logits, scaled by T^2;
- dual encoder: 1 - cosine similarity between student and teacher embeddings, text and image;
- both: relational feature distillation on the towers' pooled outputs, i.e. the MSE between the
  student's and the teacher's batch cosine-similarity matrices. It needs no projection layer,
  because pruned and unpruned pooled widths differ;
- plus the task loss where labels exist: cross-entropy on match/mismatch pairs built by
  `edgemm.data.matching.make_matching_pairs`, or InfoNCE over the batch for the dual encoder.

Recovery runs in one process or under `torchrun` (DDP on the gloo backend): each rank trains on
its shard of every epoch and gradients are averaged. Only rank 0 returns a result; other ranks
return None.
"""

from __future__ import annotations

import copy
import functools
import logging
import time
from dataclasses import asdict, dataclass, field, fields
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, DistributedSampler

from edgemm.compression.profile import profile_model
from edgemm.compression.prune import (
    PruneConfig,
    PruneResult,
    PruningSession,
    _heads_by_part,
    _model_inputs,
    _output_shapes,
    finish_pruning,
    info_nce_loss,
)
from edgemm.data.matching import make_matching_pairs
from edgemm.data.records import Record
from edgemm.errors import ConfigError, DataError
from edgemm.training.distributed import DistributedContext, init_distributed
from edgemm.training.modeling import logit_scale_of

logger = logging.getLogger(__name__)

ProgressCallback = Callable[[str, int, int], None]


@dataclass
class RecoverConfig:
    """Settings of one recovery (distillation) run.

    `steps` (optimizer steps) wins over `epochs` when set. The loss is
    `alpha * distillation + (1 - alpha) * task + feature_weight * feature distillation`;
    `temperature` softens the logits of fusion classifiers. `freeze_batchnorm` keeps the image
    tower's BatchNorm statistics fixed, which small recovery batches would otherwise disturb.
    `match_index` is the logit index of the "match" class. `eval_pairs` pairs (taken from the
    records in order) measure the losses and the task metric before and after recovery.

    `pairing` decides what a fusion classifier trains on. "pairs" (the default) trains on the
    labelled match/mismatch pairs of `make_matching_pairs`. "matrix" takes one caption per
    image and scores every text of a batch with every image of it. A batch of B images then
    gives B * B distilled pairs for the cost of B tower passes. With five captions per image
    that is about 10x less tower work per epoch, which real towers on a CPU need. Dual encoders
    always contrast in-batch pairs, and with "matrix" they also take one caption per image.
    `frozen_parts` names submodules (e.g. "image_tower") that stay fixed:
    a tower that was not pruned needs no recovery, and freezing it skips its backward pass.
    """

    steps: int | None = None
    epochs: int = 1
    lr: float = 1e-4
    weight_decay: float = 0.01
    batch_size: int = 16
    temperature: float = 2.0
    alpha: float = 0.5
    feature_weight: float = 1.0
    freeze_batchnorm: bool = True
    max_grad_norm: float = 1.0
    negatives_per_positive: int = 1
    hard_negative_fraction: float = 0.5
    match_index: int = 1
    eval_pairs: int = 64
    seed: int = 0
    pairing: str = "pairs"
    frozen_parts: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ConfigError naming the first invalid field and its fix."""
        if self.steps is not None:
            _require(isinstance(self.steps, int) and self.steps >= 1, "steps", self.steps, "Use a positive number of optimizer steps, or None to train for `epochs`.")
        _require(isinstance(self.epochs, int) and self.epochs >= 1, "epochs", self.epochs, "Use at least 1 epoch.")
        _require(self.lr > 0, "lr", self.lr, "Use a positive learning rate such as 1e-4.")
        _require(self.weight_decay >= 0, "weight_decay", self.weight_decay, "Use 0 or a small value such as 0.01.")
        _require(isinstance(self.batch_size, int) and self.batch_size >= 2, "batch_size", self.batch_size, "Use at least 2: InfoNCE and the similarity matrices need other pairs in the batch.")
        _require(self.temperature > 0, "temperature", self.temperature, "Use a positive temperature such as 2.0.")
        _require(0.0 <= self.alpha <= 1.0, "alpha", self.alpha, "Use a weight between 0 (task loss only) and 1 (distillation only).")
        _require(self.feature_weight >= 0, "feature_weight", self.feature_weight, "Use 0 to turn feature distillation off, or a positive weight.")
        _require(self.max_grad_norm > 0, "max_grad_norm", self.max_grad_norm, "Use a positive gradient norm limit such as 1.0.")
        _require(self.pairing in PAIRINGS, "pairing", self.pairing, f"Use one of {list(PAIRINGS)}.")
        self.frozen_parts = tuple(self.frozen_parts)
        _require(self.negatives_per_positive >= 1, "negatives_per_positive", self.negatives_per_positive, "Use at least 1.")
        _require(self.eval_pairs >= 2, "eval_pairs", self.eval_pairs, "Use at least 2 pairs to measure recovery.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "RecoverConfig":
        known = {item.name for item in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"Unknown recover options: {unknown}.", f"Valid options are {sorted(known)}.")
        return cls(**dict(data))

    @classmethod
    def from_recipe(cls, section: Mapping[str, Any]) -> "RecoverConfig":
        """Build the config from a recipe's `[recover]` section (its `enabled` switch is left out)."""
        return cls.from_dict({key: value for key, value in section.items() if key != "enabled"})


def _require(condition: bool, name: str, value: Any, hint: str) -> None:
    if not condition:
        raise ConfigError(f"Recover option {name}={value!r} is invalid.", hint)


@dataclass
class RecoverResult:
    """The recovered student and its losses and task metric before and after recovery.

    `before` and `after` hold `distillation`, `feature` and `task` losses and `accuracy`
    (match/mismatch accuracy of a fusion classifier, in-batch text-to-image top-1 accuracy of a
    dual encoder), measured on the same evaluation pairs.
    """

    model: nn.Module
    steps: int
    before: dict[str, float]
    after: dict[str, float]
    history: list[dict[str, float]] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "before": dict(self.before),
            "after": dict(self.after),
            "history": list(self.history),
            "seconds": round(self.seconds, 3),
        }


PAIRINGS = ("matrix", "pairs")


def is_dual_encoder(model: nn.Module) -> bool:
    return getattr(model, "architecture", "") == "dual_encoder"


def _pool_text(features: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Return [B, H] text features; token features [B, L, H] are averaged over unmasked tokens."""
    if features.dim() == 2:
        return features
    weights = attention_mask.unsqueeze(-1).to(features.dtype)
    return (features * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)


def _pool_image(features: torch.Tensor) -> torch.Tensor:
    """Return [B, C] image features; feature-map tokens [B, N, C] are averaged."""
    return features if features.dim() == 2 else features.mean(dim=1)


def _tower_features(model: nn.Module, input_ids, attention_mask, pixel_values, image_feats=None):
    """Run both towers, or only the text tower when a frozen image tower's features are given."""
    text_feats = model.text_features(input_ids, attention_mask)
    if image_feats is None:
        image_feats = model.image_features(pixel_values)
    return text_feats, image_feats


class _StudentStep(nn.Module):
    """One forward pass of a model through its three steps, so DDP can wrap it as one module.

    Returns the model output, the pooled text and image features and, for a dual encoder,
    exp(logit_scale), so every gradient flows through the wrapped module. `image_feats`, when
    given, are the precomputed features of a frozen image tower.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor, image_feats=None):
        text_feats, image_feats = _tower_features(self.model, input_ids, attention_mask, pixel_values, image_feats)
        output = self.model.head(text_feats, attention_mask, image_feats)
        pooled_text = _pool_text(text_feats, attention_mask)
        pooled_image = _pool_image(image_feats)
        scale = logit_scale_of(self.model) if is_dual_encoder(self.model) else None
        return output, pooled_text, pooled_image, scale


def _similarity_matrix(features: torch.Tensor) -> torch.Tensor:
    normalized = F.normalize(features.float(), dim=-1)
    return normalized @ normalized.T


def _feature_loss(text, image, teacher_text, teacher_image) -> torch.Tensor:
    """Compare batch similarity matrices, which needs no projection when pruned widths differ."""
    text_loss = F.mse_loss(_similarity_matrix(text), _similarity_matrix(teacher_text))
    image_loss = F.mse_loss(_similarity_matrix(image), _similarity_matrix(teacher_image))
    return text_loss + image_loss


def _logit_distillation(output: torch.Tensor, teacher_output: torch.Tensor, temperature: float) -> torch.Tensor:
    """Return the KL divergence of temperature-softened logits, scaled by temperature**2."""
    divergence = F.kl_div(
        F.log_softmax(output / temperature, dim=-1),
        F.log_softmax(teacher_output / temperature, dim=-1),
        log_target=True,
        reduction="batchmean",
    )
    return divergence * temperature**2


def _losses(
    student: tuple,
    teacher: tuple,
    batch: Mapping[str, torch.Tensor],
    config: RecoverConfig,
    dual: bool,
) -> dict[str, torch.Tensor]:
    """Return the distillation, feature and task losses of one batch (each a scalar tensor)."""
    output, text, image, scale = student
    teacher_output, teacher_text, teacher_image, _ = teacher

    feature = _feature_loss(text, image, teacher_text, teacher_image)
    if dual:
        text_embeds, image_embeds = output
        teacher_text_embeds, teacher_image_embeds = teacher_output
        distillation = (1 - F.cosine_similarity(text_embeds, teacher_text_embeds, dim=-1)).mean() + (
            1 - F.cosine_similarity(image_embeds, teacher_image_embeds, dim=-1)
        ).mean()
        task = info_nce_loss(text_embeds, image_embeds, scale)
    else:
        distillation = _logit_distillation(output, teacher_output, config.temperature)
        labels = batch["label"]
        classes = torch.where(labels == 1, config.match_index, 1 - config.match_index)
        task = F.cross_entropy(output, classes)
    return {"distillation": distillation, "feature": feature, "task": task}


def uses_matrix(model: nn.Module, config: RecoverConfig) -> bool:
    return config.pairing == "matrix" and not is_dual_encoder(model)


class _MatrixStep(nn.Module):
    """Towers once per batch item, then the head on every (text i, image j) combination.

    Returns logits [B * B, num_labels] in row-major (text, image) order and the pooled features.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, pixel_values: torch.Tensor, image_feats=None):
        text_feats, image_feats = _tower_features(self.model, input_ids, attention_mask, pixel_values, image_feats)
        size = input_ids.shape[0]
        text_index = torch.arange(size).repeat_interleave(size)
        image_index = torch.arange(size).repeat(size)
        output = self.model.head(text_feats[text_index], attention_mask[text_index], image_feats[image_index])
        return output, _pool_text(text_feats, attention_mask), _pool_image(image_feats), None


@functools.lru_cache(maxsize=4)
def _fingerprint_projection(size: int) -> torch.Tensor:
    return torch.randn(size, dtype=torch.float64, generator=torch.Generator().manual_seed(1234))


def _image_fingerprints(pixel_values: torch.Tensor) -> torch.Tensor:
    """Project each image's pixels on a fixed random vector: equal images get equal numbers."""
    flat = pixel_values.flatten(1).double()
    return flat @ _fingerprint_projection(flat.shape[1])


def matrix_labels(pixel_values: torch.Tensor) -> torch.Tensor:
    """0/1 labels of the B * B (text i, image j) pairs: 1 where image j is text i's own image."""
    prints = _image_fingerprints(pixel_values)
    return (prints[:, None] == prints[None, :]).flatten().long()


def _matrix_losses(student: tuple, teacher: tuple, batch: Mapping[str, torch.Tensor], config: RecoverConfig) -> dict[str, torch.Tensor]:
    """Losses over all B * B pairs of a batch; the task loss weighs matches and mismatches equally."""
    output, text, image, _ = student
    teacher_output, teacher_text, teacher_image, _ = teacher
    feature = _feature_loss(text, image, teacher_text, teacher_image)
    distillation = _logit_distillation(output, teacher_output, config.temperature)

    labels = matrix_labels(batch["pixel_values"])
    classes = torch.where(labels == 1, config.match_index, 1 - config.match_index)
    per_pair = F.cross_entropy(output, classes, reduction="none")
    matches = labels == 1
    task = per_pair[matches].mean()
    if (~matches).any():
        task = 0.5 * task + 0.5 * per_pair[~matches].mean()
    return {"distillation": distillation, "feature": feature, "task": task}


def _matrix_accuracy(output: torch.Tensor, batch: Mapping[str, torch.Tensor], config: RecoverConfig) -> tuple[int, int]:
    """Count every matching pair and as many mismatched ones (a fixed random choice), as in 1:1 pairs."""
    labels = matrix_labels(batch["pixel_values"])
    classes = torch.where(labels == 1, config.match_index, 1 - config.match_index)
    correct = output.argmax(dim=-1) == classes
    matches = torch.nonzero(labels == 1).flatten()
    mismatches = torch.nonzero(labels == 0).flatten()
    order = torch.randperm(len(mismatches), generator=torch.Generator().manual_seed(0))
    chosen = torch.cat([matches, mismatches[order[: len(matches)]]])
    return int(correct[chosen].sum()), len(chosen)


def _total_loss(losses: Mapping[str, torch.Tensor], config: RecoverConfig) -> torch.Tensor:
    return (
        config.alpha * losses["distillation"]
        + (1 - config.alpha) * losses["task"]
        + config.feature_weight * losses["feature"]
    )


def _accuracy(output, batch: Mapping[str, torch.Tensor], config: RecoverConfig, dual: bool) -> tuple[int, int]:
    """Return (correct, total) for one batch."""
    if dual:
        text_embeds, image_embeds = output
        predicted = (text_embeds @ image_embeds.T).argmax(dim=1)
        return int((predicted == torch.arange(len(predicted))).sum()), len(predicted)
    labels = batch["label"]
    classes = torch.where(labels == 1, config.match_index, 1 - config.match_index)
    return int((output.argmax(dim=-1) == classes).sum()), len(classes)


def _prepare_records(model: nn.Module, records: Sequence[Record], config: RecoverConfig) -> list[Record]:
    """Return training pairs: positives for a dual encoder, labelled match/mismatch pairs otherwise."""
    records = list(records)
    if not records:
        raise DataError("No records to recover on.", "Pass the records of a dataset, e.g. from edgemm.data.load_dataset.")
    if is_dual_encoder(model):
        positives = [record for record in records if record.label != 0]
        if len(positives) < 2:
            raise DataError(
                f"A dual encoder needs at least 2 matching image-text records to recover on, got {len(positives)}.",
                "Pass captions of more images.",
            )
        # In-batch contrast already scores every text with every image of a batch. With
        # "matrix", take one caption per image as for fusion models: five times fewer tower
        # passes per epoch on five-caption data, and no image twice in a batch, where the
        # second copy would count as a negative of the first.
        return _one_caption_per_image(positives, config.seed) if config.pairing == "matrix" else positives
    if config.pairing == "matrix":
        return _one_caption_per_image([record for record in records if record.label != 0], config.seed)
    if any(record.label == 0 for record in records):
        return records
    return make_matching_pairs(
        records,
        seed=config.seed,
        negatives_per_positive=config.negatives_per_positive,
        hard_negative_fraction=config.hard_negative_fraction,
    )


def _one_caption_per_image(records: list[Record], seed: int) -> list[Record]:
    """Pick one caption per image (seeded), in sorted image order."""
    import random

    by_image: dict[Any, list[Record]] = {}
    for record in records:
        by_image.setdefault(record.image, []).append(record)
    if len(by_image) < 2:
        raise DataError(
            f"Recovery needs captions of at least 2 images, got {len(by_image)}.",
            "Pass captions of more images.",
        )
    rng = random.Random(seed)
    return [rng.choice(sorted(by_image[image], key=lambda r: r.text)) for image in sorted(by_image, key=str)]


def _batches(dataset, config: RecoverConfig, context: DistributedContext, epoch: int, drop_last: bool) -> DataLoader:
    sampler = DistributedSampler(
        dataset, num_replicas=context.world_size, rank=context.rank, shuffle=True, seed=config.seed, drop_last=False
    )
    sampler.set_epoch(epoch)
    return DataLoader(dataset, batch_size=config.batch_size, sampler=sampler, collate_fn=dataset.collate, drop_last=drop_last)


# Datasets whose preprocessed images fit in this many bytes are decoded once and kept in memory.
# 1 GiB fits 875 training images at both 192 and 224 pixels (student and teacher), which a
# dual-encoder recovery on the Flickr8k subset at a smaller image size needs.
CACHE_LIMIT_BYTES = 1024**3


class _CachedPairs(torch.utils.data.Dataset):
    """Preprocessed items of a PairDataset, decoded once because recovery uses no augmentation."""

    def __init__(self, dataset):
        self.items = [dataset[index] for index in range(len(dataset))]
        self.collate = dataset.collate

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.items[index]


class _TeacherPixels(torch.utils.data.Dataset):
    """Items of a student PairDataset with the teacher's own `teacher_pixel_values` added.

    Used when the student runs at a smaller image size than the teacher (recipe
    `input.image_size`): the teacher keeps seeing the images as it was trained on them.
    """

    def __init__(self, student, teacher_preprocessor: Any):
        from edgemm.data.torch_data import PairDataset

        self.student = student
        self.teacher = PairDataset(student.records, teacher_preprocessor)
        self.preprocessor = student.preprocessor
        self.collate = student.collate

    def __len__(self) -> int:
        return len(self.student)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        item = dict(self.student[index])
        item["teacher_pixel_values"] = self.teacher[index]["pixel_values"]
        return item


def _pair_dataset(records: Sequence[Record], preprocessor: Any, teacher_preprocessor: Any | None):
    from edgemm.data.torch_data import PairDataset

    dataset = PairDataset(records, preprocessor)
    if teacher_preprocessor is None or teacher_preprocessor.spec.image == preprocessor.spec.image:
        return dataset
    return _TeacherPixels(dataset, teacher_preprocessor)


def _teacher_inputs(batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    pixels = batch.get("teacher_pixel_values", batch["pixel_values"])
    return batch["input_ids"], batch["attention_mask"], pixels


@torch.no_grad()
def _cache_frozen_image_features(dataset: _CachedPairs, student: nn.Module, teacher: nn.Module, batch_size: int) -> bool:
    """Store each item's image features from the frozen image towers; return False when too large.

    A frozen image tower in eval mode gives the same features for an image every epoch, so
    they are computed once instead of twice per step (student and teacher). When the student
    gets the teacher's pixels and its image tower has the teacher's weights, one pass serves both.
    """
    items = dataset.items
    student.image_tower.eval()
    first = student.image_features(items[0]["pixel_values"][None])
    per_item = first[0].numel() * first.element_size()
    separate = "teacher_pixel_values" in items[0] or not _same_weights(student.image_tower, teacher.image_tower)
    if per_item * len(items) * (2 if separate else 1) > CACHE_LIMIT_BYTES:
        return False
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        pixels = torch.stack([item["pixel_values"] for item in chunk])
        features = student.image_features(pixels)
        if separate:
            teacher_pixels = torch.stack([item.get("teacher_pixel_values", item["pixel_values"]) for item in chunk])
            teacher_features = teacher.image_features(teacher_pixels)
        else:
            teacher_features = features
        for item, own, reference in zip(chunk, features, teacher_features):
            item["image_features"] = own.clone()
            item["teacher_image_features"] = reference.clone()
    return True


def _same_weights(first: nn.Module, second: nn.Module) -> bool:
    a, b = first.state_dict(), second.state_dict()
    return a.keys() == b.keys() and all(a[key].shape == b[key].shape and torch.equal(a[key], b[key]) for key in a)


def _maybe_cached(dataset):
    crop = dataset.preprocessor.spec.image.crop
    size = len(dataset) * 3 * crop * crop * 4
    if isinstance(dataset, _TeacherPixels):
        size += len(dataset) * 3 * dataset.teacher.preprocessor.spec.image.crop ** 2 * 4
    return _CachedPairs(dataset) if size <= CACHE_LIMIT_BYTES else dataset


def _train_mode(model: nn.Module, freeze_batchnorm: bool, frozen_parts: Sequence[str] = ()) -> None:
    model.train()
    for part in frozen_parts:
        getattr(model, part).eval()
    if freeze_batchnorm:
        for module in model.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()


def calibration_batches(
    model: nn.Module,
    records: Sequence[Record],
    preprocessor: Any,
    count: int,
    batch_size: int = 8,
    seed: int = 0,
    match_index: int = 1,
) -> list[dict[str, torch.Tensor]]:
    """Return `count` batches for Taylor importance, built like the recovery data.

    Each batch holds `input_ids`, `attention_mask` and `pixel_values`; fusion batches also hold
    `labels` (class indices, "match" at `match_index`). Dual encoder batches hold matching pairs
    only, because their loss treats the other pairs of the batch as negatives.
    """
    from edgemm.data.torch_data import PairDataset

    settings = RecoverConfig(batch_size=max(batch_size, 2), seed=seed, match_index=match_index)
    pairs = _prepare_records(model, records, settings)
    order = torch.randperm(len(pairs), generator=torch.Generator().manual_seed(seed)).tolist()
    dataset = PairDataset([pairs[index] for index in order[: count * batch_size]], preprocessor)
    batches = []
    for start in range(0, len(dataset), batch_size):
        batch = dataset.collate([dataset[index] for index in range(start, min(start + batch_size, len(dataset)))])
        label = batch.pop("label")
        if not is_dual_encoder(model):
            batch["labels"] = torch.where(label == 1, match_index, 1 - match_index)
        batches.append(batch)
    return batches


@torch.no_grad()
def measure(
    student: nn.Module,
    teacher: nn.Module,
    batches: Sequence[Mapping[str, torch.Tensor]],
    config: RecoverConfig,
) -> dict[str, float]:
    """Return the mean losses and the task accuracy of `student` against `teacher` on `batches`."""
    dual = is_dual_encoder(student)
    matrix = uses_matrix(student, config)
    step_class = _MatrixStep if matrix else _StudentStep
    student_step, teacher_step = step_class(student).eval(), step_class(teacher).eval()
    sums = {"distillation": 0.0, "feature": 0.0, "task": 0.0}
    correct = total = 0
    for batch in batches:
        inputs = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
        student_out, teacher_out = student_step(*inputs), teacher_step(*_teacher_inputs(batch))
        losses = _matrix_losses(student_out, teacher_out, batch, config) if matrix else _losses(student_out, teacher_out, batch, config, dual)
        for name, value in losses.items():
            sums[name] += float(value)
        if matrix:
            right, count = _matrix_accuracy(student_out[0], batch, config)
        else:
            right, count = _accuracy(student_out[0], batch, config, dual)
        correct, total = correct + right, total + count
    metrics = {name: value / max(len(batches), 1) for name, value in sums.items()}
    metrics["accuracy"] = correct / max(total, 1)
    return metrics


def recover(
    student: nn.Module,
    teacher: nn.Module,
    dataset_records: Sequence[Record],
    preprocessor: Any,
    config: RecoverConfig,
    progress: ProgressCallback | None = None,
    teacher_preprocessor: Any | None = None,
) -> RecoverResult | None:
    """Train `student` in place to match `teacher` on `dataset_records` and return the result.

    `dataset_records` are captions (pairs are built from them) or labelled pairs;
    `preprocessor` is the `edgemm.runtime.preprocess.Preprocessor` of the student's input spec.
    `teacher_preprocessor` is the teacher's, when it differs (a student served at a smaller
    image size). By default the teacher gets the student's inputs.
    `progress("recover", step, total_steps)` is called after every optimizer step on rank 0.
    Under torchrun, returns the result on rank 0 and None on the other ranks.
    """
    config.validate()
    context = init_distributed()
    try:
        result = _recover(
            student, teacher, dataset_records, preprocessor, config, progress if context.is_main else None, context, teacher_preprocessor
        )
    finally:
        context.close()
    return result if context.is_main else None


def _recover(
    student: nn.Module,
    teacher: nn.Module,
    dataset_records: Sequence[Record],
    preprocessor: Any,
    config: RecoverConfig,
    progress: ProgressCallback | None,
    context: DistributedContext,
    teacher_preprocessor: Any | None = None,
) -> RecoverResult:
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    dual = is_dual_encoder(student)
    teacher.eval()
    for parameter in teacher.parameters():
        parameter.requires_grad_(False)
    for parameter in student.parameters():
        parameter.requires_grad_(True)
    for part in config.frozen_parts:
        module = getattr(student, part, None)
        if module is None:
            raise ConfigError(f"Recover option frozen_parts names {part!r}, which the model does not have.", "Use text_tower, image_tower or leave it empty.")
        for parameter in module.parameters():
            parameter.requires_grad_(False)

    records = _prepare_records(student, dataset_records, config)
    dataset = _maybe_cached(_pair_dataset(records, preprocessor, teacher_preprocessor))
    if "image_tower" in config.frozen_parts and isinstance(dataset, _CachedPairs):
        cached = _cache_frozen_image_features(dataset, student, teacher, config.batch_size)
        logger.info("Frozen image tower: features %s", "computed once per image" if cached else "too large to cache")
    eval_dataset = _pair_dataset(records[: config.eval_pairs], preprocessor, teacher_preprocessor)
    eval_batches = [
        eval_dataset.collate([eval_dataset[index] for index in range(start, min(start + config.batch_size, len(eval_dataset)))])
        for start in range(0, len(eval_dataset), config.batch_size)
    ]
    before = measure(student, teacher, eval_batches, config)

    matrix = uses_matrix(student, config)
    step_class = _MatrixStep if matrix else _StudentStep
    step_module: nn.Module = step_class(student)
    if context.is_distributed:
        # find_unused_parameters: an image tower's ImageNet classifier takes no part in forward.
        step_module = nn.parallel.DistributedDataParallel(step_module, find_unused_parameters=True)
    teacher_step = step_class(teacher).eval()
    optimizer = torch.optim.AdamW(
        [parameter for parameter in student.parameters() if parameter.requires_grad],
        lr=config.lr,
        weight_decay=config.weight_decay,
    )

    # A dual encoder's last batch of one pair would have no in-batch negatives, so it is dropped.
    batches_per_epoch = len(_batches(dataset, config, context, 0, drop_last=dual or matrix))
    if batches_per_epoch == 0:
        raise DataError(
            f"{len(records)} pairs give no full batch of {config.batch_size} on each of {context.world_size} processes.",
            "Lower batch_size or pass more records.",
        )
    total_steps = config.steps if config.steps is not None else config.epochs * batches_per_epoch
    history: list[dict[str, float]] = []
    step = 0
    epoch = 0
    while step < total_steps:
        _train_mode(student, config.freeze_batchnorm, config.frozen_parts)
        running = {"loss": 0.0, "batches": 0}
        for batch in _batches(dataset, config, context, epoch, drop_last=dual or matrix):
            inputs = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"], batch.get("image_features"))
            with torch.no_grad():
                teacher_out = teacher_step(*_teacher_inputs(batch), batch.get("teacher_image_features"))
            if matrix:
                losses = _matrix_losses(step_module(*inputs), teacher_out, batch, config)
            else:
                losses = _losses(step_module(*inputs), teacher_out, batch, config, dual)
            loss = _total_loss(losses, config)
            if not torch.isfinite(loss):
                raise ConfigError(
                    f"Recovery loss is not finite ({float(loss)}) at step {step + 1} with lr={config.lr}.",
                    "Lower lr (e.g. by 10x) or raise temperature.",
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(student.parameters(), config.max_grad_norm)
            optimizer.step()

            step += 1
            running["loss"] += float(loss.detach())
            running["batches"] += 1
            if progress is not None:
                progress("recover", step, total_steps)
            if step >= total_steps:
                break
        epoch += 1
        history.append({"epoch": epoch, "step": step, "loss": running["loss"] / max(running["batches"], 1)})
        logger.info("Recovery epoch %d: step %d of %d, mean loss %.4f", epoch, step, total_steps, history[-1]["loss"])

    student.eval()
    after = measure(student, teacher, eval_batches, config)
    logger.info(
        "Recovery: distillation loss %.4f -> %.4f, accuracy %.3f -> %.3f in %d steps",
        before["distillation"], after["distillation"], before["accuracy"], after["accuracy"], step,
    )
    return RecoverResult(
        model=student,
        steps=step,
        before=before,
        after=after,
        history=history,
        seconds=time.perf_counter() - started,
    )


@dataclass
class PruneRecoverResult:
    """The final pruning report and one recovery result per pruning step."""

    prune: PruneResult
    recoveries: list[RecoverResult]

    @property
    def model(self) -> nn.Module:
        return self.prune.model

    def to_dict(self) -> dict[str, Any]:
        return {"prune": self.prune.to_dict(), "recover": [result.to_dict() for result in self.recoveries]}


def prune_and_recover(
    model: nn.Module,
    prune_config: PruneConfig,
    recover_config: RecoverConfig,
    example_inputs: Any,
    dataset_records: Sequence[Record],
    preprocessor: Any,
    calibration_batches: Sequence[Mapping[str, Any]] | None = None,
    progress: ProgressCallback | None = None,
    teacher_preprocessor: Any | None = None,
) -> PruneRecoverResult | None:
    """Prune a copy of `model` in `prune_config.iterative_steps` small steps, distilling after each.

    The unpruned `model` is the teacher throughout and is left unchanged. Each recovery runs
    `recover_config` (its `steps` or `epochs` per pruning step). `progress` receives
    ("prune", step, steps) and the recovery progress. Under torchrun every rank prunes the same
    way and recovers its data shard; rank 0 returns the result and the others return None.
    """
    prune_config.validate()
    recover_config.validate()
    teacher = copy.deepcopy(model).eval()
    student = copy.deepcopy(model).eval()

    expected_shapes = _output_shapes(student, example_inputs)
    expected_batches = [_output_shapes(student, _model_inputs(batch)) for batch in calibration_batches or []]
    before = profile_model(student, example_inputs)
    session = PruningSession(student, prune_config, example_inputs)
    heads_before = _heads_by_part(session)

    # One process group for all recoveries; `recover` reuses it instead of opening its own.
    context = init_distributed()
    recoveries = []
    try:
        for index in range(prune_config.iterative_steps):
            student.eval()
            session.step(calibration_batches)
            if progress is not None and context.is_main:
                progress("prune", index + 1, prune_config.iterative_steps)
            result = recover(student, teacher, dataset_records, preprocessor, recover_config, progress, teacher_preprocessor)
            if result is not None:
                recoveries.append(result)
    finally:
        context.close()

    student.eval()
    pruned = finish_pruning(session, before, heads_before, expected_shapes, calibration_batches, expected_batches)
    return PruneRecoverResult(prune=pruned, recoveries=recoveries) if context.is_main else None
