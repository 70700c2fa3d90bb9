"""Training of matching (fusion) models and dual encoders on a dataset folder.

Frozen towers (the default): the towers run once over the unique texts and images, and only the
head trains on those cached features. With `freeze_towers=False` the whole model fine-tunes end
to end and image augmentation applies.

Threshold calibration: the images of the train split are divided, seeded, into a fit part and a
held-out calibration part (`calibration_fraction`, 15 % by default). The head trains on the fit
part only. After every epoch it is scored on fixed, seeded matching pairs of the calibration part.
The epoch with the best calibration ROC-AUC (fusion) or mean recall (dual encoder) is kept. The
decision threshold is the accuracy-maximising threshold on those calibration pairs, because a
threshold fitted on the pairs the head trained on sits where an over-fitted head separates its
own training data, and that does not carry over to new data.

Distributed: under torchrun each rank computes the features of its shard of the unique texts and
images, and the shards are gathered so every rank holds all features. Each rank then trains on
its `DistributedSampler` shard of every epoch's pairs. Only rank 0 writes the checkpoint. A dual
encoder's in-batch negatives come from the rank's own batch (embeddings are not gathered).
"""

from __future__ import annotations

import copy
import logging
import random
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from edgemm.data.matching import group_by_image, make_matching_pairs
from edgemm.data.records import Record, load_dataset
from edgemm.errors import ConfigError, DataError
from edgemm.training import metrics, modeling
from edgemm.training.distributed import DistributedContext, init_distributed
from edgemm.training.features import TowerFeatures, compute_features
from edgemm.training.scoring import FeatureTable, match_scores, matching_metrics, retrieval_metrics

logger = logging.getLogger(__name__)

# Called as progress(stage, done, total): stages "text" and "image" while features are computed,
# "epoch" after each epoch.
ProgressCallback = Callable[[str, int, int], None]

# Seed offset of the fixed calibration pairs, so they never coincide with an epoch's pairs.
CALIBRATION_SEED_OFFSET = 100_003


@dataclass
class TrainConfig:
    """Settings of one training run; `lr` applies to the head, `tower_lr` to unfrozen towers."""

    architecture: str = "concat_fusion"
    text_tower: str = "minilm-l6"
    image_tower: str = "efficientnet-lite0"
    epochs: int = 10
    batch_size: int = 64
    lr: float = 1e-3
    tower_lr: float = 2e-5
    weight_decay: float = 0.01
    seed: int = 0
    freeze_towers: bool = True
    augment: bool = True
    negatives_per_positive: int = 1
    hard_negative_fraction: float = 0.5
    calibration_fraction: float = 0.15
    train_split: str = "train"
    feature_cache_dir: Path | None = None
    overwrite: bool = False

    def validate(self) -> None:
        if self.architecture not in modeling.ARCHITECTURES:
            raise ConfigError(
                f"Unknown architecture {self.architecture!r}.",
                f"Use one of: {', '.join(modeling.ARCHITECTURES)}.",
            )
        positive_ints = {"epochs": self.epochs, "batch_size": self.batch_size, "negatives_per_positive": self.negatives_per_positive}
        for name, value in positive_ints.items():
            if value < 1:
                raise ConfigError(f"{name} must be at least 1, got {value}.", f"Pass a positive {name}.")
        if self.architecture == modeling.DUAL_ENCODER and self.batch_size < 2:
            raise ConfigError(
                f"batch_size must be at least 2 for a dual encoder, got {self.batch_size}.",
                "The contrastive loss needs other pairs in the batch as negatives.",
            )
        for name, value in {"lr": self.lr, "tower_lr": self.tower_lr}.items():
            if not value > 0:
                raise ConfigError(f"{name} must be positive, got {value}.", f"Pass a learning rate such as 1e-3.")
        if self.weight_decay < 0:
            raise ConfigError(f"weight_decay must be 0 or more, got {self.weight_decay}.", "Pass e.g. 0.01.")
        if not 0.0 <= self.calibration_fraction < 1.0:
            raise ConfigError(
                f"calibration_fraction must be in [0, 1), got {self.calibration_fraction}.",
                "Pass e.g. 0.15 to hold out 15 % of the train images for the threshold.",
            )

    def to_dict(self) -> dict:
        data = asdict(self)
        data["feature_cache_dir"] = None if self.feature_cache_dir is None else str(self.feature_cache_dir)
        return data


@dataclass
class TrainResult:
    """Outcome of `train`. `checkpoint` is None on ranks other than 0, which write nothing."""

    checkpoint: Path | None
    architecture: str
    decision_threshold: float
    threshold_source: str
    best_epoch: int
    history: list[dict]
    calibration: dict
    seconds: dict
    world_size: int = 1
    fit_records: int = 0
    calibration_records: int = 0


@dataclass
class _PreparedData:
    fit: list[Record]
    calibration: list[Record]
    table: FeatureTable
    calibration_pairs: list[Record] = field(default_factory=list)


def split_by_image(records: Sequence[Record], fraction: float, seed: int) -> tuple[list[Record], list[Record]]:
    """Divide records into (fit, held-out) so that all captions of an image land on the same side.

    The held-out side gets round(fraction * images) images, but at least 2 when fraction > 0 and
    there are 4 or more images (matching pairs need two images), and none otherwise.
    """
    images = sorted({record.image for record in records}, key=str)
    held_out_count = round(fraction * len(images))
    if fraction > 0 and len(images) >= 4:
        held_out_count = max(held_out_count, 2)
    else:
        held_out_count = 0
    held_out_images = set(random.Random(seed).sample(images, held_out_count))
    fit = [record for record in records if record.image not in held_out_images]
    held_out = [record for record in records if record.image in held_out_images]
    return fit, held_out


def _prepare_data(config: TrainConfig, dataset_folder: Path) -> _PreparedData:
    records = load_dataset(dataset_folder, split=config.train_split)
    records = [record for record in records if record.label != 0]
    if not records:
        raise DataError(
            f"Split {config.train_split!r} of {dataset_folder} has no matching captions (all records are labelled 0).",
            "Training builds its own negatives; give it captions that describe their images.",
        )
    if len({record.image for record in records}) < 2:
        raise DataError(
            f"Split {config.train_split!r} of {dataset_folder} has captions of only one image.",
            "Training needs captions of at least two images.",
        )

    fit, calibration = split_by_image(records, config.calibration_fraction, config.seed)
    data = _PreparedData(fit=fit, calibration=calibration, table=FeatureTable.from_records(records))
    if calibration:
        data.calibration_pairs = make_matching_pairs(
            calibration,
            seed=config.seed + CALIBRATION_SEED_OFFSET,
            negatives_per_positive=1,
            hard_negative_fraction=config.hard_negative_fraction,
        )
    else:
        logger.warning(
            "No held-out calibration images (calibration_fraction=%s, %d images): the decision "
            "threshold is fitted on the training pairs and is likely too optimistic",
            config.calibration_fraction,
            len({record.image for record in records}),
        )
    return data


def _epoch_pairs(config: TrainConfig, fit: list[Record], epoch: int) -> list[Record]:
    """Draw the pairs of one epoch, with new negatives every epoch.

    Fusion: each caption with its image plus `negatives_per_positive` mismatched captions.
    Dual encoder: one random caption per image, so an image never appears twice in the
    contrastive batch as its own negative.
    """
    seed = config.seed * 1000 + epoch
    if config.architecture != modeling.DUAL_ENCODER:
        return make_matching_pairs(
            fit,
            seed=seed,
            negatives_per_positive=config.negatives_per_positive,
            hard_negative_fraction=config.hard_negative_fraction,
        )
    rng = random.Random(seed)
    return [Record(image=image, text=rng.choice(texts), label=1) for image, texts in group_by_image(fit).items()]


class _TrainStep(nn.Module):
    """The computation one optimisation step differentiates, so DDP can wrap it as one module.

    With frozen towers the inputs are cached features and only the head runs. A dual encoder also
    returns exp(logit_scale), so its gradient is averaged across ranks like every other one.
    """

    def __init__(self, model: nn.Module, towers_frozen: bool):
        super().__init__()
        self.model = model
        self.towers_frozen = towers_frozen
        self.dual = model.architecture == modeling.DUAL_ENCODER

    def forward(self, text: torch.Tensor, attention_mask: torch.Tensor, image: torch.Tensor):
        if self.towers_frozen:
            output = self.model.head(text, attention_mask, image)
        else:
            output = self.model(text, attention_mask, image)
        if self.dual:
            text_embeds, image_embeds = output
            return text_embeds, image_embeds, modeling.logit_scale_of(self.model)
        return output


def _loss(output, labels: torch.Tensor, dual: bool, match_index: int) -> torch.Tensor:
    if dual:
        text_embeds, image_embeds, scale = output
        logits = scale * text_embeds @ image_embeds.T
        targets = torch.arange(logits.shape[0])
        return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
    # Labels are 1 for a match and 0 for a mismatch, and the model's label order decides the class index.
    classes = labels if match_index == 1 else 1 - labels
    return F.cross_entropy(output, classes)


def train(
    config: TrainConfig,
    dataset_folder: Path | str,
    out_checkpoint: Path | str,
    progress: ProgressCallback | None = None,
) -> TrainResult:
    """Train `config.architecture` on the train split of `dataset_folder` and save a checkpoint.

    The checkpoint records the training config, the per-epoch history, the calibration metrics
    and `decision_threshold` (on P(match) for fusion models, on cosine similarity for a dual
    encoder). Raises `ConfigError` for invalid settings and `DataError` for an unusable dataset.
    """
    config.validate()
    dataset_folder = Path(dataset_folder)
    out_checkpoint = Path(out_checkpoint)
    if out_checkpoint.exists() and not config.overwrite:
        raise ConfigError(f"Output checkpoint {out_checkpoint} already exists.", "Choose another --out or pass --overwrite.")

    context = init_distributed()
    try:
        return _train(config, dataset_folder, out_checkpoint, progress if context.is_main else None, context)
    finally:
        context.close()


def _train(
    config: TrainConfig,
    dataset_folder: Path,
    out_checkpoint: Path,
    progress: ProgressCallback | None,
    context: DistributedContext,
) -> TrainResult:
    started = time.perf_counter()
    torch.manual_seed(config.seed)
    data = _prepare_data(config, dataset_folder)
    bundle = modeling.build_model(config.architecture, config.text_tower, config.image_tower, config.seed)
    model = bundle.model
    dual = bundle.is_dual_encoder
    for tower in bundle.towers():
        tower.requires_grad_(not config.freeze_towers)

    features_started = time.perf_counter()
    features = compute_features(
        model,
        data.table.texts,
        data.table.images,
        bundle.input_spec,
        bundle.vocab_path,
        cache_dir=config.feature_cache_dir,
        progress=progress,
        context=context,
    )
    features_seconds = time.perf_counter() - features_started
    if config.freeze_towers and config.augment:
        logger.info("Towers are frozen and their features cached, so image augmentation does not apply")

    trainer = _Trainer(config, bundle, data, features, context)
    history = []
    best_state, best_value, best_epoch = None, -np.inf, 0
    training_started = time.perf_counter()
    for epoch in range(1, config.epochs + 1):
        epoch_started = time.perf_counter()
        loss = trainer.run_epoch(epoch)
        entry = {"epoch": epoch, "train_loss": loss}
        if data.calibration:
            if not config.freeze_towers:
                trainer.refresh_calibration_features()
            calibration = trainer.calibration_metrics(threshold=None)
            entry["calibration"] = calibration
            value = calibration["mean_recall"] if dual else calibration["roc_auc"]
        else:
            value = -loss
        entry["seconds"] = round(time.perf_counter() - epoch_started, 3)
        history.append(entry)
        logger.info("Epoch %d/%d: %s", epoch, config.epochs, _summarise(entry))
        if value > best_value:
            best_value, best_epoch = value, epoch
            best_state = copy.deepcopy(trainer.trainable_state())
        if progress is not None:
            progress("epoch", epoch, config.epochs)
    training_seconds = time.perf_counter() - training_started

    trainer.load_trainable_state(best_state)
    if not config.freeze_towers and data.calibration:
        trainer.refresh_calibration_features()
    threshold, threshold_source, calibration = trainer.fit_decision_threshold()
    logger.info(
        "Kept epoch %d; decision threshold %.4f fitted on %s (accuracy there %.4f)",
        best_epoch, threshold, threshold_source, calibration["accuracy"],
    )

    seconds = {
        "features": round(features_seconds, 3),
        "training": round(training_seconds, 3),
        "total": round(time.perf_counter() - started, 3),
    }
    if context.is_main:
        extra = {
            "decision_threshold": threshold,
            "threshold_source": threshold_source,
            "training": {
                "config": config.to_dict(),
                "dataset": str(dataset_folder.resolve()),
                "best_epoch": best_epoch,
                "calibration": calibration,
                "fit_records": len(data.fit),
                "calibration_records": len(data.calibration),
                "world_size": context.world_size,
                "seconds": seconds,
            },
        }
        modeling.save_model(bundle, out_checkpoint, history=history, extra=extra, overwrite=config.overwrite)
        logger.info("Saved checkpoint to %s", out_checkpoint)
    context.barrier()

    return TrainResult(
        checkpoint=out_checkpoint if context.is_main else None,
        architecture=config.architecture,
        decision_threshold=threshold,
        threshold_source=threshold_source,
        best_epoch=best_epoch,
        history=history,
        calibration=calibration,
        seconds=seconds,
        world_size=context.world_size,
        fit_records=len(data.fit),
        calibration_records=len(data.calibration),
    )


def _summarise(entry: dict) -> str:
    parts = [f"loss {entry['train_loss']:.4f}"]
    for name, value in entry.get("calibration", {}).items():
        if name in ("roc_auc", "oracle_accuracy", "mean_recall", "text_to_image_recall@5"):
            parts.append(f"calibration {name} {value:.4f}")
    return ", ".join(parts)


class _Trainer:
    """Optimisation state of one run: the step module (DDP-wrapped under torchrun) and its optimiser."""

    def __init__(self, config: TrainConfig, bundle: modeling.ModelBundle, data: _PreparedData, features: TowerFeatures, context: DistributedContext):
        self.config = config
        self.bundle = bundle
        self.model = model = bundle.model
        self.data = data
        self.features = features
        self.context = context
        self.dual = config.architecture == modeling.DUAL_ENCODER
        self.match_index = 0 if self.dual else bundle.match_index

        step = _TrainStep(model, towers_frozen=config.freeze_towers)
        if context.is_distributed:
            # NOTE: with unfrozen towers each rank updates its own batch-norm running statistics
            # between the buffer broadcasts, so ranks can pick different epochs and thresholds.
            # Only rank 0's model, statistics and threshold are saved.
            step = nn.parallel.DistributedDataParallel(step, broadcast_buffers=not config.freeze_towers)
        self.step = step
        self.optimizer = self._make_optimizer()

        self.preprocessor = None
        self.augmenter = None
        if not config.freeze_towers:
            from edgemm.data.augment import Augmenter
            from edgemm.runtime.preprocess import Preprocessor

            self.preprocessor = Preprocessor(bundle.input_spec, bundle.vocab_path)
            if config.augment:
                # Each rank draws its own augmentations.
                self.augmenter = Augmenter(seed=config.seed * 7919 + context.rank)

    def _make_optimizer(self) -> torch.optim.Optimizer:
        tower_parameters = {id(parameter) for tower in self.bundle.towers() for parameter in tower.parameters()}
        head = [p for p in self.model.parameters() if p.requires_grad and id(p) not in tower_parameters]
        groups = [{"params": head, "lr": self.config.lr}]
        if not self.config.freeze_towers:
            towers = [p for p in self.model.parameters() if p.requires_grad and id(p) in tower_parameters]
            groups.append({"params": towers, "lr": self.config.tower_lr})
        return torch.optim.AdamW(groups, weight_decay=self.config.weight_decay)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {name: tensor.detach().clone() for name, tensor in self.model.state_dict().items()
                if not self.config.freeze_towers or not _is_tower_key(self.bundle, name)}

    def load_trainable_state(self, state: dict[str, torch.Tensor] | None) -> None:
        if state is not None:
            self.model.load_state_dict(state, strict=False)

    def _loader(self, epoch: int) -> DataLoader:
        pairs = _epoch_pairs(self.config, self.data.fit, epoch)
        if self.config.freeze_towers:
            dataset = torch.utils.data.TensorDataset(*self.data.table.pair_indices(pairs))
            collate = None
        else:
            from edgemm.data.torch_data import PairDataset

            dataset = PairDataset(pairs, self.preprocessor, augment=self.augmenter)
            collate = dataset.collate
        sampler = DistributedSampler(
            dataset, num_replicas=self.context.world_size, rank=self.context.rank, shuffle=True, seed=self.config.seed
        )
        sampler.set_epoch(epoch)
        # A dual encoder's last batch of one pair would have no negatives, so it is dropped.
        return DataLoader(dataset, batch_size=self.config.batch_size, sampler=sampler, collate_fn=collate, drop_last=self.dual and len(dataset) > self.config.batch_size)

    def run_epoch(self, epoch: int) -> float:
        self.model.train()
        if self.config.freeze_towers:
            # The towers do not run; keeping them in eval mode leaves their batch-norm statistics alone.
            for tower in self.bundle.towers():
                tower.eval()

        total_loss, batches = 0.0, 0
        for batch in self._loader(epoch):
            if self.config.freeze_towers:
                text_indices, image_indices, labels = batch
                inputs = (self.features.text[text_indices], self.features.text_mask[text_indices], self.features.image[image_indices])
            else:
                inputs = (batch["input_ids"], batch["attention_mask"], batch["pixel_values"])
                labels = batch["label"]
            output = self.step(*inputs)
            loss = _loss(output, labels, self.dual, self.match_index)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            total_loss += float(loss.detach())
            batches += 1
        return total_loss / max(batches, 1)

    def refresh_calibration_features(self) -> None:
        """Recompute the features of the calibration records with the current (fine-tuned) towers."""
        table = FeatureTable.from_records(self.data.calibration)
        fresh = compute_features(
            self.model, table.texts, table.images, self.bundle.input_spec, self.bundle.vocab_path
        )
        # Write the fresh rows into the full table so the same indices keep working.
        text_rows = torch.tensor([self.data.table.text_index[text] for text in table.texts])
        image_rows = torch.tensor([self.data.table.image_index[image] for image in table.images])
        self.features.text[text_rows] = fresh.text
        self.features.text_mask[text_rows] = fresh.text_mask
        self.features.image[image_rows] = fresh.image

    def _scores(self, pairs: Sequence[Record]) -> tuple[np.ndarray, np.ndarray]:
        text_indices, image_indices, labels = self.data.table.pair_indices(pairs)
        return match_scores(self.bundle, self.features, text_indices, image_indices), labels.numpy()

    def calibration_metrics(self, threshold: float | None) -> dict:
        scores, labels = self._scores(self.data.calibration_pairs)
        result = matching_metrics(scores, labels, threshold)
        if self.dual:
            result.update(retrieval_metrics(self.model, self.features, self.data.table, self.data.calibration))
        return result

    def fit_decision_threshold(self) -> tuple[float, str, dict]:
        """Fit the accuracy-maximising threshold on held-out calibration pairs (or, without them, on fixed training pairs)."""
        if self.data.calibration_pairs:
            scores, labels = self._scores(self.data.calibration_pairs)
            source = "held-out train images"
        else:
            pairs = make_matching_pairs(self.data.fit, seed=self.config.seed + CALIBRATION_SEED_OFFSET)
            scores, labels = self._scores(pairs)
            source = "training pairs"
        threshold = metrics.fit_threshold(scores, labels).threshold
        result = matching_metrics(scores, labels, threshold)
        if self.dual and self.data.calibration:
            result.update(retrieval_metrics(self.model, self.features, self.data.table, self.data.calibration))
        return threshold, source, result


def _is_tower_key(bundle: modeling.ModelBundle, name: str) -> bool:
    towers = bundle.towers()
    tower_names = [child_name for child_name, child in bundle.model.named_children() if any(child is tower for tower in towers)]
    return any(name.startswith(prefix + ".") for prefix in tower_names)
