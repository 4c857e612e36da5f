"""Ray job: batch reranking of a query set against the index.

    python -m jobs.rerank --config configs/jobs/rerank.yaml [--set key=value ...]

Submit it to a cluster with `ray job submit` (see jobs/common.py and infra/OPERATIONS.md).
Streaming and resumable (docs/rerank.md): `ray job stop` exits 143 with every committed part
intact, and resubmitting the same config skips them; a partition that failed every attempt makes
the job exit 1 after all others are done. The summary, `<results>/job-rerank.json`, carries the
fetched and distinct-candidate token bytes.
"""
from jobs.specs import JOBS

SPEC = JOBS["rerank"]
main = SPEC.main

if __name__ == "__main__":
    SPEC.entrypoint()
