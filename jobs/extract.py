"""Ray job: extraction of images into an extraction store (Parquet + Zarr).

    python -m jobs.extract --config configs/jobs/extract.yaml [--set key=value ...]

Submit it to a cluster with `ray job submit` (see jobs/common.py and infra/OPERATIONS.md).
"""
from jobs.specs import JOBS

SPEC = JOBS["extract"]
main = SPEC.main

if __name__ == "__main__":
    SPEC.entrypoint()
