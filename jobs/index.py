"""Ray job: a new version of the sharded FAISS index from an extraction store.

    python -m jobs.index --config configs/jobs/index.yaml [--set key=value ...]

Submit it to a cluster with `ray job submit` (see jobs/common.py and infra/OPERATIONS.md).
"""
from jobs.common import JobSpec, entrypoint, main as _main

SPEC = JobSpec(name="index", module="pipeline.index", config_class="IndexConfig", function="build",
               output_fields=("resolved_index_dir",))


def main(argv=None) -> int:
    return _main(SPEC, argv)


if __name__ == "__main__":
    entrypoint(SPEC)
