"""Null-space protection of edited MLP output matrices (AlphaEdit's idea, applied to gradient editors).

An edited matrix maps MLP hidden vectors ("keys") to the residual stream. The update is restricted to
delta = P @ D with P the projector onto the orthogonal complement of the protected keys' span, so the
matrix's output for every protected key is unchanged. The protected span starts as the dominant
eigen-directions of K0^T K0 over a corpus the model knows, and grows with each committed edit's own keys
(incremental Gram-Schmidt, no eigendecomposition per edit).
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch

NULL_SPACE_RULES = ("relative", "energy")


@dataclass
class ProtectedSubspace:
    """An orthonormal basis ``basis`` [dim, k] of the key directions an edit must not touch."""

    basis: torch.Tensor
    spectrum: torch.Tensor | None = None  # eigenvalues of K0^T K0, descending, for reports
    key_gram: torch.Tensor | None = None  # weighted projected Gram of committed edits' keys (soft protection)

    @classmethod
    def from_key_covariance(
        cls, covariance: torch.Tensor, threshold: float, rule: str = "relative"
    ) -> "ProtectedSubspace":
        """Protect the dominant eigen-directions of K0^T K0.

        ``rule="relative"``: every direction whose eigenvalue is at least ``threshold`` x the largest;
        ``rule="energy"``: the fewest leading directions that hold ``1 - threshold`` of the total energy.
        """
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"null-space threshold must be in (0, 1), got {threshold}")
        if rule not in NULL_SPACE_RULES:
            raise ValueError(f"null-space rule must be one of {NULL_SPACE_RULES}, got {rule!r}")
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance.double())
        eigenvalues, eigenvectors = eigenvalues.flip(0).clamp_min(0), eigenvectors.flip(1)
        if rule == "relative":
            keep = eigenvalues >= threshold * eigenvalues[0].clamp_min(1e-30)
        else:
            energy = eigenvalues.cumsum(0) / eigenvalues.sum().clamp_min(1e-30)
            keep = torch.arange(len(eigenvalues)) <= int((energy < 1.0 - threshold).sum())
        return cls(eigenvectors[:, keep].float().contiguous(), eigenvalues.float())

    def state_dict(self) -> dict:
        """Every field by name, for ``torch.save`` (a resumable checkpoint)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_state_dict(cls, state: dict) -> "ProtectedSubspace":
        """The subspace :meth:`state_dict` saved (fields it lacks keep their defaults)."""
        return cls(**{f.name: state[f.name] for f in fields(cls) if f.name in state})

    @property
    def dim(self) -> int:
        return self.basis.shape[0]

    @property
    def rank(self) -> int:
        return self.basis.shape[1]

    def project(self, rows: torch.Tensor) -> torch.Tensor:
        """``rows @ P`` with P = I - Q Q^T, without forming P: components in the protected span removed."""
        basis = self.basis.to(rows.dtype)
        return rows - (rows @ basis) @ basis.T

    def add_soft_keys(self, keys: torch.Tensor, weight: float = 1.0) -> None:
        """Remember keys [n, dim] softly: add their projected Gram matrix, which later changes are fitted
        against (least interference), instead of barring their span."""
        projected = self.project(keys.float().to(self.basis.device))
        gram = weight * projected.T @ projected
        self.key_gram = gram if self.key_gram is None else self.key_gram + gram

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
