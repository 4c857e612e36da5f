"""Ray job: training on Ray Train (retrieval, rerank or finetune stage).

    python -m jobs.train --config configs/jobs/train.yaml [--set key=value ...]

Submit it to a cluster with `ray job submit` (see jobs/common.py and infra/OPERATIONS.md).
"""
from jobs.specs import JOBS

SPEC = JOBS["train"]
main = SPEC.main

if __name__ == "__main__":
    SPEC.entrypoint()
