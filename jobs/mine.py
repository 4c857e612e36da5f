"""Ray job: cluster-wide hardest-negative mining.

    python -m jobs.mine --config configs/jobs/mine.yaml [--set key=value ...]

Submit it to a cluster with `ray job submit` (see jobs/common.py and infra/OPERATIONS.md).
"""
from jobs.common import JobSpec, entrypoint, main as _main

SPEC = JobSpec(name="mine", module="pipeline.mine", config_class="MineConfig", function="run",
               output_fields=("output",))


def main(argv=None) -> int:
    return _main(SPEC, argv)


if __name__ == "__main__":
    entrypoint(SPEC)
