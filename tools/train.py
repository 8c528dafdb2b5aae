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

from mmfm.config import load_config, save_config  # noqa: E402
from mmfm.errors import MmfmError  # noqa: E402


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
    from mmfm.engine.trainer import Trainer, make_accelerator, plot_history
    from mmfm.factory import build_model, build_streams, evaluate, task_streams, with_answers, write_metrics
    from mmfm.models.model import save_pretrained
    from mmfm.objectives.tasks import MultiTaskObjective

    cfg = load_config(args.config, args.overrides)
    output = Path(args.output or Path("runs") / Path(args.config).stem)
    if cfg.task == "segmentation":
        return run_segmentation(args, cfg, output)
    streams = task_streams(cfg)
    cfg = with_answers(cfg, streams)
    accelerator = make_accelerator(cfg.train)
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output / "config.yaml")
    model = build_model(cfg.model)
    model.trunk.set_grad_checkpointing(cfg.train.grad_checkpointing)
    data = build_streams(cfg, model.tokenizer, accelerator.num_processes)
    first = next(iter(data.values()))
    warmup = cfg.train.alpha_warmup_steps or max(1, len(first.dataset) // cfg.train.batch_size)
    cfg = replace(cfg, train=replace(cfg.train, alpha_warmup_steps=warmup))
    objective = MultiTaskObjective(model, cfg.train.loss_weights, list(data), warmup)
    trainer = Trainer(cfg.train, output, accelerator, quiet=args.quiet)
    summary = trainer.fit(objective, data, num_workers=cfg.data.num_workers, resume=args.resume,
                          max_bad_fraction=cfg.data.max_bad_fraction)
    metrics = dict(summary)
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


def run_segmentation(args, cfg, output: Path) -> dict:
    """``task: segmentation``: a timm dense model trained by the same Trainer, evaluated with ``miou``."""
    from mmfm.engine.trainer import Trainer, make_accelerator, plot_history
    from mmfm.factory import build_segmentation, evaluate_segmentation, with_answers, write_metrics
    from mmfm.models.model import save_pretrained

    cfg = with_answers(cfg, {})
    accelerator = make_accelerator(cfg.train)
    if accelerator.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        save_config(cfg, output / "config.yaml")
    model, objective, data = build_segmentation(cfg, accelerator.num_processes)
    trainer = Trainer(cfg.train, output, accelerator, quiet=args.quiet)
    metrics = trainer.fit(objective, data, num_workers=cfg.data.num_workers, resume=args.resume,
                          max_bad_fraction=cfg.data.max_bad_fraction)
    if accelerator.is_main_process:
        save_pretrained(model, output / "model.safetensors")
        if not args.no_eval:
            start = time.perf_counter()
            metrics.update(evaluate_segmentation(accelerator.unwrap_model(model), cfg, quiet=args.quiet))
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
