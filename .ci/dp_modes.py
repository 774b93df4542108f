"""Opacus grad-sample modes on the fusion model: samples/s of one DP-SGD step vs a plain step.

Measurement script behind client/dp.py's choice of mode (run by .ci/gpu_check.sh on 2 pinned cores):
python .ci/dp_modes.py THREADS MODES, e.g. `python .ci/dp_modes.py 2 none,hooks,functorch,ghost`.
Batch of 16 random 3x64x64 crops, 3 interleaved repeats of 4 s each, medians.
"""
import time, sys, torch, warnings
warnings.filterwarnings("ignore")
from torch import nn
from opacus import GradSampleModule
from opacus.optimizers import DPOptimizer
from opacus.validators import ModuleValidator
from common.model import FusionResNet
torch.set_num_threads(int(sys.argv[1]) if len(sys.argv)>1 else 2)
modes = sys.argv[2].split(",") if len(sys.argv)>2 else ["none","hooks","functorch","ew","ghost"]
B=16
x=torch.randn(B,3,64,64); z=torch.randn(B,7); y=(torch.rand(B)<0.3).float()
print("validator errors:", ModuleValidator.validate(FusionResNet(), strict=False))
res={}
for rep in range(3):
  for mode in modes:
    torch.manual_seed(0)
    net=FusionResNet().train()
    opt=torch.optim.AdamW(net.parameters(), lr=1e-3)
    if mode!="none":
        try:
            if mode=="ghost":
                from opacus.grad_sample import GradSampleModuleFastGradientClipping
                from opacus.optimizers import DPOptimizerFastGradientClipping
                gm=GradSampleModuleFastGradientClipping(net, max_grad_norm=1.0, use_ghost_clipping=True, loss_reduction="mean")
                opt=DPOptimizerFastGradientClipping(opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=B, loss_reduction="mean")
                from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
                crit=DPLossFastGradientClipping(gm, opt, nn.BCEWithLogitsLoss(reduction="mean"), loss_reduction="mean")
            else:
                gm=GradSampleModule(net, batch_first=True, loss_reduction="mean", force_functorch=(mode=="functorch")) if mode!="ew" else __import__("opacus.grad_sample",fromlist=["x"]).GradSampleModuleExpandedWeights(net, batch_first=True, loss_reduction="mean")
                opt=DPOptimizer(opt, noise_multiplier=1.0, max_grad_norm=1.0, expected_batch_size=B)
        except Exception as e:
            print(mode, "setup fails:", type(e).__name__, str(e)[:200]); modes.remove(mode); continue
    else:
        gm=net
    def step():
        opt.zero_grad()
        out=gm(x,z)
        if mode=="ghost":
            loss=crit(out,y); loss.backward()
        else:
            loss=nn.functional.binary_cross_entropy_with_logits(out,y); loss.backward()
        opt.step()
    try:
        step()
        t=time.perf_counter(); n=0
        while time.perf_counter()-t<4: step(); n+=1
        res.setdefault(mode,[]).append(n*B/(time.perf_counter()-t))
    except Exception as e:
        print(mode, "fails:", type(e).__name__, str(e)[:300]); modes.remove(mode)
import statistics
base=statistics.median(res["none"])
for m,v in res.items(): print(f"{m:10s} {statistics.median(v):7.1f} samples/s  ratio {statistics.median(v)/base:.2f}")
