"""Ray job: scheduled incremental reindexing (extract new/changed images, publish a new index version).

    python -m jobs.reindex --config configs/jobs/reindex.yaml [--set key=value ...]

Submit it to a cluster with `ray job submit` (see jobs/common.py and infra/OPERATIONS.md).
"""
from jobs.common import JobSpec, entrypoint, main as _main

SPEC = JobSpec(name="reindex", module="pipeline.reindex", config_class="ReindexConfig", function="run",
               output_fields=("resolved_index_dir",))


def main(argv=None) -> int:
    return _main(SPEC, argv)


if __name__ == "__main__":
    entrypoint(SPEC)
