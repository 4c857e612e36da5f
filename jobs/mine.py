"""Ray job: cluster-wide hardest-negative mining.

    python -m jobs.mine --config configs/jobs/mine.yaml [--set key=value ...]

Submit it to a cluster with `ray job submit` (see jobs/common.py and infra/OPERATIONS.md).
"""
from jobs.specs import JOBS

SPEC = JOBS["mine"]
main = SPEC.main

if __name__ == "__main__":
    SPEC.entrypoint()
