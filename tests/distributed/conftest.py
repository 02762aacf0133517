"""What the distributed tests read back from a stage's checkpoints."""

from pathlib import Path

import pytest
import torch
from torch import nn

from sfpp_ray.distributed.engine import EMA_SHARD_FILE, STATE_FILE


def load_saved_average(checkpoint: Path, model: nn.Module) -> nn.Module:
    """`model` with the moving average a checkpoint holds: whole in the state file, or split over the ranks'
    files: under ZeRO-3 each rank's flat, padded slice of every parameter (rank r holds elements r*n..(r+1)*n),
    below it each rank's own whole parameters; put back together."""
    whole = torch.load(checkpoint / STATE_FILE, weights_only=False)["ema"]
    if whole is None:
        states = [torch.load(f, weights_only=False) for f in
                  sorted(checkpoint.glob(EMA_SHARD_FILE.format(rank="*")), key=lambda f: int(f.stem.split("rank")[1]))]
        assert states, f"{checkpoint} holds no moving average"
        shards = [state["shadow"] for state in states]
        if states[0]["partitioned"]:
            average = {k: torch.cat([s[k] for s in shards]) for k in shards[0]}
        else:  # each parameter in exactly one rank's file
            assert sum(map(len, shards)) == len(average := {k: v for s in shards for k, v in s.items()})
    else:
        average = whole["shadow"]
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(average[name].flatten()[:p.numel()].view_as(p))
    return model


@pytest.fixture
def saved_average():
    return load_saved_average
