"""Entry point: `accelerate launch run.py manifest=jobs.csv [Hydra overrides]` (or plain python)."""

from batch_runner.lifecycle import die_with_parent, started_by_launcher

if started_by_launcher():
    die_with_parent()  # before the slow imports below: a launcher killed meanwhile still takes us along

import sys

import hydra
from omegaconf import DictConfig

from batch_runner.cli import main as run_main
from batch_runner.config import register_configs
from batch_runner.launch import requested_cpu_processes, respawn_with_torchrun

register_configs()


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    sys.exit(run_main(cfg))


if __name__ == "__main__":
    processes = requested_cpu_processes()
    sys.exit(respawn_with_torchrun(processes)) if processes > 1 else main()
