"""Evaluate a trained SAE on held-out activations (core reconstruction metrics, SPEC section 4)."""

from __future__ import annotations

import torch

from saekit.cache import ActivationCache
from saekit.errors import DataError
from saekit.metrics import ReconstructionStats
from saekit.sae import SparseAutoencoder


def check_compatible(sae: SparseAutoencoder, cache: ActivationCache, ckpt_name: str) -> None:
    """The SAE must have been trained on activations of the cache's width."""
    if sae.spec.d != cache.d:
        raise DataError(
            f"ckpt={ckpt_name} expects activations of width {sae.spec.d}, but {cache.manifest['model_name']} at "
            f"{cache.manifest['hook']} has width {cache.d}; evaluate it with the model and hook it was trained on"
        )


@torch.no_grad()
def evaluate_reconstruction(sae: SparseAutoencoder, cache: ActivationCache, device: torch.device,
                            batch_size: int = 8192, split: str = "eval") -> tuple[dict[str, float], ReconstructionStats]:
    """mse, nmse, explained_variance, l0, dead_frac over every vector of `split`, in the model's activation space."""
    if cache.n_acts(split) == 0:
        raise DataError(f"the cache's {split} split is empty; raise data.n_eval_tokens")
    was_training = sae.training
    sae.eval()
    stats = ReconstructionStats(sae.spec.d, sae.spec.n)
    for x in cache.iter_split(split, batch_size):
        x = x.to(device)
        x_hat, z = sae.reconstruct(x)
        stats.update(x, x_hat, z)
    sae.train(was_training)
    return stats.metrics(), stats
