"""What a slide's reuse record says about its scorer: the export's manifest, however the run is
named (its folder or its ``model/`` folder), and nothing reusable when nothing identifies it."""

from __future__ import annotations

from pathlib import Path

from gen_ad.app.slide import scorer_identity


def _export(run: Path, weights: bytes) -> None:
    (run / "model").mkdir(parents=True, exist_ok=True)
    (run / "model" / "model.json").write_text("{}", encoding="utf-8")
    (run / "model" / "manifest.json").write_text(f'{{"w": "{weights.hex()}"}}', encoding="utf-8")


def test_a_run_named_by_its_model_folder_is_identified_by_its_manifest(tmp_path: Path) -> None:
    run = tmp_path / "run"
    _export(run, b"old")
    by_run, by_model = scorer_identity(run, None), scorer_identity(run / "model", None)
    assert by_run == by_model and "sha256" in by_model  # was model/model/: no files, no hash
    _export(run, b"retrained")
    assert scorer_identity(run / "model", None) != by_model  # a retrained run is not reused


def test_nothing_identifies_an_empty_export_so_it_is_never_reused(tmp_path: Path) -> None:
    bank = tmp_path / "bank"  # no bank.json, no files
    bank.mkdir()
    assert scorer_identity(None, bank) != scorer_identity(None, bank)
