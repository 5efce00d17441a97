"""The progress line: what rank 0 prints, and the parser that reads it back out of `kubectl logs`."""

from __future__ import annotations

from trainer.progress import (
    ProgressLine,
    format_checkpoint,
    format_duration,
    format_eval,
    format_progress,
    parse_checkpoint,
    parse_eval,
    parse_progress,
)


def test_format_is_stable_and_parses_back() -> None:
    line = ProgressLine(3, 24, 120, 500, 0.81234, {"loss_classifier": 0.21, "loss_box_reg": 0.3}, 0.02, 45.23,
                        0.123, 3 * 3600 + 61, 3.2109)
    text = format_progress(line)
    assert text == ("epoch 3/24 step 120/500 loss 0.8123 [loss_classifier 0.2100 loss_box_reg 0.3000] lr 0.02 "
                    "img/s 45.2 data 12% eta 3:01:01 mem 3.21G")
    back = parse_progress(f"2026-11-24 10:00:00 INFO  [rank 0] {text}")
    assert back is not None
    assert (back.epoch, back.epochs, back.step, back.steps) == (3, 24, 120, 500)
    assert (back.eta_s, back.max_mem_gb) == (10861, 3.21)
    assert back.terms == {"loss_classifier": 0.21, "loss_box_reg": 0.3} and back.data_wait == 0.12


def test_cpu_runs_have_no_memory_field_and_long_etas_have_days() -> None:
    text = format_progress(ProgressLine(1, 2, 1, 10, 1.0, {}, 1e-4, 3.0, 0.5, 2 * 86400 + 5))
    assert "mem" not in text and "eta 2d0:00:05" in text
    parsed = parse_progress(text)
    assert parsed is not None and parsed.eta_s == 2 * 86400 + 5 and parsed.max_mem_gb is None and parsed.lr == 1e-4
    assert parse_progress("some other log line") is None
    assert format_duration(59.6) == "0:01:00"


def test_eval_and_checkpoint_lines_parse_back() -> None:
    stats = {"AP": 0.31204, "AP50": 0.575, "AP75": 0.30111, "APs": 0.1}
    text = format_eval(3, stats, "best AP so far", {"RBC": 0.376, "WBC": 0.6151})
    assert text == "eval epoch 3: AP 0.3120 AP50 0.5750 AP75 0.3011 (best AP so far) | RBC 0.376 WBC 0.615"
    back = parse_eval(f"2026-11-24T10:00:00.123Z 2026-11-24 10:00:00 INFO  [rank 0] {text}")
    assert back is not None and (back.epoch, back.ap, back.ap50, back.ap75) == (3, 0.312, 0.575, 0.3011)
    uri = "s3://bucket/runs/r/checkpoints/step-000000120"
    committed = parse_checkpoint("INFO  [rank 0] " + format_checkpoint(uri, 331.24, 2.44))
    assert committed is not None and (committed.uri, committed.step, committed.megabytes) == (uri, 120, 331.2)
    assert parse_eval("eval epoch x") is None and parse_checkpoint("checkpoint step 4: saved") is None
