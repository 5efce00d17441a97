"""A torchrun worker for launcher tests: exits with the code given for its rank (``RANK=CODE,...``).

With ``wait`` it instead waits for SIGTERM and exits 75, as the trainer does after its stop checkpoint.
"""

import os
import signal
import sys
import time

if sys.argv[1] == "wait":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(75))
    # One write call: under PYTHONUNBUFFERED print() sends the text and its newline as two writes, and the two
    # workers' lines could interleave on the shared pipe.
    sys.stdout.write(f"worker {os.environ['RANK']} waiting\n")
    sys.stdout.flush()
    time.sleep(60)
    sys.exit(1)
codes = dict(item.split("=") for item in sys.argv[1].split(","))
sys.exit(int(codes.get(os.environ["RANK"], "0")))
