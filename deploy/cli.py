"""`slmfed deploy` (stub until its issue lands)."""


def register(sub) -> None:
    p = sub.add_parser("deploy", help="certificates, keys and configs for a deployment")
    p.set_defaults(func=lambda a: print("not implemented yet") or 1)
