"""Ray job: scheduled incremental reindexing (extract new/changed images, publish a new index version).

    python -m jobs.reindex --config configs/jobs/reindex.yaml [--set key=value ...]

Submit it to a cluster with `ray job submit` (see jobs/common.py and infra/OPERATIONS.md).
"""
from jobs.specs import JOBS

SPEC = JOBS["reindex"]
main = SPEC.main

if __name__ == "__main__":
    SPEC.entrypoint()
