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



@dataclass
class ProtectedSubspace:
    """An orthonormal basis ``basis`` [dim, k] of the key directions an edit must not touch."""

    basis: torch.Tensor
    spectrum: torch.Tensor | None = None  # eigenvalues of K0^T K0, descending, for reports
    # Soft protection: G, the weighted projected Gram of committed edits' keys, kept as (G + ridge I)^-1
    # (float64: it is maintained incrementally) and updated by Woodbury's identity, so neither remembering nor
    # fitting needs a dim^3 solve.
    soft_inverse: torch.Tensor | None = None
    soft_ridge: float = 0.0

    @classmethod
    def from_key_covariance(cls, covariance: torch.Tensor, threshold: float) -> "ProtectedSubspace":
        """Protect the dominant eigen-directions of K0^T K0: the fewest leading ones that hold ``1 - threshold``
        of the total energy."""
        if not 0.0 < threshold < 1.0:
            raise ValueError(f"null-space threshold must be in (0, 1), got {threshold}")
        eigenvalues, eigenvectors = torch.linalg.eigh(covariance.double())
        eigenvalues, eigenvectors = eigenvalues.flip(0).clamp_min(0), eigenvectors.flip(1)
        energy = eigenvalues.cumsum(0) / eigenvalues.sum().clamp_min(1e-30)
        keep = torch.arange(len(eigenvalues)) <= int((energy < 1.0 - threshold).sum())
        return cls(eigenvectors[:, keep].float().contiguous(), eigenvalues.float())

    def state_dict(self) -> dict:
        """Every field by name, for ``torch.save`` (a resumable checkpoint)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_state_dict(cls, state: dict, ridge: float = 1e-2) -> "ProtectedSubspace":
        """The subspace :meth:`state_dict` saved (fields it lacks keep their defaults). A checkpoint written
        before the soft memory was kept inverted holds G itself (``key_gram``): it is inverted with ``ridge``."""
        subspace = cls(**{f.name: state[f.name] for f in fields(cls) if f.name in state})
        if subspace.soft_inverse is not None:  # float32 in checkpoints written before it was kept in float64
            subspace.soft_inverse = subspace.soft_inverse.double()
        if state.get("key_gram") is not None and subspace.soft_inverse is None:
            gram = state["key_gram"].double()
            eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
            subspace.soft_inverse = torch.linalg.inv(gram + ridge * eye)
            subspace.soft_ridge = ridge
        return subspace

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

    def add_soft_keys(self, keys: torch.Tensor, weight: float = 1.0, ridge: float = 1e-2) -> None:
        """Remember keys [n, dim] softly: G += weight * (P K)^T (P K), which later changes are fitted against
        (least interference, :meth:`fit_change`), instead of barring their span. O(dim^2 n): a Woodbury update
        of (G + ridge I)^-1 (``ridge`` is fixed by the first call)."""
        projected = self.project(keys.float().to(self.basis.device)).double()
        if self.soft_inverse is None:
            self.soft_inverse = torch.eye(self.dim, dtype=torch.float64, device=self.basis.device) / ridge
            self.soft_ridge = ridge
        spread = self.soft_inverse @ projected.T  # A^-1 U^T, [dim, n]
        core = torch.eye(len(projected), dtype=spread.dtype, device=spread.device) / weight + projected @ spread
        inverse = self.soft_inverse - spread @ torch.linalg.solve(core, spread.T)
        self.soft_inverse = (inverse + inverse.T) / 2

    def add_soft_covariance(self, covariance: torch.Tensor, weight: float, ridge: float = 1e-2) -> None:
        """Start the soft memory from a whole key covariance K0^T K0 [dim, dim]: G = weight * P K0^T K0 P, the
        corpus keys' energy the hard null space left unprotected, so every change is fitted around those keys
        too (MEMIT's and AlphaEdit's preservation term). Must come before any :meth:`add_soft_keys`; one dim^3
        inversion."""
        if self.soft_inverse is not None:
            raise ValueError("add_soft_covariance starts the soft memory; it already holds keys")
        projected = self.project(self.project(covariance.double().to(self.basis.device)).T)  # P C P (C symmetric)
        eye = torch.eye(self.dim, dtype=projected.dtype, device=projected.device)
        self.soft_inverse = torch.linalg.inv(weight * (projected + projected.T) / 2 + ridge * eye)
        self.soft_ridge = ridge

    def fit_change(self, keys: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The least-squares change X [dim, out] that keeps ``delta``'s effect on ``keys`` [n, dim] (projected)
        and disturbs the remembered keys least: min ||K X - K delta||^2 + tr(X^T G X) + ridge ||X||^2, i.e.
        X = (K^T K + A)^-1 K^T K delta with A = G + ridge I, computed as A^-1 K^T (I + K A^-1 K^T)^-1 K delta."""
        keys = keys.double()
        spread = self.soft_inverse @ keys.T  # [dim, n]
        core = torch.eye(len(keys), dtype=spread.dtype, device=keys.device) + keys @ spread
        return (spread @ torch.linalg.solve(core, keys @ delta.double())).to(delta.dtype)

    @property
    def key_gram(self) -> torch.Tensor | None:
        """G itself, float32 (one dim^3 inversion: for reports and checks, not used while editing)."""
        if self.soft_inverse is None:
            return None
        eye = torch.eye(self.dim, dtype=torch.float64, device=self.soft_inverse.device)
        return (torch.linalg.inv(self.soft_inverse) - self.soft_ridge * eye).float()

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
