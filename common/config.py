"""One config schema for the whole project, and the one helper that merges it.

Values come in layers, later layers win:
    defaults  <  Flower run_config  <  Flower node_config  <  TOML file  <  CLI flags
A run config may lack keys (Flower's public `run_simulation` API hands apps an empty one), so every
app and command reads its settings through `load_config`, never straight from the Context.

Keys are kebab-case everywhere (config files, run_config, node_config, CLI flags), with the same
name in code and docs. Unknown keys and wrong types are errors that name the key, the layer it
came from, what was expected and what was found.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping


class ConfigError(ValueError):
    """A config value is unknown or has the wrong type."""


@dataclass(frozen=True)
class Key:
    type: type
    default: Any
    help: str
    choices: tuple | None = None
    bounds: tuple | None = None  # (low, high) inclusive, for numbers


SCHEMA: dict[str, Key] = {
    # --- study protocol (ServerApp, run_config) ---
    "scenario": Key(str, "paper", "study design", ("paper", "federated", "multisite")),
    "seed": Key(int, 42, "seed for folds, initialisation and augmentation"),
    "folds": Key(int, 5, "cross-validation folds in the training cohort(s)", bounds=(2, 20)),
    "cv-repeats": Key(int, 1, "repeated cross-validation: R different fold assignments, each a full CV; per-repeat "
                              "AUCs, mean and SD", bounds=(1, 20)),
    "models": Key(str, "cf,dl,combined", "which of the three models to run (comma list)"),
    "combined-from": Key(str, "dl+cf", "the Combined model: dl+cf = this fit's DL model plus its CF model's clinical "
                                       "term, not trained further; cf = trained for num-rounds from the CF model",
                         ("dl+cf", "cf")),
    "cf-l2": Key(float, 0.0, "ridge penalty on the CF model's slopes (0 = plain maximum likelihood)"),
    "num-rounds": Key(int, 8, "federated rounds per DL model fit", bounds=(1, 1000)),
    "swa-rounds": Key(int, 4, "a DL fit's model is the mean of the global weights of its last N rounds (stochastic "
                              "weight averaging by the server; 0 = the last round's weights)", bounds=(0, 1000)),
    "local-epochs": Key(int, 2, "local epochs per round at each training site", bounds=(1, 100)),
    "batch-size": Key(int, 16, "local mini-batch size", bounds=(1, 1024)),
    "lr": Key(float, 1e-3, "AdamW learning rate", bounds=(1e-7, 1.0)),
    "weight-decay": Key(float, 1e-4, "AdamW weight decay", bounds=(0.0, 1.0)),
    "fedprox-mu": Key(float, 0.0, "FedProx proximal term (0 = plain FedAvg)", bounds=(0.0, 100.0)),
    "backbone": Key(str, "resnet10", "MONAI ResNet depth", ("resnet10", "resnet18", "resnet34")),
    "norm": Key(str, "instance", "normalisation layer", ("batch", "instance", "group")),
    "widen-factor": Key(float, 0.25, "ResNet stage widths are 64, 128, 256, 512 times this (MONAI widen_factor)",
                        bounds=(0.0625, 2.0)),
    "ensemble-size": Key(int, 3, "DL networks per fit, each trained on its own seed (initial weights, batch order, augmentation); the model's "
                                 "prediction is their mean logit (common/model.py EnsembleNet)", bounds=(1, 8)),
    "clinical-embed-dim": Key(int, 16, "width of the clinical embedding in the Combined model", bounds=(1, 256)),
    "augment": Key(bool, True, "MONAI augmentation during local training"),
    "augment-intensity": Key(float, 0.0, "augmentation: per-sample, per-channel random gain 1 +- x and offset +- x "
                                         "(0 = spatial augmentation only)", bounds=(0.0, 0.5)),
    "roi-stats": Key(bool, True, "the model also gets the ROI mean and SD of each input image channel, standardised over the training patients (needs the mask channel)"),
    "roi-pooling": Key(bool, True, "the model also pools its features inside the tumour ROI (needs the mask channel)"),
    "roi-stats-reference": Key(str, "", "the ROI statistics' standardisation from reference data outside the study: 12 comma "
                                        "numbers, the 6 means then the 6 SDs (slmfed roi-reference CACHE prints them); empty: "
                                        "pooled from the training sites' sums. A site under DP trains only with a reference"),
    "dp-train": Key(str, "auto", "what a site under DP-SGD trains: wide = only the linear terms on the ROI statistics (and "
                                 "the clinical vector, Combined), the image head's output fixed at 0, everything else at its "
                                 "seeded initial weights; all = every weight; auto = wide when the model has ROI statistics",
                    ("auto", "wide", "all")),
    "dp-lr": Key(float, 0.05, "AdamW learning rate of dp-train = wide (its few linear weights start at 0 and need to "
                              "grow within the planned steps; lr stays the rate of every other training)", bounds=(1e-7, 1.0)),
    "amp": Key(bool, True, "automatic mixed precision when training on CUDA"),
    "device": Key(str, "auto", "torch device: auto (CUDA when present), cpu, cuda, cuda:N"),
    "run-dir": Key(str, "runs/latest", "where the ServerApp writes the run folder"),
    "resume": Key(bool, False, "continue the study from the run folder's last checkpoint"),
    "eval-sites": Key(str, "center-external", "paper scenario: sites that only evaluate (comma list)"),
    "min-sites": Key(int, 2, "wait until this many sites are connected before starting"),
    "site-timeout-s": Key(float, 3600.0, "how long to wait for sites to connect / reply (seconds)"),
    "truth-file": Key(str, "", "synthetic cohort truth.json: the report puts oracle AUCs beside achieved"),
    "stop-after-rounds": Key(int, 0, "testing aid: stop after N DL rounds in this run (0 = never)"),
    "site-registry": Key(str, "", "deployment: the coordinator's site registry (deploy register-sites); only the "
                                  "nodes it records are enrolled, under its names (empty: sites name themselves)"),
    # --- fault tolerance (server/protocol.py Federation, server/robust.py) ---
    "site-retries": Key(int, 2, "times a site's failed or missing reply is asked again before it counts as away",
                        bounds=(0, 10)),
    "retry-backoff-s": Key(float, 5.0, "wait before the first retry; doubled for each further one (at most 300 s)",
                           bounds=(0.0, 300.0)),
    "min-train-sites": Key(int, 1, "a round goes on without away or rejected sites while at least this many "
                                   "training sites' updates remain; else the study stops, resumable", bounds=(1, 1000)),
    "aggregation": Key(str, "fedavg", "how accepted site weights are combined: fedavg (example-weighted mean), "
                                      "fedmedian (coordinate-wise median), trimmed-mean",
                       ("fedavg", "fedmedian", "trimmed-mean")),
    "trim-fraction": Key(float, 0.2, "trimmed-mean: fraction of the sites cut at each end, per coordinate",
                         bounds=(0.0, 0.49)),
    "max-update-ratio": Key(float, 10.0, "an update norm above this multiple of the other sites' median update "
                                         "norm this round (or of the global model's norm) is rejected",
                            bounds=(1.5, 1e6)),
    "smoke-run": Key(bool, False, "label the report a smoke run (`slmfed simulate --quick` sets it): its AUCs check "
                                  "that the pipeline runs, they are not a study result"),
    # --- simulation only: how a node of Flower's simulation runtime (node config: partition-id and
    # num-partitions, nothing else) finds its virtual site; client/simulated.py. Never read by a node with
    # its own node config, nor outside a Ray actor of the simulation runtime.
    "sim-sites": Key(str, "", "simulation: JSON list of the virtual sites' node configs, by partition-id "
                              "(`slmfed simulate` sends it)"),
    "sim-data": Key(str, "", "simulation: folder of site folders, one per node by partition-id (sorted), prepared "
                             "on first use; empty: the embedded synthetic cohort, generated under FLWR_HOME"),
    "sim-min-cell-size": Key(int, 0, "simulation with sim-data: the virtual sites' min-cell-size (0: the policy "
                                     "default)", bounds=(0, 10_000)),
    "sim-dp-epsilon": Key(float, 0.0, "simulation with sim-data: the virtual sites' dp-epsilon (0: no DP)",
                          bounds=(0.0, 100.0)),
    # --- site (ClientApp, node_config) ---
    "cache-dir": Key(str, "", "the site's prepared cache (output of `slmfed prepare`)"),
    "site-name": Key(str, "", "the site's name as the study refers to it"),
    "study-dir": Key(str, "", "site-local folder for per-patient predictions (default: CACHE/../study)"),
    "signing-key": Key(str, "", "the site's Ed25519 key that signs its contributions (common/signing.py; a site "
                                "bundle's study-signing.key)"),
    "peer-roster": Key(str, "", "the sites whose signed contributions this site accepts: a TOML file of site-name = "
                                "public key (a site bundle's peer-roster.toml; common/signing.py)"),
    # --- site privacy policy (ClientApp, node_config only: the run config can never set these) ---
    "min-cell-size": Key(int, 10, "k: every released statistic covers at least k patients of each class", bounds=(3, 10_000)),
    "histogram-bins": Key(int, 100, "finest grid of score summaries; cells are merged until each holds >= k",
                          bounds=(2, 100)),
    "share-histograms": Key(bool, True, "release k-safe per-class score histograms (pooled ROC, DCA, threshold)"),
    "max-logit-slope": Key(float, 10.0, "largest CF logit change per SD of a site feature the site evaluates",
                           bounds=(0.1, 1000.0)),
    "max-partitions": Key(int, 24, "distinct patient groups the site ever releases statistics for", bounds=(1, 10_000)),
    "max-studies": Key(int, 50, "distinct studies the site ever answers", bounds=(1, 100_000)),
    "privacy-ledger": Key(str, "", "the site's disclosure ledger (default: STUDY_DIR/disclosure-ledger.json)"),
    "dp-epsilon": Key(float, 0.0, "DP-SGD budget per study for the site's trained DL / Combined weights (0 = no DP; "
                                  "client/dp.py says what it covers)", bounds=(0.0, 100.0)),
    "dp-delta": Key(float, 1e-5, "DP delta per study; must stay below 1 / (10 x the site's patients)",
                    bounds=(1e-12, 1e-3)),
    "dp-clip-norm": Key(float, 1.0, "DP-SGD per-patient gradient L2 bound", bounds=(1e-3, 100.0)),
    "dp-lifetime-epsilon": Key(float, 10.0, "DP budget over the site's whole lifetime (every study's epsilon added up; "
                                            "applies whenever dp-epsilon > 0)", bounds=(0.01, 1000.0)),
    # what the coordinator may ask this site to compute (client/limits.py); defaults fit the paper protocol
    "allowed-backbones": Key(str, "resnet10,resnet18", "comma list of the ResNet depths the site trains / evaluates"),
    "max-widen-factor": Key(float, 1.0, "largest ResNet width the site builds", bounds=(0.01, 8.0)),
    "max-ensemble-size": Key(int, 5, "largest ensemble-size the site builds", bounds=(1, 8)),
    "max-epoch-patients": Key(int, 5000, "compute budget of one train request: local-epochs x ensemble-size x the "
                                         "site's patients", bounds=(1, 10_000_000)),
    "max-reply-mb": Key(float, 200.0, "largest model (weights, MB) the site trains and sends back",
                        bounds=(0.01, 100_000.0)),
    "max-rounds": Key(int, 50, "most federated rounds of one fit the site trains or evaluates", bounds=(1, 1000)),
    "min-batch-size": Key(int, 0, "smallest local batch the site trains with (0: min-cell-size, so an honest update "
                                  "never comes from fewer than k patients)", bounds=(0, 1024)),
    "max-fits-per-study": Key(int, 64, "most distinct fits (fit tag x fold) one study may train at the site",
                              bounds=(1, 10_000)),
    "max-evaluations-per-study": Key(int, 2000, "most distinct evaluations one study may ask of the site",
                                     bounds=(1, 1_000_000)),
    "max-evaluations": Key(int, 50_000, "most distinct evaluations the site answers over its lifetime",
                           bounds=(1, 100_000_000)),
    "span-audit": Key(str, "enforce", "the released-group audit (client/span_audit.py): enforce = refuse a group that "
                                      "would let a combination of releases concern fewer than k patients; report = "
                                      "answer and say so (the simulation's own virtual sites only)",
                      ("enforce", "report")),
    "model-verification": Key(str, "enforce", "client/verify.py: enforce = compute only on models the site derives "
                                              "itself from the study settings and signed contributions of its peer "
                                              "roster; off = any model (tests of the other rules only; deploy check "
                                              "refuses it)", ("enforce", "off")),
    # --- site preprocessing (`slmfed prepare`, site.toml) ---
    "input-mode": Key(str, "2d", "model input built from the volumes", ("2d", "2.5d", "3d")),
    "fov-mm": Key(float, 48.0, "physical in-plane field of view of the ROI crop (mm)"),
    "crop-size": Key(int, 64, "in-plane matrix of the crop (pixels)"),
    "crop-depth": Key(int, 32, "slices of the 3D crop"),
    "context-slices": Key(int, 1, "2.5d: neighbouring slices on each side of the largest-ROI slice"),
    "mask-channel": Key(bool, True, "give the model the tumour ROI mask as an input channel after T2WI, DWI, ADC"),
    "cea-unit": Key(str, "ng/mL", "unit of the CEA column", ("ng/mL", "ug/L")),
    "ca199-unit": Key(str, "U/mL", "unit of the CA19-9 column", ("U/mL", "kU/L")),
    "workers": Key(int, 1, "parallel worker processes for `slmfed prepare`"),
    "rigid-refine": Key(bool, False, "refine the DWI/ADC-to-T2 alignment with a rigid registration around the ROI"),
    "series-rules": Key(dict, {}, "site.toml table overriding the sequence-matching rules"),
    "roi-names": Key(str, "GTV,tumor,tumour,lesion", "comma list: the DICOM SEG segment / RTSTRUCT ROI used as "
                                                     "the tumour mask (whole word, case-insensitive, first wins)"),
    # --- the site's PACS (`slmfed fetch` only; checked by client/fetch.py, never part of the cache) ---
    "pacs": Key(dict, {}, "site.toml [pacs] table: the PACS `slmfed fetch` pulls the exams from (client/README.md)"),
}


# Basic-block depths of MONAI's resnet10 / resnet18 / resnet34 (common/model.py builds them; here so a
# site can bound a model's size without importing torch, client/limits.py)
BACKBONE_DEPTHS = {"resnet10": (1, 1, 1, 1), "resnet18": (2, 2, 2, 2), "resnet34": (3, 4, 6, 3)}
BACKBONE_WIDTHS = (64, 128, 256, 512)  # MONAI get_inplanes(), times widen-factor

# The site's privacy policy: read from the site's node config only (see client/policy.py).
SITE_POLICY_KEYS = ("min-cell-size", "histogram-bins", "share-histograms", "max-logit-slope", "max-partitions",
                    "max-studies", "dp-epsilon", "dp-delta", "dp-clip-norm", "dp-lifetime-epsilon", "allowed-backbones",
                    "max-widen-factor", "max-ensemble-size", "max-epoch-patients", "max-reply-mb", "max-rounds",
                    "min-batch-size", "max-fits-per-study", "max-evaluations-per-study", "max-evaluations", "span-audit",
                    "model-verification", "privacy-ledger")
# Keys that describe the site itself: a run config (the coordinator's) may never set them.
SITE_ONLY_KEYS = ("cache-dir", "site-name", "study-dir", "signing-key", "peer-roster") + SITE_POLICY_KEYS

# Training settings the server decides for every site and sends with each train / evaluate message
# (a site keeps its own device, paths and privacy settings).
SENT_MODEL_KEYS = ("backbone", "norm", "widen-factor", "roi-pooling", "roi-stats", "roi-stats-reference", "dp-train", "dp-lr", "ensemble-size", "clinical-embed-dim", "lr", "weight-decay",
                   "batch-size", "augment", "augment-intensity", "local-epochs", "fedprox-mu", "amp")


def coerce_value(key: str, value: Any, source: str, *, strict: bool = False) -> Any:
    """`value` of schema key `key` checked and converted; ConfigError names key, source, expected
    and found. `strict` accepts only the key's own type (an int for a float key), no text forms:
    for values that arrive in a message, where nothing needs converting."""
    if key not in SCHEMA:
        raise ConfigError(f"unknown config key '{key}' from {source}")
    if strict:
        want = SCHEMA[key].type
        ok = (isinstance(value, bool) if want is bool else
              isinstance(value, int) and not isinstance(value, bool) if want is int else
              isinstance(value, (int, float)) and not isinstance(value, bool) if want is float else
              isinstance(value, want))
        if not ok:
            raise ConfigError(f"config key '{key}' from {source}: expected {want.__name__}, found {value!r} "
                              f"({type(value).__name__})")
    return _coerce(key, value, source)


def _coerce(key: str, value: Any, source: str) -> Any:
    spec = SCHEMA[key]
    want = spec.type
    found = f"{value!r} ({type(value).__name__})"
    out: Any
    if want is bool:
        if isinstance(value, bool):
            out = value
        elif isinstance(value, str) and value.lower() in ("true", "1", "yes", "on"):
            out = True
        elif isinstance(value, str) and value.lower() in ("false", "0", "no", "off"):
            out = False
        elif isinstance(value, int) and value in (0, 1):
            out = bool(value)
        else:
            raise ConfigError(f"config key '{key}' from {source}: expected true/false, found {found}")
    elif want is int:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' from {source}: expected an integer, found {found}")
        try:
            out = int(value)
            if isinstance(value, float) and value != out:
                raise ValueError
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}' from {source}: expected an integer, found {found}") from None
    elif want is float:
        if isinstance(value, bool):
            raise ConfigError(f"config key '{key}' from {source}: expected a number, found {found}")
        try:
            out = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"config key '{key}' from {source}: expected a number, found {found}") from None
    elif want is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"config key '{key}' from {source}: expected a table, found {found}")
        out = dict(value)
    else:
        if not isinstance(value, str):
            raise ConfigError(f"config key '{key}' from {source}: expected text, found {found}")
        out = value
    if spec.bounds is not None and not spec.bounds[0] <= out <= spec.bounds[1]:
        raise ConfigError(
            f"config key '{key}' from {source}: expected a value in [{spec.bounds[0]}, {spec.bounds[1]}], found {out!r}"
        )
    if spec.choices is not None and out not in spec.choices and isinstance(out, str):
        # Names are matched without regard to case ('ng/ml' is ng/mL); the canonical spelling is kept.
        out = next((c for c in spec.choices if isinstance(c, str) and c.lower() == out.lower()), out)
    if spec.choices is not None and out not in spec.choices:
        raise ConfigError(
            f"config key '{key}' from {source}: expected one of {', '.join(map(str, spec.choices))}, "
            f"found {out!r}"
        )
    return out


def read_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML config file; a `[slmfed]` table is used when present, else the top level."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise ConfigError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {path} is not valid TOML: {exc}") from None
    return dict(data.get("slmfed", data))


def load_config(
    run_config: Mapping[str, Any] | None = None,
    node_config: Mapping[str, Any] | None = None,
    toml_path: str | Path | None = None,
    cli: Mapping[str, Any] | None = None,
    *,
    ignore_unknown_from: Iterable[str] = (),
) -> dict[str, Any]:
    """Merge defaults < run_config < node_config < TOML file < CLI flags into one checked dict.

    CLI values that are None (flags not given) are skipped. `ignore_unknown_from` names layers whose
    foreign keys are tolerated (Flower adds its own keys to node_config, e.g. partition-id).
    """
    cfg = {k: (dict(v.default) if isinstance(v.default, dict) else v.default) for k, v in SCHEMA.items()}
    tolerated = set(ignore_unknown_from)
    layers: list[tuple[str, Mapping[str, Any]]] = [
        ("run_config", run_config or {}),
        ("node_config", node_config or {}),
    ]
    if toml_path:
        layers.append((f"config file {toml_path}", read_toml(toml_path)))
    layers.append(("command line", {k: v for k, v in (cli or {}).items() if v is not None}))
    for source, layer in layers:
        for raw_key, value in layer.items():
            key = str(raw_key).replace("_", "-")
            if key not in SCHEMA:
                if source in tolerated:
                    continue
                raise ConfigError(
                    f"unknown config key '{raw_key}' from {source}; known keys: {', '.join(sorted(SCHEMA))}"
                )
            if source == "run_config" and key in SITE_ONLY_KEYS:
                raise ConfigError(
                    f"config key '{key}' from run_config: it belongs to the site (its node config), "
                    "the coordinator's run config cannot set it"
                )
            cfg[key] = _coerce(key, value, source)
    return cfg


def flower_run_config_defaults() -> dict[str, Any]:
    """The keys that belong in pyproject's [tool.flwr.app.config] (scalar study settings)."""
    study_keys = list(SCHEMA)[: list(SCHEMA).index("cache-dir")]
    return {k: SCHEMA[k].default for k in study_keys}


MODELS = ("cf", "dl", "combined")  # the study's three models, in protocol order


def model_list(cfg: Mapping[str, Any]) -> list[str]:
    """Parse the `models` key into a validated list, in protocol order."""
    names = [m.strip() for m in str(cfg["models"]).split(",") if m.strip()]
    bad = [m for m in names if m not in MODELS]
    if bad or not names:
        raise ConfigError(f"config key 'models': expected a comma list of cf, dl, combined, found {cfg['models']!r}")
    return [m for m in MODELS if m in names]


# --- how the apps get their settings -------------------------------------------------------------
# Through Flower's own channels only: the run config (`flwr run --run-config`, or the app config that
# simulation/runner.py hands to Flower's simulation runtime) and each SuperNode's node config. A
# simulated node, whose node config holds only Flower's partition keys, takes its site from the run
# config's `sim-sites` / `sim-data` (client/simulated.py; a real SuperNode never does).


def app_config(run_config: Mapping[str, Any], node_config: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The merged config of a ServerApp (node_config None) or ClientApp."""
    return load_config(run_config=dict(run_config or {}), node_config=dict(node_config or {}),
                       ignore_unknown_from=["node_config"])
