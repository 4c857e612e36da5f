"""Ray job: Recall@N of ranked lists against ground-truth positions.

    python -m jobs.evaluate --config configs/jobs/evaluate.yaml [--set key=value ...]

Submit it to a cluster with `ray job submit` (see jobs/common.py and infra/OPERATIONS.md).
"""
from jobs.common import JobSpec, entrypoint, main as _main

SPEC = JobSpec(name="evaluate", module="pipeline.evaluate", config_class="EvaluateConfig", function="run",
               output_fields=("out", "results"))


def main(argv=None) -> int:
    return _main(SPEC, argv)


if __name__ == "__main__":
    entrypoint(SPEC)
