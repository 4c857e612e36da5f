"""The Ray jobs, one row each: the job's name, the stage's config class and the function it runs,
and the config fields that name its outputs (where ``job-<name>.json`` goes).

``python -m jobs.<name>`` runs ``JOBS[name]`` (one small module per job, so that the command
``ray job submit`` is given stays what infra/ and README document).
"""
from __future__ import annotations

from jobs.common import JobSpec
from pipeline import evaluate, extract, index, mine, reindex, rerank, train

JOBS: dict[str, JobSpec] = {spec.name: spec for spec in (
    JobSpec("extract", extract.ExtractConfig, extract.run, ("store",)),
    JobSpec("index", index.IndexConfig, index.build, ("resolved_index_dir",)),
    JobSpec("rerank", rerank.RerankConfig, rerank.run, ("results",)),
    JobSpec("evaluate", evaluate.EvaluateConfig, evaluate.run, ("out", "results")),
    JobSpec("mine", mine.MineConfig, mine.run, ("output",)),
    JobSpec("train", train.TrainConfig, train.run, ("output",)),
    JobSpec("reindex", reindex.ReindexConfig, reindex.run, ("resolved_index_dir",)),
)}
