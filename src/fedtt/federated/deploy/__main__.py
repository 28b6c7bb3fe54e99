"""`python -m fedtt.federated.deploy clientapp-worker ...`, the worker's former command line:
the same as `python -m fedtt.federated.deploy.worker clientapp-worker ...`."""

import sys

from fedtt.federated.deploy.worker import main

sys.exit(main())
