"""A per-stage summary of the U-Net (what ``cellseg model summary`` prints)."""

from __future__ import annotations

import torch

from cellseg.model.unet import UNet


def summarize(model: UNet, size: int) -> dict:
    """Run one ``size``x``size`` input through ``model``; report parameters and every stage's output shape."""
    stages: list[dict] = []

    def record(name, module):
        def hook(_module, _inputs, output):
            outputs = output if isinstance(output, (list, tuple)) else [output]
            for i, out in enumerate(outputs):
                label = f"{name}[{i}]" if len(outputs) > 1 else name
                stages.append({"stage": label, "shape": list(out.shape), "parameters": None})
            stages[-1]["parameters"] = sum(p.numel() for p in module.parameters())

        return module.register_forward_hook(hook)

    named = [("encoder", model.encoder), ("bridge", model.bridge)]
    named += [(f"block{i + 1}", b) for i, b in enumerate(model.blocks)]
    named += [("final_up", model.final_up), ("tail", model.tail), ("head", model.head)]
    handles = [record(name, module) for name, module in named]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = model(torch.zeros(1, model.in_channels, size, size))
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return {
        "parameters": sum(p.numel() for p in model.parameters()),
        "output_shape": list(out.shape),
        "stages": stages,
    }
