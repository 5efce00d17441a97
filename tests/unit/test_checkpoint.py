"""trainer.checkpoint: the commit protocol (payload, manifest, latest.json), verification and fallback, retention,
safe loading, and the async writer's failure handling. Local folders here; S3 in tests/integration."""

from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import pytest
import torch

from trainer import storage
from trainer.checkpoint import (
    LATEST,
    CheckpointError,
    CheckpointWriter,
    Snapshot,
    cpu_copy,
    find_resumable,
    list_checkpoints,
    load_checkpoint,
    read_latest,
    resolve,
    step_dir_name,
)
from trainer.checkpoint.layout import MAX_MANIFEST_BYTES, MAX_POINTER_BYTES


def snapshot(step: int, metric: float | None = None) -> Snapshot:
    return Snapshot(step, epoch=step // 10, objects={"model": {"w": torch.full((4,), float(step))}},
                    state={"step": step, "note": "x"}, metric=metric)


def committed(run: Path, steps: list[int], keep_last: int = 10,
              metrics: dict[int, float] | None = None) -> CheckpointWriter:
    writer = CheckpointWriter(str(run), keep_last=keep_last)
    for step in steps:
        writer.commit(snapshot(step, (metrics or {}).get(step)))
    return writer


def test_commit_writes_payload_then_manifest_then_latest(tmp_path: Path) -> None:
    committed(tmp_path, [5])
    folder = tmp_path / "checkpoints" / step_dir_name(5)
    manifest = json.loads((folder / "manifest.json").read_text())
    assert set(manifest["files"]) == {"model.pt", "state.json"}
    for name, entry in manifest["files"].items():
        assert (folder / name).stat().st_size == entry["size"]
    latest = json.loads((tmp_path / "checkpoints" / LATEST).read_text())
    assert latest["step"] == 5 and latest["dir"] == "step-000000005"
    loaded = load_checkpoint(str(folder))
    assert loaded.step == 5 and loaded.state == {"step": 5, "note": "x"}
    assert torch.equal(loaded.objects["model"]["w"], torch.full((4,), 5.0))


def test_a_corrupt_payload_byte_falls_back_to_the_previous_checkpoint(tmp_path: Path,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    committed(tmp_path, [5, 10])
    model = tmp_path / "checkpoints" / step_dir_name(10) / "model.pt"
    data = bytearray(model.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model.write_bytes(bytes(data))
    found = find_resumable(str(tmp_path / "checkpoints"))
    assert found is not None and found.step == 5
    assert "size or sha256 differs from the manifest" in caplog.text


def test_a_latest_pointer_too_large_to_read_is_ignored_unread(tmp_path: Path,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    """A latest.json over MAX_POINTER_BYTES (a pointer is a few bytes) is refused from its size: the newest valid
    checkpoint is found instead, as for a pointer that is not JSON."""
    committed(tmp_path, [5, 10])
    os.truncate(tmp_path / "checkpoints" / LATEST, MAX_POINTER_BYTES + 1)  # sparse
    assert read_latest(str(tmp_path / "checkpoints")) is None
    assert f"is {MAX_POINTER_BYTES + 1} bytes, not a pointer (at most {MAX_POINTER_BYTES})" in caplog.text
    assert find_resumable(str(tmp_path / "checkpoints")).step == 10  # type: ignore[union-attr]


def test_an_upload_killed_before_the_manifest_is_not_used(tmp_path: Path) -> None:
    committed(tmp_path, [5])
    partial = tmp_path / "checkpoints" / step_dir_name(10)
    partial.mkdir()
    (partial / "model.pt").write_bytes(b"half a file")  # the process died here: no manifest, latest unchanged
    assert read_latest(str(tmp_path / "checkpoints")).endswith(step_dir_name(5))  # type: ignore[union-attr]
    found = find_resumable(str(tmp_path / "checkpoints"))
    assert found is not None and found.step == 5
    assert [(c.step, c.committed) for c in list_checkpoints(str(tmp_path / "checkpoints"))] == [(5, True),
                                                                                                (10, False)]


def test_latest_pointing_outside_the_run_is_ignored(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    committed(tmp_path, [5])
    (tmp_path / "checkpoints" / LATEST).write_text(json.dumps({"step": 9, "dir": "../../elsewhere"}))
    found = find_resumable(str(tmp_path / "checkpoints"))
    assert found is not None and found.step == 5
    assert "not a step-<N> folder of this run" in caplog.text


def test_nothing_verifies_is_an_error_and_no_checkpoint_is_none(tmp_path: Path) -> None:
    assert find_resumable(str(tmp_path / "checkpoints")) is None
    committed(tmp_path, [5])
    (tmp_path / "checkpoints" / step_dir_name(5) / "state.json").write_text("{}")
    with pytest.raises(CheckpointError, match="no checkpoint verifies"):
        find_resumable(str(tmp_path / "checkpoints"))


class Boom:
    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, ("touch pwned",))


def test_a_malicious_pickle_in_a_checkpoint_runs_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    writer = CheckpointWriter(str(tmp_path))
    evil = Snapshot(7, 0, {"model": {"w": torch.zeros(1)}}, {"step": 7})
    evil.payload = lambda: {"model.pt": pickle.dumps(Boom()), "state.json": b"{}"}  # type: ignore[method-assign]
    writer.commit(evil)  # a manifest with matching checksums: only the loader stands in the way
    with pytest.raises(CheckpointError, match=r"refused by torch\.load"):
        load_checkpoint(str(tmp_path / "checkpoints" / step_dir_name(7)))
    assert not (tmp_path / "pwned").exists()


def test_retention_keeps_the_newest_and_the_best(tmp_path: Path) -> None:
    committed(tmp_path, [10, 20, 30, 40, 50], keep_last=2, metrics={10: 0.2, 20: 0.5, 30: 0.4})
    kept = [c.step for c in list_checkpoints(str(tmp_path / "checkpoints"))]
    assert kept == [20, 40, 50]


def test_retention_cleans_debris_of_failed_uploads_after_a_newer_commit(tmp_path: Path) -> None:
    writer = committed(tmp_path, [10], keep_last=1)
    debris = tmp_path / "checkpoints" / step_dir_name(15)
    debris.mkdir()
    (debris / "model.pt").write_bytes(b"partial")
    writer.commit(snapshot(20))
    assert [c.step for c in list_checkpoints(str(tmp_path / "checkpoints"))] == [20]


def test_resolve_accepts_a_run_a_checkpoints_folder_or_a_step(tmp_path: Path) -> None:
    committed(tmp_path, [5, 10])
    assert resolve(str(tmp_path)).step == 10
    assert resolve(str(tmp_path / "checkpoints")).step == 10
    assert resolve(str(tmp_path / "checkpoints" / step_dir_name(5))).step == 5
    with pytest.raises(CheckpointError, match="no checkpoint there"):
        resolve(str(tmp_path / "nothing"))


def test_cpu_copy_is_independent_of_the_original() -> None:
    original = {"a": torch.ones(3), "groups": [{"lr": 0.1, "t": torch.zeros(2)}]}
    copy = cpu_copy(original)
    original["a"].add_(1)
    original["groups"][0]["t"].add_(5)
    assert torch.equal(copy["a"], torch.ones(3)) and torch.equal(copy["groups"][0]["t"], torch.zeros(2))


def test_failed_uploads_are_retried_then_reported_and_the_run_goes_on(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    writer = CheckpointWriter(str(tmp_path), attempts=2, retry_wait_s=0.01)
    real = storage.write_bytes
    failing = {"on": True}

    def flaky(uri: str, data: bytes) -> None:
        if failing["on"] and uri.endswith("model.pt"):
            raise storage.StorageError(uri, "simulated outage")
        real(uri, data)

    monkeypatch.setattr(storage, "write_bytes", flaky)
    writer.submit(snapshot(5))
    assert writer.wait() is None and writer.failures == 1
    assert "CHECKPOINT NOT SAVED: step 5 failed after 2 attempts" in caplog.text
    assert not (tmp_path / "checkpoints" / LATEST).exists()
    failing["on"] = False
    writer.submit(snapshot(10))
    result = writer.close()
    assert result is not None and result.step == 10
    assert find_resumable(str(tmp_path / "checkpoints")).step == 10  # type: ignore[union-attr]


def _rewrite(folder: Path, name: str, data: bytes) -> None:
    """Replace one payload object and keep its manifest entry consistent: only the content is damaged."""
    import hashlib

    (folder / name).write_bytes(data)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"][name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "manifest.json").write_text(json.dumps(manifest))


def _edit_manifest(folder: Path, edit: object) -> None:
    manifest = json.loads((folder / "manifest.json").read_text())
    edit(manifest)  # type: ignore[operator]
    (folder / "manifest.json").write_text(json.dumps(manifest))


DAMAGE = {
    "manifest without size": lambda f: _edit_manifest(f, lambda m: m["files"]["model.pt"].pop("size")),
    "manifest without step": lambda f: _edit_manifest(f, lambda m: m.pop("step")),
    "manifest step as text": lambda f: _edit_manifest(f, lambda m: m.update(step="10")),
    "manifest step of another folder": lambda f: _edit_manifest(f, lambda m: m.update(step=3)),
    "manifest without epoch": lambda f: _edit_manifest(f, lambda m: m.pop("epoch")),
    "manifest metric as text": lambda f: _edit_manifest(f, lambda m: m.update(metric="NaN")),
    "manifest size as text": lambda f: _edit_manifest(f, lambda m: m["files"]["model.pt"].update(size="12")),
    "manifest sha256 missing": lambda f: _edit_manifest(f, lambda m: m["files"]["state.json"].pop("sha256")),
    "manifest files a list": lambda f: _edit_manifest(f, lambda m: m.update(files=["model.pt"])),
    "manifest not an object": lambda f: (f / "manifest.json").write_text("[1, 2]"),
    "manifest too large to read": lambda f: os.truncate(f / "manifest.json", MAX_MANIFEST_BYTES + 1),  # sparse
    "state.json undecodable": lambda f: _rewrite(f, "state.json", b"\xff\xfe{"),
    "state.json not an object": lambda f: _rewrite(f, "state.json", b"[1, 2, 3]"),
    "state.json invalid JSON": lambda f: _rewrite(f, "state.json", b'{"step": '),
    "model.pt refused by torch.load": lambda f: _rewrite(f, "model.pt", pickle.dumps(Boom())),
    "model.pt larger than its manifest": lambda f: os.truncate(f / "model.pt", 1 << 30),  # sparse; refused unread
}


@pytest.mark.parametrize("damage", DAMAGE, ids=list(DAMAGE))
def test_any_damage_marks_the_checkpoint_corrupt_and_the_previous_one_is_used(
        damage: str, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    committed(tmp_path, [5, 10])
    DAMAGE[damage](tmp_path / "checkpoints" / step_dir_name(10))
    found = find_resumable(str(tmp_path / "checkpoints"))
    assert found is not None and found.step == 5
    assert resolve(str(tmp_path)).step == 5
    listed = {c.step: c for c in list_checkpoints(str(tmp_path / "checkpoints"))}
    assert listed[5].committed
    if damage.startswith("manifest"):
        assert not listed[10].committed and listed[10].problem
    assert "CORRUPT" in caplog.text or listed[10].problem


def test_a_check_rejecting_the_newest_state_falls_back_too(tmp_path: Path) -> None:
    committed(tmp_path, [5, 10])

    def needs_even_steps(checkpoint: object) -> None:
        if checkpoint.step % 10:  # type: ignore[attr-defined]
            raise CheckpointError("odd")

    assert find_resumable(str(tmp_path / "checkpoints"), check=needs_even_steps).step == 10  # type: ignore[union-attr]

    def refuses_ten(checkpoint: object) -> None:
        if checkpoint.step == 10:  # type: ignore[attr-defined]
            raise CheckpointError("step 10 lacks its optimizer state")

    assert find_resumable(str(tmp_path / "checkpoints"), check=refuses_ten).step == 5  # type: ignore[union-attr]
