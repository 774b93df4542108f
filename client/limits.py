"""What the coordinator may ask this site to compute: the site's caps on models, compute and replies.

Why: a coordinator chooses the training settings it sends (backbone, width, ensemble, epochs,
rounds). Unbounded, one train request could take a hospital's machine for hours and send back
gigabytes (resnet34 x width 2 x 8 networks x 100 epochs: about 3.6 CPU-hours on 28 patients, 2.7 GB),
and a batch of one patient makes one patient's update an exact function of that patient. The caps
live in the site's policy (node config / bundle `[privacy]`, client/policy.py); the defaults fit the
paper protocol with room to spare.

`check_request` runs in the ClientApp right after the request is validated and before the site's
cache is opened: a request over a cap is refused (rule named) having read no patient data, only the
manifest's patient count, image shape and channel names. The per-study and lifetime counts (fits,
evaluations) are charged in the Gate's ledger transaction (client/disclosure.py `Gate.count`).
"""
from __future__ import annotations

from typing import Any, Mapping

from client.disclosure import Refused

MB = 1_000_000
COUNT_STEP = 50  # the compute budget counts the site's patients rounded up to a multiple of this


def min_batch(policy) -> int:
    """The site's batch-size floor: its own setting, or k."""
    return int(policy.min_batch_size) or int(policy.min_cell_size)


def check_model(policy, req: Mapping[str, Any]) -> None:
    """The model the settings describe is one the site builds (allow-list, width, ensemble)."""
    allowed = [b.strip() for b in str(policy.allowed_backbones).split(",") if b.strip()]
    if req["backbone"] not in allowed:
        raise Refused("model-caps", f"backbone {req['backbone']!r} is not in this site's allowed-backbones "
                                    f"({', '.join(allowed)})")
    if float(req["widen-factor"]) > float(policy.max_widen_factor):
        raise Refused("model-caps", f"widen-factor {req['widen-factor']:g} is over this site's max-widen-factor "
                                    f"{policy.max_widen_factor:g}")
    if int(req["ensemble-size"]) > int(policy.max_ensemble_size):
        raise Refused("model-caps", f"ensemble-size {req['ensemble-size']} is over this site's max-ensemble-size "
                                    f"{policy.max_ensemble_size}")
    if int(req["num-rounds"]) > int(policy.max_rounds):
        raise Refused("rounds-per-fit", f"num-rounds {req['num-rounds']} is over this site's max-rounds "
                                        f"{policy.max_rounds}")


def model_bytes(cfg: Mapping[str, Any], manifest: Mapping[str, Any], n_features: int, use_clinical: bool) -> int:
    """Bytes of the weights a train reply carries, from the settings alone (built on the meta device:
    no memory, no patient data)."""
    import torch

    from common.model import build_model

    shape = manifest.get("image_shape") or [1]
    with torch.device("meta"):
        one = build_model({**cfg, "ensemble-size": 1}, int(shape[0]), int(manifest.get("spatial_dims", 2)),
                          n_features, use_clinical=use_clinical, channels=manifest.get("channels"))
    per_member = sum(v.numel() * v.element_size() for v in one.state_dict().values())
    return per_member * int(cfg.get("ensemble-size", 1))


def backbone_bytes_lower_bound(cfg: Mapping[str, Any], manifest: Mapping[str, Any]) -> int:
    """A lower bound on a train reply's bytes without torch: the second 3x3 convolution of every basic
    block (planes x planes x 3^dims float32 weights), which every backbone of common/model.py has,
    times the ensemble. A request over the cap on this bound alone is refused in milliseconds (a cold
    ClientApp process has not imported torch yet); else model_bytes counts exactly."""
    from common.config import BACKBONE_DEPTHS, BACKBONE_WIDTHS

    depths = BACKBONE_DEPTHS.get(str(cfg.get("backbone")))
    if depths is None:
        return 0
    kernel = 3 ** int(manifest.get("spatial_dims", 2))
    planes = [int(w * float(cfg.get("widen-factor", 1.0))) for w in BACKBONE_WIDTHS]
    per_member = sum(n * p * p * kernel * 4 for n, p in zip(depths, planes))
    return per_member * int(cfg.get("ensemble-size", 1))


def check_request(message_type: str, req: Mapping[str, Any], policy, manifest: Mapping[str, Any],
                  n_features: int) -> None:
    """Refuse a train / evaluate request over the site's caps (Refused, rule named)."""
    if message_type not in ("train", "evaluate") or req.get("model") == "cf":
        return
    check_model(policy, req)
    if message_type != "train":
        return
    if int(req["batch-size"]) < min_batch(policy):
        raise Refused("batch-size-floor", f"batch-size {req['batch-size']} is below this site's floor "
                                          f"{min_batch(policy)} (an update from fewer patients than that)")
    # the count at a coarse resolution: whether this refuses may not tell a withheld cohort's size
    patients = -(-int(manifest.get("counts", {}).get("included", 0)) // COUNT_STEP) * COUNT_STEP
    work = int(req["local-epochs"]) * int(req["ensemble-size"]) * patients
    if work > int(policy.max_epoch_patients):
        raise Refused("compute-budget", f"local-epochs {req['local-epochs']} x ensemble-size {req['ensemble-size']} "
                                        f"x this site's patients (rounded up to {COUNT_STEP}) is over its max-epoch-patients "
                                        f"{policy.max_epoch_patients}")
    bound = backbone_bytes_lower_bound(req, manifest)
    size = bound if bound > float(policy.max_reply_mb) * MB else model_bytes(
        req, manifest, n_features, use_clinical=req["model"] == "combined")
    if size > float(policy.max_reply_mb) * MB:
        raise Refused("reply-size", f"the model's weights ({'at least ' if size == bound else ''}{size / MB:.1f} MB) "
                                    f"are over this site's max-reply-mb "
                                    f"{policy.max_reply_mb:g}")
