"""Entry point: `accelerate launch run.py manifest=jobs.csv [Hydra overrides]` (or plain python)."""

import sys

import hydra
from omegaconf import DictConfig

from batch_runner.cli import main as run_main
from batch_runner.config import register_configs
from batch_runner.launch import requested_cpu_launch, respawn_with_torchrun

register_configs()


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    sys.exit(run_main(cfg))


if __name__ == "__main__":
    launch = requested_cpu_launch()
    sys.exit(respawn_with_torchrun(launch)) if launch.needs_respawn else main()
