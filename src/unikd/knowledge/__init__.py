"""Offline distillation (DESIGN §2 "Offline stage 2", §3 "Knowledge store"; ``docs/offline.md``): the teacher's
side of UniKD's stage 2 dumped to disk once (``unikd dump``), then stage 2 with no teacher in memory
(``unikd distill --knowledge-store``)."""
from .dump import dump_manifest, dump_records, prepare_store, store_summary
from .manifest import KnowledgeStoreError, new_manifest
from .offline import OfflineDistillationModel, StoredKnowledge, batch_knowledge, check_store_fits
from .store import KnowledgeStore
from .verify import verify_store

__all__ = ["KnowledgeStore", "KnowledgeStoreError", "OfflineDistillationModel", "StoredKnowledge", "batch_knowledge",
           "check_store_fits", "dump_manifest", "dump_records", "new_manifest", "prepare_store", "store_summary",
           "verify_store"]
