"""Ray job: Recall@N of ranked lists against ground-truth positions.

    python -m jobs.evaluate --config configs/jobs/evaluate.yaml [--set key=value ...]

Submit it to a cluster with `ray job submit` (see jobs/common.py and infra/OPERATIONS.md).
"""
from jobs.specs import JOBS

SPEC = JOBS["evaluate"]
main = SPEC.main

if __name__ == "__main__":
    SPEC.entrypoint()
