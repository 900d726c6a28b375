"""Extract -> distill on the synthetic demo data with the built-in InternVideo2 stage-2 teacher at
micro width: the official classes' random weights (the reference fixture), loaded from a
checkpoint file as a published one is."""

from __future__ import annotations

from pathlib import Path

import torch

from core import features
from core.config import TeacherConfig
from jobs.distill import run_distill
from jobs.extract import run_extract
from tests.conftest import tiny_config
from tests.test_internvideo2 import write_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"


def test_extract_and_distill_with_a_micro_stage2_teacher(ray_local, synth_dataset, tmp_path):
    reference = torch.load(FIXTURES / "internvideo2_stage2-micro_reference.pt", weights_only=True)
    torch.save(reference["state_dict"], tmp_path / "stage2-micro.pt")
    tokenizer = write_tokenizer(tmp_path / "tokenizer", reference["vocab"])
    teacher = TeacherConfig(kind="internvideo2", variant="stage2-micro", checkpoint=str(tmp_path / "stage2-micro.pt"),
                            tokenizer=str(tokenizer))
    cfg = tiny_config(tmp_path, synth_dataset, extract={"teacher": teacher.model_dump()})

    table = run_extract(cfg)
    assert table.meta.teacher["kind"] == "internvideo2" and table.meta.teacher["name"] == "stage2-micro"
    assert table.meta.embed_dim == 16 and sum(table.meta.counts.values()) == 40
    batch = features.decode_batch(features.arrow_to_columns(features.read_table(table.table_dir)), table.meta)
    assert batch.teacher_frame_emb.shape[1:] == (4, 16)

    distill = cfg.distill.model_copy(update={"epochs": 1, "num_workers": 1, "storage_dir": str(tmp_path / "train")})
    result = run_distill(cfg, table.table_dir, distill=distill, name="internvideo2-micro")
    assert result.checkpoint.is_file()
    assert {"train_cgt", "train_fgt"} <= set(result.history[0])
