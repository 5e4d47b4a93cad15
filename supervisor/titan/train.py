"""`python -m supervisor.titan.train <TorchTitan args>`: TorchTitan's own
training entry point with the supervised Trainer.

Started by `supervise node` through torchrun (with SUPERVISE_RUN_DIR,
SUPERVISE_CHECKPOINTS, SUPERVISE_LEDGER, SUPERVISE_INCARNATION set) or by
plain torchrun, in which case heartbeats, notices, commits and ledger events
are simply off. Exits 0 when training finished *and* when it stopped cleanly
on a notice; outcome.json in the run dir says which.
"""

from __future__ import annotations

import os
import sys


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    from supervisor.titan import cpu_compat

    if cpu_compat.apply():
        # first, so that the user's own args override them
        argv = cpu_compat.cpu_args(int(os.environ.get("WORLD_SIZE", "1"))) + argv

    import torch
    from torchtitan.config import ConfigManager
    from torchtitan.observability import structured_logger as sl
    from torchtitan.tools.logging import init_logger, logger

    from supervisor.titan.trainer import SuperviseTrainer

    init_logger()
    config = ConfigManager().parse_args(argv)
    sl.init_structured_logger(source="training", output_dir=config.dump_folder,
                              enable=config.debug.enable_structured_logging)
    trainer = None
    try:
        trainer = SuperviseTrainer(config)
        if config.checkpoint.create_seed_checkpoint:  # as torchtitan.train does
            trainer.checkpointer.save(curr_step=0, last_step=True)
        else:
            trainer.train()
    except BaseException:
        if trainer is not None:
            trainer.close()
        raise  # torchrun reports it; the wrapper classifies the exit
    trainer.write_outcome()
    if trainer.rank == 0:
        logger.info(f"supervise: outcome {trainer.outcome}")
    trainer.close()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
