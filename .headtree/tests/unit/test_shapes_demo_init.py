"""`tiltflow demo --world shapes init_from=DIR`: the settings it takes from the stage-1 run."""


def test_shapes_demo_takes_the_lora_settings_of_its_init_run(tmp_path):
    """`demo --world shapes init_from=DIR` loads DIR's fake-score LoRA, so it adopts DIR's lora settings
    (before the user's own overrides, which still win)."""
    from tiltflow.demo import init_lora_overrides

    lora = "lora: {layout: shared, finetune: lora, rank: 16, alpha: 16.0}"
    (tmp_path / "config.yaml").write_text(f"world: shapes\n{lora}\n")
    assert init_lora_overrides([f"init_from={tmp_path}"]) == [
        "lora.layout=shared", "lora.finetune=lora", "lora.rank=16", "lora.alpha=16.0"]
    assert init_lora_overrides(["stage2.num_iters=3"]) == []
    assert init_lora_overrides([f"init_from={tmp_path / 'missing'}"]) == []  # read_final names the missing run
    # A full-fine-tuning stage-1 run: a LoRA stage 2 on its weights (full fine-tuning collapsed in stage 2).
    (tmp_path / "config.yaml").write_text("world: shapes\nlora: {layout: separate, finetune: full, rank: 16}\n")
    assert init_lora_overrides([f"init_from={tmp_path}"]) == ["lora.layout=separate", "lora.finetune=lora"]


def test_shapes_demo_starts_from_the_committed_stage1_student_when_there_is_one(tmp_path):
    from tiltflow.demo import SHAPES_DEMO_INIT, shapes_demo_config

    models = tmp_path / "models"
    for sub in ("teacher", "text_encoder", "reward_model"):
        (models / sub).mkdir(parents=True)
    bare = shapes_demo_config(tmp_path / "out", [f"models_dir={models}"])
    assert bare.init_from is None  # no stage-1 student there: the teacher with a fresh LoRA
    student = models / SHAPES_DEMO_INIT
    student.mkdir()
    (student / "final.safetensors").write_bytes(b"")
    (student / "config.yaml").write_text("lora: {rank: 16, alpha: 16.0}\n")
    cfg = shapes_demo_config(tmp_path / "out", [f"models_dir={models}"])
    assert cfg.init_from == str(student) and cfg.lora.rank == 16 and cfg.lora.rank != bare.lora.rank
    assert shapes_demo_config(tmp_path / "out", [f"models_dir={models}", "init_from=null"]).init_from is None
