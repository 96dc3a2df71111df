"""`ddk-cache` as torchrun starts it, with test-only instruments set by environment variables.

- DDK_TEST_WEIGHTS: a folder; every rank appends the DDK weights it sets to weights-rank<R>.jsonl,
  so a test can compare what each rank decided.
- DDK_TEST_KILL_RANK / DDK_TEST_KILL_STEP: that rank SIGKILLs itself when it starts that step.
- DDK_TEST_STORE_RANK / DDK_TEST_STORE: that rank is given another --store (a node that cannot see it).
"""

import json
import os
import signal
import sys
from pathlib import Path

from ddk_cache.stages.distill import Trainer
from ddk_cache.training.domain_samplers import DDKSampler

rank = int(os.environ.get("RANK", "0"))

if "DDK_TEST_WEIGHTS" in os.environ:
    update = DDKSampler.update

    def recording_update(self, student_ppl, teacher_ppl):
        update(self, student_ppl, teacher_ppl)
        with (Path(os.environ["DDK_TEST_WEIGHTS"]) / f"weights-rank{rank}.jsonl").open("a") as log:
            log.write(json.dumps([float(w) for w in self.weights]) + "\n")

    DDKSampler.update = recording_update

if os.environ.get("DDK_TEST_KILL_RANK") == str(rank):
    train_step, kill_step = Trainer.train_step, int(os.environ["DDK_TEST_KILL_STEP"])

    def dying_train_step(self):
        if self.state.step == kill_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return train_step(self)

    Trainer.train_step = dying_train_step

args = sys.argv[1:]
if os.environ.get("DDK_TEST_STORE_RANK") == str(rank):
    args[args.index("--store") + 1] = os.environ["DDK_TEST_STORE"]

from ddk_cache.cli.main import main  # noqa: E402

sys.argv = ["ddk-cache", *args]
main()
