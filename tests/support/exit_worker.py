"""A torchrun worker for launcher tests: exits with the code given for its rank (``RANK=CODE,...``).

With ``wait`` it instead waits for SIGTERM and exits 75, as the trainer does after its stop checkpoint.
"""

import os
import signal
import sys
import time

if sys.argv[1] == "wait":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(75))
    print(f"worker {os.environ['RANK']} waiting", flush=True)
    time.sleep(60)
    sys.exit(1)
codes = dict(item.split("=") for item in sys.argv[1].split(","))
sys.exit(int(codes.get(os.environ["RANK"], "0")))
