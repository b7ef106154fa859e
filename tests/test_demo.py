"""`fastllm demo` end to end at a tiny scale: corpus -> tokenizer -> shards -> training -> train/validation loss
and gap -> sample, with loss.png written (the full-size figures are in benchmarks/RESULTS.md)."""

import math

from fastllm.cli import main


def test_demo_runs_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    rc = main(["demo", "--out", str(out), "--model", "tiny", "--vocab-size", "512", "--seq-len", "32",
               "--batch-size", "4", "--max-steps", "6", "--warmup-steps", "2", "--sample-tokens", "8", "--threads",
               "1", "--no-progress"])
    assert rc == 0
    text = capsys.readouterr().out
    assert "validation loss" in text and "(gap " in text and "unigram entropy" in text
    line = next(ln for ln in text.splitlines() if "validation loss" in ln and "gap" in ln)
    train_loss = float(line.split("train loss ")[1].split(",")[0])
    val_loss = float(line.split("validation loss ")[1].split(" ")[0])
    assert math.isfinite(train_loss) and math.isfinite(val_loss) and val_loss < math.log(512) + 0.5
    assert (out / "run" / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "tokenizer.tiktoken").exists() and list((out / "data").glob("val_*.bin"))
