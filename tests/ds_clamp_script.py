"""Run under `accelerate launch --use_deepspeed`: push a CLIP-style logit scale past its cap for three
optimizer steps, clamping after each, then pull it down once. If the clamp reached only ``param.data``
and not DeepSpeed's fp32 master copy, the master would have drifted to cap + 3 lr and the down-step
would leave the value at the cap instead of cap - lr. Does it under ZeRO-2, then ZeRO-3 (one launch: one
interpreter start-up and one import of DeepSpeed for both) and prints each final value on the main process."""
import math
import os
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import InitProcessGroupKwargs

from helpers import exit_cleanly, reset_accelerate
from visrep.clip import clamp_logit_scale

CAP = math.log(100.0)


class Scale(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(4, 4)
        self.logit_scale = torch.nn.Parameter(torch.full((1,), CAP - 0.5))

    def forward(self, x):
        return self.lin(x).sum() * 0.0 + self.logit_scale.sum()


def final_value(stage: int) -> tuple[Accelerator, float]:
    os.environ["ACCELERATE_DEEPSPEED_ZERO_STAGE"] = str(stage)
    reset_accelerate()
    acc = Accelerator(kwargs_handlers=[InitProcessGroupKwargs(backend="gloo")])
    assert acc.state.deepspeed_plugin.zero_stage == stage
    acc.state.deepspeed_plugin.deepspeed_config["gradient_clipping"] = 0.0
    model = Scale()
    opt = torch.optim.SGD(model.parameters(), lr=1.0)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.zeros(8, 4)), batch_size=2)
    model, opt, loader = acc.prepare(model, opt, loader)
    x = torch.zeros(2, 4)
    for direction in (-1.0, -1.0, -1.0, +1.0):  # minimise -s (push up) three times, then +s (pull down)
        loss = direction * model(x)
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
        clamp_logit_scale(acc.unwrap_model(model), CAP)
    net = acc.unwrap_model(model)
    if stage == 3:  # partitioned: gather the whole parameter to read it
        import deepspeed

        with deepspeed.zero.GatheredParameters([net.logit_scale]):
            return acc, float(net.logit_scale.detach().reshape(-1)[0])
    return acc, float(net.logit_scale.detach().reshape(-1)[0])


for stage in map(int, sys.argv[1:]):
    acc, value = final_value(stage)
    if acc.is_main_process:
        print(f"FINAL{stage} {value:.6f} EXPECTED {CAP - 1.0:.6f}")
        sys.stdout.flush()
    acc.wait_for_everyone()
exit_cleanly(acc)
