"""LightningCLI entry point: prune LeNet on MNIST digits with fairness monitoring, from YAML.

    python examples/cli.py fit --config examples/configs/cubic_equalized.yaml
    python examples/cli.py fit --config examples/configs/one_shot_undecayed.yaml \
        --pruning.final_sparsity=0.8 --trainer.max_epochs=6
    python examples/compare_recipes.py --seeds 5     # every recipe config, N seeds, compared
    fairprune-report runs/* --out runs/report      # compare the runs afterwards

Besides the usual ``model``/``data``/``trainer`` sections, the CLI has one section per
lightning_fairprune callback, so every setting is a plain YAML key or command-line flag (this
is what the W&B sweep in ``examples/sweep.yaml`` varies):

* ``pruning``: `IterativePruning` init arguments (always attached);
* ``monitor``: `FairnessMonitor` init arguments (always attached);
* ``equalizer``: optional ``class_path``/``init_args`` of a `GroupEqualizer`; use it together
  with ``model.group_equalized: true`` (the model's loss it drives).

Schedules, criteria and parameter selection are given by name, so no Python object is needed
in a config. The callbacks' settings also go into the W&B run config when a `WandbLogger` is
attached, and the final numbers into the run summary.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fairprune_examples import LeNet
from lightning.pytorch import LightningDataModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI

from lightning_fairprune.callbacks.equalizer import GroupEqualizer
from lightning_fairprune.callbacks.monitor import FairnessMonitor
from lightning_fairprune.callbacks.pruning import IterativePruning
from lightning_fairprune.logging import log_config

#: CLI section -> name used in the W&B run config.
SECTIONS = {
    "pruning": "IterativePruning",
    "monitor": "FairnessMonitor",
    "equalizer": "GroupEqualizer",
}


class FairPruneCLI(LightningCLI):
    """LightningCLI with ``pruning``, ``monitor`` and optional ``equalizer`` sections."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_lightning_class_args(IterativePruning, "pruning")
        parser.add_lightning_class_args(FairnessMonitor, "monitor")
        # optional, so not a callback section (those are always attached): a plain subclass
        # argument, added to the trainer's callbacks in instantiate_trainer when it is given
        parser.add_subclass_arguments(GroupEqualizer, "equalizer", required=False)

    def instantiate_trainer(self, **kwargs: Any) -> Trainer:
        config = self._subcommand_config(self.config_init)
        equalizer = config.get("equalizer")
        if equalizer is not None:
            callbacks = (config.get("trainer") or {}).get("callbacks") or []
            callbacks = callbacks if isinstance(callbacks, list) else [callbacks]
            kwargs["callbacks"] = [*callbacks, equalizer]
        return super().instantiate_trainer(**kwargs)

    def _subcommand_config(self, config: Any) -> Any:
        """The part of ``config`` that belongs to the running subcommand."""
        return config.get(str(self.subcommand), config) if self.subcommand else config

    def _settings(self) -> dict[str, Any]:
        config = self._subcommand_config(self.config)
        out = {}
        for key, name in SECTIONS.items():
            value = config.get(key)
            if value is not None:
                out[name] = value.as_dict() if hasattr(value, "as_dict") else dict(value)
        return out

    def before_fit(self) -> None:
        for name, settings in self._settings().items():
            log_config(self.trainer, name, settings)


def main(
    args: Sequence[str] | None = None, run: bool = True, model_class: type | None = LeNet
) -> FairPruneCLI:
    """Build (and by default run) the CLI; ``args=None`` reads ``sys.argv``.

    ``model_class=None``: any LightningModule, named by ``model.class_path`` in the config
    (the recipe configs of ``examples/configs/recipes/`` do this).
    """
    return FairPruneCLI(
        model_class,
        LightningDataModule,
        subclass_mode_data=True,
        args=None if args is None else list(args),
        run=run,
        save_config_kwargs={"overwrite": True},
    )


if __name__ == "__main__":
    main()
