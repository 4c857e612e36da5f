"""Ray job: extraction of images into an extraction store (Parquet + Zarr).

    python -m jobs.extract --config configs/jobs/extract.yaml [--set key=value ...]

Submit it to a cluster with `ray job submit` (see jobs/common.py and infra/OPERATIONS.md).
"""
from jobs.common import JobSpec, entrypoint, main as _main

SPEC = JobSpec(name="extract", module="pipeline.extract", config_class="ExtractConfig", function="run",
               output_fields=("store",))


def main(argv=None) -> int:
    return _main(SPEC, argv)


if __name__ == "__main__":
    entrypoint(SPEC)
