"""Fixtures for the export tests: a small CPC-SAM whose CaPL and LoRA really change its output."""

from __future__ import annotations

import pytest
from export_helpers import calibrated_small_model


@pytest.fixture(scope="session")
def calibrated_model():
    return calibrated_small_model()


@pytest.fixture(scope="session")
def exported(calibrated_model, tmp_path_factory):
    """The model exported once for the session: (LoRA-merged model, encoder path, decoder path)."""
    from cpcsam.export.onnx import export_decoder, export_image_encoder, prepare_for_export

    out = tmp_path_factory.mktemp("onnx")
    merged = prepare_for_export(calibrated_model)
    return merged, export_image_encoder(merged, out / "image_encoder.onnx"), export_decoder(merged, out / "decoder_capl.onnx")
