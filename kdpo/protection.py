"""Null-space protection of edited MLP output matrices (AlphaEdit's idea, applied to gradient editors).

An edited matrix maps MLP hidden vectors ("keys") to the residual stream. The update is restricted to
delta = P @ D with P the projector onto the orthogonal complement of the protected keys' span, so the
matrix's output for every protected key is unchanged. The protected span starts as the dominant
eigen-directions of K0^T K0 over a corpus the model knows, and grows with each committed edit's own keys
(incremental Gram-Schmidt, no eigendecomposition per edit).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class ProtectedSubspace:
    """An orthonormal basis ``basis`` [dim, k] of the key directions an edit must not touch."""

    basis: torch.Tensor
    spectrum: torch.Tensor | None = None  # eigenvalues of K0^T K0, descending, for reports

    @classmethod
    def from_key_covariance(cls, covariance: torch.Tensor, threshold: float) -> "ProtectedSubspace":
        """Protect the eigen-directions whose eigenvalue is at least ``threshold`` x the largest."""
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"null-space threshold must be in (0, 1), got {threshold}")
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance.double())
        eigenvalues, eigenvectors = eigenvalues.flip(0), eigenvectors.flip(1)
        keep = eigenvalues >= threshold * eigenvalues[0].clamp_min(1e-30)
        return cls(eigenvectors[:, keep].float().contiguous(), eigenvalues.float())

    @property
    def dim(self) -> int:
        return self.basis.shape[0]

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    def projector(self) -> torch.Tensor:
        """P = I - Q Q^T: keys in the protected span map to zero."""
        return torch.eye(self.dim, device=self.basis.device) - self.basis @ self.basis.T

    def add_keys(self, keys: torch.Tensor, tolerance: float = 0.05) -> int:
        """Add the directions of ``keys`` [n, dim] not yet protected (relative residual > tolerance).

        Returns how many directions were added.
        """
        added = 0
        for key in keys.float().to(self.basis.device):
            norm = key.norm()
            if norm == 0:
                continue
            residual = key - self.basis @ (self.basis.T @ key)
            residual = residual - self.basis @ (self.basis.T @ residual)  # re-orthogonalise once
            if residual.norm() > tolerance * norm and self.rank < self.dim:
                self.basis = torch.cat([self.basis, (residual / residual.norm()).unsqueeze(1)], dim=1)
                added += 1
        return added
