"""The test suite. Imported before tests/conftest.py and every test module, in each pytest process.

One CPU thread per process: the suite runs three workers on the two cores CI has, and the
processes the tests launch run beside them. torch's default, a thread per core that spins while it
waits, had every process compete with the others for the same cores: the family contract's
end-to-end runs took 30% more CPU time with it (81.7 user-s against 57.7 for two of them). Set
before anything imports torch here, and inherited by every process a test starts; a value exported
beforehand stands.
"""

import os

os.environ.setdefault("OMP_NUM_THREADS", "1")

# A warm server the developer left running (python -m batch_runner.run.warm) serves no run the tests
# start: tests/test_warm.py starts its own, on sockets of its own, and turns this back on for them.
os.environ.setdefault("BATCH_RUNNER_WARM", "0")
