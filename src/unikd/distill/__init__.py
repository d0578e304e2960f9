"""UniKD (paper §3.2): AKEs, stage 1 (absorb), stage 2 (inject), and the feature baselines (the modified FitNet,
FGD, MGD, PKD), behind one :class:`Distiller` interface and a registry (``register_method``).

Inside one's own training loop (see the README)::

    distiller = build_distiller("unikd", DistillConfig(), student, teacher, akes=akes)
    losses, student_features = student(images, targets)
    with torch.no_grad():
        teacher_features = teacher.extract_features(images)
    losses.update(distiller.loss(teacher_features, student_features, targets))
"""
from .absorb import AbsorbModel
from .adaptor import Adaptor, nearest_levels
from .ake import AKE, KnowledgeExtractors
from .ake_file import AKEMismatchError, load_ake, save_ake, teacher_fingerprint
from .base import Distiller, Levels
from .box_sampler import sample_query_boxes, sample_query_boxes_batch
from .feature_kd import FeatureDistiller, LevelPair, foreground_mask, resample_level
from .fgd import FGD
from .fitnet import FitNet
from .mgd import MGD
from .model import DistillationModel, build_distiller, method_class, method_names
from .pkd import PKD
from .registry import METHODS, register_method
from .teacher_scale import measure_teacher_rms
from .unikd import TeacherKnowledge, UniKD, knowledge_distance

__all__ = [
    "AKE", "AKEMismatchError", "AbsorbModel", "Adaptor", "DistillationModel", "Distiller", "FGD",
    "FeatureDistiller", "FitNet", "KnowledgeExtractors", "LevelPair", "Levels", "METHODS", "MGD", "PKD",
    "TeacherKnowledge", "UniKD", "build_distiller", "foreground_mask", "knowledge_distance", "load_ake",
    "measure_teacher_rms", "method_class", "method_names", "nearest_levels", "register_method", "resample_level",
    "sample_query_boxes", "sample_query_boxes_batch", "save_ake", "teacher_fingerprint",
]
