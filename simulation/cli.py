"""`slmfed simulate` (stub until its issue lands)."""


def register(sub) -> None:
    p = sub.add_parser("simulate", help="run the federated study on one machine")
    p.set_defaults(func=lambda a: print("not implemented yet") or 1)
