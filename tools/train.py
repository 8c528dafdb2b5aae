"""Train an mmfm model from a YAML config.

    python tools/train.py --config configs/demo_shapes.yaml --output runs/demo [key.sub=value ...]

Runs the same under `accelerate launch` and `torchrun` (see docs/training.md for multi-process recipes).
Writes OUTPUT/config.yaml (resolved), checkpoints/, model.safetensors, metrics.json, history.jsonl,
curves.png and TensorBoard logs. `--resume latest` continues a killed run exactly where it stopped.
"""

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from mmfm.config import load_config, save_config
from mmfm.errors import MmfmError


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML config (see configs/)")
    parser.add_argument("--output", default=None, help="run directory (default runs/<config name>)")
    parser.add_argument("--resume", default=None, help="'latest' or a checkpoint directory")
    parser.add_argument("--no-eval", action="store_true", help="skip the final evaluation")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.max_steps=50")
    return parser.parse_args(argv)


def run(args) -> dict:
    """Build the run's model, objective and streams for its task, then train, export and evaluate."""
    from mmfm.engine.trainer import make_accelerator
    from mmfm.factory import task_streams, with_answers

    cfg = load_config(args.config, args.overrides)
    output = Path(args.output or Path("runs") / Path(args.config).stem)
    segmentation = cfg.task == "segmentation"
    cfg = with_answers(cfg, {} if segmentation else task_streams(cfg))
    accelerator = make_accelerator(cfg.train)
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output / "config.yaml")
    build = _build_segmentation if segmentation else _build_multitask
    cfg, model, objective, data, evaluate = build(cfg, accelerator.num_processes)
    return _train_and_report(args, cfg, output, accelerator, model, objective, data, evaluate)


def _build_multitask(cfg, world_size: int):
    from mmfm.factory import build_model, build_streams, evaluate
    from mmfm.objectives.tasks import MultiTaskObjective

    model = build_model(cfg.model)
    model.trunk.set_grad_checkpointing(cfg.train.grad_checkpointing)
    data = build_streams(cfg, model.tokenizer, world_size)
    first = next(iter(data.values()))
    warmup = cfg.train.alpha_warmup_steps or max(1, len(first.dataset) // cfg.train.batch_size)
    cfg = replace(cfg, train=replace(cfg.train, alpha_warmup_steps=warmup))
    objective = MultiTaskObjective(model, cfg.train.loss_weights, list(data), warmup)
    return cfg, model, objective, data, evaluate


def _build_segmentation(cfg, world_size: int):
    """``task: segmentation``: a timm dense model trained by the same Trainer, evaluated with ``miou``."""
    from mmfm.factory import build_segmentation, evaluate_segmentation

    model, objective, data = build_segmentation(cfg, world_size)
    return cfg, model, objective, data, evaluate_segmentation


def _train_and_report(args, cfg, output, accelerator, model, objective, data, evaluate) -> dict:
    from mmfm.engine.trainer import Trainer, plot_history
    from mmfm.factory import write_metrics
    from mmfm.models.model import save_pretrained

    trainer = Trainer(cfg.train, output, accelerator, quiet=args.quiet)
    metrics = trainer.fit(objective, data, num_workers=cfg.data.num_workers, resume=args.resume,
                          max_bad_fraction=cfg.data.max_bad_fraction)
    if accelerator.is_main_process:
        save_pretrained(model, output / "model.safetensors")
        if not args.no_eval:
            start = time.perf_counter()
            metrics.update(evaluate(model, cfg, quiet=args.quiet))
            metrics["eval_seconds"] = round(time.perf_counter() - start, 2)
        write_metrics(output / "metrics.json", metrics)
        plot_history(output)
    accelerator.wait_for_everyone()
    return metrics


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        metrics = run(args)
    except MmfmError as err:
        print(f"train.py: error: {err}", file=sys.stderr)
        return 2
    if not args.quiet:
        print({k: v for k, v in metrics.items() if "/" not in k})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
