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
