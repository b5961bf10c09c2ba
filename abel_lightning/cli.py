"""The ``abel-lightning`` command: Lightning's CLI for the training loops plus the phases that are not loops.

    abel-lightning fit --config configs/ppo.yaml          # Phase 1 (PPO) or, with configs/dpo.yaml, Phase 4 (DPO)
    abel-lightning predict --config configs/rollouts.yaml # Phase 2: Regime W rollouts
    abel-lightning preferences --rollouts R --out P       # Phase 3: preference pairs
    abel-lightning test --config configs/eval.yaml        # Phase 5: GSM8K Platinum evaluation
    abel-lightning compare outputs/*_platinum_eval.jsonl  # base vs PPO vs DPO
    abel-lightning pipeline --config configs/pipeline.yaml

Going from one GPU to eight is a config change: add ``--config configs/strategy/ddp.yaml`` (or fsdp) and set
``--trainer.devices``.

A known failure (a bad input file, a missing model folder, a diverged run) prints one line saying what is wrong and
what to do, and exits with status 2; ``--debug`` (anywhere on the command line) or ``ABEL_LIGHTNING_DEBUG=1`` shows
its traceback instead. Any other exception is a bug and keeps its traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

from jsonargparse import CLI
from lightning.pytorch.cli import LightningCLI, SaveConfigCallback

from abel_lightning.errors import ActionableError

DEBUG_FLAG = "--debug"
DEBUG_ENV = "ABEL_LIGHTNING_DEBUG"
# What a person can fix from the message alone. FileNotFoundError is here because its message names the path; every
# other exception is a bug, whose traceback is what its report needs.
KNOWN_FAILURES = (ActionableError, FileNotFoundError)

TRAINER_COMMANDS = {
    "fit": "train a policy: PPO (configs/ppo.yaml) or DPO (configs/dpo.yaml)",
    "validate": "run a module's validation loop once",
    "test": "evaluate a policy on GSM8K Platinum (configs/eval.yaml)",
    "predict": "collect Regime W rollouts (configs/rollouts.yaml)",
}


def preferences(
    rollouts: str = "data/abel_regime_w_rollouts.jsonl",
    out: str = "data/abel_coherence_preferences.jsonl",
    threshold: float = 0.01,
) -> None:
    """Phase 3: build correctness and coherence preference pairs from Regime W rollouts.

    Args:
        rollouts: the Phase 2 rollouts file (JSONL, one question per line).
        out: where to write the pairs (JSONL with prompt/chosen/rejected, as TRL's DPO trainer reads).
        threshold: coherence pairs need a reward gap above this.
    """
    from abel_lightning.preferences import write_preferences

    counts = write_preferences(rollouts, out, threshold)
    print(
        f"{out}: {counts.correctness} correctness pairs, {counts.coherence} coherence pairs "
        f"from {counts.questions} questions"
    )


def compare(args: list[str]) -> None:
    """Compare evaluation files (base vs PPO vs DPO): accuracy, 95% bootstrap interval, paired McNemar tests."""
    from abel_lightning.compare import compare as run_compare

    # argparse, not jsonargparse: the shell's glob (outputs/*.jsonl) arrives as separate positional paths.
    parser = argparse.ArgumentParser(prog="abel-lightning compare", description=compare.__doc__)
    parser.add_argument("paths", nargs="+", help="<name>_platinum_eval.jsonl files written by `abel-lightning test`")
    parser.add_argument("--out", default="outputs/compare.png", help="the PNG plot to write")
    parser.add_argument("--n_bootstrap", type=int, default=10000, help="bootstrap resamples of each accuracy")
    parsed = parser.parse_args(args)
    run_compare(parsed.paths, parsed.out, parsed.n_bootstrap)


def pipeline(args: list[str]) -> None:
    """Run the five phases in order from one config, skipping the phases whose outputs are complete.

    ``abel-lightning pipeline --config configs/pipeline.yaml``; with no arguments, the embedded toy testbed.
    """
    from jsonargparse import ActionConfigFile, ArgumentParser

    from abel_lightning.pipeline import TINY_CONFIGS, PipelineConfig, run_pipeline

    # No arguments: the embedded toy testbed as its packaged config, which sets the toy's own coherence threshold.
    args = args or ["--config", str(TINY_CONFIGS / "pipeline.yaml")]
    parser = ArgumentParser(prog="abel-lightning pipeline", description=pipeline.__doc__)
    parser.add_argument("--config", action=ActionConfigFile, help="a pipeline YAML (configs/pipeline.yaml)")
    parser.add_class_arguments(PipelineConfig)
    config = PipelineConfig(**{k: v for k, v in parser.parse_args(args).as_dict().items() if k != "config"})
    report = run_pipeline(config, lightning_cli)
    print(f"report: {report}")


# Commands that are no Lightning loop: each takes its argument list.
EXTRA_COMMANDS: dict[str, Callable[[list[str]], None]] = {
    "preferences": lambda args: CLI(preferences, args=args),
    "compare": compare,
    "pipeline": pipeline,
}
SUMMARIES = {
    name: fn.__doc__.strip().splitlines()[0]
    for name, fn in (("preferences", preferences), ("compare", compare), ("pipeline", pipeline))
}


class SaveConfigBesideLogs(SaveConfigCallback):
    """Writes the run's full config into the logger's folder; a run without a logger (rollouts, evaluation) writes
    none, instead of dropping a config.yaml into the working directory."""

    def setup(self, trainer, pl_module, stage: str) -> None:
        if trainer.logger is not None:
            super().setup(trainer, pl_module, stage)


class AbelCLI(LightningCLI):
    """Lightning's CLI, with the checks that must come before any model or data module is built."""

    def before_instantiate_classes(self) -> None:
        """Refuse a GPU config on a machine without one before any model is built: building it first would fetch and
        load the weights (minutes for a 7B model) only for the Trainer to fail."""
        import torch

        config = self.config[self.subcommand] if self.subcommand else self.config
        accelerator = config.get("trainer", {}).get("accelerator")
        if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
            files = [str(path) for path in config.get("config") or []]
            tiny = " or ".join(f"configs/tiny/{Path(file).name}" for file in files) or "a config from configs/tiny/"
            raise ActionableError(
                f"{', '.join(files) or 'the command line'}: trainer.accelerator is {accelerator!r} but this machine "
                f"has no CUDA GPU; use {tiny} (the toy model on a CPU) or add --trainer.accelerator cpu"
            )


def lightning_cli(args: list[str] | None = None, run: bool = True) -> LightningCLI:
    return AbelCLI(
        subclass_mode_model=True,
        subclass_mode_data=True,
        save_config_callback=SaveConfigBesideLogs,
        save_config_kwargs={"overwrite": True},
        args=args,
        run=run,
        auto_configure_optimizers=False,
    )


def _print_help() -> None:
    print("usage: abel-lightning COMMAND [--config FILE.yaml] [options]\n\ncommands:")
    for name, summary in TRAINER_COMMANDS.items():
        print(f"  {name:<12} {summary}")
    for name, summary in SUMMARIES.items():
        print(f"  {name:<12} {summary}")
    print("\n`abel-lightning COMMAND --help` lists a command's options; a config's model options are listed by")
    print("  abel-lightning fit --config configs/ppo.yaml --model.help abel_lightning.modules.ppo.PPOModule")
    print("(the model's class_path from the config; --data.help CLASS likewise for the data module).")
    print(f"{DEBUG_FLAG} (or {DEBUG_ENV}=1) shows the traceback of a failure that is otherwise reported in one line.")


def report_known_failures(command: Callable[[], None], debug: bool) -> None:
    """Run ``command``; a known failure (:data:`KNOWN_FAILURES`) becomes one line on stderr and exit status 2, unless
    ``debug``, which lets it raise with its traceback."""
    try:
        command()
    except Exception as error:
        known = _known_failure(error)
        if debug or known is None:
            raise
        print(f"abel-lightning: error: {_one_line(known)} ({DEBUG_FLAG} shows the traceback)", file=sys.stderr)
        raise SystemExit(2) from None


def _known_failure(error: BaseException) -> BaseException | None:
    """``error`` if it is a known failure, or the known failure that jsonargparse wrapped while building a class from
    the config (it re-raises an ``__init__``'s error as a ValueError about Union subtypes); None for anything else."""
    while not isinstance(error, KNOWN_FAILURES):
        if error.__cause__ is None or not _raised_by_jsonargparse(error):
            return None
        error = error.__cause__
    return error


def _raised_by_jsonargparse(error: BaseException) -> bool:
    traceback = error.__traceback__
    while traceback is not None and traceback.tb_next is not None:
        traceback = traceback.tb_next
    return traceback is not None and traceback.tb_frame.f_globals.get("__name__", "").startswith("jsonargparse")


def _one_line(error: BaseException) -> str:
    if isinstance(error, FileNotFoundError) and error.filename is not None:
        return f"{error.filename}: no such file or directory (paths are relative to {Path.cwd()}); check the path"
    return " ".join(str(error).split())


def _hide_known_noise() -> None:
    """Drop messages of other libraries that are harmless here and say nothing a user can act on, each by its text."""
    # peft imports bitsandbytes whenever it is installed; on a CPU without the optional `kernels` package it warns
    # that a CPU 4-bit kernel is missing. Quantization here is for CUDA only (models/loading.py).
    logging.getLogger("bitsandbytes.backends.cpu.ops").addFilter(lambda r: "gemm_4bit_forward" not in r.getMessage())
    # An advertisement Lightning logs at every fit.
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(lambda r: "litlogger" not in r.getMessage())
    # The pipeline runs each phase through LightningCLI with its own arguments while sys.argv holds the pipeline's.
    warnings.filterwarnings("ignore", message="LightningCLI's args parameter", category=UserWarning)
    # Deprecations met inside the libraries, not in this code: peft reads transformers' `is_gradient_checkpointing`,
    # Lightning builds torch's `LeafSpec`.
    warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    warnings.filterwarnings("ignore", message=r"`isinstance\(treespec, LeafSpec\)` is deprecated")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    debug = DEBUG_FLAG in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [arg for arg in argv if arg != DEBUG_FLAG]
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    _hide_known_noise()
    if not argv or argv[0] in ("-h", "--help"):
        _print_help()
        return
    if argv[0] in EXTRA_COMMANDS:
        report_known_failures(lambda: EXTRA_COMMANDS[argv[0]](argv[1:]), debug)
        return
    try:
        report_known_failures(lambda: lightning_cli(argv), debug)
    except SystemExit:
        hint = _component_help_hint(argv)
        if hint:
            print(hint)
        raise


def _component_help_hint(argv: list[str]) -> str | None:
    """After ``--help`` with configs: the commands that list the options of the configs' model and data classes, which
    Lightning's help leaves out in subclass mode (it shows only their class_path)."""
    if not {"-h", "--help"} & set(argv):
        return None
    import yaml

    classes = {}
    for flag, value in zip(argv, argv[1:]):
        if flag == "--config" and Path(value).is_file():
            config = yaml.safe_load(Path(value).read_text()) or {}
            for key in ("model", "data"):
                if isinstance(config.get(key), dict) and "class_path" in config[key]:
                    classes[key] = config[key]["class_path"]
    if not classes:
        return None
    lines = [f"  abel-lightning {argv[0]} --{key}.help {path}" for key, path in classes.items()]
    return "\nThe options of the config's classes (not listed above):\n" + "\n".join(lines)


if __name__ == "__main__":
    main()
