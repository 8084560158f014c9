"""The lean Trainer stepped by a loop of its own, as Lightning's fit steps a NeMo 2 job.

A front-end whose framework owns the training loop cannot hand it to
``RecoveryLoop.run()``; it uses the loop's entry for that case instead (what
``nemo/session.py`` does inside Lightning): ``runtime.open_recovery`` (the agent's hello,
a warm spare waits there), ``join`` (the generation's world, before the framework builds
in it), ``attach`` (the built driver: agreement, and the state transfer to a replacement),
``recover`` on a failure the framework caught in a step, ``step_done`` after each step,
``finish``, ``runtime.end_recovery``. This script is that front-end with the lean loop's
Trainer, so the entry is tested without NeMo; run by ncl-launch in place of
``recipes/pretrain.py`` (same overrides, plus ``hydra.run.dir=DIR``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from nemo_checkpointless import runtime
from nemo_checkpointless.comm import destroy_world
from nemo_checkpointless.config import compose
from nemo_checkpointless.launch.channel import Channel
from nemo_checkpointless.logs import setup_logging
from nemo_checkpointless.train.loop import Trainer


def main(argv: list[str]) -> None:
    run_dir = Path(next(a.split("=", 1)[1] for a in argv if a.startswith("hydra.run.dir=")))
    cfg = compose([a for a in argv if not a.startswith("hydra.")])
    setup_logging("spare" if os.environ.get("NCL_SPARE") == "1" else os.environ["RANK"])
    channel = Channel.from_env()
    assert channel is not None, "run under ncl-launch"
    loop = runtime.open_recovery(cfg, run_dir, channel)  # a warm spare waits in here
    try:
        loop.join()  # a replacement too: the survivors wait for it in the new generation
        trainer = Trainer(cfg, run_dir, loop.step_hooks)
        trainer.setup(collective=not loop.replacement)
        loop.attach(trainer)
        while trainer.step < cfg.trainer.max_steps:
            try:
                metrics = trainer.train_step()
            except BaseException as err:  # noqa: BLE001 - the loop classifies it
                loop.recover(err)
                continue
            loop.step_done(metrics)
        while True:
            try:
                summary = loop.finish()
                break
            except BaseException as err:  # noqa: BLE001 - the loop classifies it
                loop.recover(err)
        runtime.end_recovery(loop, channel, summary)
    except BaseException as err:
        runtime.leave_on(err, channel)
        raise
    finally:
        try:
            destroy_world()
        except Exception:  # noqa: BLE001 - groups may already be aborted
            pass
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # groups parked by recoveries are not shut down at exit (as pretrain.py)


if __name__ == "__main__":
    main(sys.argv[1:])
