"""Run under `mpiexec -n 2` by tests/test_distributed.py: pre-training as `fastllm train` runs it, with rank 1
misbehaving at step 3 -- `raise` (an exception), `hang` (sleeps far past the timeout), `stop` (SIGSTOP: the
process no longer answers at all) -- or `ok` (none). Usage: python mpi_worker.py MODE DATA OUT."""

from __future__ import annotations

import os
import signal
import sys
import time

from fastllm import distributed
from fastllm.train import LMStage, TrainConfig, train


def main() -> None:
    mode, data, out = sys.argv[1:4]
    step_of = LMStage.step

    def step(self, step, lr, rng):
        if distributed.world().rank == 1 and step == 3:
            if mode == "raise":
                raise RuntimeError("boom on purpose")
            if mode == "hang":
                time.sleep(600)
            if mode == "stop":
                os.kill(os.getpid(), signal.SIGSTOP)
        return step_of(self, step, lr, rng)

    LMStage.step = step
    train(TrainConfig(data=data, out=out, model="tiny", batch_size=4, seq_len=32, total_batch_tokens=256,
                      max_steps=6, eval_every=0, threads=1), progress=False)


if __name__ == "__main__":
    main()
