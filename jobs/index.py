"""Ray job: a new version of the sharded FAISS index from an extraction store.

    python -m jobs.index --config configs/jobs/index.yaml [--set key=value ...]

Submit it to a cluster with `ray job submit` (see jobs/common.py and infra/OPERATIONS.md).
"""
from jobs.specs import JOBS

SPEC = JOBS["index"]
main = SPEC.main

if __name__ == "__main__":
    SPEC.entrypoint()
