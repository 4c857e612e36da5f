"""Training data of the recipes with ``mining: partial`` (retrieval, finetune, end_to_end):
triplets of dataset images from partial mining (``pipeline.mine.PartialMiner``), refreshed every
``cache_queries`` queries, as the official recipes' cache does.

Per refresh (the same on every worker, derived from ``seed`` and the epoch)::

    PartialMiner.sample ──► queries and a database subset ──► their global descriptors with the
    current model (split across workers, all-gathered) ──► hardest negatives per query (triplets)
    ──► ``cache_passes`` passes over a seeded permutation, ``batch_size`` items per global step,
        worker r taking items r::W ──► ``step.step``
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from ..config import ConfigError
from .data import ImageSource, dataset_positions, describe_rows, item_images
from .step import Batch, triplet_rows
from .validation import ImageValidation

if TYPE_CHECKING:
    from .config import TrainConfig
    from .loop import Trainer
    from .recipes import Recipe


class PartialMiningData:
    mining = "partial"
    validation = ImageValidation

    @staticmethod
    def on_tokens(cfg: TrainConfig) -> bool:
        """Whether training reads stored tokens instead of images: never, triplets need images."""
        return False

    @staticmethod
    def check(cfg: TrainConfig, recipe: Recipe) -> None:
        missing = [f"train.{n}" for n in ("queries", "database") if not getattr(cfg.train, n)]
        if missing:
            raise ConfigError(f"recipe {recipe.name} needs {', '.join(missing)} (dataset specs)")

    def __init__(self, cfg: TrainConfig, recipe: Recipe, rank: int, world: int, device):
        from ..datasets import load_dataset
        from ..mine import PartialMiner

        self.cfg, self.recipe, self.rank, self.world, self.device = cfg, recipe, rank, world, device
        q, db = load_dataset(cfg.train.queries), load_dataset(cfg.train.database)
        self.q_src, self.db_src = ImageSource(q, cfg.image_size), ImageSource(db, cfg.image_size)
        self.miner = PartialMiner(dataset_positions(q), dataset_positions(db), positive_radius=cfg.positive_radius,
                                  negative_radius=cfg.negative_radius, cache_queries=cfg.cache_queries,
                                  database_subset=cfg.database_subset, num_negatives=recipe.num_negatives,
                                  seed=cfg.seed)

    def epoch(self, epoch: int, trainer: Trainer) -> list[float]:
        """Train one epoch through ``trainer``; returns the global batch loss of every step."""
        import torch

        cfg, B = self.cfg, self.recipe.batch_size
        losses: list[float] = []
        refreshes = max(1, math.ceil(min(cfg.queries_per_epoch, len(self.miner.trainable_queries)) / cfg.cache_queries))
        for r in range(refreshes):
            round_ = self.miner.sample(epoch * 1000 + r)
            qd = describe_rows(trainer.model, self.q_src, round_.queries, self.rank, self.world, self.device)
            dd = describe_rows(trainer.model, self.db_src, round_.database, self.rank, self.world, self.device)
            trip = self.miner.triplets(round_, qd, dd)
            order = np.random.default_rng([cfg.seed, epoch, r]).permutation(len(trip.queries))
            steps = len(order) // B
            trainer.set_train_mode()
            for s in [s for _ in range(cfg.cache_passes) for s in range(steps)]:
                if trainer.capped(len(losses)):
                    break
                idx = order[s * B:(s + 1) * B][self.rank::self.world]
                ni = trip.negatives[idx]
                images = item_images(self.q_src, self.db_src, trip.queries[idx], trip.positives[idx], ni, self.device)
                batch = Batch(triplets=torch.from_numpy(triplet_rows(len(idx), ni.shape[1])).to(self.device),
                              global_batch=B, images=images)
                losses.append(trainer.step(batch))
            if trainer.capped(len(losses)):
                break
        return losses
