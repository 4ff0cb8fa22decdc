"""Training losses: LM cross-entropy, optionally mixed with distillation from a frozen teacher.

loss = (1 - a) * CE(student, targets) + a * T^2 * KL(teacher_T || student_T), where x_T are the logits
divided by the temperature T; the T^2 factor keeps the gradient scale of the KL term independent of T
(Hinton et al., 2015). Both terms are means over predicted tokens, computed in float32.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from attnconv.errors import AttnconvError


@dataclass(frozen=True)
class DistillConfig:
    weight: float = 0.5
    temperature: float = 1.0

    def check(self) -> None:
        if not 0.0 <= self.weight <= 1.0:
            raise AttnconvError(f"--distill-weight must lie in [0, 1], not {self.weight}")
        if not self.temperature > 0:
            raise AttnconvError(f"--temperature must be positive, not {self.temperature}")


def cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean token CE; logits [b, s, V] (any float dtype), targets [b, s]."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def kl_teacher_student(student_logits: torch.Tensor, teacher_logits: torch.Tensor,
                       temperature: float = 1.0) -> torch.Tensor:
    """Mean over tokens of KL(teacher || student) on logits softened by `temperature`; [b, s, V] inputs."""
    log_s = F.log_softmax(student_logits.float() / temperature, dim=-1)  # [b, s, V]
    log_t = F.log_softmax(teacher_logits.float() / temperature, dim=-1)  # [b, s, V]
    kl = F.kl_div(log_s, log_t, log_target=True, reduction="none").sum(-1)  # [b, s]
    return kl.mean()


def training_loss(student_logits: torch.Tensor, targets: torch.Tensor, teacher_logits: torch.Tensor | None = None,
                  distill: DistillConfig | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """(loss to backpropagate, {"ce": .., "kl": ..} detached parts for the log)."""
    ce = cross_entropy(student_logits, targets)
    if teacher_logits is None or distill is None:
        return ce, {"ce": ce.detach()}
    t = distill.temperature
    kl = kl_teacher_student(student_logits, teacher_logits, t)
    loss = (1.0 - distill.weight) * ce + distill.weight * (t * t) * kl
    return loss, {"ce": ce.detach(), "kl": kl.detach()}
