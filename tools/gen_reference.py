"""Print docs/reference.md: `make reference`, or `python tools/gen_reference.py > docs/reference.md`.

The rendering is opt_study.config.reference; this script adds the workload registry, which lives
a layer above the config layer.
"""

from opt_study.config.reference import document
from opt_study.workloads import WORKLOADS

if __name__ == "__main__":
    print(document({name: cfg for name, (_, cfg) in WORKLOADS.items()}), end="")
