"""TopK SAE (Makhzani & Frey 2013; Gao et al. 2024): keep the k largest latents, zero the rest.

The sparsity is set by k, so the loss is the reconstruction error alone (+ AuxK for dead latents).
Gradients reach only the k kept entries: the dense latent vector is a scatter of the kept values.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from saekit.sae.base import SparseAutoencoder
from saekit.sae.registry import register


def topk_activation(h: torch.Tensor, k: int, on: str = "preact") -> torch.Tensor:
    """(B, n) pre-activations → (B, n) latents with at most k nonzeros per row.

    on="preact": the k largest entries of h, then ReLU (Gao et al.); on="relu": the k largest of ReLU(h).
    """
    source = h if on == "preact" else F.relu(h)
    values, indices = source.topk(k, dim=-1, sorted=False)
    return torch.zeros_like(h).scatter(-1, indices, F.relu(values))


@register
class TopKSAE(SparseAutoencoder):
    name = "topk"
    topk_family = True
    homogeneous = True

    def activate(self, h: torch.Tensor) -> torch.Tensor:
        return topk_activation(h, self.spec.k, self.spec.topk_on)
