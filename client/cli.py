"""`slmfed prepare` (stub until its issue lands)."""


def register(sub) -> None:
    p = sub.add_parser("prepare", help="turn a site folder into a checked cache")
    p.set_defaults(func=lambda a: print("not implemented yet") or 1)
