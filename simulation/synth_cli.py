"""`slmfed synth`: write the synthetic two-center cohort (stub until the generator lands)."""


def register(sub) -> None:
    p = sub.add_parser("synth", help="generate the synthetic two-center MRI cohort")
    p.set_defaults(func=lambda a: print("not implemented yet") or 1)
