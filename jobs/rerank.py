"""Ray job: batch reranking of a query set against the index.

    python -m jobs.rerank --config configs/jobs/rerank.yaml [--set key=value ...]

Submit it to a cluster with `ray job submit` (see jobs/common.py and infra/OPERATIONS.md).
Streaming and resumable (docs/rerank.md): `ray job stop` exits 143 with every committed part
intact, and resubmitting the same config skips them; a partition that failed every attempt makes
the job exit 1 after all others are done. The summary, `<results>/job-rerank.json`, carries the
fetched and distinct-candidate token bytes.
"""
from jobs.common import JobSpec, entrypoint, main as _main

SPEC = JobSpec(name="rerank", module="pipeline.rerank", config_class="RerankConfig", function="run",
               output_fields=("results",))


def main(argv=None) -> int:
    return _main(SPEC, argv)


if __name__ == "__main__":
    entrypoint(SPEC)
