"""The bidirectional teacher and critic: diffusers' Wan transformer, with the output read as a flow.

The module tree, weights and call are diffusers' `WanTransformer3DModel`; `prediction` (set from
model.prediction when built) says whether the network predicts the flow itself or clean latents that
are turned into the flow, so every caller sees a flow either way.
"""

from __future__ import annotations

import torch
from diffusers import WanTransformer3DModel

from sfpp_ray.algorithm.schedule import flow_from_sample


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
