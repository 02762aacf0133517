import json

import torch
from safetensors.torch import load_file, save_file


def test_ship_writes_float16_and_a_condensed_record(load_experiment, tmp_path):
    ship_weights = load_experiment("ship_weights")
    src = tmp_path / "run" / "teacher"
    (src / "text_encoder").mkdir(parents=True)
    weights = {"w": torch.randn(5, 3), "steps": torch.arange(4)}
    save_file(weights, src / "diffusion_pytorch_model.safetensors")
    save_file({"e": torch.randn(7, dtype=torch.float64)}, src / "text_encoder" / "model.safetensors")
    (src / "config.json").write_text("{}")
    losses = torch.rand(1234).tolist()
    (src / "stage.json").write_text(json.dumps({"steps": 1234, "losses": losses}))

    record = ship_weights.ship(src, tmp_path / "shipped", "sfpp-ray pretrain-teacher --config c.yaml", "abc1234")
    out = tmp_path / "shipped"
    shipped = load_file(out / "diffusion_pytorch_model.safetensors")
    assert shipped["w"].dtype == torch.float16 and torch.allclose(shipped["w"].float(), weights["w"], atol=1e-3)
    assert torch.equal(shipped["steps"], weights["steps"])  # integer tensors kept as they are
    assert load_file(out / "text_encoder" / "model.safetensors")["e"].dtype == torch.float16
    stage = json.loads((out / "stage.json").read_text())
    every = stage["loss_every"]
    assert len(stage["losses"]) <= ship_weights.LOSS_POINTS and every == -(-1234 // ship_weights.LOSS_POINTS)
    assert abs(stage["losses"][1] - sum(losses[every:2 * every]) / every) < 1e-9
    assert record["commit"] == "abc1234" and record["bytes"] == sum(p.stat().st_size for p in out.rglob("*")
                                                                    if p.is_file() and p.name != "made_by.json")
