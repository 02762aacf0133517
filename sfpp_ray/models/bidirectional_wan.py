"""The bidirectional teacher and critic: diffusers' Wan transformer, with the output read as a flow.

The module tree, weights and call are diffusers' `WanTransformer3DModel`; `prediction` (set from
model.prediction when built) says whether the network predicts the flow itself or clean latents that
are turned into the flow, so every caller sees a flow either way.
"""

from __future__ import annotations

import torch
from diffusers import WanTransformer3DModel

MIN_SAMPLE_SIGMA = 0.05  # a sample prediction read as a flow divides by sigma: not by less than this


def flow_from_sample(x_t: torch.Tensor, x0: torch.Tensor, t: torch.Tensor, T: int = 1000) -> torch.Tensor:
    """The flow (x_t - x0) / sigma that a clean-sample prediction x0 implies at timesteps t ((B,) or (B, F))."""
    sigma = (t.float() / T).clamp(min=MIN_SAMPLE_SIGMA).to(x_t.device)
    sigma = sigma.view(-1, 1, 1, 1, 1) if sigma.ndim == 1 else sigma.view(sigma.shape[0], 1, sigma.shape[1], 1, 1)
    return ((x_t.float() - x0.float()) / sigma).to(x0.dtype)


class BidirectionalWanTransformer3DModel(WanTransformer3DModel):
    prediction: str = "flow"

    def forward(self, hidden_states: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
                *args, return_dict: bool = True, **kwargs):
        out = super().forward(hidden_states, timestep, encoder_hidden_states, *args, return_dict=False, **kwargs)[0]
        if self.prediction == "sample":
            out = flow_from_sample(hidden_states, out, timestep)
        return (out,) if not return_dict else type(self)._output(out)

    @staticmethod
    def _output(sample: torch.Tensor):
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=sample)
