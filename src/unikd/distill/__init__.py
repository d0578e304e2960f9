"""UniKD (paper §3.2): AKEs, stage 1 (absorb), stage 2 (inject), and the modified FitNet baseline.

Inside one's own training loop (see the README)::

    distiller = UniKD(akes, student.feature_strides, student.feature_channels,
                      teacher.feature_strides, teacher.feature_channels, DistillConfig())
    losses, student_features = student(images, targets)
    with torch.no_grad():
        teacher_features = teacher.extract_features(images)
    losses.update(distiller.loss(teacher_features, student_features, targets))
"""
from .absorb import AbsorbModel
from .adaptor import Adaptor, nearest_levels
from .ake import AKE, KnowledgeExtractors
from .ake_file import AKEMismatchError, load_ake, save_ake, teacher_fingerprint
from .box_sampler import sample_query_boxes, sample_query_boxes_batch
from .fitnet import FitNet, foreground_mask
from .model import DistillationModel, build_distiller
from .unikd import UniKD, knowledge_distance

__all__ = [
    "AKE", "AKEMismatchError", "AbsorbModel", "Adaptor", "DistillationModel", "FitNet", "KnowledgeExtractors",
    "UniKD", "build_distiller", "foreground_mask", "knowledge_distance", "load_ake",
    "nearest_levels", "sample_query_boxes", "sample_query_boxes_batch", "save_ake", "teacher_fingerprint",
]
