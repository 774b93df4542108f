"""The synthetic study's public stand-in for reference data: the ROI statistics' standardisation
that `slmfed simulate --dp-epsilon` and `slmfed bench dp` give the study (key roi-stats-reference)
when it sets none.

Made from a cohort that is not the study's (same generator, another seed, all 40 patients of both
centres, labels unused):
    slmfed synth --out ref --preset small --seed 2027
    slmfed prepare ref/center-primary --cache refcache/center-primary   (and center-external)
    slmfed roi-reference refcache/center-primary refcache/center-external
Because it comes from the same generator it matches the study's sites better than a real public
dataset would match a hospital's; simulation/README.md "Differential privacy" measures what a
reference off by one SD / a factor 2 costs.
"""
SYNTHETIC = ("0.312923,0.797179,0.32907,0.0823545,0.169728,0.0534149,"
             "0.138917,0.0301455,0.0441019,0.0223362,0.0134404,0.0151036")


def with_reference(study: dict) -> dict:
    """`study` with the synthetic reference when it names none (a study under DP needs one)."""
    return study if str(study.get("roi-stats-reference") or "") else {**study, "roi-stats-reference": SYNTHETIC}
