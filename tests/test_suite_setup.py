"""The suite's own start-up check (tests/conftest.py calls `paths.require_shared`): without the team's shared folder beside the repository the
session stops at once with a message naming the missing folder."""

from __future__ import annotations

import pytest

import paths


def test_the_session_stops_naming_a_missing_shared_folder(monkeypatch, tmp_path):
    missing = tmp_path / "shared" / "bench" / "smollm2-135m-config"
    monkeypatch.setattr(paths, "TOKENIZER_DIR", missing)
    with pytest.raises(pytest.UsageError, match=str(missing)):
        paths.require_shared()
    monkeypatch.setattr(paths, "TOKENIZER_DIR", tmp_path)  # an existing folder: nothing raised
    assert paths.require_shared() is None
