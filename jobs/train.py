"""Ray job: training on Ray Train (retrieval, rerank or finetune stage).

    python -m jobs.train --config configs/jobs/train.yaml [--set key=value ...]

Submit it to a cluster with `ray job submit` (see jobs/common.py and infra/OPERATIONS.md).
"""
from jobs.common import JobSpec, entrypoint, main as _main

SPEC = JobSpec(name="train", module="pipeline.train", config_class="TrainConfig", function="run",
               output_fields=("output",))


def main(argv=None) -> int:
    return _main(SPEC, argv)


if __name__ == "__main__":
    entrypoint(SPEC)
