"""Editors behind one interface: ``build_editor(method, model, tokenizer, config)``."""
from __future__ import annotations

from kdpo.editors.base import Editor, EditorConfig, EditOutcome
from kdpo.editors.dpo import DPOConfig, DPOEditor
from kdpo.editors.ft_l import FTLConfig, FTLEditor
from kdpo.editors.ft_m import FTMEditor
from kdpo.editors.kdpo import KDPOEditor

EDITORS: dict[str, type[Editor]] = {cls.name: cls for cls in (KDPOEditor, DPOEditor, FTLEditor, FTMEditor)}

__all__ = ["EDITORS", "Editor", "EditorConfig", "EditOutcome", "DPOConfig", "FTLConfig"]
