"""Offline distillation (DESIGN §2 "Offline stage 2", §3 "Knowledge store"; ``docs/offline.md``): the teacher's
side of stage 2 (UniKD's knowledge, or FitNet's teacher features) dumped to disk once (``unikd dump``), then
stage 2 with no teacher in memory (``unikd distill --knowledge-store``)."""
from .dump import dump_manifest, dump_records, prepare_store, store_summary, unikd_records
from .features import REGIONS, feature_fields, feature_records, stored_pyramid
from .manifest import KNOWLEDGE, KnowledgeStoreError, ake_entry, new_manifest
from .offline import OfflineDistillationModel, StoredKnowledge, batch_knowledge, check_store_fits, unikd_teacher
from .seeded_boxes import SeededQueryBoxes
from .store import KnowledgeStore
from .verify import verify_store

__all__ = ["KNOWLEDGE", "KnowledgeStore", "KnowledgeStoreError", "OfflineDistillationModel", "REGIONS",
           "SeededQueryBoxes", "StoredKnowledge", "ake_entry", "batch_knowledge", "check_store_fits", "dump_manifest",
           "dump_records", "feature_fields", "feature_records", "new_manifest", "prepare_store", "store_summary",
           "stored_pyramid", "unikd_records", "unikd_teacher", "verify_store"]
