"""Entry point: `accelerate launch run.py manifest=jobs.csv [Hydra overrides]` (or plain python)."""

from batch_runner.run import startup  # noqa: F401, I001  first: its import marks the interpreter's start-up done
from batch_runner.run import warm
from batch_runner.run.lifecycle import die_with_parent, exit_now, started_by_launcher

if started_by_launcher() and not warm.is_forked_run():
    die_with_parent()  # before the slow imports below: a launcher killed meanwhile still takes us along
if __name__ == "__main__" and not warm.is_forked_run():
    served = warm.hand_over(__file__)  # a warm server's child runs this command, its imports done
    if served is not None:
        exit_now(served)

import os
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from batch_runner.config import register_configs
from batch_runner.errors import UserError
from batch_runner.run.launch import requested_cpu_launch, respawn_with_torchrun
from batch_runner.run.overrides import check_overrides, with_family_options

register_configs()


@hydra.main(config_path="conf", config_name="config", version_base=None)
def main(cfg: DictConfig) -> None:
    from batch_runner.run.cli import main as run_main  # imports torch: after the overrides were checked

    exit_now(run_main(cfg))


if __name__ == "__main__":
    try:
        check_overrides(sys.argv[1:], Path(__file__).resolve().parent / "conf")
    except UserError as e:
        if int(os.environ.get("RANK", 0)) == 0:
            print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    sys.argv[1:] = with_family_options(sys.argv[1:])  # before Hydra, the preflight and torchrun read them
    launch = requested_cpu_launch()
    if launch.needs_respawn:  # this launch's one process, before it starts the others: refuse here, once
        from batch_runner.run.preflight import preflight

        try:
            preflight(sys.argv[1:], Path(__file__).resolve().parent / "conf", launch.nproc_per_node * launch.nnodes)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
    exit_now(respawn_with_torchrun(launch)) if launch.needs_respawn else main()
