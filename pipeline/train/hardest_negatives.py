"""Training data of the recipes with ``mining: global`` (rerank): each query with its best
positive and ``num_negatives`` negatives drawn from its top-``negatives_top`` global hardest
negatives (``r2f mine``).

    extraction stores' global tables (image id, row, position, global descriptor)
        ──► best positive per query (nearest in descriptor space within ``positive_radius``)
    `r2f mine` output ──► each query's negative pool as database table rows
        ──► per epoch a seeded permutation and a seeded draw of negatives from each pool,
            ``batch_size`` items per global step, worker r taking items r::W
        ──► images of the items (official: tokens recomputed, so ``local_head`` learns) or their
            stored tokens (``rerank_source: tokens``, a project deviation) ──► ``step.step``

Items are arrays (query row, positive row, negative pool padded with -1): memory
O(queries x negatives_top), no Python object per query.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .. import storage
from ..config import ConfigError
from .data import ImageSource, TokenSource, align_to_store, dataset_positions, item_images
from .step import Batch, triplet_rows
from .validation import RerankValidation

if TYPE_CHECKING:
    from .config import TrainConfig
    from .loop import Trainer
    from .recipes import Recipe


def best_positives(query_desc: np.ndarray, db_desc: np.ndarray, positives, chunk_pairs: int = 1 << 20,
                   ) -> np.ndarray:
    """(Q,) the database row among each query's ``positives`` (``spatial.Neighbours``) nearest in
    descriptor space, -1 where a query has none. Vectorised over (query, positive) pairs in
    chunks: memory O(chunk_pairs x D)."""
    counts = positives.counts
    pair_q = np.repeat(np.arange(len(counts), dtype=np.int64), counts)
    d = np.empty(len(pair_q), np.float32)
    for s in range(0, len(pair_q), chunk_pairs):
        e = s + chunk_pairs
        d[s:e] = ((db_desc[positives.rows[s:e]] - query_desc[pair_q[s:e]]) ** 2).sum(-1)
    order = np.lexsort((d, pair_q))       # by query, then distance: each query's first pair is its best
    out = np.full(len(counts), -1, np.int64)
    has = counts > 0
    out[has] = positives.rows[order[positives.offsets[:-1][has]]]
    return out


class HardestNegativesData:
    mining = "global"
    validation = RerankValidation

    @staticmethod
    def on_tokens(cfg: TrainConfig) -> bool:
        """Whether training reads stored tokens instead of images (``rerank_source: tokens``)."""
        return cfg.rerank_source == "tokens"

    @staticmethod
    def check(cfg: TrainConfig, recipe: Recipe) -> None:
        if cfg.rerank_source == "tokens" and recipe.triplet_loss:
            raise ConfigError(f"recipe {recipe.name} has a triplet loss: rerank_source tokens cannot train it")
        need = ["queries_store", "database_store", "hardest_negatives"]
        if cfg.rerank_source == "images":
            need += ["queries", "database"]
        missing = [f"train.{n}" for n in need if not getattr(cfg.train, n)]
        if missing:
            raise ConfigError(f"recipe {recipe.name} needs {', '.join(missing)} (extraction stores and `r2f mine` "
                              f"output{'' if cfg.rerank_source == 'tokens' else ', dataset specs of the images'})")

    def __init__(self, cfg: TrainConfig, recipe: Recipe, rank: int, world: int, device):
        from ..mine import read_hardest_negatives
        from ..spatial import PositionIndex

        self.cfg, self.recipe, self.rank, self.world, self.device = cfg, recipe, rank, world, device
        self.tokens = self.on_tokens(cfg)
        cols = ["image_id", "row", "utm_east", "utm_north", "global_descriptor"]
        q = storage.read_global_table(cfg.train.queries_store, cols)
        db = storage.read_global_table(cfg.train.database_store, cols)
        q_rows = q.column("row").to_numpy().astype(np.int64)
        db_rows = db.column("row").to_numpy().astype(np.int64)
        q_ids = q.column("image_id").to_numpy().astype(np.int64)
        db_ids = db.column("image_id").to_numpy().astype(np.int64)
        q_desc, db_desc = storage.descriptors_of(q), storage.descriptors_of(db)
        hard = PositionIndex(dataset_positions(db)).pairs_within(dataset_positions(q), cfg.positive_radius)
        best = best_positives(q_desc, db_desc, hard)
        negatives = read_hardest_negatives(cfg.train.hardest_negatives, top=cfg.negatives_top)
        mined = negatives.rows_of(q_ids)
        neg_ids = np.where(mined[:, None] >= 0, negatives.negatives[np.maximum(mined, 0)], -1)
        # Negative image ids -> database table rows (ids outside this database are dropped).
        by_id = np.argsort(db_ids, kind="stable")
        at = np.clip(np.searchsorted(db_ids[by_id], neg_ids), 0, len(db_ids) - 1)
        pool = np.where((neg_ids >= 0) & (db_ids[by_id][at] == neg_ids), by_id[at], -1)
        pool = np.take_along_axis(pool, np.argsort(pool < 0, axis=1, kind="stable"), 1)  # valid first
        pool_len = (pool >= 0).sum(1)
        keep = np.flatnonzero((best >= 0) & (pool_len > 0))
        self.item_q, self.item_pos = keep, best[keep]
        self.item_pool, self.item_pool_len = pool[keep], pool_len[keep]
        if not len(keep):
            raise ValueError("rerank training found no query with both a positive and hardest negatives; "
                             "check positive_radius and the `r2f mine` output")
        self.num_items = len(keep)
        self.steps_per_epoch = max(1, self.num_items // recipe.batch_size)
        if cfg.max_steps_per_epoch:
            self.steps_per_epoch = min(self.steps_per_epoch, cfg.max_steps_per_epoch)
        if self.tokens:
            self.q_tokens = TokenSource(cfg.train.queries_store, q_rows)
            self.db_tokens = TokenSource(cfg.train.database_store, db_rows)
        else:
            from ..datasets import load_dataset
            qt, dbt = load_dataset(cfg.train.queries), load_dataset(cfg.train.database)
            self.q_src = ImageSource(align_to_store(qt, q_ids, cfg.train.queries), cfg.image_size)
            self.db_src = ImageSource(align_to_store(dbt, db_ids, cfg.train.database), cfg.image_size)

    def _item_tokens(self, qi: np.ndarray, pi: np.ndarray, ni: np.ndarray, epoch: int, s: int):
        """Stored tokens of items (query, positive, negatives...) in the official collate order."""
        import torch

        cfg = self.cfg
        b, K = len(qi), ni.shape[1]
        c_np = self.db_tokens.get(np.concatenate([pi, ni.reshape(-1)]))
        if cfg.augment != "none":
            from ..augment import augment_candidates
            c_np = augment_candidates(c_np, cfg.augment, cfg.augment_scale,
                                      np.random.default_rng([cfg.seed, epoch, s, self.rank]),
                                      aspect=cfg.image_size[0] / cfg.image_size[1])
        q = self.q_tokens.get(qi)
        items = np.concatenate([q[:, None], c_np[:b, None], c_np[b:].reshape(b, K, *c_np.shape[1:])], axis=1)
        return torch.from_numpy(items.reshape(b * (2 + K), *q.shape[1:])).to(self.device)

    def epoch(self, epoch: int, trainer: Trainer) -> list[float]:
        """Train one epoch through ``trainer``; returns the global batch loss of every step."""
        import torch

        cfg, B, K = self.cfg, self.recipe.batch_size, self.recipe.num_negatives
        rng = np.random.default_rng([cfg.seed, epoch])
        order = rng.permutation(self.num_items)
        neg_pick = rng.integers(0, 1 << 30, (self.num_items, K))   # negatives drawn from each query's pool
        trainer.set_train_mode()
        losses = []
        for s in range(self.steps_per_epoch):
            idx = order[s * B:(s + 1) * B][self.rank::self.world]
            qi, pi = self.item_q[idx], self.item_pos[idx]
            ni = self.item_pool[idx[:, None], neg_pick[idx] % self.item_pool_len[idx, None]]
            triplets = torch.from_numpy(triplet_rows(len(idx), K)).to(self.device)
            if self.tokens:
                batch = Batch(triplets=triplets, global_batch=B, tokens=self._item_tokens(qi, pi, ni, epoch, s))
            else:
                batch = Batch(triplets=triplets, global_batch=B,
                              images=item_images(self.q_src, self.db_src, qi, pi, ni, self.device))
            losses.append(trainer.step(batch))
        return losses
