"""Baselines run every member as a whole Hugging Face model, so they cover every family in helpers.FAMILIES.

`family` (use with indirect parametrisation) names one. bts's member loader accepts only the families listed in
bts.core.hf.SUPPORTED_MODEL_TYPES (the stitched model's per-layer support); while a family is not listed there yet,
the fixture lists it for the test, since no baseline uses that per-layer support."""

import pytest

from bts.core import hf


@pytest.fixture
def family(request, monkeypatch):
    arch = request.param
    if arch not in hf.SUPPORTED_MODEL_TYPES:
        monkeypatch.setattr(hf, "SUPPORTED_MODEL_TYPES", (*hf.SUPPORTED_MODEL_TYPES, arch))
    return arch
